"""Reliability and security: failed candidates retried on a re-run, aborted / empty searches never
reported as success, no credentials in anything Ray writes, one safe path segment per name, no
path escape when staging S3 data, one run per job (lease), finished stages answered from storage
without Ray."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

import pytest
import ray.cloudpickle

from noah_ray import security
from noah_ray.config import JobConfig, SearchConfig
from noah_ray.errors import ConfigError, RunError
from noah_ray.evolution import DONE, FAILED, QUEUED, EvolutionEngine, TargetObjective
from noah_ray.search.driver import _finish, _settings
from noah_ray.search.searcher import NoahSearcher
from noah_ray.search.store import SearchStore
from noah_ray.space import ModuleSpace, SearchSpace, SubnetConfig
from noah_ray.space.budget import ParamLimit
from noah_ray.space.kinds import BackboneShape
from noah_ray.store import lease, storage
from noah_ray.store.layout import JobPaths

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

SPACE = SearchSpace({m: ModuleSpace((2, 4, 6), (1, 5, 10)) for m in ("vpt", "lora", "adapter")}, num_layers=6)
LIMIT = ParamLimit(0.01, BackboneShape(48, 3, 6, 10))
KW = {"population": 4, "generations": 2, "top_k": 2, "mutations": 1, "crossovers": 1, "seed": 0}


def drive(searcher, objective, fail=lambda cid: False, start=0) -> int:
    n = start
    while (cfg := searcher.suggest(f"t{n}")) not in (None, "FINISHED"):
        if fail(cfg["candidate_id"]):
            searcher.on_trial_complete(f"t{n}", error=True)
            searcher.note_error(cfg["candidate_id"], "endpoint unreachable")
        else:
            searcher.on_trial_complete(f"t{n}", {"val_acc": objective(SubnetConfig.from_dict(cfg["subnet"]))})
        n += 1
    return n


# ------------------------------------------------------------------ 1. failed candidates
def test_failed_candidates_are_retried_and_every_attempt_is_kept(tmp_path):
    """Generation 0 fails completely (a cause later fixed); a re-run requeues those candidates,
    reopens generation 0, and the trials table keeps the failed attempts with their error."""
    objective = TargetObjective.random(SPACE, LIMIT, seed=3)
    store = SearchStore(str(tmp_path), None, "r", "job", "synthetic", "evolution")
    first = NoahSearcher(EvolutionEngine(SPACE, LIMIT, **KW), store=store)
    first.abort_after = 0
    n = drive(first, objective, fail=lambda cid: cid.startswith("g000"))
    assert first.engine.history[0].evaluated == 0 and first.engine.history[0].failed == 4
    state = store.load_state()
    again = NoahSearcher(EvolutionEngine(SPACE, LIMIT, **KW), store=store)
    again.set_state(state, requeue_running=True, requeue_failed=True)
    retried = [c for c in again.engine.candidates.values() if c.generation == 0]
    assert all(c.status == QUEUED and c.info["attempts"][0]["error"] == "endpoint unreachable" for c in retried)
    assert again.engine.generation == 0 and again.engine.history == [] and not again.finished
    drive(again, objective, start=n)
    assert again.finished and all(c.status == DONE for c in again.engine.candidates.values())
    trials = storage.read_table(storage.resolve(str(tmp_path)), "trials").to_pandas()
    failed = trials[trials.status == FAILED]
    assert len(failed) == 4 and (failed.error == "endpoint unreachable").all() and (failed.attempt == 0).all()
    g0 = trials[(trials.generation == 0) & (trials.status == DONE)]
    assert sorted(g0.trial_id) == sorted(failed.trial_id) and (g0.attempt == 1).all()


def test_a_search_with_nothing_scored_is_never_a_success(tmp_path):
    store = SearchStore(str(tmp_path), None, "r", "job", "synthetic", "evolution")
    searcher = NoahSearcher(EvolutionEngine(SPACE, LIMIT, **KW), store=store)
    searcher.abort_after = 0
    drive(searcher, TargetObjective.random(SPACE, LIMIT, seed=1), fail=lambda cid: True)
    assert searcher.engine.finished and searcher.engine.best() is None
    with pytest.raises(RunError, match=r"none of its 8 candidates scored \(first error: endpoint unreachable\)"):
        _finish(searcher, store, storage.resolve(str(tmp_path)), "r", SearchConfig())
    assert not (tmp_path / "best_subnet.yaml").exists() and not (tmp_path / "pareto").exists()


def test_run_error_line_names_the_exact_command_that_resumes(monkeypatch, capsys, tmp_path):
    from noah_ray.cli import main as cli
    from noah_ray.run import pipeline

    def stopped(job, stages, start_ray=None):
        raise RunError("search 'evolution-seed0' stopped (first error: endpoint unreachable); fix the cause "
                       "and run the same command again")

    monkeypatch.setattr(pipeline, "run_stages", stopped)
    cfg = tmp_path / "my job.yaml"
    cfg.write_text("name: j\n")
    rc = cli.main(["search", "--config", str(cfg), "--set", "search.generations=3"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "first error: endpoint unreachable" in err
    assert err.rstrip().endswith(f"noah-ray search --config '{cfg}' --set search.generations=3")


# ------------------------------------------------------------------ 3. secrets
class _Probe:
    pass


def test_tune_does_not_put_credentials_into_runtime_envs(monkeypatch):
    from ray.tune.execution.class_cache import ENV_VARS_TO_PROPAGATE, _ActorClassCache

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAPROBE0000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "probe-secret")
    before = set(ENV_VARS_TO_PROPAGATE)
    with security.tune_without_credentials():
        remote = _ActorClassCache().get(_Probe)
    env = remote._default_options["runtime_env"]["env_vars"]
    assert not set(env) & set(security.SECRET_ENV_VARS) and "probe-secret" not in json.dumps(env)
    assert set(ENV_VARS_TO_PROPAGATE) == before           # Ray's own set is left as it was


@pytest.mark.parametrize("text, shown", [
    ("cannot read s3://AKIAX:s3cr3t@bucket/x", "cannot read s3://***@bucket/x"),
    ("'http://user:pw@127.0.0.1:9000' and s3://k@b/p", "'http://***@127.0.0.1:9000' and s3://***@b/p"),
    ("s3://bucket/key@2x.png", "s3://bucket/key@2x.png"),
    # real-shaped AWS secret keys (40 characters, '/' and '+'): the userinfo runs to the '@'
    ("storage 's3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG+bPxRfiCY/EXAMPLEKY@bucket/noah' is bad",
     "storage 's3://***@bucket/noah' is bad"),
    ("(endpoint http://AKIAIOSFODNN7EXAMPLE:/wJalrXUtnFEMIK7MDENG+bPxRfiCYEXAMPLEK@127.0.0.1:9)",
     "(endpoint http://***@127.0.0.1:9)"),
])
def test_errors_never_echo_uri_userinfo(text, shown):
    assert security.redact(text) == shown


def test_uris_with_credentials_are_refused_without_echoing_them():
    assert not security.has_userinfo("s3://bucket/key@2x.png")
    for uri in ("s3://AKIAX:s3cr3t@bucket/noah", "file://me:pw@/tmp/x", "s3://AKIAX:s3cr3t/with+slash@bucket/noah"):
        with pytest.raises(ConfigError) as e:
            storage.resolve(uri)
        assert "s3cr3t" not in str(e.value) and "pw@" not in str(e.value) and "***@" in str(e.value)
    with pytest.raises(ConfigError) as e:
        storage.s3_filesystem("http://AKIAX:s3cr3t@127.0.0.1:9000")
    assert "s3cr3t" not in str(e.value)


# ------------------------------------------------------------------ 4. names and paths
@pytest.mark.parametrize("name", ["..", ".", "...", "a/b", "a\\b", "", " x", "-x", "x y"])
def test_names_are_one_safe_path_segment(name):
    from noah_ray.search.driver import search_run_name
    from noah_ray.store.layout import JobPaths

    with pytest.raises(ConfigError, match="must be one path segment"):
        JobConfig.from_dict({"name": name})
    job = JobConfig()
    with pytest.raises(ConfigError, match="must be one path segment"):
        search_run_name(job, name or "..")
    with pytest.raises(ConfigError, match="must be one path segment"):
        JobPaths.of(job).supernet(name or "..")
    for ok in ("cifar100-noah", "run_1.v2"):
        assert JobConfig.from_dict({"name": ok}).name == ok


def test_staging_s3_data_never_writes_outside_the_cache(s3_bucket, tmp_path, monkeypatch):
    import boto3

    from noah_ray.config import DataConfig
    from noah_ray.data.readers import dataset_dir

    endpoint, bucket = s3_bucket
    client = boto3.client("s3", endpoint_url=endpoint)
    client.put_object(Bucket=bucket, Key="data/gen_x/train800.txt", Body=b"a.png 0\n")
    client.put_object(Bucket=bucket, Key="data/gen_x/../../../../escape.txt", Body=b"x")
    cache = tmp_path / "a" / "b" / "cache"
    monkeypatch.setenv("NOAH_RAY_DATA_CACHE", str(cache))
    with pytest.raises(ConfigError, match=r"gen_x/\.\./\.\./\.\./\.\./escape\.txt.*not copied"):
        dataset_dir(DataConfig(root=f"s3://{bucket}/data", dataset="gen_x"), endpoint=endpoint)
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and cache not in p.parents]
    assert outside == [] and not any(p.name == "escape.txt" for p in tmp_path.rglob("*"))


# ------------------------------------------------------------------ 5. one run per job
@pytest.fixture(params=["local", "s3"])
def lease_loc(request, tmp_path):
    if request.param == "local":
        return JobPaths.at(str(tmp_path / "store"), "job").lease
    endpoint, bucket = request.getfixturevalue("s3_bucket")
    return JobPaths.at(f"s3://{bucket}/store", "job", endpoint).lease


def _foreign(loc, renewed_ago: float, host: str = "other-host", pid: int = 4242) -> None:
    now = time.time()
    storage.write_text(loc, json.dumps({"token": "x", "host": host, "pid": pid, "since": now - 3600,
                                        "renewed": now - renewed_ago}))


def test_a_second_run_fails_at_once_naming_the_holder(lease_loc):
    mine = lease.acquire(lease_loc, "job", timeout_s=60, settle_s=0.0)
    t0 = time.time()
    with pytest.raises(ConfigError) as e:
        lease.acquire(lease_loc, "job", timeout_s=60, settle_s=0.0)
    assert time.time() - t0 < 5
    msg = str(e.value)
    assert f"host {socket.gethostname()}, pid {os.getpid()}, since " in msg and "already running" in msg
    lease.release(lease_loc, mine)
    assert not storage.exists(lease_loc)


def test_a_stale_lease_is_taken_over_and_a_clean_exit_releases(lease_loc):
    _foreign(lease_loc, renewed_ago=10)
    with pytest.raises(ConfigError, match="host other-host, pid 4242"):
        lease.acquire(lease_loc, "job", timeout_s=60, settle_s=0.0)
    _foreign(lease_loc, renewed_ago=120)                       # its holder stopped renewing
    with lease.hold(lease_loc.uri.rsplit("/job/", 1)[0], lease_loc.endpoint, "job", timeout_s=60) as held:
        assert lease.read(lease_loc).token == held.token and held.lease.pid == os.getpid()
    assert not storage.exists(lease_loc)


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    import subprocess

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    loc = JobPaths.at(str(tmp_path), "job").lease
    _foreign(loc, renewed_ago=1, host=socket.gethostname(), pid=dead.pid)
    assert lease.acquire(loc, "job", timeout_s=600, settle_s=0.0).pid == os.getpid()


def test_a_rerun_after_node_loss_waits_out_a_lease_nobody_renews(tmp_path):
    # the holder ran on another host (its node died): not renewed for one renewal period, so the
    # re-run (wait_stale) waits until the lease is timeout_s old, then takes it over
    loc = JobPaths.at(str(tmp_path), "job").lease
    _foreign(loc, renewed_ago=0.5)
    t0 = time.time()
    mine = lease.acquire(loc, "job", timeout_s=2.0, settle_s=0.0, wait_stale=True)
    waited = time.time() - t0
    assert mine.pid == os.getpid() and lease.read(loc).token == mine.token
    assert 1.5 - 0.1 <= waited < 10                 # >= 2.0 - 0.5 s: the lease's remaining life


def test_a_rerun_fails_when_the_holder_still_renews(tmp_path):
    import threading

    loc = JobPaths.at(str(tmp_path), "job").lease
    _foreign(loc, renewed_ago=0.0)
    stop = threading.Event()

    def renewing() -> None:                          # another host's live run, renewing
        while not stop.wait(0.2):
            _foreign(loc, renewed_ago=0.0)

    t = threading.Thread(target=renewing)
    t.start()
    try:
        with pytest.raises(ConfigError, match="already running: host other-host"):
            lease.acquire(loc, "job", timeout_s=2.0, settle_s=0.0, wait_stale=True)
    finally:
        stop.set()
        t.join()


def test_the_lease_is_renewed_while_held(tmp_path):
    loc = JobPaths.at(str(tmp_path), "job").lease
    with lease.hold(str(tmp_path), None, "job", timeout_s=0.4) as held:
        first = held.lease.renewed
        time.sleep(0.5)
        assert lease.read(loc).renewed > first and held.lost is None


# ------------------------------------------------------------------ 8. finished stages without Ray
def _finished_job(tiny_job, tmp_path: Path, data_root: Path) -> JobConfig:
    """A job whose supernet and search are finished in storage (written without Ray)."""
    from noah_ray.train.runs import spec_for

    job = JobConfig.from_dict(tiny_job(
        data_root, tmp_path / "store", name="done", model={"drop_path_rate": 0.1}, retrain=None,
        space={"num_layers": 12, "modules": {"lora": {"depths": [3, 6], "widths": [1, 2]}}}))
    run = JobPaths.of(job).supernet()
    spec = spec_for(job, "supernet", "noah", None, job.supernet.lr, job.supernet.seed, 4)
    storage.write_text(run.join("spec.json"), json.dumps(spec.to_dict()))
    storage.save_state(run.join("final"), {}, {"epochs_done": 1, "num_classes": 4, "val_acc": {"largest": 50.0}})
    from noah_ray.search.driver import make_searcher

    store = SearchStore(JobPaths.of(job).search.uri, None, "evolution-seed0", job.name, job.data.dataset, "evolution")
    searcher = make_searcher(job, store=store)
    searcher.extra_state = {"settings": _settings(job), "attempt": 0, "run_id": "evolution-seed0"}
    drive(searcher, lambda cfg: 40.0 + sum(cfg.layer_widths("lora")))
    assert searcher.finished
    return job


def test_finished_stages_answer_from_storage_without_starting_ray(tmp_path, monkeypatch, capsys, tiny_job):
    import yaml

    from noah_ray.cli import main as cli
    from noah_ray.data import write_generated_vtab
    from noah_ray.run import pipeline

    write_generated_vtab(tmp_path / "data", "gen_color", num_train=8, num_val=4, num_test=4)
    job = _finished_job(tiny_job, tmp_path, tmp_path / "data")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job.to_dict()))
    started = []

    def no_ray(*args, **kwargs):
        started.append(args)
        raise RuntimeError("Ray would start here")

    monkeypatch.setattr(pipeline, "init_ray", no_ray)
    t0 = time.time()
    rc = cli.main(["search", "--config", str(path)])
    out, err = capsys.readouterr()
    assert rc == 0 and started == [], (out, err)
    assert re.search(r"search: best val \d+\.\d\d% .*\(4 candidates scored\)", out)
    assert (tmp_path / "store" / "done" / "search" / "best_subnet.yaml").is_file()
    rc = cli.main(["supernet", "--config", str(path)])
    out, err = capsys.readouterr()
    assert rc == 0 and started == [] and "finished earlier" in out, (out, err)
    assert time.time() - t0 < 8
    rc = cli.main(["retrain", "--config", str(path), "--method", "linear"])   # not trained yet: needs Ray
    err = capsys.readouterr().err
    assert rc == 1 and started and "Ray would start here" in err


# ------------------------------------------------------------------ 2 + 3. S3 end to end, no secrets on disk
def _b64_forms(secret: bytes) -> list[bytes]:
    """Substrings every base64 encoding of a text containing ``secret`` contains (3 alignments)."""
    return [base64.b64encode(b"\0" * k + secret)[4 if k else 0:-4] for k in range(3)]


def _upload(local: Path, loc: storage.Location) -> None:
    for p in sorted(local.rglob("*")):
        if p.is_file():
            storage.write_bytes(loc.join(*p.relative_to(local).parts), p.read_bytes())


@pytest.mark.slow
def test_search_with_data_and_storage_on_s3_writes_no_secret(ray_session, s3_bucket, tmp_path, monkeypatch,
                                                             tiny_job):
    """Data root and storage on the local S3 endpoint (the search's validation loader must use
    ``storage_endpoint``); with distinctive credentials in the driver's environment, no byte of
    them (plain or base64) reaches Ray's session directory or the storage."""
    import boto3
    import ray

    from noah_ray.data import write_generated_vtab
    from noah_ray.nn.models import build_model, ensure_backbone
    from noah_ray.search.driver import run_search

    endpoint, bucket = s3_bucket
    write_generated_vtab(tmp_path / "data", "gen_shape", num_train=8, num_val=16, num_test=4)
    _upload(tmp_path / "data", storage.resolve(f"s3://{bucket}/data", endpoint))
    job = JobConfig.from_dict(tiny_job(
        f"s3://{bucket}/data", f"s3://{bucket}/store", name="s3job", storage_endpoint=endpoint,
        data={"dataset": "gen_shape", "batch_size": 64, "eval_batch_size": 8}, supernet=None, retrain=None,
        space={"num_layers": 12, "modules": {"lora": {"depths": [3, 6], "widths": [1, 2]}}},
        search={"max_concurrent": 2, "trial_retries": 0}))
    model = build_model(job, None, ensure_backbone(job), 4)
    storage.save_state(JobPaths.of(job).supernet_final(), model.trainable_state_dict(),
                       {"num_classes": 4, "epochs_done": 1})
    key_id, secret = "AKIANOAHLEAKPROBE7", "noahLeakProbe/Secret+9876zz"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    result = run_search(job)
    assert result.finished and result.evaluated == 4 and result.failed == 0
    assert storage.exists(storage.resolve(result.best_subnet_uri, endpoint))

    needles = [s.encode() for s in (key_id, secret)]
    needles += [form for s in needles for form in _b64_forms(s)]
    session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
    files = [p for p in session.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name.startswith("runtime_env") for p in files)         # the agent's logs are there
    leaks = [str(p) for p in files if any(n in p.read_bytes() for n in needles)]
    assert leaks == []
    client = boto3.client("s3", endpoint_url=endpoint)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert any(k.startswith("store/s3job/search/trials/") for k in keys)
    for k in keys:
        body = client.get_object(Bucket=bucket, Key=k)["Body"].read()
        assert not any(n in body for n in needles), k


