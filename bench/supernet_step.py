"""Images/s of a NOAH supernet training step vs a plain timm ViT of the same size.

Variants, all with the backbone frozen and an AdamW step on what trains, timed in one process
in interleaved rounds (so load drift hits all alike; per-step medians):

    plain (head only)     timm ViT forward + backward, only the head trains (the issue's
                          baseline; backward stops at the head)
    plain (full bwd)      the same ViT with gradients flowing back through every block
                          (pos_embed trains): the backward any prompt / adapter / LoRA method pays
    supernet              PromptedViT supernet of the paper's VTAB space (VPT, LoRA, Adapter;
                          depths {3,6,9,12}, widths {1,5,10}), a random subnet per step
    supernet + ckpt       the same with per-block gradient checkpointing
    supernet + ckpt N/D   (``--ckpt-blocks N ...``) checkpointing of the first N of D blocks only
                          (``model.checkpoint_blocks``)

The overhead ratio is supernet step time / plain (full bwd) step time (issue 29's goals: <= 1.10 at
224 px, <= 1.30 on the tiny 32 px model; checkpointing <= 1.33x the supernet step).  On CUDA the
peak memory (``torch.cuda.max_memory_allocated``) of the supernet step with and without
checkpointing is printed too.

Defaults: CUDA: ``vit_base_patch16_224``, batch 64, bf16 autocast; CPU: the tiny
``vit_noah_tiny_patch4_32``, batch 64, fp32.

``--ablate`` instead times the supernet with one module kind at a time (the random subnet's other
kinds set to width 0) and with all of them, against ``plain (full bwd)``: what each kind costs;
``--recipe modern`` (no dropouts) beside the default ``noah`` recipe shows what the dropouts cost.

``--products`` instead times the rank-r matrix products of a LoRA on the model's fused qkv
(``(rows, 3d) @ (3d, r)`` and ``(3d, rows) @ (rows, r)``, the gradients of ``x A^T B^T``) laid out
as autograd forms them and transposed as :func:`noah_ray.nn.modules.fast_ops.thin_linear` forms them.

``--tokens`` instead times the plain ViT's blocks (forward + backward to the input) on its own
sequence and on 1, 5 and 10 tokens more: what VPT's prompt tokens cost by themselves, the same
frozen blocks run on a longer sequence (a random subnet of the paper's space carries 5.4 prompt
tokens in every layer on average).

``--compile N`` instead runs N steps of the supernet under ``torch.compile(dynamic=True)`` on random
subnets and prints each step's time (a step that meets a new graph includes its compilation) with
the graphs compiled so far, then the eager supernet's median step on the same subnets.

``--profile N`` instead profiles N steps of ``plain (full bwd)`` and ``supernet`` with
torch.profiler (same random subnets) and prints milliseconds per step in forward / backward /
optimizer and the top operators by self CPU time.

On the CPU the process first applies the workers' glibc setting
(:func:`noah_ray.nn.malloc.keep_freed_memory`: freed memory is kept for the next step);
``--glibc-default`` leaves glibc's adaptive thresholds instead (the setting is process-wide, so the
two are compared in separate runs).

Usage: ``python bench/supernet_step.py [--device auto|cpu|cuda] [--model M] [--batch B]
[--precision fp32|bf16] [--rounds R] [--steps S] [--warmup W] [--threads T] [--profile N] [--ablate] [--recipe R]
[--products] [--tokens] [--compile N] [--glibc-default]``
"""

from __future__ import annotations

import argparse
import contextlib
import random
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from noah_ray.nn import optim
from noah_ray.nn.backbones import create_backbone
from noah_ray.nn.malloc import keep_freed_memory
from noah_ray.nn.supernet import PromptedViT
from noah_ray.space import SearchSpace, SubnetConfig

DEFAULTS = {"cuda": ("vit_base_patch16_224", 64, "bf16", 5, 10), "cpu": ("vit_noah_tiny_patch4_32", 64, "fp32", 10, 2)}


