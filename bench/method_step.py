"""One retraining step per method, as the Ray Train workers build the model: what a mini-VTAB
epoch costs per method, and where the time of a step goes.

For each method of the mini-VTAB recipe (``noah_ray/configs/minivtab.yaml``: the tiny ViT at
32 px, the baselines at their recipe widths, the ``noah`` recipe's dropouts) the model is built
with :func:`noah_ray.nn.models.build_model` and one step (forward, backward, AdamW) on a batch of
random images is timed; methods alternate in rounds in one process (medians per step), so the
ratios to the first method hold within one run.  ``--profile`` also prints the top operators of
each method's step by self CPU time (torch.profiler, 3 steps).  The process first applies the
workers' glibc setting (:func:`noah_ray.nn.malloc.keep_freed_memory`) unless ``--glibc-default``.

    python bench/method_step.py [--threads 1] [--batch 32] [--methods linear full lora vpt adapter]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from noah_ray.nn.malloc import keep_freed_memory


def build(method: str, task: str = "mv_count"):
    from noah_ray.data import minivtab
    from noah_ray.nn import optim
    from noah_ray.nn.models import build_model, subnet_for
    from noah_ray.space.methods import trains_backbone

    job = minivtab.job_config(task, "/tmp/unused", "/tmp/unused")
    torch.manual_seed(0)
    model = build_model(job, subnet_for(method, job, None), None, 10, train_backbone=trains_backbone(method),
                        method=method).train()
    return model, optim.adamw(model, job.retrain.lr, job.retrain.weight_decay)


def step(model, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a worker has one CPU)")
    p.add_argument("--batch", type=int, default=32, help="the recipe's batch size")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--methods", nargs="+", default=["linear", "full", "lora", "vpt", "adapter"])
    p.add_argument("--profile", action="store_true")
    p.add_argument("--glibc-default", action="store_true",
                   help="keep glibc's adaptive malloc thresholds (default: the workers' keep_freed_memory)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.glibc_default:
        keep_freed_memory()
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    models = {m: build(m) for m in args.methods}
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    for _ in range(args.rounds):
        for m, (model, opt) in models.items():
            t0 = time.perf_counter()
            step(model, opt, x, y)
            step(model, opt, x, y)
            times[m].append((time.perf_counter() - t0) / 2)
    first = statistics.median(times[args.methods[0]][2:])
    print(f"threads {args.threads}, batch {args.batch}, {args.rounds} rounds x 2 steps (median; 2 rounds dropped)")
    print("| method | ms per step | / " + args.methods[0] + " | 25 steps (an 800-image epoch), s |")
    print("|---|---|---|---|")
    for m in args.methods:
        med = statistics.median(times[m][2:])
        print(f"| {m} | {med * 1e3:.1f} | {med / first:.2f} | {25 * med:.2f} |")
    if args.profile:
        from torch.profiler import profile

        for m, (model, opt) in models.items():
            with profile() as prof:
                for _ in range(3):
                    step(model, opt, x, y)
            events = prof.key_averages()
            print(f"\n{m}: {sum(e.count for e in events) / 3:.0f} operator calls per step")
            print(events.table(sort_by="self_cpu_time_total", row_limit=8))
    return 0


if __name__ == "__main__":
    sys.exit(main())
