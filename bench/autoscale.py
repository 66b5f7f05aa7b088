"""Autoscaling from our cluster YAML, on this machine: nodes added for the work, removed when idle.

``cluster/aws.yaml``'s node types become a ``fake_multinode`` cluster config (:func:`fake_config`):
the same type names and head, each worker type's CPUs scaled down to what this machine can lend
(``--cpus-per-node``), its GPUs kept as a custom resource ``GPU_SIM`` (a CPU machine has no GPU to
schedule on), ``max_workers`` capped, ``idle_timeout_minutes`` shortened.  A head with no CPU
(as in the YAML) is started by ``ray start --head --block --autoscaling-config`` with its own
ports, temp dir and auth token; Ray's autoscaler then starts every worker node as a separate
raylet on this machine when work is pending, and stops it when idle.  Nothing is mocked.

Scenario: the tiny NOAH pipeline (supernet with 1 worker, a search with ``max_concurrent`` trials
of 1 CPU, retraining) is submitted with ``--address`` to that head, so every piece of work needs
a node the autoscaler adds; a poller records the alive worker nodes every second.  Then a job
asking more than any node type holds (``search.cpus_per_trial`` above the largest type) is
refused before it starts, in one line, from the YAML (``NOAH_RAY_CLUSTER_CONFIG``).  Every
process started here is stopped by PID (the head's process group, then any process carrying this
cluster's token path); no other Ray on the machine is touched.

Prints one JSON line: nodes over time, the most worker nodes at once, seconds from the pipeline's
end until no worker node was left, the refusal line.

    python bench/autoscale.py                 # ~3-4 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
#: a GPU of the YAML becomes this custom resource on the fake nodes (no GPU to schedule on here)
GPU_SIM = "GPU_SIM"


def fake_config(src: Path, gcs_address: str, *, cpus_per_node: float = 1.0, max_per_type: int = 2,
                max_workers: int = 3, idle_timeout_minutes: float = 0.1) -> dict:
    """The ``fake_multinode`` cluster config of the cluster YAML ``src``: its node types, head
    and ``max_workers`` scaled to this machine (see the module doc)."""
    data = yaml.safe_load(src.read_text())
    head = data["head_node_type"]
    types: dict = {}
    for name, t in data["available_node_types"].items():
        res = dict(t.get("resources") or {})
        if name == head:
            types[name] = {"resources": {"CPU": float(res.get("CPU", 0))}, "node_config": {}, "max_workers": 0}
            continue
        fake = {"CPU": min(float(res.get("CPU", 1)), cpus_per_node)}
        if res.get("GPU"):
            fake[GPU_SIM] = float(res["GPU"])
        types[name] = {"resources": fake, "node_config": {}, "min_workers": 0,
                       "max_workers": min(int(t.get("max_workers", 1)), max_per_type)}
    return {"cluster_name": f"{data.get('cluster_name', 'noah')}-fake", "max_workers": min(max_workers,
            int(data.get("max_workers", max_workers))), "upscaling_speed": 1.0,
            "idle_timeout_minutes": idle_timeout_minutes, "head_node_type": head, "available_node_types": types,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": gcs_address},
            "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "initialization_commands": [],
            "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
            "head_start_ray_commands": [], "worker_start_ray_commands": [], "rsync_exclude": [],
            "rsync_filter": [], "file_mounts_sync_continuously": False}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def own_token() -> tuple[str, str]:
    """A temp dir (short: Ray's socket paths) holding this cluster's own auth token; this process
    authenticates with it too (set before ``ray`` is imported, which reads it once)."""
    temp = tempfile.mkdtemp(prefix="nra", dir="/tmp")
    token_file = os.path.join(temp, "auth_token")
    Path(token_file).write_text(secrets.token_hex(32))
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_file)
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.pop("RAY_ADDRESS", None)
    return temp, token_file


class FakeCluster:
    """``ray start --head --block`` of a fake autoscaling cluster; :meth:`stop` ends every process
    it started (its process group, then anything carrying its token path)."""

    def __init__(self, src: Path, temp: str, token_file: str, **scale) -> None:
        import ray._private.services as services

        self.temp, self.token_file = temp, token_file
        gcs, client, agent, agent_grpc, rt_env, metrics = _free_ports(6)
        self.address = f"{services.get_node_ip_address()}:{gcs}"
        self.config = fake_config(src, self.address, **scale)
        self.config_path = Path(self.temp, "cluster.yaml")
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.env = dict(os.environ)
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=self.token_file, RAY_FAKE_CLUSTER="1",
                        AUTOSCALER_UPDATE_INTERVAL_S="1",
                        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
        cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
               f"--autoscaling-config={self.config_path}", "--port", str(gcs), "--num-cpus", "0", "--num-gpus", "0",
               "--include-dashboard", "false", "--ray-client-server-port", str(client),
               "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
               "--runtime-env-agent-port", str(rt_env), "--metrics-export-port", str(metrics),
               "--temp-dir", self.temp, "--disable-usage-stats"]
        self.log = open(os.path.join(self.temp, "ray-start.log"), "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(wait)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        marker = f"RAY_AUTH_TOKEN_PATH={self.token_file}".encode()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    mine = marker in f.read().split(b"\0")
                if mine and int(pid) != os.getpid():
                    os.kill(int(pid), signal.SIGKILL)
            except (OSError, ValueError):
                continue
        self.log.close()


def job_dict(data_root: str, storage: str, concurrent: int) -> dict:
    modules = {m: {"depths": [3, 12], "widths": [1, 5]} for m in ("lora", "adapter")}
    return {"name": "autoscaled", "storage": storage,
            "data": {"root": data_root, "dataset": "gen_color", "batch_size": 16, "num_workers": 0},
            "model": {"name": "vit_noah_tiny_patch4_32", "drop_path_rate": 0.0},
            "space": {"num_layers": 12, "modules": modules},
            "supernet": {"epochs": 1, "warmup_epochs": 0, "num_workers": 1, "eval_random_subnets": 0},
            "search": {"generations": 1, "population": 2 * concurrent, "top_k": 2, "mutations": 1, "crossovers": 1,
                       "param_limit": 0.01, "max_concurrent": concurrent, "hold_actors": False},
            "race": {"enabled": False},
            "retrain": {"epochs": 1, "warmup_epochs": 0, "seeds": [0], "baselines": []}}


class NodePoller(threading.Thread):
    """Alive worker nodes (those with CPU) every ``period_s``: ``timeline`` of (seconds, count)
    at every change."""

    def __init__(self, t0: float, period_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.t0, self.period_s, self.timeline, self.done = t0, period_s, [], threading.Event()

    def count(self) -> int:
        import ray

        return sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0)

    def run(self) -> None:
        while not self.done.is_set():
            n = self.count()
            if not self.timeline or self.timeline[-1][1] != n:
                self.timeline.append((round(time.time() - self.t0, 1), n))
            time.sleep(self.period_s)


def _wait_connect(cluster: FakeCluster, timeout_s: float = 120.0) -> None:
    import ray

    deadline = time.time() + timeout_s
    while True:
        if cluster.proc.poll() is not None:
            raise RuntimeError(f"ray start exited: {Path(cluster.log.name).read_text()[-2000:]}")
        try:
            ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
            return
        except Exception:                      # the head is not up yet
            if time.time() > deadline:
                raise
            time.sleep(2)


def run_pipeline(cluster: FakeCluster, config: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**cluster.env, **(extra_env or {})}
    env.pop("RAY_FAKE_CLUSTER", None)
    exe = str(Path(sys.executable).with_name("noah-ray"))
    return subprocess.run([exe, "pipeline", "--config", str(config), "--address", cluster.address],
                          capture_output=True, text=True, env=env, timeout=900)


def scenario(work: Path, concurrent: int, idle_wait_s: float, temp: str, token_file: str) -> dict:
    import ray

    from noah_ray.data import write_generated_vtab

    write_generated_vtab(work / "data", "gen_color", num_train=64, num_val=32, num_test=32)
    cluster = FakeCluster(REPO / "cluster" / "aws.yaml", temp, token_file, max_workers=concurrent,
                          max_per_type=concurrent)
    out: dict = {"config_types": {k: v["resources"] for k, v in cluster.config["available_node_types"].items()}}
    try:
        _wait_connect(cluster)
        t0 = time.time()
        poller = NodePoller(t0)
        poller.start()
        cfg = work / "job.yaml"
        cfg.write_text(yaml.safe_dump(job_dict(str(work / "data"), str(work / "store"), concurrent)))
        p = run_pipeline(cluster, cfg)
        out["pipeline_rc"], out["pipeline_s"] = p.returncode, round(time.time() - t0, 1)
        out["pipeline_tail"] = (p.stdout + p.stderr)[-1500:] if p.returncode else ""
        ended = time.time()
        while poller.count() > 0 and time.time() - ended < idle_wait_s:
            time.sleep(1)
        out["idle_to_zero_s"] = round(time.time() - ended, 1) if poller.count() == 0 else None
        poller.done.set()
        poller.join(5)
        out["timeline"] = poller.timeline
        out["max_workers_seen"] = max(n for _, n in poller.timeline)
        big = job_dict(str(work / "data"), str(work / "store2"), concurrent)
        big["search"]["cpus_per_trial"] = 64
        cfg2 = work / "big.yaml"
        cfg2.write_text(yaml.safe_dump(big))
        r = run_pipeline(cluster, cfg2, {"NOAH_RAY_CLUSTER_CONFIG": str(cluster.config_path)})
        out["refusal_rc"], out["refusal"] = r.returncode, r.stderr.strip()
        # nothing left behind (preflight's writability probe and the lease come and go before the check)
        out["refused_before_writing"] = not any(p.is_file() for p in (work / "store2").rglob("*"))
    finally:
        ray.shutdown()
        cluster.stop()
    return out


def _sigterm(signum, frame) -> None:
    raise SystemExit(f"stopped by signal {signum}")      # so that the finally clauses stop the cluster


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrent", type=int, default=2, help="search trials at once = worker nodes it can use")
    p.add_argument("--idle-wait", type=float, default=120.0, help="seconds to wait for idle nodes to go")
    p.add_argument("--work", type=Path, default=None)
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="noah-autoscale-"))
    signal.signal(signal.SIGTERM, _sigterm)
    temp, token_file = own_token()
    try:
        out = scenario(work, args.concurrent, args.idle_wait, temp, token_file)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    print("AUTOSCALE " + json.dumps(out), flush=True)
    return 0 if out.get("pipeline_rc") == 0 and out.get("refusal_rc") == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