class Variant:
    """One model + its training step."""

    def __init__(self, name: str, model: torch.nn.Module, x, y, precision: str, space: SearchSpace | None = None,
                 seed: int = 0, keep: tuple[str, ...] | None = None) -> None:
        self.name, self.model, self.x, self.y, self.space, self.keep = name, model, x, y, space, keep
        self.rng = random.Random(seed)
        self.opt = optim.adamw(model, 1e-4, 0.05)   # the product's optimiser (fused where torch has it)
        self.dtype = torch.bfloat16 if precision == "bf16" else None
        self.times: list[float] = []
        self.peak_mib = float("nan")

    def step(self) -> None:
        if self.space is not None:  # random subnet per step, as in supernet training
            cfg = self.space.sample(self.rng)
            if self.keep is not None:   # --ablate: the other module kinds at width 0
                cfg = SubnetConfig({m: w if m in self.keep else (0,) * len(w) for m, w in cfg.widths.items()})
            self.model.set_active(cfg)
        ctx = contextlib.nullcontext() if self.dtype is None or self.space is not None else \
            torch.autocast(self.x.device.type, dtype=self.dtype)  # PromptedViT autocasts itself
        with ctx:
            out = self.model(self.x)
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(out.float(), self.y).backward()
        self.opt.step()

    def timed(self, steps: int) -> None:
        cuda = self.x.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        if cuda:
            torch.cuda.synchronize()
            self.peak_mib = torch.cuda.max_memory_allocated() / 2**20
        self.times.append((time.perf_counter() - t0) / steps)

    @property
    def step_s(self) -> float:
        return statistics.median(self.times)


def inputs(args: argparse.Namespace) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The backbone's depth, one batch of images and labels."""
    dev = torch.device(args.device)
    torch.manual_seed(0)
    probe = create_backbone(args.model, 100)
    x = torch.randn(args.batch, 3, *probe.patch_embed.img_size, device=dev)
    return len(probe.blocks), x, torch.randint(0, 100, (args.batch,), device=dev)


def plain_full_bwd(args: argparse.Namespace, x, y) -> Variant:
    full_bwd = create_backbone(args.model, 100).to(args.device).train()
    full_bwd.requires_grad_(False)
    full_bwd.head.requires_grad_(True)
    full_bwd.pos_embed.requires_grad_(True)
    return Variant("plain (full bwd)", full_bwd, x, y, args.precision)


def build_ablation(args: argparse.Namespace) -> list[Variant]:
    """plain (full bwd), then the supernet with each module kind alone and with all of them."""
    depth, x, y = inputs(args)
    space = SearchSpace.paper_vtab(depth)
    variants = [plain_full_bwd(args, x, y)]
    for keep in [(m,) for m in space.modules] + [tuple(space.modules)]:
        net = PromptedViT.supernet(args.model, 100, space, recipe=args.recipe).to(args.device).train()
        net.set_precision(args.precision)
        name = "supernet, " + ("all" if len(keep) > 1 else f"{keep[0]} only")
        variants.append(Variant(name, net, x, y, args.precision, space, keep=keep))
    return variants


def build(args: argparse.Namespace) -> list[Variant]:
    dev = torch.device(args.device)
    depth, x, y = inputs(args)
    variants = []
    head_only = create_backbone(args.model, 100).to(dev).train()
    head_only.requires_grad_(False)
    head_only.head.requires_grad_(True)
    variants.append(Variant("plain (head only)", head_only, x, y, args.precision))
    variants.append(plain_full_bwd(args, x, y))
    space = SearchSpace.paper_vtab(depth)
    for ckpt, blocks in [(False, None), (True, None), *((True, n) for n in args.ckpt_blocks)]:
        net = PromptedViT.supernet(args.model, 100, space, recipe=args.recipe).to(dev).train()
        net.set_precision(args.precision)
        net.set_grad_checkpointing(ckpt, blocks)
        name = "supernet" + (" + ckpt" if ckpt else "") + (f" {blocks}/{depth}" if blocks is not None else "")
        variants.append(Variant(name, net, x, y, args.precision, space))
    return variants


