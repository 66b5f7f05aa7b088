"""Before / after of the supernet step in ONE process: an older commit's ``noah_ray`` against the
working tree, interleaved with a plain timm ViT (full backward), on the same input.

On a shared or virtual 2-core machine the speed of the whole machine drifts by 20 % and more
between runs a few minutes apart (docs/benchmarks.md), so two runs of ``bench/supernet_step.py``
cannot tell a 2 % change.  Here the older package is unpacked from git under the name
``noah_ray_before`` (``git archive REV noah_ray``, imports renamed), both supernets draw the same
random subnets, and the rounds alternate plain / before / after, so drift hits all three alike.
Each side uses its own commit's optimiser (``nn.optim.adamw``; commits since the package's layers).

Usage: ``python bench/step_ab.py REV [--model M] [--batch B] [--rounds R] [--threads T] [--ckpt]``
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from noah_ray.nn import optim
from noah_ray.nn.backbones import create_backbone

ROOT = pathlib.Path(__file__).resolve().parent.parent


def unpack_before(rev: str, into: pathlib.Path) -> str:
    """``rev``'s ``noah_ray`` package as ``noah_ray_before`` under ``into``; returns the commit."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], check=True,
                            capture_output=True, text=True).stdout.strip()
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "noah_ray"], check=True,
                         capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=tar, check=True)
    pkg = into / "noah_ray_before"
    (into / "noah_ray").rename(pkg)
    for f in pkg.rglob("*.py"):
        f.write_text(re.sub(r"\bnoah_ray\b", "noah_ray_before", f.read_text()))
    return commit


def side(prefix: str, model: str, ckpt: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    """A supernet of the paper's VTAB space from package ``prefix``, with that package's optimiser."""
    sn, space_mod = importlib.import_module(f"{prefix}.nn.supernet"), importlib.import_module(f"{prefix}.space")
    space = space_mod.SearchSpace.paper_vtab(12)
    net = sn.PromptedViT.supernet(model, 100, space).train()
    net.set_grad_checkpointing(ckpt)
    return net, importlib.import_module(f"{prefix}.nn.optim").adamw(net, 1e-4, 0.05), space


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rev", help="the older commit (git revision)")
    p.add_argument("--model", default="vit_noah_tiny_patch4_32")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ckpt", action="store_true", help="per-block gradient checkpointing on both supernets")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="step_ab_"))
    commit = unpack_before(args.rev, tmp)
    sys.path.insert(0, str(tmp))
    torch.manual_seed(0)
    size = create_backbone(args.model, 100).patch_embed.img_size
    x, y = torch.randn(args.batch, 3, *size), torch.randint(0, 100, (args.batch,))
    plain = create_backbone(args.model, 100).train()
    plain.requires_grad_(False)
    plain.head.requires_grad_(True)
    plain.pos_embed.requires_grad_(True)
    variants = {"plain (full bwd)": (plain, optim.adamw(plain, 1e-4, 0.05), None),
                f"before {commit}": side("noah_ray_before", args.model, args.ckpt),
                "after (working tree)": side("noah_ray", args.model, args.ckpt)}
    rngs = {k: random.Random(0) for k in variants}
    times: dict[str, list[float]] = {k: [] for k in variants}

    def step(k: str) -> None:
        net, opt, space = variants[k]
        if space is not None:
            net.set_active(space.sample(rngs[k]))
        out = net(x)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(out, y).backward()
        opt.step()

    for k in variants:                      # warm-up
        step(k)
        step(k)
    for _ in range(args.rounds):
        for k in variants:
            t0 = time.perf_counter()
            step(k)
            step(k)
            times[k].append((time.perf_counter() - t0) / 2)
    base = statistics.median(times["plain (full bwd)"])
    print(f"{args.model}, batch {args.batch}, torch threads {torch.get_num_threads()}, {args.rounds} rounds x 2 steps"
          f"{', per-block checkpointing' if args.ckpt else ''} (median per step)")
    for k, t in times.items():
        print(f"{k:28s} {1e3 * statistics.median(t):8.1f} ms  x plain {statistics.median(t) / base:.3f}")


if __name__ == "__main__":
    main()