# ------------------------------------------------------------------ 6. non-retryable errors in workers
@pytest.mark.slow
def test_a_corrupt_image_found_in_a_worker_ends_after_one_attempt(ray_session, tmp_path, capsys, tiny_job,
                                                                  monkeypatch):
    """An image whose header reads but whose pixels do not passes a header-only preflight (a split
    above ``DECODE_LIMIT``); the worker's ConfigError is not retried (max_failures 2) and ends the
    command with one line."""
    import ray
    import yaml

    from noah_ray.cli import main as cli
    from noah_ray.data import write_generated_vtab
    from noah_ray.run import preflight

    monkeypatch.setattr(preflight, "DECODE_LIMIT", 0)           # headers only, as for a large split

    write_generated_vtab(tmp_path / "data", "gen_color", num_train=8, num_val=4, num_test=4)
    ds = tmp_path / "data" / "gen_color"
    bad = ds / (ds / "train800.txt").read_text().split()[0]
    bad.write_bytes(bad.read_bytes()[:100])
    cfg = tiny_job(tmp_path / "data", tmp_path / "store", name="corrupt", model={"drop_path_rate": 0.1},
                   space={"num_layers": 12, "modules": {"lora": {"depths": [3], "widths": [1]}}},
                   supernet={"max_failures": 2, "eval_random_subnets": 0}, search=None, retrain=None)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc = cli.main(["supernet", "--config", str(path)])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and str(bad) in err and "skip_corrupt" in err, err
    logs = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs"
    raised = [str(p) for p in logs.rglob("*") if p.is_file() and str(bad).encode() in p.read_bytes()]
    assert raised == []          # no worker raised it, so Ray Train had nothing to retry


