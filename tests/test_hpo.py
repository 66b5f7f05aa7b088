"""Hyper-parameter search (noah_ray.hpo): the hpo section, the space per method, the trial table;
end to end on Ray Tune with a tiny ViT: ASHA stops weak trials, the chosen values reach the final
runs, a SIGKILLed search resumes without re-running a finished trial."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from noah_ray.config import JobConfig
from noah_ray.data import write_generated_vtab
from noah_ray.errors import ConfigError
from noah_ray.hpo.driver import best_row, grid_values, space_for
from noah_ray.hpo.trial import TrialTables, hp_column
from noah_ray.nn.models import subnet_for
from noah_ray.space import SubnetConfig
from noah_ray.store import results, storage

TINY = "vit_noah_tiny_patch4_32"


def job_dict(tiny_job, root: Path, store: str, **hpo) -> dict:
    return tiny_job(root, store, name="h", data={"batch_size": 32, "eval_batch_size": 32},
                    space={"num_layers": 12, "modules": {"lora": {"depths": [12], "widths": [4]}}},
                    supernet=None, search=None,
                    retrain={"epochs": 2, "lr": 3e-3, "warmup_epochs": 0, "method": "lora", "seeds": [0],
                             "max_failures": 0},
                    hpo={"trials": 4, "max_concurrent": 2, "grace_period": 1, "reduction_factor": 2, **hpo})


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hpo-data")
    write_generated_vtab(root, "gen_color", num_train=64, num_val=32, num_test=32)
    return root


# ----------------------------------------------------------------------------- no Ray
@pytest.mark.parametrize("hpo, match", [
    ({"space": {"lr": {"low": 1e-2, "high": 1e-3}}}, r"hpo\.space\.lr: low 0\.01 must be below high 0\.001"),
    ({"space": {"lr": {"low": 0, "high": 1e-3}}}, r"hpo\.space\.lr: low 0 must be > 0 on a log scale"),
    ({"space": {"drop_path": {"low": 0, "high": 1.5}}}, r"model\.drop_path_rate = 1\.5 is outside .*\[0, 1\)"),
    ({"space": {"weight_decay": {"low": -1e-3, "high": 1e-2, "log": False}}}, r"retrain\.weight_decay = -0\.001"),
    ({"space": {"momentum": None}}, r"hpo\.space\.momentum: 'momentum' is not a tunable setting"),
    ({"space": {"model.precision": None}}, r"'model\.precision' is not a tunable setting"),
    ({"space": {"model.lora_scale": {"values": []}}}, r"lora_scale\.values: \[\] must be a non-empty list"),
    ({"space": {"lr": {"lo": 1e-3}}}, r"hpo\.space\.lr: unknown key 'lo'"),
    ({"space": {"lr": 0.01}}, r"hpo\.space\.lr: 0\.01 must be a mapping"),
    ({"searcher": "bohb"}, r"hpo\.searcher: 'bohb' unknown; use tpe or random or grid"),
    ({"scheduler": "pbt"}, r"hpo\.scheduler: 'pbt' unknown; use asha or fifo"),
    ({"metric": "test_acc"}, r"hpo\.metric: 'test_acc' unknown"),
    ({"trials": 0}, r"hpo\.trials: 0 must be > 0"),
    ({"reduction_factor": 1}, r"reduction_factor 1 must be > 1"),
    ({"gpus_per_trial": -0.5}, r"gpus_per_trial and trial_retries must be >= 0"),
    ({"method_space": {"full": {"lr": {"low": 1.0, "high": 0.1}}}}, r"method_space\.full\.lr: low 1\.0 must be"),
    ({"epochs": 2.5}, r"hpo\.epochs: 2\.5 is not a valid"),
])
def test_bad_hpo_sections_are_one_line_errors(tmp_path, hpo, match):
    with pytest.raises(ConfigError, match=match) as e:
        JobConfig.from_dict({"hpo": hpo})
    assert "\n" not in str(e.value)


def test_defaults_and_space_per_method(tmp_path):
    job = JobConfig.from_dict({"hpo": {
        "space": {"lr": None, "lora_scale": None, "warmup_epochs": {"low": 0, "high": 3}},
        "method_space": {"vpt": {"model.drop_path_rate": {"values": [0.0, 0.1]}}}}})
    h = job.hpo
    assert (h.searcher, h.scheduler, h.metric, h.grace_period, h.reduction_factor) == ("tpe", "asha", "val_acc", 1, 4)
    lr = h.params("lora")["retrain.lr"]
    assert (lr.low, lr.high, lr.log) == (1e-4, 3e-2, True)
    assert h.params("full")["retrain.lr"].high == 1e-3               # the backbone trains: a lower range
    assert JobConfig.from_dict({"hpo": {}}).hpo.params("vpt").keys() == {"retrain.lr", "retrain.weight_decay"}
    lora = space_for(job, "lora", subnet_for("lora", job, None))
    assert set(lora) == {"retrain.lr", "model.lora_scale", "retrain.warmup_epochs"}
    vpt = space_for(job, "vpt", subnet_for("vpt", job, None))         # no LoRA trains: its scale is not tuned
    assert set(vpt) == {"retrain.lr", "retrain.warmup_epochs", "model.drop_path_rate"}
    assert set(space_for(job, "linear", SubnetConfig.empty(12))) == {"retrain.lr", "retrain.warmup_epochs"}
    tuned = job.with_values({"retrain.lr": 3e-6, "retrain.warmup_epochs": 2.0, "model.lora_scale": 2.0}, "lora")
    assert (tuned.retrain.lr, tuned.retrain.warmup_epochs, tuned.model.lora_scale) == (3e-6, 2, 2.0)
    assert tuned.retrain.min_lr == 3e-6 and tuned.hpo is None          # the cosine floor never exceeds lr


def test_grid_points_are_log_or_linearly_spaced():
    from noah_ray.config import HpoParam

    got = grid_values(HpoParam(1e-4, 1e-1, log=True), 4, False)
    assert [round(math.log10(v), 9) for v in got] == [-4, -3, -2, -1]
    assert grid_values(HpoParam(0.0, 0.3), 4, False) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert grid_values(HpoParam(0, 10), 3, True) == [0, 5, 10]
    assert grid_values(HpoParam(values=(7, 3)), 4, True) == [7, 3]


def test_trial_table_reads_back_with_pandas(tmp_path):
    tables = TrialTables(str(tmp_path / "h" / "hpo"), None, "h", "gen_color", "lora", "tpe", "asha", "val_acc", 4)
    last = {"epoch": 1, "val_acc": 40.0, "best_val": 40.0, "best_epoch": 1, "trial_time_s": 1.5, "worker": "w:1"}
    tables.write_trial("t0", {"retrain.lr": 1e-3, "model.lora_scale": 2.0}, last, "done")
    tables.write_trial("t1", {"retrain.lr": 1e-2}, {**last, "epoch": 4, "best_val": 75.0}, "done", chosen=True)
    tables.write_curve("t0", {"epoch": 1, "train_loss": 1.2, "val_acc": 40.0, "val_loss": 1.1, "lr": 1e-3,
                              "images_per_s": 100.0})
    df = pd.read_parquet(tmp_path / "h" / "hpo" / "hpo_trials").sort_values("trial_id")
    assert list(df["hp_retrain_lr"]) == [1e-3, 1e-2] and hp_column("model.lora_scale") == "hp_model_lora_scale"
    assert df["hp_model_lora_scale"].iloc[0] == 2.0 and math.isnan(df["hp_model_lora_scale"].iloc[1])
    assert list(df["stopped_early"]) == [True, False] and list(df["epochs_run"]) == [1, 4]
    q = results.hpo(str(tmp_path))
    assert list(q.loc[q.chosen, "trial_id"]) == ["t1"] and list(q["best_val"]) == [40.0, 75.0]
    assert list(results.hpo_curves(str(tmp_path))["val_loss"]) == [1.1]
    assert tables.finished("t0") == last and tables.finished("t9") is None
    pngs = [results.plot_hpo(str(tmp_path), tmp_path / "v.png"), results.plot_asha_curves(str(tmp_path), tmp_path / "c.png")]
    assert all(p.stat().st_size > 5000 for p in pngs)


def test_a_trial_with_a_non_finite_loss_ends_as_an_error_with_one_line(data_root, tmp_path, monkeypatch, tiny_job):
    """The trial function run directly (Tune's session faked): an epoch whose loss is inf raises
    the workers' one-line ConfigError (nn.epoch.check_loss) before that epoch's curve or report,
    and TrialRecorder keeps that line in the trial's row."""
    from types import SimpleNamespace

    import torch

    from noah_ray.hpo import trial
    from noah_ray.nn import epoch
    from noah_ray.nn.models import ensure_backbone

    job = JobConfig.from_dict(job_dict(tiny_job, data_root, str(tmp_path / "store")))
    hpo_dir = tmp_path / "store" / "h" / "hpo"
    tables = TrialTables(str(hpo_dir), None, "h", "gen_color", "lora", "tpe", "asha", "val_acc", 2)
    reports: list = []
    fake = SimpleNamespace(get_context=lambda: SimpleNamespace(get_trial_id=lambda: "t0"),
                           get_checkpoint=lambda: None, report=lambda *a, **k: reports.append(a),
                           Checkpoint=SimpleNamespace(from_directory=lambda d: d))
    monkeypatch.setattr(trial, "tune", fake)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)      # the trial's setting: not for this process
    monkeypatch.setattr(epoch, "train_epoch",
                        lambda *a, **k: torch.tensor([float("inf"), 2.0, 64.0], dtype=torch.float64))
    cfg = subnet_for("lora", job, None)
    with pytest.raises(ConfigError) as e:
        trial.hpo_trial({"retrain.lr": 0.5}, job.to_dict(), "lora", cfg.to_json(), ensure_backbone(job), 4, tables)
    msg = str(e.value)
    assert msg.startswith("[hpo lora] trial t0 epoch 1/2: the training loss is inf (not finite)"), msg
    assert "\n" not in msg and "0.5 was tried" in msg
    assert reports == [] and not (hpo_dir / "hpo_curves").exists()
    err = tmp_path / "error.txt"
    err.write_text(f"Traceback (most recent call last):\n  File \"x.py\", line 1\n{type(e.value).__name__}: {msg}\n")
    failed = SimpleNamespace(trial_id="t0", config={"retrain.lr": 0.5}, last_result={}, error_file=str(err))
    trial.TrialRecorder(tables).on_trial_error(0, [], failed)
    row = pd.read_parquet(hpo_dir / "hpo_trials").iloc[0]
    assert row["status"] == "error" and "the training loss is inf (not finite)" in row["error"]


