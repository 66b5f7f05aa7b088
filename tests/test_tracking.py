"""MLflow tracking (``tracking.mlflow``): a tiny pipeline logs into a local SQLite store, read
back with MLflow's own client; a re-run adds no run; no secret reaches the store."""

from __future__ import annotations

from pathlib import Path

import pytest

from noah_ray.config import JobConfig
from noah_ray.errors import ConfigError

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from noah_ray.store import tracking  # noqa: E402

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCY-NOAHTEST"


def test_config_refuses_credentials_in_the_tracking_uri():
    ok = JobConfig.from_dict({"tracking": {"mlflow": {"tracking_uri": "sqlite:///m.db"}}})
    assert ok.tracking.mlflow.experiment == "noah-ray"
    assert JobConfig.from_dict(ok.to_dict()).tracking == ok.tracking and JobConfig().tracking.mlflow is None
    for bad, msg in (({"mlflow": {"tracking_uri": f"https://me:{SECRET}@mlflow.example/"}}, "MLFLOW_TRACKING_PASSWORD"),
                     ({"mlflow": {"tracking_uri": ""}}, "tracking_uri and experiment must be set"),
                     ({"mlfow": {}}, "unknown key 'mlfow'"), ({"mlflow": {"uri": "x"}}, "unknown key 'uri'")):
        with pytest.raises(ConfigError, match=msg) as e:
            JobConfig.from_dict({"tracking": bad})
        assert SECRET not in str(e.value)
    assert tracking.redact(f"s3://AKIA:{SECRET}@bucket/noah") == "s3://bucket/noah"
    aws = "wJalrXUtnFEMI/K7MDENG+bPxRfiCY/EXAMPLEKY"        # a real-shaped secret key: '/' and '+'
    assert tracking.redact(f"s3://AKIA:{aws}@bucket/noah") == "s3://bucket/noah"
    with pytest.raises(ConfigError) as e:
        JobConfig.from_dict({"tracking": {"mlflow": {"tracking_uri": f"https://me:{aws}@mlflow.example/"}}})
    assert aws not in str(e.value) and "MLFLOW_TRACKING_PASSWORD" in str(e.value)


def tiny_tracked_job(tiny_job, tmp_path: Path) -> JobConfig:
    return JobConfig.from_dict(tiny_job(
        tmp_path / "data", tmp_path / "results", name="tracked",
        data={"batch_size": 16, "eval_batch_size": 16},
        supernet={"epochs": 2, "warmup_epochs": 0, "eval_random_subnets": 0, "max_failures": 0},
        search={"max_concurrent": 2}, retrain={"warmup_epochs": 0, "max_failures": 0},
        tracking={"mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "noah-test",
                             "artifact_location": str(tmp_path / "artifacts")}}))


@pytest.mark.slow
def test_pipeline_logs_stages_epochs_trials_and_artifacts(ray_session, tmp_path, monkeypatch, one_thread,
                                                         tiny_job):
    from noah_ray.data import write_generated_vtab
    from noah_ray.run import pipeline

    write_generated_vtab(tmp_path / "data", "gen_color", num_train=16, num_val=8, num_test=8)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)          # in the driver's environment
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    job = tiny_tracked_job(tiny_job, tmp_path)
    summary = pipeline.run_stages(job)
    client = MlflowClient(tracking_uri=job.tracking.mlflow.tracking_uri)
    exp = client.get_experiment_by_name("noah-test")
    assert exp.artifact_location == str(tmp_path / "artifacts")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    by_stage: dict[str, list] = {}
    for r in runs:
        by_stage.setdefault(r.data.tags.get("noah_ray.stage"), []).append(r)
    (sup,), (search,), (noah,) = by_stage["supernet"], by_stage["search"], by_stage["retrain"]
    assert sup.info.run_name == "supernet supernet" and noah.info.run_name == "retrain noah-seed0"
    # per-epoch metrics from the Ray Train worker, steps = epochs counted from 1
    loss = client.get_metric_history(sup.info.run_id, "train_loss")
    assert sorted(m.step for m in loss) == [1, 2] and all(m.value > 0 for m in loss)
    assert [m.step for m in client.get_metric_history(sup.info.run_id, "val_acc_largest")] == [1, 2]
    assert sup.data.params["supernet.epochs"] == "2" and sup.data.params["model.name"] == "vit_noah_tiny_patch4_32"
    assert noah.data.metrics["test_acc"] == pytest.approx(summary["retrain"]["noah"]["runs"][0])
    assert noah.data.metrics["best_epoch"] == 1 and noah.info.status == "FINISHED"
    assert search.data.metrics["val_acc"] == pytest.approx(summary["search"]["val_acc"])
    assert [m.step for m in client.get_metric_history(search.info.run_id, "best_val_acc")] == [0]   # generation 0
    # every scored candidate: a nested run with its subnet as parameters (no placeholder trials)
    trials = by_stage["search-trial"]
    assert len(trials) == summary["search"]["evaluated"] == 4
    assert all(t.data.tags["mlflow.parentRunId"] == search.info.run_id for t in trials)
    assert all("subnet/lora" in t.data.params and "val_acc" in t.data.metrics for t in trials)
    # artifacts
    def names(run) -> set[str]:
        return {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"best_subnet.yaml", "pareto.png"} <= names(search)
    assert "supernet_curves.png" in names(sup) and "subnet.yaml" in names(noah)
    best = mlflow.artifacts.load_text(f"{search.info.artifact_uri}/best_subnet.yaml")
    assert best == (tmp_path / "results" / "tracked" / "search" / "best_subnet.yaml").read_text()
    # a re-run of the finished job logs no new run
    pipeline.run_stages(job)
    assert len(client.search_runs([exp.experiment_id], max_results=100)) == len(runs)
    # no secret anywhere in the store
    for f in [tmp_path / "mlflow.db", *(tmp_path / "artifacts").rglob("*")]:
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


