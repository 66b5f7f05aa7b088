"""Node loss during hyper-parameter search (issue 27): a Tune trial loses its node and resumes.

A local cluster (``bench/local_cluster.py``: a CPU-0 head and ``--nodes`` worker nodes of one
CPU, every node its own raylet).  Run ``lossy``: the HPO stage of LoRA (grid over the learning
rate, FIFO, ``--concurrent`` trials at once on one CPU each, a checkpoint after every epoch).
Once a trial has reported an epoch, the node of a running trial is removed without warning; Tune
retries that trial from its last checkpoint on a node that remains (``hpo.trial_retries``).
Then ``calm``: the same search undisturbed, in its own storage folder.  Compared per grid point:
the per-epoch validation accuracy and loss (and no duplicate curve rows), the chosen values; and how many
trials failed with the node (Tune's ``error.txt``) and were retried.

``--drain S``: the node is first drained for pre-emption (Ray's drain API, deadline S seconds, as a
spot interruption arrives) and removed at the deadline, with ``hpo.trial_retries: 0``: Tune must
not charge a pre-empted trial to its failure budget, so every trial still finishes.

    python bench/node_loss_hpo.py [--nodes 3] [--concurrent 2] [--epochs 3] [--grid-points 4] [--drain 2]
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

from local_cluster import bench_parser, isolate, local_cluster, print_run, remove_a_busy_node  # bench/local_cluster.py

isolate()   # before Ray is imported


def job_dict(data_root: str, storage: str, name: str, args) -> dict:
    return {"name": name, "storage": storage,
            "data": {"root": data_root, "dataset": "gen_color", "batch_size": 16, "eval_batch_size": 64,
                     "num_workers": 0},
            "model": {"name": "vit_noah_tiny_patch4_32", "drop_path_rate": 0.1},
            "space": {"num_layers": 12, "modules": {"lora": {"depths": [12], "widths": [4]}}},
            "retrain": {"epochs": args.epochs, "lr": 3e-3, "warmup_epochs": 1, "method": "lora", "seeds": [0]},
            "hpo": {"searcher": "grid", "scheduler": "fifo", "grid_points": args.grid_points,
                    "max_concurrent": args.concurrent, "cpus_per_trial": 1,
                    "trial_retries": 0 if args.drain is not None else 2,
                    "space": {"lr": {"low": 1e-3, "high": 3e-2, "log": True}}}}


def curves(uri: str):
    """Per trial and epoch: the grid point (lr), val accuracy and loss; sorted by lr and epoch."""
    from noah_ray.store import results

    c = results.hpo_curves(uri)
    lr = results.hpo(uri).set_index("trial_id")["hp_retrain_lr"]
    c = c.assign(grid_lr=c["trial_id"].map(lr))
    return c.sort_values(["grid_lr", "epoch"]).reset_index(drop=True)


def kill_a_trial_node(cluster, uri: str, events: dict, stop: threading.Event, drain_s: float | None,
                      timeout_s: float = 600.0) -> None:
    """After the first reported epoch, remove a worker node that runs a trial (drained first with ``drain_s``)."""
    from noah_ray.store import results

    deadline = time.time() + timeout_s
    while time.time() < deadline and not stop.is_set():
        try:
            if len(results.hpo_curves(uri)):
                break
        except Exception:                        # the table does not exist yet
            pass
        time.sleep(0.2)
    remove_a_busy_node(cluster, events, deadline, stop, drain_s=drain_s)


def compare(lossy_uri: str, calm_uri: str, lossy, calm) -> dict:
    from noah_ray.store import results

    a, b = curves(lossy_uri), curves(calm_uri)
    cols = ["grid_lr", "epoch", "val_acc", "val_loss"]
    ta, tb = results.hpo(lossy_uri), results.hpo(calm_uri)
    return {"grid_points": int(tb["hp_retrain_lr"].nunique()),
            "trials_lossy": len(ta), "trials_calm": len(tb),
            "all_done": bool((ta["status"] == "done").all()),
            "curve_rows_lossy": len(a), "curve_rows_calm": len(b),
            "duplicate_curve_rows": int(a.duplicated(["grid_lr", "epoch"]).sum()),
            "same_curves": bool(len(a) == len(b) and (a[cols].values == b[cols].values).all()),
            "same_choice": lossy.values == calm.values, "errors_lossy": lossy.errors}


def run(args) -> dict:
    from noah_ray.config import JobConfig
    from noah_ray.data import write_generated_vtab
    from noah_ray.hpo.driver import run_hpo
    from noah_ray.run.preflight import resolve

    tmp = Path(tempfile.mkdtemp(prefix="noah-node-loss-hpo-"))
    write_generated_vtab(tmp / "data", "gen_color", num_train=args.train_images, num_val=32, num_test=16)
    jobs = {n: JobConfig.from_dict(job_dict(str(tmp / "data"), str(tmp / "store"), n, args)) for n in ("lossy", "calm")}
    uri = {n: str(tmp / "store" / n) for n in jobs}
    with local_cluster(args.nodes) as cluster:
        events: dict = {}
        stop = threading.Event()
        killer = threading.Thread(target=kill_a_trial_node, args=(cluster, uri["lossy"], events, stop, args.drain),
                                  daemon=True)
        killer.start()
        t0 = time.time()
        lossy = run_hpo(resolve(jobs["lossy"], ("hpo",), generate=True), "lora")
        wall_lossy = time.time() - t0
        stop.set()
        killer.join(timeout=30)
        t0 = time.time()
        calm = run_hpo(resolve(jobs["calm"], ("hpo",), generate=True), "lora")
        out = compare(uri["lossy"], uri["calm"], lossy, calm)
        # Tune leaves error.txt in the folder of a trial that failed (and was then retried)
        out.update(trials_failed_then_retried=len(list(Path(uri["lossy"], "hpo", "tune").rglob("error.txt"))),
                   node_removed="removed_at" in events, drained="drained_at" in events,
                   trial_retries=jobs["lossy"].hpo.trial_retries, wall_s_with_loss=round(wall_lossy, 1),
                   wall_s_undisturbed=round(time.time() - t0, 1), **({"error": events["error"]} if "error" in events
                                                                      else {}))
        return out


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__, 3, ">= 2: one is lost", drain="hpo.trial_retries")
    p.add_argument("--concurrent", type=int, default=2, help="trials at once")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--grid-points", type=int, default=4)
    p.add_argument("--train-images", type=int, default=128)
    return print_run(run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
