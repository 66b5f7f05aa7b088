"""jobs/: the entrypoints, the example configs, and (slow) a real ``ray job submit`` flow: a local
Ray head with the dashboard on 127.0.0.1, a job submitted with ``JobSubmissionClient`` from
this repository, polled to SUCCEEDED, its Parquet results read back from a moto S3 endpoint.

The Ray head here is its own cluster (own ports and temp dir), started with ``ray start
--block`` in a new process group and stopped by that group's id only, never with ``ray stop``
(which would stop every Ray on the machine)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pytest
import yaml

from noah_ray.cli import main as cli
from noah_ray.config import JobConfig

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def test_entrypoints_help_and_errors(tmp_path):
    for stage in ("pipeline", "supernet", "search", "race", "retrain", "hpo"):
        p = subprocess.run([PY, "-m", f"jobs.{stage}", "--help"], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0 and p.stdout.startswith(f"usage: python -m jobs.{stage}"), p.stderr
        assert "--config" in p.stdout and "--set" in p.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstorage: ftp://h/x\n")
    p = subprocess.run([PY, "-m", "jobs.pipeline", "--config", str(bad)], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1
    assert p.stderr.startswith("python -m jobs.pipeline: error: storage URI 'ftp://h/x'") and p.stderr.count("\n") == 1


def test_example_configs_load():
    demo = JobConfig.load(REPO / "jobs" / "configs" / "demo.yaml")
    vtab = JobConfig.load(REPO / "jobs" / "configs" / "vtab_cifar100.yaml")
    # the job config and the one `noah-ray demo` embeds stay the same apart from the paths
    embedded = cli.demo_config("/x").to_dict()
    mine = demo.to_dict()
    for d in (embedded, mine):
        d.pop("storage")
        d["data"].pop("root")
    assert mine == embedded
    # the VTAB job carries the paper's settings
    assert vtab.data.dataset == "cifar100" and vtab.model.checkpoint.endswith("ViT-B_16.npz")
    assert (vtab.supernet.epochs, vtab.supernet.lr, vtab.supernet.weight_decay, vtab.supernet.warmup_epochs) == \
        (500, 5e-4, 1e-4, 10)
    assert (vtab.search.population, vtab.search.top_k, vtab.search.mutations, vtab.search.crossovers,
            vtab.search.param_limit, vtab.search.mutation_prob, vtab.search.depth_prob) == \
        (50, 10, 25, 25, 0.64, 0.2, 0.4)
    assert (vtab.retrain.epochs, vtab.retrain.lr) == (100, 1e-3) and len(vtab.retrain.seeds) == 3
    assert {m: (s.depths, s.widths) for m, s in vtab.space.modules.items()} == \
        {m: ((3, 6, 9, 12), (1, 5, 10)) for m in ("vpt", "lora", "adapter")}


def test_vtab_job_without_data_fails_up_front(tmp_path):
    """Submitted where the checkpoint / data are missing, the job stops before writing anything."""
    p = subprocess.run([PY, "-m", "jobs.pipeline", "--config", "jobs/configs/vtab_cifar100.yaml",
                        "--set", f"storage={tmp_path / 'r'}"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 1 and "model.checkpoint './checkpoints/ViT-B_16.npz' does not exist" in p.stderr
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------ ray job submit
def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop_cluster(proc: subprocess.Popen, token_file: str) -> None:
    """Stop the head started by the fixture: SIGTERM to its own process group (the head is
    started with node draining off; 8 s at most), then SIGKILL; then any of its workers that left
    the group (they carry this cluster's unique token path in their environment).  Nothing else on
    the machine is touched."""
    for sig, wait in ((signal.SIGTERM, 8), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
            _group_gone(proc.pid, 2)
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    marker = f"RAY_AUTH_TOKEN_PATH={token_file}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                mine = marker in f.read().split(b"\0")
            if mine and int(pid) != os.getpid():
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def _group_gone(pgid: int, timeout: float) -> None:
    """Wait up to ``timeout`` s for process group ``pgid`` to have no process left (at most the
    fixed pause this replaces: a group whose exited members are not reaped yet waits it out)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


@pytest.fixture()
def ray_head():
    """``ray start --head --block`` with the dashboard on 127.0.0.1 and its own auth token;
    yields ``(dashboard URL, JobSubmissionClient)``."""
    gcs, dash, client, agent, agent_grpc, rt_env, metrics = _free_ports(7)
    temp = tempfile.mkdtemp(prefix="nrj", dir="/tmp")            # short: Ray's socket paths
    token = secrets.token_hex(32)                              # this cluster's own auth token
    token_file = os.path.join(temp, "auth_token")
    with open(token_file, "w") as f:
        f.write(token)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_file,
               PATH=os.pathsep.join([str(Path(PY).parent), env.get("PATH", "")]),   # as in an activated venv
               # on SIGTERM the head tears down at once instead of first draining the node for up to
               # 30 s (the job has finished by then; nothing is left to drain)
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    cmd = [str(Path(PY).with_name("ray")), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(gcs), "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "true",
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
           "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--runtime-env-agent-port", str(rt_env), "--metrics-export-port", str(metrics),
           "--temp-dir", temp, "--disable-usage-stats"]
    log = open(os.path.join(temp, "ray-start.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline, client_ = time.time() + 180, None
        while client_ is None:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {open(log.name).read()[-2000:]}")
            try:
                client_ = JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"})
            except (OSError, RuntimeError):                  # dashboard not up yet
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        yield url, client_
    finally:
        _stop_cluster(proc, token_file)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_job_submission_writes_parquet_to_s3(ray_head, s3_bucket, tmp_path, tiny_job):
    from ray.job_submission import JobStatus

    from noah_ray.data import write_generated_vtab
    from noah_ray.store import results

    url, client = ray_head
    endpoint, bucket = s3_bucket
    write_generated_vtab(tmp_path / "data", "gen_color", num_train=48, num_val=24, num_test=24)
    cfg = tiny_job(
        tmp_path / "data", f"s3://{bucket}/noah", name="submitted", storage_endpoint=endpoint,
        data={"batch_size": 16},
        space={"num_layers": 12, "modules": {"lora": {"widths": [1, 4]}, "adapter": {"widths": [1, 4]}}},
        supernet={"warmup_epochs": 0, "eval_random_subnets": 0},
        search={"population": 3, "top_k": 1, "crossovers": 0, "max_concurrent": 1, "hold_actors": False},
        retrain={"warmup_epochs": 0})
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(cfg))
    job_id = client.submit_job(
        entrypoint=f"python -m jobs.pipeline --config {config}",
        runtime_env={"working_dir": str(REPO),
                     "excludes": [".venv", ".git", "noah-results", "*.egg-info", ".pytest_cache", "__pycache__"]})
    deadline = time.time() + 600
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                             JobStatus.STOPPED}:
        assert time.time() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(0.5)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "== supernet" in logs and "== search" in logs and "retrain noah: test" in logs
    # the results, read back from S3 with plain pandas + pyarrow and with noah_ray.store.results
    fs = pafs.S3FileSystem(endpoint_override=endpoint.split("://")[1], scheme="http")
    runs = pd.read_parquet(f"{bucket}/noah/submitted/retrain/runs", filesystem=fs)
    assert list(runs["method"]) == ["noah"] and runs["test_acc"].between(0, 100).all()
    trials = pd.read_parquet(f"{bucket}/noah/submitted/search/trials", filesystem=fs)
    assert len(trials) == 3 and (trials["params"] <= 0.01e6).all()
    board = results.leaderboard(f"s3://{bucket}/noah", endpoint)
    assert board.set_index("method").loc["noah", "test_acc_mean"] == pytest.approx(runs["test_acc"].item())
    assert not (tmp_path / "noah-results").exists()