@pytest.mark.slow
def test_hpo_logs_a_run_per_method_with_nested_trials_and_the_chosen_values(ray_session, tmp_path, monkeypatch,
                                                                           one_thread, tiny_job):
    import io

    from noah_ray import progress
    from noah_ray.data import write_generated_vtab
    from noah_ray.run import pipeline

    write_generated_vtab(tmp_path / "data", "gen_color", num_train=16, num_val=8, num_test=8)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    d = tiny_tracked_job(tiny_job, tmp_path).to_dict()
    d["retrain"].update(method="lora", baselines=[], seeds=[0], epochs=2)
    d["hpo"] = {"trials": 2, "epochs": 2, "searcher": "random", "scheduler": "fifo", "max_concurrent": 2,
                "space": {"lr": {"low": 1e-3, "high": 1e-1}}}
    job = JobConfig.from_dict(d)
    out = io.StringIO()
    with progress.session(stream=out):
        summary = pipeline.run_stages(job, ("hpo", "retrain"))
    chosen = summary["hpo"]["lora"]
    client = MlflowClient(tracking_uri=job.tracking.mlflow.tracking_uri)
    exp = client.get_experiment_by_name("noah-test")
    by_stage: dict[str, list] = {}
    for r in client.search_runs([exp.experiment_id], max_results=100):
        by_stage.setdefault(r.data.tags.get("noah_ray.stage"), []).append(r)
    (hpo,), (final,), trials = by_stage["hpo"], by_stage["retrain"], by_stage["hpo-trial"]
    assert hpo.info.run_name == "hpo lora" and hpo.info.status == "FINISHED"
    assert hpo.data.params["hpo.trials"] == "2" and hpo.data.params["hpo.for_method"] == "lora"
    lr = chosen["values"]["retrain.lr"]
    assert float(hpo.data.params["chosen.retrain.lr"]) == pytest.approx(lr)
    assert hpo.data.params["chosen.trial_id"] == chosen["trial_id"]
    assert hpo.data.metrics["best_val"] == pytest.approx(chosen["best_val"]) and hpo.data.metrics["trials"] == 2
    # each trial: a nested run with its value as a parameter and its metrics per epoch (step 1, 2)
    assert len(trials) == 2 and all(t.data.tags["mlflow.parentRunId"] == hpo.info.run_id for t in trials)
    assert sorted(float(t.data.params["retrain.lr"]) for t in trials).count(lr) >= 1
    for t in trials:
        assert 1e-3 <= float(t.data.params["retrain.lr"]) <= 1e-1
        assert sorted(m.step for m in client.get_metric_history(t.info.run_id, "val_acc")) == [1, 2]
        assert [m.value for m in client.get_metric_history(t.info.run_id, "epoch")] == [1, 2]
    # the final run carries the chosen values
    assert float(final.data.params["chosen.retrain.lr"]) == pytest.approx(lr)
    assert final.data.params["chosen.trial_id"] == chosen["trial_id"]
    # the console: our lines, one per trial epoch, no Ray Tune chatter
    text = out.getvalue()
    assert text.count("[hpo lora] trial ") == 4 and "[hpo lora] best trial " + chosen["trial_id"] in text
    for chatter in ("Trial status", "View detailed results", "tensorboard", "╭", "(pid="):
        assert chatter not in text, chatter
    for f in [tmp_path / "mlflow.db", *(tmp_path / "artifacts").rglob("*")]:
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
