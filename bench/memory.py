"""Peak memory and images/s of a VPT-Deep training step under the memory switches.

VPT-Deep with ``--tokens`` (100) prompt tokens in every layer, backbone frozen (prompts and head
train, AdamW), one training step = forward + loss + backward + optimiser step, for

    plain            explicit attention, no checkpointing, fp32
    sdpa             fused scaled_dot_product_attention
    sdpa+ckpt        + per-block non-reentrant gradient checkpointing
    sdpa+ckpt+bf16   + bf16 autocast
    sdpa+ckpt-half   (not by default) checkpointing of the first half of the blocks only
                     (``model.checkpoint_blocks``)

printed as a table with ratios to plain.  Every mode runs in a fresh subprocess so its peak is
its own.  Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (``peak``: everything
allocated, weights included; ``step``: above what was allocated before the steps); on CPU the
process's peak RSS (``VmHWM``, reset with ``/proc/self/clear_refs`` before the steps; glibc
is told to ``mmap`` allocations >= 64 KiB so freed tensors leave the RSS) -- ``peak`` is the
whole process (Python and torch libraries included), ``step`` the part above the RSS before
the steps.  Ratios use ``step``.

Defaults: CUDA: ``vit_base_patch16_224``, batch 64 (the issue's setting); CPU: the smaller
``vit_tiny_patch16_224``, batch 8 (about 1-2 minutes on 2 idle cores).

Usage: ``python bench/memory.py [--device auto|cpu|cuda] [--model M] [--batch B] [--tokens 100]
[--steps N] [--warmup N] [--modes plain,sdpa,...] [--threads T]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODES = {  # name -> (fused_attn, grad_checkpointing, precision, checkpointed share of the blocks)
    "plain": (False, False, "fp32", 1.0),
    "sdpa": (True, False, "fp32", 1.0),
    "sdpa+ckpt": (True, True, "fp32", 1.0),
    "sdpa+ckpt+bf16": (True, True, "bf16", 1.0),
    "sdpa+ckpt-half": (True, True, "fp32", 0.5),
}
DEFAULT_MODES = ("plain", "sdpa", "sdpa+ckpt", "sdpa+ckpt+bf16")
DEFAULTS = {"cuda": ("vit_base_patch16_224", 64, 10, 3), "cpu": ("vit_tiny_patch16_224", 8, 3, 1)}


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def worker(args: argparse.Namespace) -> dict:
    """One mode in this process; returns its numbers."""
    import torch
    import torch.nn.functional as F

    from noah_ray.nn.backbones import create_backbone
    from noah_ray.nn.supernet import PromptedViT
    from noah_ray.space import SubnetConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    fused, ckpt, precision, share = MODES[args.worker]
    dev = torch.device(args.device)
    torch.manual_seed(0)
    vit = create_backbone(args.model, 100)
    model = PromptedViT(vit, SubnetConfig.uniform(len(vit.blocks), vpt=args.tokens)).to(dev).train()
    model.set_fused_attn(fused)
    model.set_grad_checkpointing(ckpt, None if share == 1.0 else round(share * len(vit.blocks)))
    model.set_precision(precision)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    size = model.vit.patch_embed.img_size
    x = torch.randn(args.batch, 3, *size, device=dev)
    y = torch.randint(0, 100, (args.batch,), device=dev)
    cuda = dev.type == "cuda"

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).float(), y).backward()
        opt.step()

    for _ in range(args.warmup):  # also creates the AdamW state
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # peak RSS := current RSS
            start = _kib("VmRSS:") * 1024
        except OSError:  # no way to reset the peak: measure from the (higher) old peak
            start = _kib("VmHWM:") * 1024
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else _kib("VmHWM:") * 1024
    return {"mode": args.worker, "peak_mib": peak / 2**20, "step_mib": (peak - start) / 2**20,
            "images_per_s": args.batch * args.steps / dt, "step_s": dt / args.steps}


def run_mode(args: argparse.Namespace, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--device", args.device, "--model", args.model,
           "--batch", str(args.batch), "--tokens", str(args.tokens), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"mode {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--model", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"a comma list of {', '.join(MODES)}")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    model, batch, steps, warmup = DEFAULTS[args.device]
    args.model, args.batch = args.model or model, args.batch or batch
    args.steps, args.warmup = args.steps or steps, args.warmup if args.warmup is not None else warmup
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown or "plain" not in modes:
        raise SystemExit(f"--modes: {unknown or modes} invalid; use a comma list of {', '.join(MODES)} incl. plain")
    print(f"VPT-Deep {args.tokens} tokens/layer, {args.model}, batch {args.batch}, device {args.device}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, threads {args.threads or 'default'}")
    rows = [run_mode(args, m) for m in modes]
    base = rows[0] if rows[0]["mode"] == "plain" else next(r for r in rows if r["mode"] == "plain")
    print(f"{'mode':16s} {'peak MiB':>9s} {'step MiB':>9s} {'mem x plain':>11s} {'img/s':>8s} "
          f"{'step time x plain':>17s}")
    for r in rows:
        print(f"{r['mode']:16s} {r['peak_mib']:9.0f} {r['step_mib']:9.0f} {r['step_mib'] / base['step_mib']:11.2f} "
              f"{r['images_per_s']:8.1f} {r['step_s'] / base['step_s']:17.2f}")
    ck = next((r for r in rows if r["mode"] == "sdpa+ckpt"), None)
    if ck:
        print(f"checkpointing (sdpa+ckpt) vs plain: {base['step_mib'] / ck['step_mib']:.2f}x lower step memory "
              f"({base['peak_mib'] / ck['peak_mib']:.2f}x lower peak) at {ck['step_s'] / base['step_s']:.2f}x "
              f"step time (issue goal on GPU: >= 2x lower peak at <= 1.35x)")


if __name__ == "__main__":
    main()
