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


# ----------------------------------------------------------------------------- the search and hpo stores
SPACE_KW = {"population": 4, "generations": 2, "top_k": 2, "mutations": 1, "crossovers": 1, "seed": 0}


def _files(root: str, endpoint: str | None) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (local or S3)."""
    import pyarrow.fs as pafs

    loc = storage.resolve(root, endpoint)
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True))
    out = {}
    for i in infos:
        if i.type == pafs.FileType.File:
            with loc.fs.open_input_stream(i.path) as f:
                out[i.path] = f.read()
    return out


def _fence(root: str, endpoint: str | None) -> tuple[JobPaths, lease.Fence]:
    """The job ``job`` under ``root`` with its lease taken by this run, and that lease's fence."""
    paths = JobPaths.at(root, "job", endpoint)
    mine = lease.acquire(paths.lease, "job", timeout_s=60, settle_s=0.0)
    return paths, lease.Fence(paths.lease.uri, endpoint, mine.token)


def test_fence_of_a_job_names_its_lease_and_none_without_a_token(tmp_path, tiny_job):
    job = JobConfig.from_dict(tiny_job(tmp_path / "data", tmp_path / "store"))
    assert lease.Fence.of(job, None) is None
    fence = lease.Fence.of(job, "tok")
    assert fence is not None and fence.uri == JobPaths.of(job).lease.uri and fence.token == "tok"


def test_a_search_store_whose_lease_was_taken_over_writes_nothing(where):
    """The trials / generations / pareto tables, the state log (snapshot and record) and the winner:
    every write of a SearchStore checks the fence first, so a stale holder raises LeaseLost and the
    storage stays as the new holder left it."""
    from noah_ray.evolution import EvolutionEngine, TargetObjective, pareto_front
    from noah_ray.search.searcher import NoahSearcher
    from noah_ray.search.store import SearchStore
    from noah_ray.space import ModuleSpace, SearchSpace, SubnetConfig
    from noah_ray.space.budget import ParamLimit
    from noah_ray.space.kinds import BackboneShape

    root, endpoint = where
    space = SearchSpace({m: ModuleSpace((2, 4, 6), (1, 5, 10)) for m in ("vpt", "lora", "adapter")}, num_layers=6)
    limit = ParamLimit(0.01, BackboneShape(48, 3, 6, 10))
    paths, fence = _fence(root, endpoint)
    store = SearchStore(paths.search.uri, endpoint, "r1", "job", "synthetic", "evolution", fence)
    searcher = NoahSearcher(EvolutionEngine(space, limit, **SPACE_KW), store=store)
    searcher.extra_state = {"settings": {}, "attempt": 0, "run_id": "r1"}
    store.save_state(searcher.get_state())
    objective, n = TargetObjective.random(space, limit, seed=0), 0
    while (cfg := searcher.suggest(f"t{n}")) not in (None, "FINISHED"):   # the lease is ours: writes pass
        searcher.on_trial_complete(f"t{n}", {"val_acc": objective(SubnetConfig.from_dict(cfg["subnet"]))})
        n += 1
    eng = searcher.engine
    assert eng.finished and storage.exists(paths.search.join("trials"))
    assert store.load_state() is not None
    _take_over(paths.lease)
    before = _files(root, endpoint)
    writes = {"generation": lambda: store.write_generation(eng.history[-1], eng),
              "state record": lambda: store.append_state({"engine": {}}, searcher.get_state),
              "snapshot": lambda: store.save_state(searcher.get_state()),
              "winner": lambda: store.write_final(pareto_front(list(eng.candidates.values())), eng.best())}
    for what, write in writes.items():
        with pytest.raises(lease.LeaseLost, match="other-host, pid 4242"):
            write()
        assert _files(root, endpoint) == before, what
    assert not storage.exists(paths.search.join("best_subnet.yaml"))
    assert not storage.exists(paths.search.join("pareto"))