def test_hpo_command_without_a_section_is_one_line_before_ray_starts(data_root, tmp_path, capsys, tiny_job):
    from noah_ray.cli import main as cli

    cfg = job_dict(tiny_job, data_root, str(tmp_path / "store"))
    del cfg["hpo"]
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    rc = cli.main(["hpo", "--config", str(tmp_path / "job.yaml"), "--address", "127.0.0.1:9"])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and "the job has no hpo section; add one" in err
    assert not (tmp_path / "store").exists()


# ----------------------------------------------------------------------------- Ray Tune
@pytest.mark.slow
def test_asha_stops_weak_trials_and_the_chosen_values_reach_the_final_run(ray_session, data_root, tmp_path, tiny_job):
    from noah_ray.run import pipeline

    # grid in this order: two good learning rates first, so the two tiny ones meet full rungs
    job = JobConfig.from_dict(job_dict(tiny_job, data_root, str(tmp_path), searcher="grid",
                                       space={"lr": {"values": [3e-2, 1e-2, 1e-6, 1e-7]}}))
    summary = pipeline.run_stages(job, ("hpo", "retrain"))
    trials = results.hpo(str(tmp_path / "h"))
    assert len(trials) == 4 and (trials.status == "done").all()
    assert trials.stopped_early.sum() >= 1 and (trials.loc[trials.stopped_early, "epochs_run"] < 2).all()
    assert set(trials.hp_retrain_lr) == {3e-2, 1e-2, 1e-6, 1e-7}
    assert len(set(trials.worker)) >= 1 and (trials.wall_time_s > 0).all()
    curves = results.hpo_curves(str(tmp_path / "h"))
    per_trial = curves.groupby("trial_id")["epoch"].apply(list)
    for row in trials.itertuples():                                   # one curve point per epoch run
        assert per_trial[row.trial_id] == list(range(1, row.epochs_run + 1))   # epochs count from 1
        assert row.best_val == curves[curves.trial_id == row.trial_id].val_acc.max()
    chosen = trials[trials.chosen].iloc[0]
    assert chosen.best_val == trials.best_val.max() and chosen.hp_retrain_lr in (3e-2, 1e-2)
    best = json.loads((tmp_path / "h" / "hpo" / "lora" / "best.json").read_text())
    assert best["values"] == {"retrain.lr": chosen.hp_retrain_lr} and best["trial_id"] == chosen.trial_id
    # the final run: chosen lr, trained on train800val200, the values in meta.json and the runs row
    runs = results.runs(str(tmp_path / "h"))
    assert len(runs) == 1 and json.loads(runs.hpo_json.iloc[0])["values"] == best["values"]
    _, meta = storage.load_state(storage.resolve(str(tmp_path / "h" / "retrain" / "lora-seed0" / "final")))
    assert meta["hpo"]["values"] == best["values"] and meta["spec"]["lr"] == chosen.hp_retrain_lr
    assert meta["spec"]["data"]["train_split"] == "train800val200" and meta["epochs_done"] == 2
    assert summary["retrain"]["lora"]["hpo"]["trial_id"] == chosen.trial_id
    assert runs.val_acc.iloc[0] == chosen.best_val                     # the search's held-out val, not val200-in-train
    # finished search and final runs answer from storage: Ray not needed, no trial or epoch re-run
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "h").rglob("*.parquet") if "runs" not in p.parts}
    again = pipeline.run_stages(job, ("hpo", "retrain"), start_ray=lambda: pytest.fail("Ray was started"))
    assert again["retrain"]["lora"]["runs"] == summary["retrain"]["lora"]["runs"]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "h").rglob("*.parquet") if "runs" not in p.parts} == files
    assert len(results.runs(str(tmp_path / "h"))) == 1
    changed = JobConfig.from_dict(job_dict(tiny_job, data_root, str(tmp_path), searcher="grid",
                                           space={"lr": {"values": [3e-2, 1e-3]}}))
    with pytest.raises(ConfigError, match="was started with other space.retrain.lr"):
        pipeline.run_stages(changed, ("hpo",))


