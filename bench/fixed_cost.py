"""Fixed cost of the retrain stage per Ray Train run; prints numbers.

One retrain stage (``noah_ray.run.pipeline.run_stages(job, ("retrain",))``) of ``--seeds`` seeds x
3 methods (LoRA, VPT, Adapter) on the tiny fractal ViT and a generated task, ``--epochs`` epochs
each (mini-VTAB's data settings: decoded images cached, no loader processes).  Read back from the
``train_metrics`` table (one timestamp per epoch, written after the epoch's training and
validation):

* ``to first epoch``: from the stage's call to the end of its first epoch, minus one epoch;
* ``per run after the first``: for each later run, from the previous run's last epoch to the
  end of this run's first epoch, minus one epoch of this run (its epoch-to-epoch time): the
  worker group start, imports, data decode, model build, test evaluation and result writing;
* the stage's wall time and the total of its epochs.

Ray is started before the clock starts (``ray.init(num_cpus=2)``: its start is not the stage's).

Usage: ``python bench/fixed_cost.py [--seeds 2] [--epochs 2] [--images 64]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

METHODS = ("lora", "vpt", "adapter")


def make_job(data_root: Path, store: str, *, seeds: int, epochs: int):
    from noah_ray.config import JobConfig

    return JobConfig.from_dict({
        "name": "fixed-cost", "storage": store,
        "data": {"root": str(data_root), "dataset": "gen_shape", "batch_size": 32, "eval_batch_size": 250,
                 "num_workers": 0, "cache_decoded": True},
        "model": {"name": "vit_noah_tiny_patch4_32.fractal", "drop_path_rate": 0.0},
        "retrain": {"epochs": epochs, "lr": 3e-3, "warmup_epochs": 0, "num_workers": 1, "max_failures": 0,
                    "seeds": list(range(seeds)), "method": METHODS[0], "baselines": list(METHODS[1:]),
                    "baseline_widths": {"vpt": {"vpt": 32}, "lora": {"lora": 8}, "adapter": {"adapter": 16}}},
    })


def measure(job, t_call: float) -> dict:
    """The fixed costs of the stage that started at ``t_call`` (seconds since the epoch)."""
    from noah_ray.store import storage

    root = storage.resolve(job.storage).join(job.name, "retrain")
    m = storage.read_table(root, "train_metrics").to_pandas()
    m["t"] = m["timestamp"].map(lambda ts: ts.timestamp())
    runs = m.groupby("run_id")["t"].agg(list).map(sorted).sort_values(key=lambda s: s.map(lambda v: v[0]))
    epoch = {r: statistics.median(b - a for a, b in zip(ts, ts[1:])) for r, ts in runs.items()}
    first_run = runs.index[0]
    per_run = [runs.iloc[i][0] - runs.iloc[i - 1][-1] - epoch[runs.index[i]] for i in range(1, len(runs))]
    return {"runs": len(runs), "to_first_epoch_s": runs.iloc[0][0] - t_call - epoch[first_run],
            "per_run_s": per_run, "epoch_s": statistics.median(epoch.values()),
            "epochs_total_s": sum(epoch[r] * len(ts) for r, ts in runs.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2, help="at least 2 (the epoch time is epoch to epoch)")
    ap.add_argument("--images", type=int, default=64, help="training images (val and test: half as many)")
    args = ap.parse_args()

    import ray

    from noah_ray.data import write_generated_vtab
    from noah_ray.run import pipeline

    with tempfile.TemporaryDirectory(prefix="noah-fixed-cost-") as tmp:
        data = Path(tmp) / "data"
        write_generated_vtab(data, "gen_shape", num_train=args.images, num_val=args.images // 2,
                             num_test=args.images // 2)
        job = make_job(data, str(Path(tmp) / "store"), seeds=args.seeds, epochs=max(args.epochs, 2))
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            t_call = time.time()
            pipeline.run_stages(job, ("retrain",))
            wall = time.time() - t_call
            r = measure(job, t_call)
        finally:
            ray.shutdown()
    per = r["per_run_s"]
    print(f"retrain stage: {r['runs']} runs ({args.seeds} seeds x {len(METHODS)} methods), "
          f"{max(args.epochs, 2)} epochs each, {args.images} training images, 1 worker")
    print(f"  stage wall time          {wall:7.1f} s  (epochs {r['epochs_total_s']:.1f} s, "
          f"one epoch {r['epoch_s']:.2f} s)")
    print(f"  call -> first epoch      {r['to_first_epoch_s']:7.1f} s")
    print(f"  fixed cost per run after the first: mean {statistics.fmean(per):.1f} s, "
          f"median {statistics.median(per):.1f} s, max {max(per):.1f} s  ({', '.join(f'{p:.1f}' for p in per)})")
    print(f"  fixed cost per run (stage wall - epochs) / runs: {(wall - r['epochs_total_s']) / r['runs']:.1f} s")


if __name__ == "__main__":
    main()
