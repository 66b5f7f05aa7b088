"""Node loss during the subnet search, on a real multi-node Ray: a node dies with candidates in flight.

A local cluster (``ray.cluster_utils.Cluster``: a CPU-0 head and ``--nodes`` worker nodes of one
CPU, each its own raylet) trains the tiny supernet once, then runs the evolutionary search twice on
it with the same seed: ``lossy``, whose evaluation trials run ``max_concurrent`` at a time on the
worker nodes and lose one node (raylet and every process on it killed) while candidates are being
scored, and ``calm``, undisturbed.  A trial on the lost node fails as a system failure and Tune
retries it on a node left (``search.trial_retries``).

Checked: every candidate of ``calm`` was scored in ``lossy`` with the same val accuracy, none is
recorded as scored twice (one ``done`` row per candidate in the ``trials`` table, as many as the
search's state says it scored), the winner and the Pareto front are the same.  Measured: the
wall time of both runs, and the time from the node's removal to the next scored candidate.

``--drain S``: the node is first drained for pre-emption (Ray's drain API, deadline S seconds) and
removed at the deadline, with ``search.trial_retries: 0``: a pre-empted evaluation must not be
charged to the failure budget, so every candidate is still scored.

Prints one JSON line.

    python bench/node_loss_search.py              # ~3-4 min on 2 cores
"""

from __future__ import annotations

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


def job_dict(data_root: str, storage: str, concurrent: int, population: int, generations: int,
             retries: int = 2) -> dict:
    return {**tiny_job("searched", storage, data_root, ("vpt", "lora", "adapter")),
            "search": {"generations": generations, "population": population, "top_k": 3, "mutations": 2,
                       "crossovers": 2, "param_limit": 0.02, "max_concurrent": concurrent, "cpus_per_trial": 1,
                       "trial_retries": retries, "hold_actors": False}}


def scored(uri: str, run: str):
    """The run's trials rows: all attempts, and the ``done`` ones."""
    from noah_ray.store import results

    t = results.load_trials(uri)
    t = t[t["run_id"] == run]
    return t, t[t["status"] == "done"]


def kill_while_scoring(cluster, uri: str, run: str, events: dict, stop: threading.Event,
                       drain_s: float | None = None, timeout_s: float = 600.0) -> None:
    """After the run's first scored candidate, remove a worker node that is running a trial (never
    after ``stop`` is set: the run ended)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and not stop.is_set():
        try:
            if len(scored(uri, run)[1]):
                break
        except Exception:                        # the table does not exist yet
            pass
        time.sleep(0.3)
    remove_a_busy_node(cluster, events, deadline, stop, lambda: {"done_before": len(scored(uri, run)[1])},
                       drain_s=drain_s)


def compare(uri: str, lossy, calm, events: dict) -> dict:
    from noah_ray.store import results

    rows, done = scored(uri, "lossy")
    _, calm_done = scored(uri, "calm")
    acc = dict(zip(done["config_key"], done["val_acc"]))
    calm_acc = dict(zip(calm_done["config_key"], calm_done["val_acc"]))
    pareto = results.pareto(uri)
    front = {r: sorted(pareto[pareto["run_id"] == r]["config_json"]) for r in ("lossy", "calm")}
    after = done[done["timestamp"].map(lambda t: t.timestamp()) > events.get("removed_at", float("inf"))]
    first_after = float(after["timestamp"].map(lambda t: t.timestamp()).min()) if len(after) else None
    return {"candidates_lossy": len(done), "candidates_calm": len(calm_done),
            "attempts_lossy": len(rows), "failed_attempts": int((rows["status"] != "done").sum()),
            "scored_twice": int(done["trial_id"].duplicated().sum() + done["config_key"].duplicated().sum()),
            "state_evaluated": lossy.evaluated, "same_scores": acc == calm_acc,
            "same_winner": lossy.best == calm.best and lossy.best_val_acc == calm.best_val_acc,
            "same_pareto": front["lossy"] == front["calm"] and bool(front["calm"]),
            "done_before_loss": events.get("done_before"),
            "removal_to_next_scored_s": round(first_after - events["removed_at"], 1) if first_after else None,
            **({"error": events["error"]} if "error" in events else {})}


def run(args) -> dict:
    from noah_ray.config import JobConfig
    from noah_ray.data import write_generated_vtab
    from noah_ray.run.preflight import resolve
    from noah_ray.search.driver import run_search
    from noah_ray.train.runs import train_supernet

    tmp = Path(tempfile.mkdtemp(prefix="noah-node-loss-search-"))
    write_generated_vtab(tmp / "data", "gen_color", num_train=64, num_val=args.val_images, num_test=16)
    job = JobConfig.from_dict(job_dict(str(tmp / "data"), str(tmp / "store"), args.concurrent, args.population,
                                       args.generations, 0 if args.drain is not None else 2))
    uri = str(tmp / "store" / "searched")
    with local_cluster(args.nodes) as cluster:
        train_supernet(resolve(job, ("supernet",), generate=True))
        events: dict = {}
        stop = threading.Event()
        killer = threading.Thread(target=kill_while_scoring, args=(cluster, uri, "lossy", events, stop, args.drain),
                                  daemon=True)
        killer.start()
        t0 = time.time()
        lossy = run_search(job, run_name="lossy")
        wall_lossy = time.time() - t0
        stop.set()
        killer.join(timeout=30)
        t0 = time.time()
        calm = run_search(job, run_name="calm")
        out = compare(uri, lossy, calm, events)
        # Tune leaves error.txt in the folder of a trial that failed (and was then retried)
        failed = [f for f in Path(uri, "search", "tune").rglob("error.txt") if "lossy" in str(f)]
        out.update(trials_failed_then_retried=len(failed), drained="drained_at" in events,
                   trial_retries=job.search.trial_retries,
                   wall_s_with_loss=round(wall_lossy, 1), wall_s_undisturbed=round(time.time() - t0, 1))
        return out


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__, 3, ">= 2: one is lost", drain="search.trial_retries")
    p.add_argument("--concurrent", type=int, default=3, help="search trials at once")
    p.add_argument("--population", type=int, default=9)
    p.add_argument("--generations", type=int, default=2)
    p.add_argument("--val-images", type=int, default=128)
    return print_run(run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