def _curve_files(store: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (store / "h" / "hpo" / "hpo_curves").glob("*.parquet")}


def _ended(store: Path) -> set[str]:
    return {p.stem.split("-", 1)[1] for p in (store / "h" / "hpo" / "hpo_trials").glob("*.parquet")}


@pytest.mark.slow
def test_sigkilled_search_resumes_without_rerunning_a_finished_trial(ray_session, data_root, tmp_path, tiny_job):
    """``noah-ray hpo`` in a subprocess (on the session's Ray) is SIGKILLed once a trial has ended;
    the same command again finishes the search: the ended trial's curve is not written again."""
    store = tmp_path / "store"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(job_dict(tiny_job, data_root, str(store), trials=3, max_concurrent=1, searcher="tpe",
                                           startup_trials=2, scheduler="fifo",
                                           space={"lr": {"low": 1e-3, "high": 3e-2}})))
    cmd = [sys.executable, "-m", "noah_ray.cli", "hpo", "--config", str(cfg),
           "--address", ray_session.get_runtime_context().gcs_address]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not _ended(store) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before_ended = _ended(store)
    assert len(before_ended) == 1, proc.stderr.read()[-2000:]
    before = _curve_files(store)
    time.sleep(1.0)
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming the search" in again.stdout
    trials = results.hpo(str(store / "h"))
    assert len(trials) == 3 and (trials.status == "done").all() and trials.chosen.sum() == 1
    after = _curve_files(store)
    for tid in before_ended:                              # the ended trial was not trained again
        mine = {n: t for n, t in after.items() if f"-{tid}-" in n}
        assert mine and all(before.get(n) == t for n, t in mine.items())
    assert sum(trials.epochs_run) == len(after) == 3 * 2  # every other trial ran its epochs once


