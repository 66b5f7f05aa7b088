"""Node loss during the finalist race (issue 27): a race trial loses its node and resumes.

A local cluster (``bench/local_cluster.py``: a CPU-0 head and ``--nodes`` worker nodes of one CPU,
every node its own raylet) trains the tiny supernet and runs the search once; then the race (the
search's top finalists plus the one-module baselines, ASHA, ``race.max_concurrent`` trials at once
on one CPU each, a checkpoint every epoch) runs twice on them: ``lossy``, which loses the node of a
running trial once a trial has reported an epoch (``--drain S``: drained for pre-emption first,
with ``race.trial_retries: 0``), and ``calm``, undisturbed (the first race's folder is moved aside
first).  Tune retries the lost trial from its last checkpoint on a node left.

Checked per trial (finalist): the val accuracy of every epoch both races ran is equal (training is
deterministic, so a retried trial repeats its curve); no duplicate curve rows; every trial ended
(finished, or stopped by ASHA); the survivor.  ASHA decides by the order results arrive, which two
trials at once make timing-dependent even without a loss, so the epochs each trial ran (and so the
survivor) may differ between two undisturbed races too; the bench reports whether they did.

With ``--scheduler sync`` (each rung decided on all its results) the epochs each trial ran must be
equal too.

    python bench/node_loss_race.py [--nodes 3] [--concurrent 2] [--drain 1] [--scheduler sync]  # ~2-3 min
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from local_cluster import (  # bench/local_cluster.py
    bench_parser,
    isolate,
    local_cluster,
    print_run,
    remove_a_busy_node,
    tiny_job,
)

isolate()   # before Ray is imported


def job_dict(data_root: str, storage: str, args) -> dict:
    return {**tiny_job("raced", storage, data_root),
            "search": {"generations": 1, "population": 6, "top_k": 2, "mutations": 1, "crossovers": 1,
                       "param_limit": 0.02, "max_concurrent": args.concurrent, "cpus_per_trial": 1,
                       "hold_actors": False},
            "race": {"finalists": 2, "baselines": True, "max_epochs": args.epochs, "grace_period": 1,
                     "reduction_factor": 2, "max_concurrent": args.concurrent, "cpus_per_trial": 1,
                     "scheduler": args.scheduler,
                     "trial_retries": 0 if args.drain is not None else 2},
            "retrain": {"epochs": args.epochs, "lr": 3e-3, "warmup_epochs": 0, "seeds": [0], "baselines": []}}


def race_curves(race_dir: Path):
    """Per finalist and epoch: val accuracy and loss, sorted."""
    from noah_ray.store import storage

    loc = storage.resolve(str(race_dir))
    curves, table = storage.read_table(loc, "hpo_curves"), storage.read_table(loc, "finalists")
    if curves is None or table is None:
        raise RuntimeError(f"the race under {race_dir} wrote no curves or finalists")
    c, f = curves.to_pandas(), table.to_pandas().drop_duplicates("trial_id", keep="last")
    c = c.assign(finalist=c["trial_id"].map(dict(zip(f["trial_id"], f["finalist"]))))
    return c.sort_values(["finalist", "epoch"]).reset_index(drop=True), f


def kill_a_race_node(cluster, race_dir: Path, events: dict, stop: threading.Event, drain_s: float | None,
                     timeout_s: float = 600.0) -> None:
    """After the first reported epoch, remove a worker node that runs a race trial."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and not stop.is_set() and not any(race_dir.glob("hpo_curves/*")):
        time.sleep(0.2)
    remove_a_busy_node(cluster, events, deadline, stop, drain_s=drain_s)


def compare(lossy_dir: Path, calm_dir: Path, lossy, calm) -> dict:
    (a, fa), (b, fb) = race_curves(lossy_dir), race_curves(calm_dir)
    both = a.merge(b, on=["finalist", "epoch"], suffixes=("_lossy", "_calm"))
    ran = {n: dict(zip(f["finalist"], f["epochs_run"])) for n, f in (("lossy", fa), ("calm", fb))}
    return {"trials_lossy": len(fa), "trials_calm": len(fb),
            "all_ended_lossy": bool(fa["status"].eq("done").all()),
            "duplicate_curve_rows": int(a.duplicated(["finalist", "epoch"]).sum()),
            "common_epochs": len(both),
            "same_curves_on_common_epochs": bool((both["val_acc_lossy"] == both["val_acc_calm"]).all()
                                                 and (both["val_loss_lossy"] == both["val_loss_calm"]).all()),
            "same_epochs_run": ran["lossy"] == ran["calm"], "epochs_run_lossy": ran["lossy"],
            "epochs_run_calm": ran["calm"],
            "same_survivor": (lossy.finalist, lossy.val_acc) == (calm.finalist, calm.val_acc)}


def run(args) -> dict:
    from noah_ray.config import JobConfig
    from noah_ray.data import write_generated_vtab
    from noah_ray.hpo.race import run_race
    from noah_ray.run.preflight import resolve
    from noah_ray.search.driver import run_search
    from noah_ray.train.runs import train_supernet

    tmp = Path(tempfile.mkdtemp(prefix="noah-node-loss-race-"))
    write_generated_vtab(tmp / "data", "gen_color", num_train=args.train_images, num_val=64, num_test=16)
    job = JobConfig.from_dict(job_dict(str(tmp / "data"), str(tmp / "store"), args))
    race_dir = tmp / "store" / "raced" / "race"
    with local_cluster(args.nodes) as cluster:
        train_supernet(resolve(job, ("supernet",), generate=True))
        run_search(job)
        events: dict = {}
        stop = threading.Event()
        killer = threading.Thread(target=kill_a_race_node, args=(cluster, race_dir, events, stop, args.drain),
                                  daemon=True)
        killer.start()
        t0 = time.time()
        lossy = run_race(resolve(job, ("race",)))
        wall_lossy = time.time() - t0
        stop.set()
        killer.join(timeout=30)
        shutil.move(race_dir, tmp / "race_lossy")
        t0 = time.time()
        calm = run_race(resolve(job, ("race",)))
        out = compare(tmp / "race_lossy", race_dir, lossy, calm)
        failed = list((tmp / "race_lossy").rglob("error.txt"))   # Tune's, in a trial that failed (then retried)
        out.update(trials_failed_then_retried=len(failed), node_removed="removed_at" in events,
                   drained="drained_at" in events, trial_retries=job.race.trial_retries,
                   wall_s_with_loss=round(wall_lossy, 1), wall_s_undisturbed=round(time.time() - t0, 1),
                   **({"error": events["error"]} if "error" in events else {}))
        return out


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__, 3, ">= 2: one is lost", drain="race.trial_retries")
    p.add_argument("--concurrent", type=int, default=2, help="race trials at once")
    p.add_argument("--epochs", type=int, default=6, help="the race's top rung")
    p.add_argument("--train-images", type=int, default=128)
    p.add_argument("--scheduler", default="asha", choices=("asha", "sync"), help="race.scheduler")
    return print_run(run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
