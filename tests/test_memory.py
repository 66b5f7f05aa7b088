"""Memory switches of PromptedViT: fused SDPA attention, per-block non-reentrant gradient
checkpointing, bf16 / fp16 autocast (with the fp16 GradScaler helper).

Each switch must leave the fp32 loss and gradients equal to the plain path (explicit attention,
no checkpointing) with VPT-Deep prompts (different counts per layer, pass-through layers),
E2VPT key/value prompts (shared and separate), LoRA and adapters all active; dropout runs on the
fused path only while training; and checkpointing must really lower the peak memory of a
training step (peak RSS of a fresh subprocess, since CPU tensors are invisible to tracemalloc).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from noah_ray.nn.backbones import create_backbone
from noah_ray.nn.supernet import PromptedViT
from noah_ray.space import SubnetConfig

MODEL = "vit_noah_tiny_patch4_32"
CFG = SubnetConfig({"vpt": [3, 0, 5, 1, 0, 0, 7, 2, 0, 0, 4, 0],
                    "kv_prompt": [2, 4, 0, 1, 0, 3, 6, 0, 5, 0, 1, 0],
                    "lora": [2, 0, 4, 0, 1, 0, 0, 3, 0, 0, 0, 2],
                    "adapter": [0, 3, 0, 0, 2, 0, 5, 0, 0, 1, 0, 0]})


pytestmark = pytest.mark.usefixtures("one_thread")  # in-process torch on one thread (conftest)


def _net(kv_shared: bool = False, seed: int = 0, **timm_kwargs) -> PromptedViT:
    torch.manual_seed(seed)
    net = PromptedViT(create_backbone(MODEL, 6, **timm_kwargs), CFG, kv_shared=kv_shared)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # LoRA / adapter up-projections start at zero: give them values
        for p in net.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net.train()


def _data(n: int = 6, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 6, (n,), generator=g)


def _step(net: PromptedViT, x, y, *, fused: bool, ckpt: bool, seed: int = 0):
    net.set_fused_attn(fused)
    net.set_grad_checkpointing(ckpt)
    net.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same dropout / drop-path draws for both paths
    loss = F.cross_entropy(net(x).float(), y)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _assert_same(a, b, atol: float) -> None:
    (la, ga), (lb, gb) = a, b
    assert torch.allclose(la, lb, rtol=0, atol=atol), (la.item(), lb.item())
    assert ga.keys() == gb.keys() and len(ga) > 10
    for n in ga:
        assert gb[n].abs().sum() > 0, f"{n}: no gradient"
        assert torch.allclose(ga[n], gb[n], rtol=1e-4, atol=atol), f"{n}: max diff {(ga[n] - gb[n]).abs().max()}"


@pytest.mark.parametrize("kv_shared", [False, True], ids=["kv-separate", "kv-shared"])
@pytest.mark.parametrize("fused,ckpt", [(True, False), (False, True), (True, True)],
                         ids=["sdpa", "checkpointing", "sdpa+checkpointing"])
def test_switch_leaves_loss_and_gradients_equal(kv_shared, fused, ckpt):
    net = _net(kv_shared)
    x, y = _data()
    plain = _step(net, x, y, fused=False, ckpt=False)
    _assert_same(plain, _step(net, x, y, fused=fused, ckpt=ckpt), atol=2e-6)


def test_prompt_inputs_actually_matter():
    """Guards the test above: the prompts and their per-layer counts change the loss."""
    net = _net()
    x, y = _data()
    base = _step(net, x, y, fused=False, ckpt=False)[0]
    with torch.no_grad():
        net.module("vpt", 6).prompts.mul_(-1)
        net.module("kv_prompt", 8).key.mul_(-1)
    assert not torch.allclose(base, _step(net, x, y, fused=False, ckpt=False)[0], atol=1e-4)


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
def test_checkpointing_is_exact_with_dropout_and_drop_path(fused):
    """Non-reentrant checkpointing replays the RNG: the recomputed forward draws the same
    attention-dropout, projection-dropout and drop-path masks."""
    net = _net(attn_drop_rate=0.2, proj_drop_rate=0.1, drop_path_rate=0.2)
    x, y = _data()
    off = _step(net, x, y, fused=fused, ckpt=False, seed=7)
    on = _step(net, x, y, fused=fused, ckpt=True, seed=7)
    _assert_same(off, on, atol=2e-6)
    # and the dropout is really on: another seed gives another loss
    assert not torch.allclose(off[0], _step(net, x, y, fused=fused, ckpt=True, seed=8)[0], atol=1e-5)


def test_fused_attention_dropout_only_in_training():
    net = _net(attn_drop_rate=0.5)
    x, _ = _data(4)
    with torch.no_grad():
        net.eval()
        net.set_fused_attn(True)
        a, b = net(x), net(x)
        net.set_fused_attn(False)
        c = net(x)
        assert torch.equal(a, b), "fused eval forward is not deterministic: dropout ran at eval"
        assert torch.allclose(a, c, atol=1e-5), "fused and explicit eval outputs differ"
        net.train()
        net.set_fused_attn(True)
        d, e = net(x), net(x)
    assert not torch.allclose(d, e, atol=1e-4), "no attention dropout while training on the fused path"
    assert not torch.allclose(d, a, atol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_autocast_stays_close_with_fp32_grads(precision):
    net = _net()
    x, y = _data()
    ref_loss, ref_grads = _step(net, x, y, fused=False, ckpt=False)
    net.set_precision(precision)
    loss, grads = _step(net, x, y, fused=True, ckpt=True)
    net.set_precision("fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.no_grad():
        net.set_precision(precision)
        assert net(x).dtype == dtype  # autocast really ran
        net.set_precision("fp32")
    assert abs(loss.item() - ref_loss.item()) < 0.05 * max(1.0, abs(ref_loss.item()))
    flat = torch.cat([g.flatten() for g in grads.values()])
    ref = torch.cat([g.flatten() for g in ref_grads.values()])
    assert all(g.dtype == torch.float32 for g in grads.values())
    assert torch.isfinite(flat).all()
    assert F.cosine_similarity(flat, ref, dim=0) > 0.98
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_grad_scaler_helper_is_enabled_for_fp16_only_and_trains():
    net = _net()
    for precision, enabled in (("fp32", False), ("bf16", False), ("fp16", True)):
        net.set_precision(precision)
        assert net.grad_scaler("cpu").is_enabled() == enabled
    x, y = _data()
    scaler = net.grad_scaler("cpu")
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    before = net.module("vpt", 0).prompts.detach().clone()
    scales = []
    for _ in range(40):  # overflowing steps are skipped and the scale drops until one fits
        opt.zero_grad(set_to_none=True)
        scaler.scale(F.cross_entropy(net(x).float(), y)).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        if not torch.equal(before, net.module("vpt", 0).prompts):
            break
    assert not torch.equal(before, net.module("vpt", 0).prompts), scales
    assert torch.isfinite(net.module("vpt", 0).prompts).all()
    assert 0 < scales[-1] <= 2.0 ** 16


def test_extract_keeps_the_switches():
    net = _net()
    net.set_fused_attn(False)
    net.set_grad_checkpointing(True, 4)
    net.set_precision("bf16")
    sub = net.extract(SubnetConfig({m: [min(w, 1) for w in ws] for m, ws in CFG.to_dict().items()}))
    assert sub.grad_checkpointing and sub.checkpoint_blocks == 4 and sub.precision == "bf16"
    assert not any(b.block.attn.fused_attn for b in sub.blocks)


# --------------------------------------------------------------------------- peak memory
_PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, torch.nn.functional as F
    from noah_ray.nn.backbones import create_backbone
    from noah_ray.space import SubnetConfig
    from noah_ray.nn.supernet import PromptedViT

    ckpt = sys.argv[1] != "0"            # "0": none, "all": every block, N: the first N blocks
    blocks = None if sys.argv[1] in ("0", "all") else int(sys.argv[1])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = PromptedViT(create_backbone("vit_noah_tiny_patch4_32", 10),
                      SubnetConfig.uniform(12, vpt=16, kv_prompt=4)).train()
    net.set_grad_checkpointing(ckpt, blocks)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))

    def kib(field):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))

    try:  # reset the peak RSS to the current RSS (Linux >= 4.0)
        open("/proc/self/clear_refs", "w").write("5")
        start = kib("VmRSS:")
    except OSError:
        start = kib("VmHWM:")
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    print(json.dumps({"step_peak_kib": kib("VmHWM:") - start,
                      "grad": float(net.module("vpt", 0).prompts.grad.abs().sum())}))
""")


def _peak(ckpt: str) -> dict:
    """Peak RSS growth of one training step in a fresh process; glibc is told to ``mmap``
    allocations >= 64 KiB so that freed activations leave the RSS at once."""
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, ckpt], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_checkpointing_lowers_peak_memory_of_a_training_step():
    """Activations dominate here (batch 128, 81 tokens, 12 blocks, weights < 1 MB)."""
    plain, ckpt, half = _peak("0"), _peak("all"), _peak("6")
    assert plain["grad"] > 0 and abs(plain["grad"] - ckpt["grad"]) < 1e-3 * plain["grad"]
    assert abs(plain["grad"] - half["grad"]) < 1e-3 * plain["grad"]
    assert plain["step_peak_kib"] > 100 * 1024, plain  # the workload is activation-heavy
    assert ckpt["step_peak_kib"] < 0.5 * plain["step_peak_kib"], (plain, ckpt)  # measured: ~0.28
    # the first 6 of 12 blocks checkpointed: the other 6 keep their activations, so the peak lies
    # between (about halfway: each block holds the same activations)
    assert ckpt["step_peak_kib"] < half["step_peak_kib"] < plain["step_peak_kib"], (plain, half, ckpt)