def test_tpe_hears_asha_stopped_trials_as_pruned_at_their_rung_and_finished_ones_as_complete(ray_session, tmp_path):
    import optuna
    from optuna.trial import TrialState
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from noah_ray.hpo.tpe import RungAwareOptunaSearch

    def _rungs(config):                           # local: Ray pickles it by value (tests is no package)
        for epoch in range(1, 5):                 # the score grows with x and with the epochs
            tune.report({"epoch": epoch, "score": config["x"] * epoch})

    searcher = RungAwareOptunaSearch(sampler=optuna.samplers.TPESampler(n_startup_trials=3, seed=0), max_t=4)
    tuner = tune.Tuner(_rungs, param_space={"x": tune.uniform(0.0, 1.0)}, tune_config=tune.TuneConfig(
        metric="score", mode="max", search_alg=searcher, num_samples=10, max_concurrent_trials=1,
        scheduler=ASHAScheduler(time_attr="epoch", max_t=4, grace_period=1, reduction_factor=2)),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="rungs", verbose=0))
    grid = tuner.fit()
    assert len(grid) == 10 and not grid.errors
    seen = {}
    for r in grid:
        ot = searcher._ot_study.trials[searcher._ot_trials[r.metrics["trial_id"]].number]
        seen[r.metrics["trial_id"]] = ot.state
        last, x = r.metrics["epoch"], r.config["x"]
        if last < 4:                                  # ASHA stopped it at a rung
            assert ot.state == TrialState.PRUNED
            # every rung it reached is an intermediate value, the last one included (Tune hands
            # the stopping result to on_trial_complete only); the trial's value is that last one
            assert ot.intermediate_values == pytest.approx({e: x * e for e in range(1, last + 1)})
            assert ot.value == pytest.approx(x * last)
        else:
            assert ot.state == TrialState.COMPLETE and ot.value == pytest.approx(4 * x)
    assert TrialState.PRUNED in seen.values() and TrialState.COMPLETE in seen.values()


