"""The lease is a fence (issue 28, item 3): a run that paused past the lease timeout finds its lease
taken over; it stops (the driver through its renewal thread, the workers and the driver's writes
through :func:`noah_ray.store.lease.check`) and never overwrites the new holder's lease or files."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time

import pytest

from noah_ray.config import JobConfig
from noah_ray.config.resolved import ResolvedJob
from noah_ray.store import lease, storage
from noah_ray.store.layout import JobPaths


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path) -> tuple[str, str | None]:
    """``(storage root, endpoint)`` on a local folder and on S3 (moto)."""
    if request.param == "local":
        return str(tmp_path / "store"), None
    endpoint, bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/store", endpoint


def _take_over(loc: storage.Location, pid: int = 4242) -> lease.Lease:
    """What a second run does once the first stopped renewing: a lease of its own."""
    now = time.time()
    other = lease.Lease("second-run-token", "other-host", pid, now, now)
    storage.write_text(loc, json.dumps(other.__dict__))
    return other


def test_a_paused_holder_finds_its_lease_taken_over_and_writes_nothing(where):
    """Two holders: the first pauses past the timeout, the second takes the lease over; the first's
    renewal, fence and release then leave the second's lease as it is."""
    root, endpoint = where
    loc = JobPaths.at(root, "job", endpoint).lease
    first = lease.acquire(loc, "job", timeout_s=0.5, settle_s=0.0)
    time.sleep(0.6)                                          # the first run is paused past the timeout
    second = lease.acquire(loc, "job", timeout_s=0.5, settle_s=0.0)
    assert second.token != first.token
    with pytest.raises(lease.LeaseLost) as e:
        lease.renew(loc, first)
    msg = str(e.value)
    assert f"taken over by host {socket.gethostname()}, pid {os.getpid()}" in msg and loc.uri in msg
    assert "\n" not in msg and msg.endswith("resume with")
    with pytest.raises(lease.LeaseLost):
        lease.check(loc, first.token)
    lease.check(loc, second.token)                           # the new holder's writes pass
    lease.release(loc, first)
    assert lease.read(loc) == second                         # untouched by the stale holder
    lease.renew(loc, second)
    lease.release(loc, second)
    assert not storage.exists(loc)


def test_the_renewal_thread_notices_the_takeover_and_does_not_release(where):
    root, endpoint = where
    loc = JobPaths.at(root, "job", endpoint).lease
    told: list[lease.LeaseLost] = []
    with lease.hold(root, endpoint, "job", timeout_s=0.4, on_lost=told.append) as held:
        other = _take_over(loc)
        deadline = time.time() + 10
        while held.lost is None and time.time() < deadline:
            time.sleep(0.05)
        assert isinstance(held.lost, lease.LeaseLost) and told == [held.lost]
        assert "other-host, pid 4242" in str(held.lost)
        time.sleep(0.3)                                      # no renewal after the loss
        assert lease.read(loc) == other
    assert lease.read(loc) == other                          # a lost lease is not released


def test_renewal_errors_are_said_and_end_in_a_lost_lease(tmp_path, monkeypatch, capsys):
    loc = JobPaths.at(str(tmp_path), "job").lease
    real = storage.write_text

    def failing(where: storage.Location, text: str) -> None:
        if where.uri == loc.uri and threading.current_thread() is not threading.main_thread():
            raise OSError("storage endpoint unreachable")
        real(where, text)

    monkeypatch.setattr(storage, "write_text", failing)
    with lease.hold(str(tmp_path), None, "job", timeout_s=0.4) as held:
        deadline = time.time() + 10
        while held.lost is None and time.time() < deadline:
            time.sleep(0.05)
    assert isinstance(held.lost, lease.LeaseLost) and "storage endpoint unreachable" in str(held.lost)
    assert "renewing the lease" in capsys.readouterr().out


def _resolved(job: JobConfig) -> ResolvedJob:
    return ResolvedJob(job, ("supernet",), 4, None, None, "", {})  # type: ignore[arg-type]


def test_run_stages_stops_the_stage_when_the_lease_is_taken_over(tmp_path, monkeypatch, tiny_job):
    """The renewal thread interrupts the main thread (blocked in a stage); the command raises
    LeaseLost, the stage saw the lease token as its fence, and the new holder's lease stays."""
    from noah_ray.run import pipeline

    job = JobConfig.from_dict(tiny_job(tmp_path / "data", tmp_path / "store"))
    loc = JobPaths.of(job).lease
    seen: dict[str, object] = {}

    def stage(rj: ResolvedJob) -> dict:
        seen["token"] = rj.lease
        lease.check(loc, rj.lease)                           # the fence passes while the lease is ours
        seen["other"] = _take_over(loc)
        time.sleep(30)                                       # a stage that would go on writing
        seen["finished"] = True
        return {}

    monkeypatch.setenv("NOAH_RAY_LEASE_TIMEOUT_S", "1")       # the smallest allowed
    monkeypatch.setattr(pipeline, "preflight", lambda j, s: pipeline.PreflightReport(_resolved(j), ()))
    monkeypatch.setattr(pipeline, "prepare_data", lambda j: None)
    monkeypatch.setitem(pipeline._RUNNERS, "supernet", stage)
    t0 = time.time()
    with pytest.raises(lease.LeaseLost, match="other-host, pid 4242"):
        pipeline.run_stages(job, ("supernet",))
    assert time.time() - t0 < 10 and "finished" not in seen
    assert isinstance(seen["token"], str) and lease.read(loc) == seen["other"]


def test_the_workers_and_the_driver_check_the_token_before_writing(tmp_path, tiny_job):
    from noah_ray.train import runs
    from noah_ray.train.worker import RunSpec

    job = JobConfig.from_dict(tiny_job(tmp_path / "data", tmp_path / "store"))
    loc = JobPaths.of(job).lease
    mine = lease.acquire(loc, job.name, timeout_s=60, settle_s=0.0)
    spec = runs.spec_for(job, "supernet", "noah", None, 1e-3, 0, 4)
    run = RunSpec(job, "supernet", "supernet", "supernet", method="noah", seed=0, lr=1e-3, num_classes=4,
                  backbone=None, spec=spec, metrics_part="supernet", lease=mine.token)
    again = RunSpec.from_dict(json.loads(json.dumps(run.to_dict())))      # as train_loop_config carries it
    again.fence()
    rj = dataclasses.replace(_resolved(job), lease=mine.token)
    runs._fence(rj)
    _take_over(loc)
    with pytest.raises(lease.LeaseLost):
        again.fence()
    with pytest.raises(lease.LeaseLost):
        runs._fence(rj)
    with pytest.raises(lease.LeaseLost):                     # a restarted worker ends before training
        from noah_ray.train.worker import train_loop

        train_loop({"run": again.to_dict(), "faults": None})