@pytest.mark.slow
def test_a_non_finite_loss_stops_training_with_one_line_and_records_nothing(ray_session, tmp_path, capsys,
                                                                            tiny_job):
    """A finite but huge learning rate (1e30) makes the loss overflow within the first epoch: the
    run ends with one line (not retried, not exit 0), and no ``runs`` row, final weights or result
    is written."""
    import yaml

    from noah_ray.cli import main as cli
    from noah_ray.data import write_generated_vtab
    from noah_ray.store import results

    write_generated_vtab(tmp_path / "data", "gen_color", num_train=32, num_val=4, num_test=4)   # 4 steps
    cfg = tiny_job(tmp_path / "data", tmp_path / "store", name="nan", supernet=None, search=None,
                   retrain={"epochs": 2, "lr": 1e30, "min_lr": 0.0, "warmup_epochs": 0, "max_failures": 2})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc = cli.main(["retrain", "--config", str(path), "--method", "linear"])
    out, err = capsys.readouterr()
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err, (out, err)
    assert "epoch 1/2: the training loss is" in err and "(not finite)" in err and "retrain.lr (1e+30)" in err, err
    job = tmp_path / "store" / "nan"
    assert results.runs(str(job)).empty
    assert not list(job.rglob("final/meta.json")) and not list(job.rglob("checkpoint_e*")), \
        sorted(str(p.relative_to(job)) for p in job.rglob("*"))
    assert "test_acc" not in out


def test_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    from noah_ray.cli import main as cli

    missing = str(tmp_path / "missing.yaml")
    assert cli.main(["pipeline", "--config", missing]) == 1
    assert "Traceback" not in capsys.readouterr().err
    with pytest.raises(ConfigError, match="does not exist"):
        cli.main(["--debug", "pipeline", "--config", missing])
    with pytest.raises(ConfigError, match="does not exist"):
        cli.stage_main("search", ["--config", missing, "--debug"])
    monkeypatch.setenv("NOAH_RAY_DEBUG", "1")
    with pytest.raises(ConfigError, match="does not exist"):
        cli.main(["supernet", "--config", missing])
