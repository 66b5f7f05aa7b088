"""The head node lost (issue 27): the cluster dies with its driver, the job is submitted again to a
new cluster and resumes from object storage.

A child process of this bench starts a local multi-node Ray (``ray.cluster_utils.Cluster``: a
CPU-0 head and ``--nodes`` worker nodes of one CPU, each its own raylet) and runs
``noah-ray pipeline --address`` against it, as a user's ``ray job submit`` would.  Storage is a real
S3 endpoint (a moto server in this process), so no node's disk holds the job.  When the run
reaches ``--at`` (``supernet``: its first checkpoint; ``search``: ``--after`` scored candidates;
``race``: ``--after`` race epochs recorded, with the synchronous race on: ``race.scheduler: sync``),
every process of that cluster and its driver is killed with SIGKILL at once, as when the head
machine dies (its GCS gone, the worker nodes lose the cluster too).  A new cluster is started and
the same job submitted again (the dead run's lease was held by a process of this host that is gone,
so it is taken over at once; from another host the new run would wait out the lease timeout).
Then the same job under another name, undisturbed, on a third cluster.

Checked: the re-submitted run finished; the supernet's final weights, the search's scores and
winner, the race's stops and survivor (``--at race``) and the retrained model's test accuracy equal
the undisturbed run's; no candidate scored twice; what was redone (supernet epochs, candidates).
Measured: re-submission to the pipeline's end, and the undisturbed pipeline's time.  No process
of any of the clusters is left at the end.

Prints one JSON line.

    python bench/head_loss.py [--at supernet|search|race] [--nodes 2]      # ~4-6 min on 2 cores
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml
from local_cluster import FAST_HEALTH, bench_parser, isolate, start_s3, tiny_job  # bench/local_cluster.py

MARK = "NOAH_BENCH_CLUSTER"          # every process of one cluster (and its driver) carries MARK=<its id>


def job_dict(data_root: str, endpoint: str, name: str, args) -> dict:
    job = tiny_job(name, "s3://bench/store", data_root, endpoint=endpoint)
    job["supernet"].update(epochs=args.epochs, checkpoint_every=1)
    return {**job,
            "search": {"generations": 2, "population": 6, "top_k": 2, "mutations": 2, "crossovers": 2,
                       "param_limit": 0.02, "max_concurrent": args.nodes, "cpus_per_trial": 1, "hold_actors": False},
            # --at race: the synchronous race (its restore replays the rung decisions from storage)
            "race": {"enabled": True, "finalists": 2, "baselines": True, "max_epochs": 6, "grace_period": 1,
                     "reduction_factor": 2, "max_concurrent": args.nodes, "scheduler": "sync"}
            if args.at == "race" else {"enabled": False},
            "retrain": {"epochs": 2, "warmup_epochs": 0, "seeds": [0], "baselines": []}}


# ------------------------------------------------------------------ the child: one cluster + one submission
def child(config: str, nodes: int) -> int:
    """Start a cluster, run the pipeline against it, stop the cluster; the pipeline's exit status."""
    isolate()
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": FAST_HEALTH})
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        exe = str(Path(sys.executable).with_name("noah-ray"))
        return subprocess.run([exe, "pipeline", "--config", config, "--address", cluster.address]).returncode
    finally:
        cluster.shutdown()


class Submission:
    """One child (cluster + pipeline) whose every process carries its own mark."""

    def __init__(self, config: Path, nodes: int, log: Path) -> None:
        self.mark = uuid.uuid4().hex
        self.log = open(log, "w")
        env = {**os.environ, MARK: self.mark}
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", str(config), "--nodes", str(nodes)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def pids(self) -> list[int]:
        marker = f"{MARK}={self.mark}".encode()
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if marker in f.read().split(b"\0"):
                        found.append(int(pid))
            except OSError:
                continue
        return found

    def kill(self) -> int:
        """SIGKILL every process of this cluster (again while any is left: one being started
        during a pass escapes it); how many were killed."""
        killed: set[int] = set()
        for _ in range(20):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        self.proc.wait(30)
        return len(killed)

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout_s)
        finally:
            self.kill()                  # anything the child's own shutdown left behind
            self.log.close()


# ------------------------------------------------------------------ watching storage for the kill point
def supernet_checkpoints(uri: str, endpoint: str) -> int:
    from noah_ray.store import storage

    loc = storage.resolve(uri, endpoint).join("supernet")
    try:
        return sum(1 for f in storage.list_files(loc) if "/checkpoint_e" in f.path and f.path.endswith("state.json"))
    except Exception:                    # not written yet
        return 0


def scored(uri: str, endpoint: str):
    from noah_ray.store import results

    try:
        t = results.load_trials(uri, endpoint)
    except Exception:                    # not written yet
        return None
    return t[t["status"] == "done"] if len(t) else None


def race_epochs(uri: str, endpoint: str) -> int:
    """Race epochs recorded so far (the race's ``hpo_curves`` rows)."""
    from noah_ray.store import storage

    try:
        return len(storage.list_files(storage.resolve(uri, endpoint).join("race", "hpo_curves"), ".parquet"))
    except Exception:                    # not written yet
        return 0


def reached(at: str, uri: str, endpoint: str, after: int) -> bool:
    if at == "supernet":
        return supernet_checkpoints(uri, endpoint) >= 1
    if at == "race":
        return race_epochs(uri, endpoint) >= after
    done = scored(uri, endpoint)
    return done is not None and len(done) >= after


