"""Weight-decay groups follow timm's rule (through ``timm.optim``), in the layout checkpoints hold."""

import pytest
import torch

from noah_ray.nn import optim
from noah_ray.nn.backbones import create_backbone
from noah_ray.nn.supernet import PromptedViT
from noah_ray.space import SubnetConfig

pytestmark = pytest.mark.usefixtures("one_thread")

#: timm's ``VisionTransformer.no_weight_decay()``, under PromptedViT's ``vit.`` prefix
TOKENS = {"vit.pos_embed", "vit.cls_token", "vit.reg_token", "vit.dist_token"}


def _no_decay(name: str, p: torch.Tensor) -> bool:
    """The rule: no decay for 1-D parameters (norm weights), biases and the token embeddings."""
    return p.ndim <= 1 or name.endswith(".bias") or name in TOKENS


@pytest.mark.parametrize("weight_decay", [0.05, 0.0])
def test_groups_follow_the_no_decay_rule_with_the_decay_group_first(weight_decay):
    torch.manual_seed(0)
    vit = create_backbone("vit_noah_tiny_patch4_32", 5, reg_tokens=1, depth=2)
    cfg = SubnetConfig.uniform(2, vpt=2, lora=2, adapter=2, kv_prompt=2)
    model = PromptedViT(vit, cfg, train_backbone=True)
    groups = optim.param_groups(model, weight_decay)
    assert [g["weight_decay"] for g in groups] == [weight_decay, 0.0]  # two groups even at 0
    names = {id(p): n for n, p in model.named_parameters()}
    want_decay = [n for n, p in model.named_parameters() if p.requires_grad and not _no_decay(n, p)]
    want_free = [n for n, p in model.named_parameters() if p.requires_grad and _no_decay(n, p)]
    assert [names[id(p)] for p in groups[0]["params"]] == want_decay  # model order inside a group
    assert [names[id(p)] for p in groups[1]["params"]] == want_free
    assert {"vit.reg_token", "vit.pos_embed", "vit.cls_token"} <= set(want_free)
    assert "vit.blocks.0.vpt.prompts" in want_decay and "vit.blocks.0.block.attn.attn.qkv.base.weight" in want_decay


def test_frozen_backbone_groups_hold_only_modules_and_head():
    torch.manual_seed(0)
    model = PromptedViT(create_backbone("vit_noah_tiny_patch4_32", 5, depth=2),
                        SubnetConfig.uniform(2, lora=2, adapter=3))
    decay, free = optim.param_groups(model, 1e-4)
    n_train = sum(p.requires_grad for p in model.parameters())
    assert len(decay["params"]) + len(free["params"]) == n_train
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in free["params"])


def test_adamw_is_fused_on_cpu_and_takes_the_decoupled_weight_decay_step():
    """One step against AdamW written out (Loshchilov & Hutter; torch's bias-corrected form):
    p <- p (1 - lr wd); m = (1 - b1) g; v = (1 - b2) g^2; p <- p - lr m_hat / (sqrt(v_hat) + eps)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    opt = optim.adamw(model, lr=0.1, weight_decay=0.5)
    assert opt.defaults["fused"] is True
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    opt.step()
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    for n, p in model.named_parameters():
        wd = 0.5 if n == "weight" else 0.0                    # biases: the no-decay group
        g = grads[n]
        m_hat, v_hat = (1 - b1) * g / (1 - b1), (1 - b2) * g * g / (1 - b2)
        want = before[n] * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)
        assert torch.allclose(p.detach(), want, atol=1e-12, rtol=0), n


def test_a_checkpoint_of_the_for_loop_adamw_resumes_into_the_fused_one():
    """Checkpoints written before the fused kernel carry ``fused: None``; loading one keeps the
    optimiser as built (fused), with the saved moments."""
    model = torch.nn.Linear(4, 3)
    old = torch.optim.AdamW(optim.param_groups(model, 0.1), lr=0.1)   # as written by earlier versions
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    old.step()
    tensors, data = optim.optimizer_state(old)
    new = optim.adamw(model, lr=0.1, weight_decay=0.1)
    optim.load_optimizer_state(new, tensors, data)
    assert all(g["fused"] is True for g in new.param_groups)
    assert torch.equal(new.state[model.weight]["exp_avg"], old.state[model.weight]["exp_avg"])
