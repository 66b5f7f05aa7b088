"""The multi-node Ray of the node-loss benches (``bench/node_loss*.py``), on this machine.

``ray.cluster_utils.Cluster``: a CPU-0 head (like ``cluster/aws.yaml``'s head node) and worker
nodes of one CPU, every node its own raylet as on separate machines.  Node death is noticed in
about 3 s (:data:`FAST_HEALTH`) instead of Ray's 15 s.  :func:`isolate` puts Ray's session files
and its address file (``ray_current_cluster``) in a temp folder of the bench's own, so no other
Ray on this machine (nor its ``ray.init("auto")``) meets this one; call it before Ray is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

#: node death is noticed after health_check_period_ms x failure_threshold (Ray's defaults: 3 s x 5)
FAST_HEALTH = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
               "health_check_failure_threshold": 3}


def isolate() -> None:
    """Ray Train V2, no usage stats, and a session folder of this process's own."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="nrc", dir="/tmp"))


@contextlib.contextmanager
def local_cluster(nodes: int) -> Iterator[Any]:
    """A started cluster of ``nodes`` one-CPU worker nodes with this driver attached; shut down
    (driver, then every node's processes) on exit."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": FAST_HEALTH})
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def busy_worker_nodes(cluster: Any) -> list:
    """The worker nodes whose CPU is in use (each hosts a Ray Train worker or a Tune trial)."""
    import ray

    free = ray._private.state.available_resources_per_node()
    return [n for n in cluster.worker_nodes if n.node_id in free and free[n.node_id].get("CPU", 0.0) < 1.0]


def drain_node(cluster: Any, node: Any, deadline_s: float) -> None:
    """Ray's drain of ``node`` for pre-emption (as a spot interruption arrives), ``deadline_s`` ahead."""
    import ray
    from ray.core.generated import autoscaler_pb2

    gcs = ray._raylet.GcsClient(address=cluster.address)
    accepted, why = gcs.drain_node(node.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                   "spot interruption (bench)", int((time.time() + deadline_s) * 1000))
    if not accepted:
        raise RuntimeError(f"drain refused: {why}")


def remove_a_busy_node(cluster: Any, events: dict, deadline: float, stop: threading.Event,
                       before: Callable[[], dict] | None = None, drain_s: float | None = None) -> None:
    """Remove (without warning) the first worker node found busy, recording ``removed_at`` and
    what ``before()`` returns at that moment in ``events``; ``error`` if none was busy by
    ``deadline`` or ``stop`` was set (the run ended).  With ``drain_s``: drain it for pre-emption
    first (``drained_at``) and remove it at the drain's deadline, as a spot interruption does."""
    while time.time() < deadline and not stop.is_set():
        busy = busy_worker_nodes(cluster)
        if busy:
            events.update(before() if before else {})
            if drain_s is not None:
                events["drained_at"] = time.time()
                drain_node(cluster, busy[0], drain_s)
                time.sleep(drain_s)
            events["removed_at"] = time.time()
            cluster.remove_node(busy[0], allow_graceful=False)
            return
        time.sleep(0.1)
    events["error"] = "no busy worker node found"


def tiny_job(name: str, storage: str, data_root: str, kinds: tuple[str, ...] = ("lora", "adapter"),
             endpoint: str | None = None, supernet_workers: int = 1) -> dict:
    """The benches' job: the tiny ViT on generated ``gen_color``, a small space of ``kinds``, one
    supernet epoch; a bench adds its own search, race and retrain sections."""
    return {"name": name, "storage": storage, "storage_endpoint": endpoint,
            "data": {"root": data_root, "dataset": "gen_color", "batch_size": 16, "eval_batch_size": 64,
                     "num_workers": 0},
            "model": {"name": "vit_noah_tiny_patch4_32", "drop_path_rate": 0.0},
            "space": {"num_layers": 12, "modules": {m: {"depths": [3, 12], "widths": [1, 5]} for m in kinds}},
            "supernet": {"epochs": 1, "warmup_epochs": 0, "num_workers": supernet_workers, "eval_random_subnets": 0}}


def bench_parser(doc: str | None, nodes: int, spare: str = ">= 2: one is lost",
                 drain: str | None = None) -> argparse.ArgumentParser:
    """A node-loss bench's command line, with ``--nodes``; with ``drain`` (the stage's failure
    budget setting, e.g. ``hpo.trial_retries``), ``--drain S`` too."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=nodes, help=f"worker nodes of 1 CPU each ({spare})")
    if drain:
        p.add_argument("--drain", type=float, default=None, metavar="S",
                       help=f"drain the node for pre-emption S seconds before removing it, with {drain} 0")
    return p


def print_run(run: Callable[[argparse.Namespace], dict], args: argparse.Namespace) -> int:
    """Run the scenario and print its outcome as one JSON line."""
    print(json.dumps(run(args)), flush=True)
    return 0


#: the local S3 endpoint's fake keys (every process of a cluster started after they are set inherits them)
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def start_s3(request_log: logging.Handler | None = None) -> tuple[Any, str]:
    """A real S3 endpoint (a moto server in this process) on 127.0.0.1 with the bucket ``bench``,
    its fake keys in this process's environment; ``request_log`` gets moto's line per request
    (else those lines are dropped).  Returns the server (``.stop()``) and its URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    os.environ.update(S3_CREDENTIALS)
    werkzeug = logging.getLogger("werkzeug")
    if request_log is None:
        werkzeug.setLevel(logging.WARNING)
    else:
        werkzeug.setLevel(logging.INFO)
        werkzeug.propagate = False
        werkzeug.addHandler(request_log)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    return server, endpoint
