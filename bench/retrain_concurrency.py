"""The retrain stage with its runs one after another and two at once (``retrain.max_concurrent``);
prints both wall times, their ratio and whether every run's result is the same.

One mini-VTAB task (``noah_ray/configs/minivtab.yaml``: the shipped tiny ViT, batch 32, decoded
images cached), the baselines ``--methods`` with ``--seeds`` seeds each, ``--epochs`` epochs (the
recipe: 10).  The stage runs twice in this process on a local Ray of 2 CPUs started before the
clock, each time into fresh storage: ``max_concurrent: 1`` (one worker group) then ``2`` (two
groups at once, the runs dealt between them).  Each run should end with the same val and test
accuracy and best epoch in both: the runs are seeded and do not depend on each other.

Usage: ``python bench/retrain_concurrency.py [--task mv_textures] [--epochs 4] [--seeds 3]``
(needs ``pip install -e '.[bench]'`` for the natural tasks' images)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

METHODS = ("lora", "vpt", "adapter", "full", "linear")


def stage(task: str, data: Path, store: Path, args: argparse.Namespace, concurrent: int) -> tuple[float, list]:
    """Wall seconds of one retrain stage and its rows ``(run_id, val, test, best epoch)``."""
    from noah_ray.data import minivtab
    from noah_ray.run import pipeline
    from noah_ray.store import storage

    methods = list(args.methods)
    job = minivtab.job_config(task, store, data, {"retrain": {
        "epochs": args.epochs, "seeds": list(range(args.seeds)), "method": methods[0], "baselines": methods[1:],
        "max_concurrent": concurrent}}, name=f"conc{concurrent}")
    t0 = time.time()
    pipeline.run_stages(job, ("retrain",))
    wall = time.time() - t0
    rows = storage.read_table(storage.resolve(job.storage).join(job.name, "retrain"), "runs").to_pandas()
    return wall, sorted(rows[["run_id", "val_acc", "test_acc", "best_epoch"]].itertuples(index=False, name=None))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="mv_textures")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    args = ap.parse_args(argv)

    import ray

    from noah_ray.data import minivtab

    with tempfile.TemporaryDirectory(prefix="noah-retrain-conc-") as tmp:
        data = Path(tmp) / "data"
        minivtab.write_task(minivtab.versioned_root(data), args.task)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            one, rows1 = stage(args.task, data, Path(tmp) / "one", args, 1)
            two, rows2 = stage(args.task, data, Path(tmp) / "two", args, 2)
        finally:
            ray.shutdown()
    print(f"retrain stage of {args.task}: {len(rows1)} runs ({args.seeds} seeds x {', '.join(args.methods)}), "
          f"{args.epochs} epochs each, 1 worker per run, 2 CPUs")
    print(f"  max_concurrent 1: {one:7.1f} s")
    print(f"  max_concurrent 2: {two:7.1f} s   ratio {two / one:.2f}")
    print(f"  every run's (val, test, best epoch) the same: {'yes' if rows1 == rows2 else 'NO'}")
    if rows1 != rows2:
        for a, b in zip(rows1, rows2, strict=False):
            if a != b:
                print(f"    {a} vs {b}")
    return 0 if rows1 == rows2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
