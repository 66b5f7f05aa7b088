"""Node loss on a real multi-node Ray: the supernet's worker group loses a node mid-epoch.

A local cluster (``ray.cluster_utils.Cluster``: every node its own raylet, as on separate machines)
with a head holding no CPU (as ``cluster/aws.yaml``) and ``--nodes`` worker nodes of one CPU each
trains the tiny supernet with 2 Ray Train workers, so the workers sit on two different nodes.
After the first checkpoint the node of one worker is removed (its raylet and every process on it
killed, as when a machine dies).  Ray Train restarts the group from the last checkpoint on the
nodes left (``supernet.max_failures``); the run finishes.  Then the same job, undisturbed, in a
fresh storage folder: the final weights must be equal (the restart resumed weights, optimiser,
schedule and every rank's RNG).

Prints one JSON line: recovery time (node removed -> the restarted group's first finished epoch,
minus one undisturbed epoch), epochs redone, whether the weights are equal.

    python bench/node_loss.py                    # ~3-5 min on 2 cores
    python bench/node_loss.py --storage s3://bucket/x --endpoint http://127.0.0.1:5000
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

from local_cluster import (  # bench/local_cluster.py
    bench_parser,
    busy_worker_nodes,
    drain_node,
    isolate,
    local_cluster,
    print_run,
)

isolate()   # before Ray is imported


def job_dict(data_root: str, storage: str, endpoint: str | None, name: str, epochs: int,
             max_failures: int = 2) -> dict:
    modules = {m: {"depths": [3, 12], "widths": [1, 5]} for m in ("vpt", "lora", "adapter")}
    return {"name": name, "storage": storage, "storage_endpoint": endpoint,
            "data": {"root": data_root, "dataset": "gen_color", "batch_size": 16, "num_workers": 0},
            "model": {"name": "vit_noah_tiny_patch4_32", "drop_path_rate": 0.1},
            "space": {"num_layers": 12, "modules": modules},
            "supernet": {"epochs": epochs, "lr": 3e-3, "warmup_epochs": 1, "num_workers": 2,
                         "cpus_per_worker": 1, "eval_random_subnets": 0, "max_failures": max_failures},
            "retrain": {"epochs": 1}}


def busy_worker_node(cluster):
    """A worker node whose CPU is in use (it hosts a Ray Train worker)."""
    busy = busy_worker_nodes(cluster)
    return busy[0] if busy else None


def _first_checkpoint(paths, timeout_s: float = 600.0) -> float:
    from noah_ray.store import storage

    loc = storage.resolve(paths[0], paths[1]).join(paths[2], "supernet")
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if any("/checkpoint_e" in f.path and f.path.endswith("state.json") for f in storage.list_files(loc)):
            return time.time()
        time.sleep(0.2)
    raise TimeoutError("no checkpoint written")


def kill_a_worker_node(cluster, where: tuple, delay_s: float, out: dict, drain_s: float | None = None) -> None:
    """Wait for the first checkpoint, then ``delay_s`` (inside the next epoch), then remove the
    node of one worker; with ``drain_s``, first drain it for pre-emption and remove it at the deadline."""
    out["checkpoint_at"] = _first_checkpoint(where)
    time.sleep(delay_s)
    node = busy_worker_node(cluster)
    if node is None:
        out["error"] = "no busy worker node found"
        return
    if drain_s is not None:
        out["drained_at"] = time.time()
        drain_node(cluster, node, drain_s)
        time.sleep(drain_s)
    out["removed_at"] = time.time()
    cluster.remove_node(node, allow_graceful=False)


def train(job: dict):
    from noah_ray.config import JobConfig
    from noah_ray.run.preflight import resolve
    from noah_ray.train.runs import train_supernet

    cfg = JobConfig.from_dict(job)
    return train_supernet(resolve(cfg, ("supernet",), generate=True))


def final_weights(job: dict) -> dict:
    from noah_ray.store import storage

    state, _ = storage.load_state(storage.resolve(job["storage"], job["storage_endpoint"]).join(job["name"],
                                                                                                 "supernet", "final"))
    return state


def epoch_times(job: dict):
    from noah_ray.store import storage

    root = storage.resolve(job["storage"], job["storage_endpoint"]).join(job["name"], "supernet")
    m = storage.read_table(root, "train_metrics").to_pandas()
    m = m.drop_duplicates("epoch").sort_values("epoch")[["epoch", "timestamp"]]
    m["timestamp"] = [t.timestamp() if hasattr(t, "timestamp") else float(t) for t in m["timestamp"]]  # seconds
    return m


def run(args) -> dict:
    import torch

    from noah_ray.data import write_generated_vtab

    tmp = Path(tempfile.mkdtemp(prefix="noah-node-loss-"))
    write_generated_vtab(tmp / "data", "gen_color", num_train=args.train_images, num_val=16, num_test=16)
    with local_cluster(args.nodes) as cluster:
        storage_root = args.storage or str(tmp / "store")
        # drained for pre-emption: no failure budget at all, a pre-emption must not be charged to it
        failures = 0 if args.drain is not None else 2
        lossy = job_dict(str(tmp / "data"), storage_root, args.endpoint, "lossy", args.epochs, failures)
        calm = job_dict(str(tmp / "data"), storage_root, args.endpoint, "calm", args.epochs, failures)
        events: dict = {}
        killer = threading.Thread(target=kill_a_worker_node, daemon=True,
                                  args=(cluster, (storage_root, args.endpoint, "lossy"), args.delay, events,
                                        args.drain))
        killer.start()
        t0 = time.time()
        res = train(lossy)
        wall_lossy = time.time() - t0
        killer.join(timeout=5)
        t0 = time.time()
        train(calm)
        wall_calm = time.time() - t0
        a, b = final_weights(lossy), final_weights(calm)
        equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        max_diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        return report(lossy, calm, res, events, wall_lossy, wall_calm, equal, max_diff)


def report(lossy: dict, calm: dict, res, events: dict, wall_lossy: float, wall_calm: float,
           equal: bool, max_diff: float) -> dict:
    from noah_ray.store import storage

    _, meta = storage.load_state(storage.resolve(lossy["storage"], lossy["storage_endpoint"]).join(
        lossy["name"], "supernet", "final"))
    et = epoch_times(lossy)
    calm_et = epoch_times(calm)
    epoch_s = float(calm_et["timestamp"].diff().median())
    out = {"epochs": res.epochs_done, "start_epochs": meta.get("start_epochs"), "weights_equal": equal,
           "max_failures": lossy["supernet"]["max_failures"], "drained": "drained_at" in events,
           "max_abs_diff": max_diff, "wall_s_with_loss": round(wall_lossy, 1),
           "wall_s_undisturbed": round(wall_calm, 1),
           "undisturbed_epoch_s": round(epoch_s, 1), **({"error": events["error"]} if "error" in events else {})}
    if "removed_at" in events:
        starts = meta.get("start_epochs") or []
        restart = starts[-1] if len(starts) > 1 else 0
        # the first epoch the restarted group finished (epochs count from 1: the restart from k trains k + 1);
        # the epoch in flight may still finish on the node left before the loss is noticed
        after = et[(et["timestamp"] > events["removed_at"]) & (et["epoch"] > restart)]
        first = float(after["timestamp"].iloc[0]) if len(after) else float("nan")
        out["node_removed_after_checkpoint_s"] = round(events["removed_at"] - events["checkpoint_at"], 1)
        out["removal_to_next_epoch_s"] = round(first - events["removed_at"], 1)
        out["recovery_s"] = round(first - events["removed_at"] - epoch_s, 1)
        done_before = int((et["timestamp"] < events["removed_at"]).sum())
        out["restarted_from_epoch"] = starts[-1] if len(starts) > 1 else None
        # whole epochs finished before the loss but trained again (0: at most the epoch in flight was
        # lost; the restart may even come after it, when that epoch finished before the loss was noticed)
        out["finished_epochs_redone"] = max(0, done_before - starts[-1]) if len(starts) > 1 else None
    return out


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__, 3, ">= 3: one spare", drain="supernet.max_failures")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train-images", type=int, default=256)
    p.add_argument("--delay", type=float, default=1.0, help="seconds after the first checkpoint")
    p.add_argument("--storage", default=None, help="default: a temporary folder")
    p.add_argument("--endpoint", default=None)
    return print_run(run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
