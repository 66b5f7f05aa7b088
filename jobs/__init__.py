"""Ray job entrypoints: ``python -m jobs.<stage> --config X.yaml [--set key=value ...]``.

    ray job submit --working-dir . -- python -m jobs.pipeline --config jobs/configs/demo.yaml
    ray job submit --working-dir . -- python -m jobs.supernet --config jobs/configs/vtab_cifar100.yaml \
        --set storage=s3://MY-BUCKET/noah

    ray job submit --working-dir . -- python -m jobs.sweep --config jobs/configs/vtab_sweep.yaml \
        --set storage=s3://MY-BUCKET/noah     # 19 VTAB tasks' pipelines at once, one storage root

Inside a job ``RAY_ADDRESS`` names the cluster, so the stages run on it; outside one a local Ray
is started.  Each module is the matching ``noah-ray`` subcommand (same options, same
validation before anything is written, same resume behaviour).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def run(command: str, argv: Sequence[str] | None = None) -> int:
    """Run stage command ``command`` (pipeline, supernet, search, race, hpo, retrain) with ``argv``."""
    from noah_ray.cli.main import stage_main

    return stage_main(command, sys.argv[1:] if argv is None else argv, prog=f"python -m jobs.{command}")
