"""Hyper-parameter search benchmark (``noah_ray.hpo``); prints numbers.

Over one space (learning rate x weight decay, log ranges), on a generated task in the VTAB-1k
layout (800 train / 200 val images, 32x32) with the tiny ViT and one retraining method:

1. the full grid (``grid_points`` per axis, FIFO: every trial runs every epoch) vs Optuna TPE +
   ASHA with ``--trials`` trials: best val reached, total epochs trained, wall time; the goal is
   TPE+ASHA within 0.5 point of the grid's best val with at most 35 % of its epochs;
2. the speed-up of 2 concurrent trials over 1 (TPE+ASHA at max_concurrent 1 vs 2): wall time and
   epochs per second (the runs may train different epoch counts, ASHA decides asynchronously).

Usage: ``python bench/hpo.py [--task gen_count] [--method lora] [--epochs 9] [--trials 12]
[--points 4] [--grace 1] [--reduction-factor 3] [--seed 0] [--search-seed S] [--skip-concurrency]
[--out DIR]``; with the same
``--out`` a finished run (e.g. the grid) is reused, not run again
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

SPACE = {"lr": {"low": 1e-4, "high": 1e-1, "log": True}, "weight_decay": {"low": 1e-4, "high": 1e-1, "log": True}}


def make_job(args, root: Path, name: str, **hpo):
    from noah_ray.config import JobConfig

    return JobConfig.from_dict({
        "name": name, "storage": str(root / "store"),
        "data": {"root": str(root / "data"), "dataset": args.task, "batch_size": 32, "eval_batch_size": 200,
                 "num_workers": 0, "cache_decoded": True},
        "model": {"name": "vit_noah_tiny_patch4_32", "drop_path_rate": 0.0},
        "space": {"num_layers": 12, "modules": {"lora": {"depths": [12], "widths": [8]}}},
        "retrain": {"epochs": args.epochs, "warmup_epochs": 1, "method": args.method, "seeds": [0]},
        "hpo": {"space": SPACE, "grid_points": args.points, "cpus_per_trial": 1,
                "seed": args.seed if args.search_seed is None else args.search_seed, **hpo}})


def measure(job, method: str) -> dict:
    """Run (or, with the same ``--out``, reuse: numbers saved in ``<out>/<job>.json``) one search."""
    import json

    from noah_ray.hpo import driver as hpo
    from noah_ray.run.preflight import resolve
    from noah_ray.store import results

    saved = Path(job.storage).parent / f"{job.name}.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    t0 = time.perf_counter()
    hpo.run_hpo(resolve(job, ("hpo",)), method)
    wall = time.perf_counter() - t0
    df = results.hpo(str(Path(job.storage) / job.name))
    chosen = df[df.chosen].iloc[0]
    out = {"trials": len(df), "epochs": int(df.epochs_run.sum()), "best_val": float(df.best_val.max()),
           "chosen_val": float(chosen.best_val), "stopped": int(df.stopped_early.sum()), "wall_s": wall,
           "lr": float(chosen.hp_retrain_lr), "wd": float(chosen.hp_retrain_weight_decay)}
    saved.write_text(json.dumps(out))
    return out


def line(name: str, r: dict) -> str:
    return (f"{name:<22} {r['trials']:>6} {r['epochs']:>7} {r['stopped']:>8} {r['best_val']:>9.2f} "
            f"{r['wall_s']:>8.1f} {r['epochs'] / r['wall_s']:>9.3f}   lr {r['lr']:.2e} wd {r['wd']:.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="gen_count", help="generated task (noah_ray.data.GENERATED_TASKS)")
    p.add_argument("--method", default="lora", help="retraining method tuned (lora, vpt, adapter, linear, ...)")
    p.add_argument("--epochs", type=int, default=9, help="epochs per trial (ASHA's max_t)")
    p.add_argument("--trials", type=int, default=12, help="TPE+ASHA trials")
    p.add_argument("--points", type=int, default=4, help="grid points per axis")
    p.add_argument("--reduction-factor", type=float, default=3.0)
    p.add_argument("--grace", type=int, default=1, help="ASHA grace period (epochs before the first stop)")
    p.add_argument("--seed", type=int, default=0, help="data (and, without --search-seed, sampler) seed")
    p.add_argument("--search-seed", type=int, default=None, help="the TPE sampler's seed (hpo.seed); the data "
                   "and the grid stay those of --seed, so one grid serves several sampler seeds")
    p.add_argument("--skip-concurrency", action="store_true", help="skip the 1-vs-2 concurrent trials run")
    p.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    args = p.parse_args()

    import ray
    import torch

    from noah_ray.data import write_generated_vtab

    torch.set_num_threads(1)
    root = Path(args.out or tempfile.mkdtemp(prefix="noah-bench-hpo-"))
    write_generated_vtab(root / "data", args.task, num_train=800, num_val=200, num_test=200, seed=args.seed)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    asha = {"searcher": "tpe", "scheduler": "asha", "trials": args.trials, "grace_period": args.grace,
            "reduction_factor": args.reduction_factor}
    tag = f"{args.method}-{args.task}-e{args.epochs}"
    grid = measure(make_job(args, root, f"grid{args.points}-{tag}", searcher="grid", scheduler="fifo",
                            max_concurrent=2), args.method)
    tag += f"-t{args.trials}-rf{args.reduction_factor:g}-g{args.grace}-s{args.seed}"
    tag += "" if args.search_seed is None else f"-ss{args.search_seed}"
    tpe2 = measure(make_job(args, root, f"tpe-asha-c2-{tag}", max_concurrent=2, **asha), args.method)
    rows = [("grid (fifo), 2 conc.", grid), ("tpe+asha, 2 conc.", tpe2)]
    if not args.skip_concurrency:
        rows.append(("tpe+asha, 1 conc.", measure(make_job(args, root, f"tpe-asha-c1-{tag}", max_concurrent=1,
                                                           **asha), args.method)))
    print(f"\n{args.method} on {args.task} (800 train / 200 val, tiny ViT), {args.epochs} epochs per trial, "
          f"space lr x wd in [1e-4, 1e-1]^2 (log); grid {args.points}x{args.points}; torch {torch.__version__}, "
          f"{os.cpu_count()} CPU(s)")
    print(f"{'run':<22} {'trials':>6} {'epochs':>7} {'stopped':>8} {'best val':>9} {'wall s':>8} {'epochs/s':>9}")
    for name, r in rows:
        print(line(name, r))
    gap, share = grid["best_val"] - tpe2["best_val"], tpe2["epochs"] / grid["epochs"]
    met = gap <= 0.5 and share <= 0.35
    print(f"\nTPE+ASHA vs grid: best val {tpe2['best_val']:.2f} vs {grid['best_val']:.2f} (gap {gap:+.2f} points), "
          f"{tpe2['epochs']} vs {grid['epochs']} epochs ({100 * share:.1f} %), wall {tpe2['wall_s']:.0f} s vs "
          f"{grid['wall_s']:.0f} s; goal (gap <= 0.5, epochs <= 35 %): {'met' if met else 'NOT met'}")
    if not args.skip_concurrency:
        one = rows[2][1]
        print(f"2 concurrent trials vs 1: wall {one['wall_s']:.1f} s / {tpe2['wall_s']:.1f} s = "
              f"{one['wall_s'] / tpe2['wall_s']:.2f}x, throughput {tpe2['epochs'] / tpe2['wall_s']:.3f} / "
              f"{one['epochs'] / one['wall_s']:.3f} epochs/s = "
              f"{(tpe2['epochs'] / tpe2['wall_s']) / (one['epochs'] / one['wall_s']):.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
