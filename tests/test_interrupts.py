"""SIGTERM and SIGINT to a running stage command (issue 28, item 7): what ``timeout``, Kubernetes,
Slurm and the cluster launcher send.  The stage stops, the Ray the command started is shut down,
the lease is released, one line says what was saved and the command that resumes, the exit status
is 128 + the signal (143, 130), no process the command started is left, and a rerun resumes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from noah_ray.store.layout import JobPaths

EXE = Path(sys.executable).with_name("noah-ray")


def _lines(proc: subprocess.Popen, sink: list[str]) -> threading.Thread:
    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sink.append(line)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return t


def _wait_for(sink: list[str], text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while not any(text in ln for ln in sink):
        assert proc.poll() is None, "".join(sink)[-3000:]
        assert time.time() < deadline, f"no {text!r} in:\n" + "".join(sink)[-3000:]
        time.sleep(0.2)


def _gone(pids: list[int], timeout: float = 30) -> list[int]:
    """The processes of ``pids`` still alive after ``timeout`` s (zombies count as gone)."""
    deadline = time.time() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.1)


def _stop(pids: list[int]) -> None:
    for pid in pids:                                     # only what this test's command started
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture()
def job_file(tmp_path, tiny_job) -> Path:
    from noah_ray.data import write_generated_vtab

    # written here, smaller than the 800-image default the command writes: epochs of about a second,
    # still 4 of them left after the signal is sent
    write_generated_vtab(tmp_path / "data", "gen_color", num_train=192, num_val=32, num_test=32)
    cfg = tiny_job(tmp_path / "data", tmp_path / "store", name="sig", supernet={"epochs": 6},
                   retrain={"epochs": 6, "seeds": [0, 1], "max_concurrent": 2})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture()
def ray_env():
    """A Ray of the command's own: local (no RAY_ADDRESS) with its own short temp dir."""
    tmp = tempfile.mkdtemp(prefix="nrsig")
    yield {**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": tmp, "PYTHONUNBUFFERED": "1"}
    shutil.rmtree(tmp, ignore_errors=True)


def _interrupt(job_file: Path, env: dict, sig: int, command: list[str], line: str) -> tuple[int, str, str, list[int]]:
    """Run ``noah-ray <command> --config job_file ...``, send ``sig`` after ``line``; the exit status,
    stdout, stderr and the processes it had started that are still alive afterwards."""
    proc = subprocess.Popen([str(EXE), command[0], "--config", str(job_file), *command[1:]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=job_file.parent)
    out: list[str] = []
    pump = _lines(proc, out)
    started: list[int] = []
    try:
        _wait_for(out, line, proc, timeout=400)
        started = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert started, "the command started no Ray processes?"
        proc.send_signal(sig)
        proc.wait(timeout=120)
        pump.join(timeout=10)
        assert proc.stderr is not None
        err = proc.stderr.read()
        left = _gone(started)
        return proc.returncode, "".join(out), err, left
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _stop(started)


#: the stage each signal stops: SIGTERM the supernet (one Ray Train run, then resumed); SIGINT a
#: retraining of 2 runs in two worker groups at once (retrain.max_concurrent 2, each in a Ray task)
STOPS = {"SIGTERM": (["supernet"], "[supernet supernet] epoch 2/6", "supernet"),   # epoch 1's checkpoint is saved
         "SIGINT": (["retrain", "--method", "lora"], "[retrain lora-seed1] epoch 2/6", "retrain")}


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_a_signal_stops_the_stage_in_one_line_and_a_rerun_resumes(job_file, ray_env, sig, code, name):
    command, line, stage = STOPS[name]
    rc, out, err, left = _interrupt(job_file, ray_env, sig, command, line)
    assert rc == code, out[-2000:] + err[-3000:]
    assert err.count("\n") == 1, err[-3000:]
    assert err.startswith(f"noah-ray: stopped: interrupted by {name} during the {stage} stage; ")
    assert err.rstrip().endswith(f"resume with: noah-ray {' '.join([command[0], '--config', str(job_file), *command[1:]])}"), err
    assert "SIGTERM received" not in err and "PC: @" not in err and "Traceback" not in err
    assert left == [], f"processes left running: {left}"
    job = yaml.safe_load(job_file.read_text())
    assert not Path(JobPaths.at(job["storage"], job["name"]).lease.path).exists()     # the lease is released
    again = subprocess.run([str(EXE), command[0], "--config", str(job_file), *command[1:]], capture_output=True,
                           text=True, env=ray_env, cwd=job_file.parent, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "resuming at epoch" in again.stdout, again.stdout[-3000:]
    if stage == "supernet":
        assert "supernet: 6 epoch(s)" in again.stdout, again.stdout[-3000:]
    else:                         # both runs of the two groups finished all their epochs
        assert all(f"[retrain] lora seed {s}: val" in again.stdout for s in (0, 1)), again.stdout[-3000:]
