"""Node loss during retraining, on a real multi-node Ray: the node of the session's worker dies.

The retrain stage trains every method and seed of a job in one session of reused Ray Train
workers.  On a local cluster (``ray.cluster_utils.Cluster``: a CPU-0 head and ``--nodes`` worker
nodes of one CPU, each its own raylet) the job ``lossy`` retrains LoRA, Adapter and VPT-Deep (one
seed each, one worker); after the session's first checkpoint the worker's node is removed (raylet
and every process on it killed).  Ray Train restarts the group on a node left
(``retrain.max_failures``); runs already finished are not trained again, the run in flight resumes
from its last checkpoint.  Then ``calm``, the same job undisturbed, in its own storage folder.

Checked: every run finished, with the same test accuracy and bit-equal best weights as ``calm``;
how many runs / epochs were trained again.  Measured: wall time of both, and node removed -> next
epoch finished.  Prints one JSON line.

    python bench/node_loss_retrain.py             # ~3 min on 2 cores
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

from local_cluster import bench_parser, isolate, local_cluster, print_run, remove_a_busy_node  # bench/local_cluster.py

isolate()   # before Ray is imported
METHODS = ("lora", "adapter", "vpt")


def job_dict(data_root: str, storage: str, name: str, epochs: int) -> dict:
    return {"name": name, "storage": storage,
            "data": {"root": data_root, "dataset": "gen_color", "batch_size": 16, "eval_batch_size": 64,
                     "num_workers": 0},
            "model": {"name": "vit_noah_tiny_patch4_32", "drop_path_rate": 0.1},
            "space": {"num_layers": 12, "modules": {m: {"depths": [12], "widths": [1, 4]} for m in METHODS}},
            "retrain": {"epochs": epochs, "warmup_epochs": 1, "num_workers": 1, "seeds": [0], "method": METHODS[0],
                        "baselines": list(METHODS[1:]), "checkpoint_every": 1, "max_failures": 2,
                        "baseline_widths": {m: {m: 4} for m in METHODS}}}


def _checkpoints(root) -> list[str]:
    from noah_ray.store import storage

    try:
        return [f.path for f in storage.list_files(root) if "/checkpoint_e" in f.path and f.path.endswith("state.json")]
    except Exception:                             # nothing written yet
        return []


def kill_the_worker_node(cluster, root, events: dict, stop: threading.Event, timeout_s: float = 600.0) -> None:
    """After the first checkpoint of the session, remove the node its worker runs on."""
    deadline = time.time() + timeout_s
    while not _checkpoints(root) and time.time() < deadline and not stop.is_set():
        time.sleep(0.2)
    events["checkpoints_before"] = len(_checkpoints(root))
    remove_a_busy_node(cluster, events, deadline, stop)


def outcome(job) -> dict:
    """Per run id: test accuracy, epochs trained in all, the best weights."""
    from noah_ray.store import storage
    from noah_ray.store.layout import JobPaths, retrain_run_id

    out = {}
    for m in METHODS:
        run = JobPaths.of(job).retrain_run(retrain_run_id(m, 0))
        weights, _ = storage.load_state(run.join("best"))
        _, meta = storage.load_state(run.join("final"))
        out[m] = {"test_acc": meta["test_acc"], "start_epochs": meta.get("start_epochs"), "weights": weights}
    return out


def _recovery(root, removed_at: float | None) -> dict:
    """Node removed -> the next epoch finished (any run), and the median undisturbed epoch before it."""
    from noah_ray.store import storage

    if removed_at is None:
        return {}
    m = storage.read_table(root, "train_metrics").to_pandas()
    t = m["timestamp"].map(lambda v: v.timestamp()).sort_values()
    after = t[t > removed_at]
    epoch_s = float(t[t < removed_at].diff().median()) if (t < removed_at).sum() > 1 else None
    return {"removal_to_next_epoch_s": round(float(after.iloc[0]) - removed_at, 1) if len(after) else None,
            "epoch_s_before": round(epoch_s, 1) if epoch_s == epoch_s and epoch_s is not None else None}


def run(args) -> dict:
    import torch

    from noah_ray.config import JobConfig
    from noah_ray.data import write_generated_vtab
    from noah_ray.run.preflight import resolve
    from noah_ray.store import storage
    from noah_ray.train.runs import retrain_methods

    tmp = Path(tempfile.mkdtemp(prefix="noah-node-loss-retrain-"))
    write_generated_vtab(tmp / "data", "gen_color", num_train=args.train_images, num_val=32, num_test=32)
    lossy = JobConfig.from_dict(job_dict(str(tmp / "data"), str(tmp / "store"), "lossy", args.epochs))
    calm = JobConfig.from_dict(job_dict(str(tmp / "data"), str(tmp / "store"), "calm", args.epochs))
    with local_cluster(args.nodes) as cluster:
        events: dict = {}
        stop = threading.Event()
        root = storage.resolve(str(tmp / "store")).join("lossy", "retrain")
        killer = threading.Thread(target=kill_the_worker_node, args=(cluster, root, events, stop), daemon=True)
        killer.start()
        t0 = time.time()
        retrain_methods(resolve(lossy, ("retrain",), generate=True), None, METHODS)
        wall_lossy = time.time() - t0
        stop.set()
        killer.join(timeout=30)
        t0 = time.time()
        retrain_methods(resolve(calm, ("retrain",), generate=True), None, METHODS)
        wall_calm = time.time() - t0
        a, b = outcome(lossy), outcome(calm)
        recovery = _recovery(root, events.get("removed_at"))
        equal = {m: a[m]["weights"].keys() == b[m]["weights"].keys()
                 and all(torch.equal(a[m]["weights"][k], b[m]["weights"][k]) for k in a[m]["weights"]) for m in METHODS}
        return {"runs_finished": len(a), "same_test_acc": all(a[m]["test_acc"] == b[m]["test_acc"] for m in METHODS),
                "best_weights_equal": equal, "start_epochs": {m: a[m]["start_epochs"] for m in METHODS},
                "checkpoints_before_loss": events.get("checkpoints_before"), **recovery,
                "wall_s_with_loss": round(wall_lossy, 1), "wall_s_undisturbed": round(wall_calm, 1),
                **({"error": events["error"]} if "error" in events else {}),
                **({"node_removed": True} if "removed_at" in events else {"node_removed": False})}


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__, 2, ">= 2: one is lost")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train-images", type=int, default=256)
    return print_run(run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
