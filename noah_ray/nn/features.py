"""Training a head on cached features: when only the classifier head of a model trains (the
``linear`` probe) and nothing before it is random, each image's pre-logit features are the same
in every epoch and every run on the same backbone, so they are computed once and the epochs run
on them.

The training is the same as on the images: the head sees the same feature values (computed by
the same modules; only the batches the frozen part ran in differ, which can move a value by the
last bits of float rounding), the loader built over the features is built as the image loader
was (same batch size, order, sampler and random draws), and computing the features draws no
random number.  :func:`frozen_below_head` says when this holds; the Ray Train workers
(:mod:`noah_ray.train.worker`) use it for every retraining run it holds for.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

#: modules whose forward draws random numbers in training mode, with the attribute holding their
#: rate (torch's dropouts, timm's DropPath and PatchDropout)
_RANDOM_RATES = {"Dropout": "p", "Dropout1d": "p", "Dropout2d": "p", "Dropout3d": "p", "AlphaDropout": "p",
                 "FeatureAlphaDropout": "p", "DropPath": "drop_prob", "PatchDropout": "prob"}


def frozen_below_head(model: Any) -> bool:
    """Whether ``model`` (a :class:`~noah_ray.nn.supernet.PromptedViT`) trains its classifier head
    only and computes the head's input without randomness or training-mode state: no parameter
    outside the head requires a gradient, no prompt module is active, no dropout / drop-path /
    patch-dropout outside the head has a rate above 0, and there is no batch norm."""
    from noah_ray.nn.modules import REGISTRY

    head = model.vit.get_classifier()
    in_head = {id(p) for p in head.parameters()}
    if any(p.requires_grad and id(p) not in in_head for p in model.parameters()):
        return False
    kinds = tuple(REGISTRY.values())
    for m in model.modules():
        if isinstance(m, kinds) and m.active > 0:
            return False
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return False
        rate = _RANDOM_RATES.get(type(m).__name__)
        if rate is not None and float(getattr(m, rate, 0.0) or 0.0) > 0.0:
            return False
    return True


def pre_logit_dataset(model: Any, dataset: Dataset, batch_size: int, device: torch.device) -> TensorDataset:
    """``(features, labels)`` of every item of ``dataset`` in order: ``model.pre_logits`` in eval
    mode, without gradients, on ``device``; kept on the CPU, as the images were.  The random number
    generators are left as they were."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    devices = [device] if device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):
            feats.append(model.pre_logits(x.to(device)).cpu())
            labels.append(y)
    model.train(was_training)
    return TensorDataset(torch.cat(feats), torch.cat(labels))


class HeadOnly(nn.Module):
    """The model's classifier head as a module of its own: ``forward`` takes
    :meth:`~noah_ray.nn.supernet.PromptedViT.pre_logits` features (what the cached loaders yield).
    It holds the model, so ``train()`` / ``eval()`` and its parameters are the model's."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.model.head_logits(f)