def profile(variants: list[Variant], steps: int, rows: int = 15) -> None:
    """Per-step phase times and the top operators of ``plain (full bwd)`` and ``supernet``."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    for v in variants[1:3]:
        v.rng = random.Random(1)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                if v.space is not None:
                    with record_function("set_active"):
                        v.model.set_active(v.space.sample(v.rng))
                with record_function("forward"):
                    out = v.model(v.x)
                v.opt.zero_grad(set_to_none=True)
                with record_function("backward"):
                    F.cross_entropy(out.float(), v.y).backward()
                with record_function("optimizer"):
                    v.opt.step()
        ka = prof.key_averages()
        phases = {e.key: e.cpu_time_total / steps / 1e3 for e in ka
                  if e.key in ("set_active", "forward", "backward", "optimizer")}
        print(f"== {v.name}: ms per step " + ", ".join(f"{k} {t:.1f}" for k, t in phases.items())
              + f"; {sum(e.count for e in ka) // steps} profiler events per step")
        print(ka.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=44))


def _ms(f, *a, n: int = 10, reps: int = 5) -> float:
    f(*a)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            f(*a)
        out.append((time.perf_counter() - t0) / n * 1e3)
    return statistics.median(out)


def _mm_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mm(a, b).t()


def products(args: argparse.Namespace) -> None:
    """The LoRA gradient products at this model's shapes (rows = batch x tokens + 5 prompts)."""
    probe = create_backbone(args.model, 100)
    d, rows = probe.embed_dim, args.batch * (probe.patch_embed.num_patches + probe.num_prefix_tokens + 5)
    g = torch.randn(rows, 3 * d)
    print(f"{args.model}: rows {rows}, qkv width {3 * d}, torch threads {torch.get_num_threads()} (median ms)")
    print(f"{'r':>3s} {'g @ B':>8s} {'(B.T @ g.T).T':>14s} {'g.T @ h':>8s} {'(h.T @ g).T':>12s}")
    for r in (1, 5, 10, 16):
        b, h = torch.randn(3 * d, 16)[:, :r], torch.randn(rows, r)
        bt = b.t().contiguous()
        print(f"{r:3d} {_ms(torch.mm, g, b):8.2f} {_ms(_mm_t, bt, g.t()):14.2f} "
              f"{_ms(torch.mm, g.t(), h):8.2f} {_ms(_mm_t, h.t(), g):12.2f}")


def tokens(args: argparse.Namespace) -> None:
    """The plain blocks' forward + backward time at the model's sequence length + 0 / 1 / 5 / 10."""
    vit = create_backbone(args.model, 100).to(args.device).train()
    vit.requires_grad_(False)
    n = vit.patch_embed.num_patches + vit.num_prefix_tokens
    xs = {extra: torch.randn(args.batch, n + extra, vit.embed_dim, device=args.device, requires_grad=True)
          for extra in (0, 1, 5, 10)}
    times: dict[int, list[float]] = {e: [] for e in xs}

    def fwd_bwd(x: torch.Tensor) -> None:
        vit.blocks(x).sum().backward()

    for x in xs.values():
        fwd_bwd(x)
    for _ in range(args.rounds):
        for extra, x in xs.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fwd_bwd(x)
            times[extra].append((time.perf_counter() - t0) / args.steps * 1e3)
    base = statistics.median(times[0])
    print(f"{args.model}, batch {args.batch}, torch threads {torch.get_num_threads()}: blocks forward + backward")
    for extra, t in times.items():
        ms = statistics.median(t)
        print(f"  {n + extra:4d} tokens (+{extra:2d}): {ms:8.1f} ms  x {ms / base:.3f}")