def test_the_chosen_trial_does_not_depend_on_the_order_trials_finished_in():
    """Equal best scores and epochs go to the earlier trial, whatever order Tune lists the results
    in (a trial retried after a lost node finishes last)."""
    def row(tid, best, epoch=3):
        return {"trial_id": tid, "m": {"best_val": best, "epoch": epoch}}

    rows = [row("a_00002", 100.0), row("a_00003", 100.0), row("a_00001", 100.0), row("a_00000", 96.9)]
    for order in (rows, rows[::-1], rows[1:] + rows[:1]):
        assert best_row(order, "max")["trial_id"] == "a_00001"
    assert best_row([row("a_00000", 90.0, 2), row("a_00001", 90.0, 3)], "max")["trial_id"] == "a_00001"  # more epochs
    assert best_row([row("a_00000", 0.5), row("a_00001", 0.4)], "min")["trial_id"] == "a_00001"         # val_loss


def test_a_result_without_config_is_read_from_its_last_reported_row():
    """Ray Tune 2.60 restores a trial that was stopped while paused with no last result (no config,
    no metrics): the trial rows take both from its last reported row instead."""
    from types import SimpleNamespace

    import pandas as pd

    from noah_ray.hpo.driver import _result_of

    rows = pd.DataFrame({"epoch": [1, 2], "val_acc": [50.0, 61.0], "trial_id": ["a_00003"] * 2,
                         "config/finalist": [3, 3], "config/lr": [0.01, 0.01]})
    lost = SimpleNamespace(config=None, metrics={"trial_id": "a_00003"}, metrics_dataframe=rows)
    config, metrics = _result_of(lost)
    assert config == {"finalist": 3, "lr": 0.01}
    assert metrics == {"epoch": 2, "val_acc": 61.0, "trial_id": "a_00003"}
    whole = SimpleNamespace(config={"finalist": 1}, metrics={"epoch": 4}, metrics_dataframe=rows)
    assert _result_of(whole) == ({"finalist": 1}, {"epoch": 4})               # a normal result as it is
