"""An ``s3://`` data root on a multi-node Ray (issue 27): staged once per node, not once per worker,
and a node that joins later stages it itself.

A real S3 endpoint (a moto server in this process) holds the dataset and the job's storage; its
request log counts every ``GET`` of every data object.  A local cluster (``ray.cluster_utils.Cluster``:
a CPU-0 head and two worker nodes of ``--cpus`` CPUs, each its own raylet) gives every node a data
cache of its own (``$NOAH_RAY_DATA_CACHE``, as separate machines have separate disks; the driver
has one too).  Then, in order:

1. the supernet with ``--cpus`` Ray Train workers (Ray Train packs them onto one node);
2. the search, ``2 x --cpus`` evaluation trials at once (both nodes busy);
3. a third node joins, the first two leave, and the retraining runs (on the new node only).

Checked: every data object was fetched from S3 exactly once per cache that holds the dataset
(driver and nodes), however many workers and trials read it there; every such cache holds the whole
dataset; the late node's cache was filled by the retraining alone.

Prints one JSON line.

    python bench/data_staging.py [--cpus 2]           # ~2-3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from local_cluster import FAST_HEALTH, isolate, start_s3, tiny_job  # bench/local_cluster.py

isolate()   # before Ray is imported

PREFIX = "/bench/data/"


class DataGets(logging.Handler):
    """moto's request log (werkzeug: one record per HTTP request): GETs per data object."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.gets: Counter = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()           # '... "GET /bench/data/<key> HTTP/1.1" 200 -' (colour codes on a 206)
        start = msg.find(f"GET {PREFIX}")
        if start >= 0:
            path = msg[start + 4:].split(" ", 1)[0].split("?", 1)[0]
            self.gets[path[len(PREFIX):]] += 1


def upload(folder: Path, endpoint: str) -> list[str]:
    """The dataset folder under ``s3://bench/data/``; the object keys below that prefix."""
    from noah_ray.store import storage

    base = storage.resolve("s3://bench/data", endpoint)
    keys = []
    for f in sorted(folder.rglob("*")):
        if f.is_file() and not f.name.startswith("."):
            key = str(f.relative_to(folder.parent))
            storage.write_bytes(base.join(key), f.read_bytes())
            keys.append(key)
    return keys


def job_dict(endpoint: str, cpus: int) -> dict:
    return {**tiny_job("staged", "s3://bench/store", "s3://bench/data", endpoint=endpoint, supernet_workers=cpus),
            "search": {"generations": 1, "population": 4 * cpus, "top_k": 2, "mutations": 1, "crossovers": 1,
                       "param_limit": 0.02, "max_concurrent": 2 * cpus, "cpus_per_trial": 1, "hold_actors": False},
            "race": {"enabled": False},
            "retrain": {"epochs": 1, "warmup_epochs": 0, "seeds": [0], "baselines": []}}


def add_node(cluster, cache: Path, cpus: int):
    """A worker node whose processes stage data into ``cache`` (they inherit the raylet's environment)."""
    before = os.environ.get("NOAH_RAY_DATA_CACHE")
    os.environ["NOAH_RAY_DATA_CACHE"] = str(cache)
    try:
        return cluster.add_node(num_cpus=cpus)
    finally:
        if before is None:
            os.environ.pop("NOAH_RAY_DATA_CACHE")
        else:
            os.environ["NOAH_RAY_DATA_CACHE"] = before


def cached(cache: Path) -> set[str]:
    """The data files a cache holds, as keys below the data prefix (``gen_color/...``): the cache
    keeps a dataset under ``<cache>/<hash of its URI>/<dataset folder>/``."""
    return {"/".join(f.relative_to(cache).parts[1:]) for f in cache.rglob("*")
            if f.is_file() and not f.name.startswith(".")}


def run(args) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from noah_ray.config import JobConfig
    from noah_ray.data import write_generated_vtab
    from noah_ray.run.pipeline import run_stages

    tmp = Path(tempfile.mkdtemp(prefix="noah-staging-"))
    caches = {n: tmp / "cache" / n for n in ("driver", "head", "node1", "node2", "late")}
    os.environ["NOAH_RAY_DATA_CACHE"] = str(caches["head"])
    log = DataGets()
    server, endpoint = start_s3(log)
    cluster = None
    try:
        keys = upload(write_generated_vtab(tmp / "data", "gen_color", num_train=64, num_val=32, num_test=32),
                      endpoint)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": FAST_HEALTH})
        os.environ["NOAH_RAY_DATA_CACHE"] = str(caches["driver"])
        first = [add_node(cluster, caches[n], args.cpus) for n in ("node1", "node2")]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        job = JobConfig.from_dict(job_dict(endpoint, args.cpus))
        t0 = time.time()
        run_stages(job, ("supernet", "search"))
        after_search = {n: len(cached(c)) for n, c in caches.items()}
        add_node(cluster, caches["late"], args.cpus)       # joins now: its cache did not exist before
        for node in first:
            cluster.remove_node(node)
        cluster.wait_for_nodes()
        run_stages(job, ("retrain",))
        wall = time.time() - t0
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        server.stop()
    holders = [n for n, c in caches.items() if cached(c)]
    gets = [log.gets.get(k, 0) for k in keys]
    return {"data_objects": len(keys), "caches_holding_data": holders,
            "complete_copies": [n for n in holders if cached(caches[n]) == set(keys)],
            "gets_per_object_min": min(gets), "gets_per_object_max": max(gets),
            "files_after_search": after_search, "late_node_filled_by_retrain": cached(caches["late"]) == set(keys),
            "workers_per_node": args.cpus,
            "search_trials_at_once": 2 * args.cpus, "wall_s": round(wall, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpus", type=int, default=2, help="CPUs per worker node (workers / trials on one node)")
    print(json.dumps(run(p.parse_args(argv))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