def compiled(args: argparse.Namespace) -> None:
    """``--compile N``: compile time, graphs and step time of the compiled supernet against eager."""
    from torch._dynamo.utils import counters

    depth, x, y = inputs(args)
    space = SearchSpace.paper_vtab(depth)
    net = PromptedViT.supernet(args.model, 100, space, recipe=args.recipe).to(args.device).train()
    net.set_precision(args.precision)
    comp = Variant("compiled", torch.compile(net, dynamic=True), x, y, args.precision, space, seed=1)
    print(f"{args.model}, batch {args.batch}, recipe {args.recipe}, torch threads {torch.get_num_threads()}: "
          f"torch.compile(dynamic=True), one random subnet per step")
    t_start = time.perf_counter()
    for i in range(args.compile):
        comp.timed(1)
        print(f"  step {i:3d}: {1e3 * comp.times[-1]:9.1f} ms, graphs compiled so far "
              f"{counters['stats']['unique_graphs']}, frames {counters['frames']['ok']}", flush=True)
    print(f"compiled: {time.perf_counter() - t_start:.1f} s for {args.compile} steps; median step "
          f"{1e3 * comp.step_s:.1f} ms, last {min(5, args.compile)} steps' median "
          f"{1e3 * statistics.median(comp.times[-5:]):.1f} ms")
    eager = Variant("eager", net, x, y, args.precision, space, seed=1)
    eager.step()
    eager.rng = random.Random(1)          # the compiled run's subnets, in order
    for _ in range(args.compile):
        eager.timed(1)
    print(f"eager on the same subnets: median step {1e3 * eager.step_s:.1f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--model", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"])
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="profile N steps instead of timing")
    p.add_argument("--ablate", action="store_true", help="time each module kind alone instead")
    p.add_argument("--recipe", default="noah", help="the supernet's recipe (noah_ray.space.recipes)")
    p.add_argument("--products", action="store_true", help="time the LoRA gradient products in both layouts")
    p.add_argument("--compile", type=int, default=0, metavar="N",
                   help="run N steps under torch.compile(dynamic=True) instead (compile time, graphs)")
    p.add_argument("--tokens", action="store_true", help="time the plain blocks on longer sequences")
    p.add_argument("--glibc-default", action="store_true",
                   help="keep glibc's adaptive malloc thresholds (default: the workers' keep_freed_memory)")
    p.add_argument("--ckpt-blocks", type=int, nargs="*", default=[], metavar="N",
                   help="also time checkpointing of the first N blocks only (model.checkpoint_blocks)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    kept = args.device == "cpu" and not args.glibc_default and keep_freed_memory()
    print(f"glibc malloc: {'freed memory kept (noah_ray.nn.malloc)' if kept else 'default'}")
    model, batch, precision, rounds, steps = DEFAULTS[args.device]
    args.model, args.batch, args.precision = args.model or model, args.batch or batch, args.precision or precision
    args.rounds, args.steps = args.rounds or rounds, args.steps or steps
    if args.products or args.tokens:
        (products if args.products else tokens)(args)
        return
    if args.compile:
        compiled(args)
        return
    variants = build_ablation(args) if args.ablate else build(args)
    for v in variants:  # warm-up (kernels, AdamW state, the allocator's thresholds)
        for _ in range(args.warmup):
            v.step()
    if args.profile:
        profile(variants, args.profile)
        return
    for _ in range(args.rounds):
        for v in variants:
            v.timed(args.steps)
    if args.ablate:
        print(f"{args.model}, batch {args.batch}, recipe {args.recipe}, torch threads {torch.get_num_threads()}, "
              f"{args.rounds} rounds x {args.steps} steps (median per step)")
        for v in variants:
            print(f"{v.name:26s} {1e3 * v.step_s:9.1f} ms  x plain (full bwd) {v.step_s / variants[0].step_s:.3f}")
        return
    print(f"{args.model}, batch {args.batch}, {args.precision}, device {args.device}, torch threads "
          f"{torch.get_num_threads()}, {args.rounds} rounds x {args.steps} steps (median per step)")
    base = variants[0]
    cuda = args.device == "cuda"
    print(f"{'variant':20s} {'img/s':>9s} {'ms/step':>9s} {'time x plain(head)':>19s}"
          + (f" {'peak MiB':>9s}" if cuda else ""))
    for v in variants:
        print(f"{v.name:20s} {args.batch / v.step_s:9.1f} {1e3 * v.step_s:9.1f} {v.step_s / base.step_s:19.2f}"
              + (f" {v.peak_mib:9.0f}" if cuda else ""))
    sn, full = variants[2], variants[1]
    print(f"overhead ratio supernet / plain (head only): {sn.step_s / base.step_s:.2f}; "
          f"supernet / plain (full bwd): {sn.step_s / full.step_s:.2f}")
    print("checkpointing / supernet: " + ", ".join(f"{v.name.split(' + ckpt')[1].strip() or 'all'} "
                                                   f"{v.step_s / sn.step_s:.2f}" for v in variants[3:]))
    print(f"peak resident memory of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if cuda:
        ck = variants[3]
        print(f"supernet peak memory: {sn.peak_mib:.0f} MiB without, {ck.peak_mib:.0f} MiB with checkpointing "
              f"({sn.peak_mib / ck.peak_mib:.2f}x lower) at {ck.step_s / sn.step_s:.2f}x step time")


if __name__ == "__main__":
    main()
