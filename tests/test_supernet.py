"""PromptedViT: weight entanglement, extraction, exact parameter counts, frozen backbone,
gradient checkpointing, and that it learns."""

import math
import random

import pytest
import timm
import torch
import torch.nn.functional as F

from noah_ray.errors import ConfigError
from noah_ray.nn.backbones import register_tiny_models
from noah_ray.nn.supernet import PromptedViT
from noah_ray.space import ModuleSpace, SearchSpace, SubnetConfig

register_tiny_models()  # timm.create_model on the tiny ViT below

MODEL = "vit_noah_tiny_patch4_32"
ALL4 = SearchSpace({m: ModuleSpace(widths=(1, 5, 10)) for m in ("vpt", "lora", "adapter", "kv_prompt")})


def _randomise_modules(net: PromptedViT, seed: int = 0) -> None:
    """Modules start as identity (zero LoRA B / adapter up); give them real values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def supernet():
    torch.manual_seed(0)
    net = PromptedViT.supernet(MODEL, 10, ALL4).eval()
    _randomise_modules(net)
    return net


def test_extracted_subnet_matches_supernet_logits(supernet):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    rng = random.Random(0)
    for _ in range(12):
        cfg = ALL4.sample(rng)
        supernet.set_active(cfg)
        with torch.no_grad():
            y_super = supernet(x)
            y_sub = supernet.extract(cfg).eval()(x)
        assert torch.allclose(y_super, y_sub, atol=1e-5, rtol=0), cfg.to_dict()


def test_different_subnets_give_different_outputs(supernet):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        supernet.set_active(ALL4.smallest())
        a = supernet(x)
        supernet.set_active(ALL4.largest())
        b = supernet(x)
    assert not torch.allclose(a, b, atol=1e-3)


def test_param_count_equals_materialised_subnet(supernet):
    rng = random.Random(5)
    for _ in range(12):
        cfg = ALL4.sample(rng)
        sub = supernet.extract(cfg)
        count = cfg.param_count(supernet.shape, supernet.kv_shared)
        materialised = sub.num_trainable()
        assert {m: materialised[m] for m in count.per_module} == count.per_module
        assert materialised["head"] == count.head
        assert sum(p.numel() for p in sub.parameters() if p.requires_grad) == count.total


def test_all_widths_zero_is_the_plain_frozen_vit():
    torch.manual_seed(0)
    plain = timm.create_model(MODEL, num_classes=7).eval()
    net = PromptedViT(timm.create_model(MODEL, num_classes=7), SubnetConfig.empty(12)).eval()
    net.load_state_dict(_wrap_keys(plain.state_dict(), net), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain(x), net(x), atol=1e-6)
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 48 * 7 + 7


def _wrap_keys(plain_state, net):
    """Map plain timm keys onto the wrapped model's key names (blocks.N.attn.x -> ...)."""
    out = {}
    for k in net.state_dict():
        plain_key = (k.removeprefix("vit.").replace(".block.", ".", 1).replace("attn.attn.", "attn."))
        out[k] = plain_state[plain_key]
    return out


def test_full_supernet_with_zero_init_modules_equals_backbone():
    torch.manual_seed(3)
    net = PromptedViT.supernet(MODEL, 5, SearchSpace({"lora": ModuleSpace(), "adapter": ModuleSpace()}),
                               recipe="modern").eval()   # zero LoRA B and adapter up (NOAH's adapter is no identity)
    plain = net.backbone().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net(x), plain(x), atol=1e-6)


def test_only_modules_and_head_get_gradients(supernet):
    net = supernet.extract(ALL4.largest()).train()
    loss = F.cross_entropy(net(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, p in net.named_parameters():
        is_module = any(t in name for t in ("lora_", "adapter.", "prompts", "kv_prompt.")) or name.startswith("vit.head.")
        assert p.requires_grad == is_module, name
        if is_module:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("fused,blocks", [(True, None), (False, None), (True, 5), (True, 0)],
                         ids=["sdpa-all", "explicit-all", "sdpa-first5", "sdpa-none"])
def test_grad_checkpointing_gives_same_loss_and_gradients(supernet, fused, blocks):
    """Every block, the first 5 of 12 or none checkpointed: the same loss and gradients."""
    cfg = ALL4.sample(random.Random(11))
    net = supernet.extract(cfg).train()
    net.set_fused_attn(fused)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])

    def run(ckpt: bool):
        net.zero_grad()
        net.set_grad_checkpointing(ckpt, blocks)
        torch.manual_seed(0)  # the same dropout masks in both runs (recomputation replays them)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}

    l0, g0 = run(False)
    l1, g1 = run(True)
    assert torch.allclose(l0, l1, atol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6), n


def test_fused_and_explicit_attention_agree(supernet):
    cfg = ALL4.sample(random.Random(12))
    supernet.set_active(cfg)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        supernet.set_fused_attn(True)
        a = supernet(x)
        supernet.set_fused_attn(False)
        b = supernet(x)
        supernet.set_fused_attn(True)
    assert torch.allclose(a, b, atol=1e-5)


def test_bf16_autocast_runs_and_stays_close(supernet):
    supernet.set_active(ALL4.largest())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = supernet(x)
        supernet.set_precision("bf16")
        out = supernet(x)
        supernet.set_precision("fp32")
    assert out.dtype == torch.bfloat16
    assert torch.allclose(ref, out.float(), atol=0.1)
    with pytest.raises(ConfigError, match="precision 'fp8' unknown"):
        supernet.set_precision("fp8")


def test_width_above_capacity_is_refused(supernet):
    with pytest.raises(ConfigError, match="vpt layer 0: width 11 exceeds the model's capacity 10"):
        supernet.set_active(SubnetConfig({"vpt": [11] + [0] * 11}))


def _stripes_task(n: int, seed: int):
    """Class = stripe orientation (0, 45, 90, 135 degrees) with random phase and noise.

    A randomly initialised (frozen) ViT mixes tokens almost uniformly, so tasks that hinge on
    *where* something is are out of reach without pretraining; texture survives the mixing.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    ii, jj = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    angle = y.float() * math.pi / 4
    phase = torch.rand(n, generator=g) * 2 * math.pi
    proj = torch.cos(angle)[:, None, None] * ii + torch.sin(angle)[:, None, None] * jj
    img = torch.sin(2 * math.pi / 6 * proj + phase[:, None, None])
    return img[:, None].repeat(1, 3, 1, 1) + 0.3 * torch.randn(n, 3, 32, 32, generator=g), y


@pytest.mark.slow
def test_training_a_random_subnet_per_step_learns():
    torch.manual_seed(0)
    space = SearchSpace({m: ModuleSpace(widths=(1, 5, 10)) for m in ("vpt", "lora", "adapter")})
    net = PromptedViT.supernet(MODEL, 4, space)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=3e-3)
    xtr, ytr = _stripes_task(512, 0)
    xte, yte = _stripes_task(256, 1)
    rng = random.Random(0)
    net.train()
    for _ in range(120):  # ~100 steps reach 100% here; 120 leaves a margin
        idx = torch.randint(0, len(xtr), (32,))
        net.set_active(space.sample(rng))
        loss = F.cross_entropy(net(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval().set_active(space.largest())
    with torch.no_grad():
        acc = (net(xte).argmax(-1) == yte).float().mean().item()
    assert acc > 0.8, f"accuracy {acc:.2f} not well above chance (0.25)"