def test_run_search_fences_its_store_with_the_token_it_is_given(tmp_path, monkeypatch, tiny_job):
    from noah_ray.search import driver
    from noah_ray.space.budget import ParamLimit
    from noah_ray.space.kinds import BackboneShape

    job = JobConfig.from_dict(tiny_job(tmp_path / "data", tmp_path / "store"))
    seen: list[lease.Fence | None] = []

    class Stop(Exception):
        pass

    def store(*args, **kwargs):
        seen.append(args[6] if len(args) > 6 else kwargs.get("fence"))
        raise Stop

    monkeypatch.setattr(driver, "SearchStore", store)
    limit = ParamLimit(1.0, BackboneShape(48, 3, 6, 10))
    for token in ("tok", None):
        with pytest.raises(Stop):
            driver.run_search(job, limit=limit, lease=token)
    assert seen == [lease.Fence(JobPaths.of(job).lease.uri, None, "tok"), None]


def test_the_pipeline_gives_the_search_its_lease_token(tmp_path, monkeypatch, tiny_job):
    from noah_ray.run import pipeline
    from noah_ray.search import driver

    job = JobConfig.from_dict(tiny_job(tmp_path / "data", tmp_path / "store"))
    seen: dict[str, object] = {}

    def run_search(job, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(driver, "run_search", run_search)
    with pytest.raises(RuntimeError, match="stop here"):
        pipeline._RUNNERS["search"](dataclasses.replace(_resolved(job), lease="tok"))
    assert seen["lease"] == "tok"


def test_hpo_tables_settings_and_choice_whose_lease_was_taken_over_write_nothing(where):
    from types import SimpleNamespace

    from noah_ray.hpo import driver as hpo
    from noah_ray.hpo.trial import TrialTables

    root, endpoint = where
    paths, fence = _fence(root, endpoint)
    tables = TrialTables(paths.hpo.uri, endpoint, "job", "gen_color", "lora", "tpe", "asha", "val_acc", 4, fence)
    last = {"epoch": 1, "val_acc": 40.0, "best_val": 40.0, "best_epoch": 1, "trial_id": "t0"}
    curve = {"epoch": 1, "train_loss": 1.2, "val_acc": 40.0, "val_loss": 1.1, "lr": 1e-3, "images_per_s": 1.0}
    tables.write_trial("t0", {"retrain.lr": 1e-3}, last, "done")                 # the lease is ours: writes pass
    tables.write_curve("t0", curve)
    hpo._check_settings(paths.hpo_method("lora"), {"method": "lora"}, tables)
    assert storage.exists(paths.hpo_method("lora").join("settings.json"))
    _take_over(paths.lease)
    before = _files(root, endpoint)
    result = SimpleNamespace(metrics=last, config={"retrain.lr": 1e-3}, error=None)
    h = JobConfig.from_dict({"hpo": {"trials": 2}}).hpo
    writes = {"trial row": lambda: tables.write_trial("t1", {"retrain.lr": 1e-2}, last, "done"),
              "curve": lambda: tables.write_curve("t1", curve),
              "settings": lambda: hpo._check_settings(paths.hpo_method("adapter"), {"method": "adapter"}, tables),
              "choice": lambda: hpo._choose("lora", h, [result], tables, paths.hpo_method("lora"))}
    for what, write in writes.items():
        with pytest.raises(lease.LeaseLost, match="other-host, pid 4242"):
            write()
        assert _files(root, endpoint) == before, what
    assert not storage.exists(paths.hpo_method("lora").join("best.json"))
    hpo._check_settings(paths.hpo_method("lora"), {"method": "lora"}, tables)     # a resume only reads them


def test_run_hpo_fences_its_tables_with_the_resolved_token(tmp_path, monkeypatch, tiny_job):
    from noah_ray.hpo import driver as hpo

    job = JobConfig.from_dict(tiny_job(tmp_path / "data", tmp_path / "store", supernet=None, search=None,
                                       retrain={"method": "lora"}, hpo={"trials": 2}))
    seen: list[lease.Fence | None] = []

    class Stop(Exception):
        pass

    def check_settings(loc, settings, tables):
        seen.append(tables.fence)
        raise Stop

    monkeypatch.setattr(hpo, "_check_settings", check_settings)
    for token in ("tok", None):
        with pytest.raises(Stop):
            hpo.run_hpo(dataclasses.replace(_resolved(job), lease=token), "lora")
    assert seen == [lease.Fence(JobPaths.of(job).lease.uri, None, "tok"), None]