def kill_at(sub: Submission, at: str, uri: str, endpoint: str, after: int, timeout_s: float = 900.0) -> dict:
    deadline = time.time() + timeout_s
    while not reached(at, uri, endpoint, after):
        if sub.proc.poll() is not None or time.time() > deadline:
            sub.kill()
            return {"error": f"the run ended (rc {sub.proc.returncode}) or timed out before reaching {at}"}
        time.sleep(0.2)
    done = scored(uri, endpoint)
    out = {"lost_at": time.time(), "checkpoints_before": supernet_checkpoints(uri, endpoint),
           "scored_before": 0 if done is None else len(done), "race_epochs_before": race_epochs(uri, endpoint)}
    out["processes_killed"] = sub.kill()
    out["left_after_kill"] = len(sub.pids())
    return out


# ------------------------------------------------------------------ comparing with the undisturbed run
def outcome(job: dict) -> dict:
    from noah_ray.config import JobConfig
    from noah_ray.search.driver import load_best_subnet
    from noah_ray.store import results, storage

    uri, endpoint = f"{job['storage']}/{job['name']}", job["storage_endpoint"]
    state, meta = storage.load_state(storage.resolve(uri, endpoint).join("supernet", "final"))
    done = scored(uri, endpoint)
    runs = results.runs(uri, endpoint)
    race = results.finalists(uri, endpoint)
    return {"race": {int(r.finalist): (int(r.epochs_run), bool(r.chosen)) for r in race.itertuples()},
            "state": state, "start_epochs": meta.get("start_epochs"),
            "scores": dict(zip(done["config_key"], done["val_acc"])),
            "scored_twice": int(done["config_key"].duplicated().sum() + done["trial_id"].duplicated().sum()),
            "winner": load_best_subnet(JobConfig.from_dict(job)).to_dict(),
            "test_acc": {f"{r.method}-seed{r.seed}": float(r.test_acc) for r in runs.itertuples()}}


def compare(lossy: dict, calm: dict) -> dict:
    import torch

    a, b = lossy["state"], calm["state"]
    starts = lossy["start_epochs"] or []
    return {"supernet_weights_equal": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
            "supernet_start_epochs": starts, "same_scores": lossy["scores"] == calm["scores"],
            "candidates": len(lossy["scores"]), "scored_twice": lossy["scored_twice"],
            "same_winner": lossy["winner"] == calm["winner"],
            "same_test_acc": lossy["test_acc"] == calm["test_acc"] and bool(calm["test_acc"]),
            "test_acc": lossy["test_acc"], "same_race": lossy["race"] == calm["race"],
            "race_epochs_and_chosen": lossy["race"]}


def run(args) -> dict:
    from noah_ray.data import write_generated_vtab

    tmp = Path(tempfile.mkdtemp(prefix="noah-head-loss-"))
    write_generated_vtab(tmp / "data", "gen_color", num_train=args.train_images, num_val=64, num_test=32)
    server, endpoint = start_s3()       # its fake keys are in the environment every cluster inherits
    jobs = {n: job_dict(str(tmp / "data"), endpoint, n, args) for n in ("lossy", "calm")}
    for n, job in jobs.items():
        (tmp / f"{n}.yaml").write_text(yaml.safe_dump(job))
    subs: list[Submission] = []

    def submit(name: str, log: str) -> Submission:
        subs.append(Submission(tmp / f"{name}.yaml", args.nodes, tmp / log))
        return subs[-1]

    try:
        first = submit("lossy", "first.log")
        out = kill_at(first, args.at, "s3://bench/store/lossy", endpoint, args.after)
        first.wait(30)
        t0 = time.time()
        rc_again = submit("lossy", "again.log").wait(1800)
        out.update(resubmitted_rc=rc_again, resubmit_to_done_s=round(time.time() - t0, 1))
        t0 = time.time()
        out.update(undisturbed_rc=submit("calm", "calm.log").wait(1800), undisturbed_s=round(time.time() - t0, 1))
        out["processes_left"] = sum(len(s.pids()) for s in subs)
        if rc_again == 0 and out["undisturbed_rc"] == 0:
            out.update(compare(outcome(jobs["lossy"]), outcome(jobs["calm"])))
            starts, before = out["supernet_start_epochs"], out.get("checkpoints_before")
            # finished (checkpointed) epochs trained again; None: the supernet had ended before the loss
            out["supernet_epochs_redone"] = max(0, before - starts[-1]) if len(starts) > 1 and before else None
        else:
            out["log_tail"] = (tmp / "again.log").read_text()[-1500:]
        out["lost_during"] = args.at
        return out
    finally:
        for sub in subs:                 # whatever happened (Ctrl-C too): no process of any cluster is left
            sub.kill()
        server.stop()


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(sys.argv[2], int(sys.argv[4]))
    p = bench_parser(__doc__, 2, ">= 1")
    p.add_argument("--at", choices=("supernet", "search", "race"), default="supernet",
                   help="where the head is lost (race: the synchronous race runs, lost after --after epochs)")
    p.add_argument("--after", type=int, default=4, help="--at search: scored candidates before the loss")
    p.add_argument("--epochs", type=int, default=4, help="supernet epochs (a checkpoint after each)")
    p.add_argument("--train-images", type=int, default=128)
    args = p.parse_args(argv)
    print(json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
