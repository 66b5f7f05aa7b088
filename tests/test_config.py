"""The job schema: the two training sections hold only their own keys, defaults in one place."""

from __future__ import annotations

import dataclasses

import pytest

from noah_ray.config import JobConfig, RetrainConfig, SupernetConfig, TrainConfig
from noah_ray.errors import ConfigError


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_sections_share_only_the_common_keys():
    common = _fields(TrainConfig)
    assert _fields(SupernetConfig) & _fields(RetrainConfig) == common
    assert {"seed", "sampling", "eval_random_subnets"} <= _fields(SupernetConfig) - common
    assert {"seeds", "method", "subnet", "baselines", "baseline_widths", "method_lr", "init"} <= \
        _fields(RetrainConfig) - common
    job = JobConfig()
    assert isinstance(job.supernet, TrainConfig) and isinstance(job.retrain, TrainConfig)


def test_retrain_defaults_apply_with_or_without_a_section():
    # the paper's retraining: 100 epochs at lr 1e-3; the supernet's 500 at 5e-4
    for data in ({}, {"retrain": None}, {"retrain": {"seeds": [0, 1]}}):
        job = JobConfig.from_dict(data)
        assert (job.retrain.epochs, job.retrain.lr) == (100, 1e-3)
        assert (job.supernet.epochs, job.supernet.lr) == (500, 5e-4)
    assert JobConfig.from_dict({"retrain": {"seeds": [0, 1]}}).retrain.seeds == (0, 1)


@pytest.mark.parametrize("section,key,value,owner", [
    ("retrain", "sampling", "sandwich", "supernet"),
    ("retrain", "seed", 3, "supernet"),
    ("retrain", "eval_random_subnets", 1, "supernet"),
    ("supernet", "seeds", [0, 1], "retrain"),
    ("supernet", "method", "vpt", "retrain"),
    ("supernet", "baselines", ["linear"], "retrain"),
    ("supernet", "init", "/x", "retrain"),
])
def test_a_key_of_the_other_section_is_refused(section, key, value, owner):
    with pytest.raises(ConfigError) as e:
        JobConfig.from_dict({section: {key: value}})
    msg = str(e.value)
    assert "\n" not in msg and f"config.{section}" in msg and repr(key) in msg and f"under {owner}" in msg


def test_unknown_key_still_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"config.supernet: unknown key 'bogus'; known keys: .*sampling"):
        JobConfig.from_dict({"supernet": {"bogus": 1}})


@pytest.mark.parametrize("data,match", [
    ({"supernet": {"sampling": "all"}}, r"config.supernet.sampling: 'all' unknown"),
    ({"retrain": {"method_lr": {"full": -1.0}}}, r"config.retrain.method_lr.full"),
    ({"retrain": {"min_lr": 1.0}}, r"config.retrain.min_lr: 1.0 must be in \[0, lr=0.001\]"),
    ({"supernet": {"epochs": 0}}, r"config.supernet.epochs: 0 must be > 0"),
    ({"retrain": {"max_failures": -2}}, r"config.retrain.max_failures"),
    ({"retrain": {"max_concurrent": 0}}, r"config.retrain.max_concurrent: 0 must be > 0"),
])
def test_every_section_checks_with_its_own_where(data, match):
    with pytest.raises(ConfigError, match=match):
        JobConfig.from_dict(data)


def test_round_trip_keeps_each_section_to_its_keys():
    job = JobConfig.from_dict({"supernet": {"epochs": 3, "sampling": "sandwich", "seed": 4},
                               "retrain": {"epochs": 2, "seeds": [1, 2], "baselines": ["vpt"]}})
    d = job.to_dict()
    assert set(d["supernet"]) == _fields(SupernetConfig) and set(d["retrain"]) == _fields(RetrainConfig)
    assert JobConfig.from_dict(d) == job


def test_tuned_values_still_validate():
    job = JobConfig.from_dict({"retrain": {"method_lr": {"vpt": 0.5}}})
    tuned = job.with_values({"retrain.lr": 1e-6, "retrain.warmup_epochs": 2.4}, "vpt")
    assert tuned.retrain.lr == 1e-6 and tuned.retrain.min_lr == 1e-6 and tuned.retrain.warmup_epochs == 2
    assert "vpt" not in tuned.retrain.method_lr


def test_shipped_job_files_load():
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    files = [*root.glob("jobs/configs/*.yaml"), *root.glob("noah_ray/configs/*.yaml")]
    jobs = [p for p in files if "sweep" not in yaml.safe_load(p.read_text())]   # sweeps: noah_ray.run.sweep
    assert len(jobs) >= 4
    for p in jobs:
        job = JobConfig.load(p)
        assert JobConfig.from_dict(job.to_dict()) == job


def test_checkpoint_blocks_is_a_memory_switch_not_a_setting_to_match_or_tune():
    """A resumed hpo or race compares the model settings it started with: checkpoint_blocks is left
    out (it changes memory, not results; settings written before it existed lack it), and hpo
    cannot tune it."""
    from noah_ray.config.schema import ModelConfig, hpo_path

    with_it = ModelConfig(grad_checkpointing=True, checkpoint_blocks=4)
    assert "checkpoint_blocks" not in with_it.settings()
    assert with_it.settings() == ModelConfig(grad_checkpointing=True).settings()
    assert set(with_it.settings()) == {f.name for f in dataclasses.fields(ModelConfig)} - {"checkpoint_blocks"}
    with pytest.raises(ConfigError, match="'checkpoint_blocks' is not a tunable setting"):
        hpo_path("checkpoint_blocks", "hpo.space")
    assert hpo_path("lora_dropout", "hpo.space") == "model.lora_dropout"     # the other numeric keys still are
