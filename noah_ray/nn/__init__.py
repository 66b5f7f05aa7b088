"""The torch side, no Ray: timm backbones and checkpoint readers (:mod:`.backbones`), the
``PromptedViT`` supernet (:mod:`.supernet`), the prompt modules (:mod:`.modules`), E2VPT pruning
(:mod:`.prune`), model construction for every stage (:mod:`.models`), the optimiser and
checkpoints (:mod:`.optim`), one training epoch (:mod:`.epoch`), backbone pretraining
(:mod:`.pretrain`) and glibc's handling of freed memory in a training process
(:mod:`.malloc`).  Above ``data``.
"""
