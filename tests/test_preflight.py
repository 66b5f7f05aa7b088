"""The one validation pass (:func:`noah_ray.run.preflight.resolve`): what it works out for the stages,
and that a command runs it (with the storage probe and the data check) once, however many runs
its stages start."""

import pytest

from noah_ray.config import JobConfig
from noah_ray.config.resolved import resolved
from noah_ray.data import write_generated_vtab
from noah_ray.errors import ConfigError
from noah_ray.run import pipeline, preflight
from noah_ray.space.kinds import BackboneShape
from noah_ray.store import storage
from noah_ray.store.records import MetaRecord
from noah_ray.train import runs


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_generated_vtab(root, "gen_color", num_train=8, num_val=4, num_test=4)
    return root


def job_for(data_root, store, **retrain) -> JobConfig:
    return JobConfig.from_dict({
        "name": "pf", "storage": str(store),
        "data": {"root": str(data_root), "dataset": "gen_color", "batch_size": 4, "num_workers": 0},
        "model": {"name": "vit_noah_tiny_patch4_32"},
        "space": {"num_layers": 12, "modules": {"lora": {"widths": [1, 2]}}},
        "search": {"param_limit": 0.01},
        "retrain": {"epochs": 1, "method": "lora", "baselines": [], **retrain}})


def test_resolve_works_out_what_the_stages_need(data_root, tmp_path):
    job = job_for(data_root, tmp_path / "out")
    rj = preflight.resolve(job, ("supernet", "search", "retrain"))
    assert rj.job is job and rj.num_classes == 4                        # gen_color: four colours
    assert rj.shape == BackboneShape(embed_dim=48, num_heads=3, depth=12, num_classes=1)
    assert rj.limit is not None and rj.limit.max_m == 0.01 and rj.limit.shape == rj.shape
    assert rj.backbone == storage.resolve(str(tmp_path / "out")).join("pf", "backbone.safetensors").uri
    assert rj.splits == {"supernet": ("train800", "val200"), "search": ("val200",),
                         "retrain": ("train800", "val200", "test")}
    assert preflight.resolve(job, ("retrain",)).limit is None           # no search: no limit worked out
    assert resolved(rj, "supernet") is rj                               # resolved once: passed through
    with pytest.raises(TypeError, match="preflight.resolve"):
        resolved(job, "supernet")                                       # a stage never checks a job again
    assert not (tmp_path / "out" / "pf").exists()                        # only the storage probe, removed
    with pytest.raises(ConfigError, match="unknown stage 'train'"):
        preflight.resolve(job, ("train",))


def test_a_command_checks_once_however_many_runs_it_starts(data_root, tmp_path, monkeypatch):
    """Three retraining seeds: one resolve, one storage probe, one data check (the Ray Train run
    itself is replaced by what a finished run returns, so no Ray starts)."""
    calls = {"resolve": 0, "check_writable": 0, "check_data": 0}

    def counted(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(preflight, "resolve", counted("resolve", preflight.resolve))
    monkeypatch.setattr(pipeline, "resolve", preflight.resolve)
    monkeypatch.setattr(storage, "check_writable", counted("check_writable", storage.check_writable))
    monkeypatch.setattr(preflight, "check_data", counted("check_data", preflight.check_data))
    fits = []

    def finished_runs(session, faults=None, limit=1):   # the retrain stage's sessions of runs
        fits.extend((run.run_id, run.num_classes, run.backbone) for run in session)
        return [MetaRecord.from_dict({"params": 16, "params_head": 4, "best_val": 50.0, "test_acc": 25.0,
                                      "best_epoch": 0, "epochs_done": 1, "train_time_s": 0.1, "best_uri": "unused"})
                for _ in session]

    monkeypatch.setattr(runs, "_fit_session", finished_runs)
    monkeypatch.setattr(runs, "_publish", lambda *args: None)
    job = job_for(data_root, tmp_path / "out", seeds=[0, 1, 2])
    summary = pipeline.run_stages(job, ("retrain",))
    backbone = storage.resolve(str(tmp_path / "out")).join("pf", "backbone.safetensors").uri
    assert fits == [(f"lora-seed{s}", 4, backbone) for s in (0, 1, 2)]
    assert summary["retrain"]["lora"]["runs"] == [25.0, 25.0, 25.0]
    assert calls == {"resolve": 1, "check_writable": 1, "check_data": 1}
