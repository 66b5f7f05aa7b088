"""Search benchmarks; prints numbers.

1. Candidates scored per minute through ``run_search`` with 1 vs 2 evaluation workers
   (tiny randomised supernet, generated validation images).
2. Per-trial overhead of Tune: wall time per candidate through Tune vs the pure evaluation
   loop (same model, same candidates, no Ray), as a ratio.
3. Evaluations needed to reach 99 % of a synthetic objective's known optimum: evolution vs
   random vs Optuna NSGA-II (engines only, no model).

Usage: ``python bench/search.py [--val-images 512] [--candidates 16] [--seeds 5] [--skip-tune]``
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def val_batches(job, model, n: int = 512, batch: int = 64):
    import torch

    g = torch.Generator().manual_seed(1)
    size = model.vit.patch_embed.img_size[0]
    x, y = torch.randn(n, 3, size, size, generator=g), torch.randint(0, 4, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def make_job(root: Path, store: str, candidates: int, workers: int, model: str):
    from noah_ray.config import JobConfig

    pop = max(2, candidates // 2)
    return JobConfig.from_dict({
        "name": f"bench-w{workers}", "storage": store,
        "data": {"num_classes": 4, "dataset": "generated"},
        "model": {"name": model, "checkpoint": str(root / "backbone.safetensors")},
        "search": {"generations": 2, "population": pop, "top_k": 2, "mutations": pop // 4,
                   "crossovers": pop // 4, "param_limit": 0.64 if "base" in model else 0.01,
                   "max_concurrent": workers, "cpus_per_trial": 1}})


def prepare(root: Path, model: str):
    import torch
    from safetensors.torch import save_file

    from noah_ray.nn.backbones import create_backbone
    from noah_ray.nn.supernet import PromptedViT
    from noah_ray.space import SearchSpace
    from noah_ray.store import storage

    torch.manual_seed(0)
    save_file(create_backbone(model, 4).state_dict(), str(root / "backbone.safetensors"))
    net = PromptedViT.supernet(model, 4, SearchSpace(), str(root / "backbone.safetensors"))
    loc = storage.resolve(str(root)).join("supernet")
    storage.save_state(loc, net.trainable_state_dict(), {"num_classes": 4})
    return loc.uri


def bench_tune(args) -> None:
    import ray
    import torch

    from noah_ray.nn.models import evaluate, load_supernet
    from noah_ray.search.driver import run_search
    from noah_ray.space import SubnetConfig
    from noah_ray.store import storage

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    root = Path(tempfile.mkdtemp(prefix="bench-search-"))
    uri = prepare(root, args.model)
    loader = functools.partial(load_supernet, uri=uri)
    data = functools.partial(val_batches, n=args.val_images)
    rates, per_trial, evals, walls = {}, {}, {}, {}
    for workers in (1, 2):
        job = make_job(root, str(root / f"store{workers}"), args.candidates, workers, args.model)
        t0 = time.perf_counter()
        res = run_search(job, loader=loader, val_data=data)
        wall = walls[workers] = time.perf_counter() - t0
        trials = storage.read_table(storage.resolve(res.uri), "trials").to_pandas()
        n = len(trials)
        span = (trials.timestamp.max() - trials.timestamp.min()).total_seconds()
        rates[workers] = 60 * (n - 1) / span            # steady state: first to last result
        per_trial[workers] = span / (n - 1)
        evals[workers] = trials.wall_time_s.mean()
        print(f"workers={workers}: {n} candidates, end-to-end {wall:.1f} s ({60 * n / wall:.1f}/min incl. "
              f"Tune start and supernet loading); steady state {rates[workers]:.1f} candidates/min "
              f"(mean in-actor evaluation {evals[workers]:.3f} s, {len(set(trials.worker))} actors)")
    print(f"speed-up 2 vs 1 workers (steady state): {rates[2] / rates[1]:.2f}x")
    ray.shutdown()
    # pure evaluation loop: the same candidates, one model, no Ray
    job = make_job(root, str(root / "store1"), args.candidates, 1, args.model)
    torch.set_num_threads(1)
    model = loader(job).eval()
    batches = data(job, model)
    cfgs = [SubnetConfig.from_json(j) for j in trials.config_json]
    t0 = time.perf_counter()
    for cfg in cfgs:
        model.set_active(cfg)
        evaluate(model, batches)
    pure = (time.perf_counter() - t0) / len(cfgs)
    print(f"pure evaluation loop {pure:.3f} s/candidate (1 thread, no Ray)")
    print(f"Tune, 1 worker, steady state: {per_trial[1]:.3f} s/candidate -> ratio to pure {per_trial[1] / pure:.2f}; "
          f"Tune overhead per trial {per_trial[1] - evals[1]:.3f} s beyond the in-actor evaluation "
          f"({(per_trial[1] - evals[1]) / evals[1] * 100:.1f} %)")
    print(f"Tune, 1 worker, end to end (incl. Tune start, actor start, supernet load): "
          f"{walls[1] / n:.3f} s/candidate -> ratio to pure {walls[1] / n / pure:.2f}")


def bench_synthetic(args) -> None:
    from noah_ray.evolution import ENGINES, TargetObjective
    from noah_ray.space import ModuleSpace, SearchSpace
    from noah_ray.space.budget import ParamLimit
    from noah_ray.space.kinds import BackboneShape

    space = SearchSpace({m: ModuleSpace((2, 4, 6), (1, 5, 10)) for m in ("vpt", "lora", "adapter")}, 6)
    limit = ParamLimit(0.01, BackboneShape(48, 3, 6, 10))
    print(f"synthetic objective: {space.size():.2e} subnets, limit binds "
          f"(largest {limit.count(space.largest())} > {int(limit.max_m * 1e6)} params); "
          f"budget {args.budget} evaluations, {args.seeds} seeds")
    for alg in ("evolution", "random", "optuna"):
        found, times = [], []
        for seed in range(args.seeds):
            objective = TargetObjective.random(space, limit, seed=100 + seed)
            engine = ENGINES[alg](space, limit, generations=args.budget // 50 + 1, seed=seed)
            t0 = time.perf_counter()
            n_hit = None
            for n in range(1, args.budget + 1):
                c = engine.ask(str(n))
                if c is None:
                    break
                score = objective(c.config)
                engine.tell(str(n), score)
                if score >= 0.99:
                    n_hit = n
                    break
            times.append(time.perf_counter() - t0)
            found.append(n_hit)
        hits = [f for f in found if f is not None]
        med = statistics.median(hits) if len(hits) == len(found) else None
        print(f"{alg:9s}: evaluations to 99% of optimum per seed {found} "
              f"(median {med if med is not None else f'>{args.budget}'}; "
              f"{len(hits)}/{len(found)} reached; searcher time {statistics.mean(times):.2f} s/seed)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_noah_tiny_patch4_32")
    p.add_argument("--val-images", type=int, default=512)
    p.add_argument("--candidates", type=int, default=32)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--budget", type=int, default=5000)
    p.add_argument("--skip-tune", action="store_true")
    p.add_argument("--skip-synthetic", action="store_true")
    args = p.parse_args()
    if not args.skip_synthetic:
        bench_synthetic(args)
    if not args.skip_tune:
        bench_tune(args)


if __name__ == "__main__":
    main()
