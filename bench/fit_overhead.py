"""Fixed cost of one Ray Train stage run: ``--fits`` supernet stages of 1 epoch on 64 generated
images (the tiny ViT, 1 worker), one after another on a local Ray started before the clock;
prints each ``train_supernet`` call's wall time.  The training itself is well under a second, so
the time is the worker group's start (controller, worker actor, imports, process group), the
checkpoint and the controller noticing the end.

Usage: ``python bench/fit_overhead.py [--fits 3]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def job_dict(data_root: Path, store: Path, name: str) -> dict:
    return {"name": name, "storage": str(store),
            "data": {"root": str(data_root), "dataset": "gen_color", "batch_size": 8, "num_workers": 0},
            "model": {"name": "vit_noah_tiny_patch4_32", "drop_path_rate": 0.0},
            "space": {"num_layers": 12, "modules": {"lora": {"widths": [1, 2]}, "adapter": {"widths": [1, 2]}}},
            "supernet": {"epochs": 1}, "retrain": {"epochs": 1}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fits", type=int, default=3)
    args = p.parse_args(argv)

    import ray

    from noah_ray.config import JobConfig
    from noah_ray.data import write_generated_vtab
    from noah_ray.run.preflight import resolve
    from noah_ray.train.runs import train_supernet

    with tempfile.TemporaryDirectory(prefix="noah-fit-") as tmp:
        root = Path(tmp)
        write_generated_vtab(root / "data", "gen_color", num_train=64, num_val=32, num_test=32)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            walls = []
            for i in range(args.fits):
                rj = resolve(JobConfig.from_dict(job_dict(root / "data", root / f"store{i}", f"fit{i}")))
                t0 = time.perf_counter()
                train_supernet(rj)
                walls.append(time.perf_counter() - t0)
        finally:
            ray.shutdown()
    print(f"1-epoch supernet stage on 64 images, {args.fits} fits: " + ", ".join(f"{w:.1f} s" for w in walls))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
