"""Sweeps: one file naming many datasets (few-shot: shots x seeds), expanded into validated jobs;
(slow) three generated datasets' pipelines run concurrently as Ray tasks, one with bad data
failing while the others finish, into one storage root read by ``results.vtab_table``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from noah_ray.cli import main as cli
from noah_ray.errors import ConfigError
from noah_ray.run.sweep import SweepConfig, run_sweep
from noah_ray.store import results

REPO = Path(__file__).resolve().parents[1]


def test_sweep_expands_datasets_shots_and_seeds():
    s = SweepConfig.from_dict({"name": "fs", "data": {"format": "fewshot"},
                               "sweep": {"datasets": ["food101", "stanford_cars"], "shots": [1, 16],
                                         "seeds": [0, 2], "max_concurrent": 3}})
    jobs = s.jobs()
    assert [j.name for j in jobs[:4]] == ["fs-food101-1shot-seed0", "fs-food101-1shot-seed2",
                                          "fs-food101-16shot-seed0", "fs-food101-16shot-seed2"]
    assert len(jobs) == 8 and len({j.name for j in jobs}) == 8
    assert {(j.data.dataset, j.data.shots, j.data.seed) for j in jobs} == \
        {(d, k, s) for d in ("food101", "stanford_cars") for k in (1, 16) for s in (0, 2)}
    assert all(j.data.format == "fewshot" and j.storage == jobs[0].storage for j in jobs)


def test_the_vtab_sweep_file_names_the_19_tasks_over_the_papers_job():
    s = SweepConfig.load(REPO / "jobs" / "configs" / "vtab_sweep.yaml")
    jobs = s.jobs()
    assert len(jobs) == 19 and jobs[0].name == "vtab-cifar100" and jobs[-1].data.dataset == "smallnorb_ele"
    assert all((j.search.population, j.search.param_limit, j.supernet.epochs) == (50, 0.64, 500) for j in jobs)


@pytest.mark.parametrize("sweep, match", [
    ({}, r"sweep.datasets: \[\] must name at least one dataset"),
    ({"datasets": ["a", "a"]}, r"names a dataset twice"),
    ({"datasets": ["a"], "shots": [0]}, r"sweep.shots: \[0\] must be positive integers"),
    ({"datasets": ["a"], "stages": ["train"]}, r"sweep.stages: \['train'\]: use some of supernet, search, race, hpo, retrain"),
    ({"datasets": ["a"], "colour": 1}, r"sweep: unknown key 'colour'"),
])
def test_sweep_errors_name_the_key(sweep, match):
    with pytest.raises(ConfigError, match=match):
        SweepConfig.from_dict({"sweep": sweep})


def test_a_bad_job_section_fails_before_anything_runs():
    with pytest.raises(ConfigError, match=r"search.population: 0 must be > 0"):
        SweepConfig.from_dict({"search": {"population": 0}, "sweep": {"datasets": ["a"]}})


TASKS = ("gen_shape", "gen_count")                  # one pipeline that runs, one that fails


@pytest.mark.slow
def test_sweep_runs_pipelines_concurrently_and_isolates_a_failure(ray_session, tmp_path, capsys, tiny_job):
    from noah_ray.data import write_generated_vtab

    data = tmp_path / "data"
    for t in TASKS:
        write_generated_vtab(data, t, num_train=16, num_val=8, num_test=8, img_size=32)
    bad = data / "gen_count" / "train800.txt"
    bad.write_text(bad.read_text().replace(" 1\n", " one\n", 1))          # bad data: a label that is no integer
    store = tmp_path / "store"
    spec = tiny_job(   # data.dataset: each of the sweep's datasets
        data, store, name="sw", data={"eval_batch_size": 8},
        space={"num_layers": 12, "modules": {m: {"depths": [3, 6], "widths": [1, 4]} for m in ("vpt", "lora")}},
        supernet={"warmup_epochs": 0, "eval_random_subnets": 0, "max_failures": 0},
        search={"population": 2, "top_k": 1, "mutations": 0, "crossovers": 0, "param_limit": 0.004,
                "max_concurrent": 1, "hold_actors": False},
        retrain={"warmup_epochs": 0, "max_failures": 0},
        sweep={"datasets": list(TASKS), "max_concurrent": 2})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    rc = cli.main(["sweep", "--config", str(path)])
    out, err = capsys.readouterr()
    assert rc == 1
    # the console holds our lines only: the sweep's, then the summary (the pipelines' in Ray's logs).
    # Ray's driver prints the raylet's error notices (e.g. "N PYTHON worker processes have been
    # started") whatever log_to_driver says; those are the only other lines allowed
    ours = re.compile(r"^(== sweep: |sweep: \d+/2 pipeline|  (ok|FAILED) +sw-gen_|table: noah-ray results )")
    raylet = re.compile(r"^(\x1b\[\d+m)?\(raylet\)")
    assert [ln for ln in out.splitlines() if not ours.match(ln) and not raylet.match(ln)] == [], out[-3000:]
    assert "(pid=" not in out and "Trial " not in out and "[supernet supernet] epoch" not in out
    assert out.count("== sweep: starting ") == 2 and out.index("== sweep: starting ") < out.index("sweep: 1/2")
    assert err.count("\n") == 1 and "1 of 2 pipeline(s) failed" in err and "sw-gen_count" in err
    assert "train800.txt:" in err and "label 'one' is not an integer" in err
    assert "ok      sw-gen_shape" in out and "FAILED  sw-gen_count" in out
    table = results.vtab_table(str(store))
    assert table.method.tolist() == ["noah"]
    assert "gen_shape" in table.columns and "gen_count" not in table.columns
    assert table["gen_shape"].notna().all()
    assert not (store / "sw-gen_count" / "search").exists()


def test_a_pipeline_no_node_can_hold_is_refused_on_the_driver_and_starts_no_task(ray_session, tmp_path, tiny_job,
                                                                                    monkeypatch, capsys):
    """The capacity check runs on the sweep's driver (inside a task, a local Ray looks attached and
    would go unchecked): a job asking for a GPU the local Ray lacks fails in one line, no task runs."""
    from noah_ray.run import capacity

    monkeypatch.delenv(capacity.CONFIG_ENV, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(capacity, "BOOTSTRAP", "/nonexistent/ray_bootstrap_config.yaml")
    spec = tiny_job(tmp_path / "data", tmp_path / "store", name="gpu", supernet={"use_gpu": True},
                    sweep={"datasets": ["gen_shape"], "max_concurrent": 1})
    [outcome] = run_sweep(SweepConfig.from_dict(spec))
    assert not outcome.ok and "== sweep: starting" not in capsys.readouterr().out
    assert "\n" not in outcome.error and "supernet" in outcome.error and "GPU: 1" in outcome.error
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("flags, quiet", [((), True), (("--verbose",), False)])
def test_sweep_starts_ray_quiet_unless_verbose(tmp_path, monkeypatch, capsys, flags, quiet):
    from noah_ray import progress
    from noah_ray.run import pipeline, sweep

    calls, sessions = [], []
    monkeypatch.setattr(pipeline, "init_ray", lambda address=None, *, quiet=False: calls.append((address, quiet)))
    monkeypatch.setattr(sweep, "run_sweep", lambda s, n=None: sessions.append(progress.current()) or [])
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "sw", "storage": str(tmp_path / "store"),
                                    "sweep": {"datasets": ["gen_shape"]}}))
    assert cli.main(["sweep", "--config", str(path), *flags]) == 0
    assert calls == [(None, quiet)]
    (s,) = sessions                                   # the pipelines run inside our console's session
    assert s is not None and (s.sink_name is not None) == quiet
    assert capsys.readouterr().out.startswith("== sweep: 1 pipeline(s), 4 at a time")


@pytest.mark.parametrize("started", [True, False])
def test_sweep_stops_on_a_signal_like_the_stage_commands(tmp_path, monkeypatch, capsys, started):
    """The sweep runs inside interrupts() (our handler, reinstalled after ray.init); a signal gives
    one line naming what is saved and exit 143, and Ray is shut down only when the sweep started it."""
    import signal

    import ray

    from noah_ray.run import pipeline, sweep

    calls: list[str] = []
    monkeypatch.setattr(pipeline, "init_ray", lambda address=None, *, quiet=False: calls.append("init") or started)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))

    def run_sweep(s, n=None):
        handler = signal.getsignal(signal.SIGTERM)
        assert getattr(handler, "__self__", None).__class__ is pipeline.Trap       # ours, not Ray's or the default
        handler(signal.SIGTERM, None)                  # what a SIGTERM to the command does
        raise AssertionError("the handler did not stop the sweep")

    monkeypatch.setattr(sweep, "run_sweep", run_sweep)
    before = signal.getsignal(signal.SIGTERM)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "sw", "storage": str(tmp_path / "store"),
                                    "sweep": {"datasets": ["gen_shape"]}}))
    assert cli.main(["sweep", "--config", str(path)]) == 143
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stopped: interrupted by SIGTERM" in err and str(tmp_path / "store") in err, err
    assert "resume with" in err and "sweep --config" in err
    assert calls == (["init", "shutdown"] if started else ["init"])
    assert signal.getsignal(signal.SIGTERM) == before                               # restored afterwards


def test_the_jobs_entrypoint_and_the_cli_know_sweep(tmp_path, capsys):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "jobs.sweep", "--help"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and p.stdout.startswith("usage: python -m jobs.sweep") and "--max-concurrent" in p.stdout
    assert "--verbose" in p.stdout
    single = tmp_path / "job.yaml"
    single.write_text("name: x\n")
    assert cli.main(["sweep", "--config", str(single)]) == 1       # a config error: one line, nothing run
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no 'sweep' section" in err


@pytest.mark.slow
def test_a_pipeline_whose_process_dies_is_rerun_and_resumes(ray_session, tmp_path, tiny_job):
    """A system failure (the pipeline's worker process killed, as on a lost node) re-runs the
    pipeline (sweep.task_retries); it takes over the dead run's lease and finishes from storage.
    The pipeline is the supernet stage (where the kill lands) and the retraining of a baseline
    (LoRA): no search stage, whose Tune run would add its fixed cost and nothing this test checks."""
    import json
    import os
    import signal
    import threading
    import time

    from noah_ray.data import write_generated_vtab
    from noah_ray.run.sweep import run_sweep

    data, store = tmp_path / "data", tmp_path / "store"
    write_generated_vtab(data, "gen_shape", num_train=16, num_val=8, num_test=8, img_size=32)
    spec = tiny_job(
        data, store, name="sk", data={"eval_batch_size": 8},
        space={"num_layers": 12, "modules": {m: {"depths": [3, 6], "widths": [1, 4]} for m in ("vpt", "lora")}},
        supernet={"epochs": 3, "warmup_epochs": 0, "eval_random_subnets": 0},
        search={"population": 2, "top_k": 1, "mutations": 0, "crossovers": 0, "param_limit": 0.004,
                "max_concurrent": 1, "hold_actors": False},
        retrain={"warmup_epochs": 0, "method": "lora"},
        sweep={"datasets": ["gen_shape"], "task_retries": 1, "stages": ["supernet", "retrain"]})
    lease_file = store / "sk-gen_shape" / "lease.json"
    holders: list[int] = []

    def kill_first_holder() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                pid = json.loads(lease_file.read_text())["pid"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.2)
                continue
            if pid not in holders:
                holders.append(pid)
                if len(holders) == 1:
                    time.sleep(3.0)                      # inside the supernet stage
                    os.kill(pid, signal.SIGKILL)
                else:
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_first_holder, daemon=True)
    killer.start()
    before = _live_placement_groups()
    try:
        [outcome] = run_sweep(SweepConfig.from_dict(spec))
    finally:
        # Known gap (issue 27): a pipeline process SIGKILLed while Ray Train is starting its worker
        # group can leave that group's placement group behind in this Ray (Ray Train's cleaner had
        # not registered it yet); it holds a CPU until the Ray ends.  Removed here so that the
        # session's later tests get both CPUs.
        from ray.util import remove_placement_group

        for pg_id in _live_placement_groups() - before:
            remove_placement_group(_pg(pg_id))
    killer.join(timeout=5)
    assert outcome.ok, outcome.error
    assert len(holders) == 2 and holders[0] != holders[1]       # killed once, re-run by another worker
    assert outcome.summary["supernet"]["epochs"] == 3 and "search" not in outcome.summary
    assert results.vtab_table(str(store))["gen_shape"].notna().all()


def _live_placement_groups() -> set[str]:
    """The ids of the placement groups of this Ray that are not removed."""
    from ray.util import placement_group_table

    return {k for k, v in placement_group_table().items() if v["state"] != "REMOVED"}


def _pg(pg_id: str):
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    return PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id)))
