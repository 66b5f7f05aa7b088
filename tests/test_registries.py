"""Each name list lives with what implements it (issue 23, item 3): the lists the config checks,
the CLI help, preflight and the table schemas show are derived from one registry, and an entry
added to a registry (temporarily, with ``monkeypatch``) shows up everywhere."""

from __future__ import annotations

import dataclasses

import pytest

from noah_ray.cli import main as cli
from noah_ray.config import (
    HPO_SCHEDULERS,
    HPO_SEARCHERS,
    SAMPLING_RULES,
    SEARCH_ALGORITHMS,
    SEARCH_ENGINES,
    STAGES,
    HpoConfig,
    JobConfig,
    ModelConfig,
    hpo_module,
    hpo_path,
)
from noah_ray.config.entries import load_entry
from noah_ray.errors import ConfigError
from noah_ray.evolution import ENGINES, RandomEngine, SearchEngine, engine_for
from noah_ray.space import ADAPTER, KV_PROMPT, LORA, MODULES, VPT, SearchSpace, SubnetConfig
from noah_ray.space.kinds import BackboneShape
from noah_ray.space.methods import (
    METHODS,
    Method,
    baseline_widths,
    baselines,
    default_recipe,
    method_help,
    trains_backbone,
)
from noah_ray.space.sampling import SAMPLING
from noah_ray.store.layout import JobPaths, backbone_trained
from noah_ray.store.tables import TABLES

SPACE = {"num_layers": 4, "modules": {"vpt": {"depths": [2, 4], "widths": [1, 5]},
                                      "lora": {"depths": [2, 4], "widths": [1, 8]}}}


# ----------------------------------------------------------------------------- sampling rules
def test_config_accepts_exactly_the_sampling_registry():
    assert SAMPLING_RULES is SAMPLING and tuple(SAMPLING) == ("uniform", "sandwich")
    for rule in SAMPLING:
        assert JobConfig.from_dict({"supernet": {"sampling": rule}}).supernet.sampling == rule


def test_a_new_sampling_rule_is_accepted_by_config_and_applied_by_the_worker(monkeypatch):
    from noah_ray.train.worker import step_subnet, step_subnets

    monkeypatch.setitem(SAMPLING, "largest", lambda space, rnd: [space.largest(), rnd])
    assert JobConfig.from_dict({"supernet": {"sampling": "largest"}}).supernet.sampling == "largest"
    space = SearchSpace.from_dict(SPACE)
    assert step_subnets(space, "largest", 0, 1, 2) == [space.largest(), step_subnet(space, 0, 1, 2)]
    with pytest.raises(ConfigError, match=r"sampling: 'all' unknown; use uniform or sandwich or largest$"):
        JobConfig.from_dict({"supernet": {"sampling": "all"}})


# ----------------------------------------------------------------------------- retraining methods
def test_methods_and_baseline_widths_come_from_the_registry():
    from noah_ray.nn import models

    assert tuple(METHODS) == ("noah", "linear", "full", "vpt", "adapter", "lora", "e2vpt")
    assert models.METHODS is METHODS
    assert baselines() == ("linear", "full", "vpt", "adapter", "lora", "e2vpt")
    expected = {"linear": {}, "full": {}, "vpt": {"vpt": 10}, "adapter": {"adapter": 8}, "lora": {"lora": 8},
                "e2vpt": {"vpt": 5, "kv_prompt": 5}}
    assert models.BASELINE_WIDTHS == baseline_widths() == expected
    assert [m for m in METHODS if trains_backbone(m)] == ["full"] and not trains_backbone("nope")
    assert {m: default_recipe(m) for m in METHODS} == {**dict.fromkeys(METHODS, "noah"), "e2vpt": "e2vpt"}
    assert method_help() == "noah or a baseline: linear, full, vpt, adapter, lora, e2vpt"


def test_a_new_method_shows_up_in_preflight_cli_models_and_layout(monkeypatch, capsys):
    from noah_ray.nn.models import subnet_for
    from noah_ray.run.preflight import _check_retrain

    monkeypatch.setitem(METHODS, "vpt50", Method("vpt50", {VPT: 50}, recipe="e2vpt"))
    monkeypatch.setitem(METHODS, "tuned", Method("tuned", trains_backbone=True))
    job = JobConfig.from_dict({"retrain": {"method": "vpt50", "baselines": ["tuned"]}})
    _check_retrain(job, ("retrain",), BackboneShape())               # both known: no error
    job.retrain.baselines = ("vpt51",)
    with pytest.raises(ConfigError, match=r"retrain method 'vpt51' unknown; use one of .*e2vpt, vpt50, tuned$"):
        _check_retrain(job, ("retrain",), BackboneShape())
    assert subnet_for("vpt50", job, None) == SubnetConfig.uniform(job.space.num_layers, vpt=50)
    assert job.model.resolved_recipe("vpt50").name == "e2vpt"
    assert backbone_trained({"method": "tuned"}, "x") and backbone_trained({}, "tuned-seed0")
    assert not backbone_trained({"method": "vpt50"}, "x")
    with pytest.raises(SystemExit):
        cli.main(["retrain", "--help"])
    assert "e2vpt, vpt50, tuned" in " ".join(capsys.readouterr().out.split())


# ----------------------------------------------------------------------------- search algorithms
def test_engines_are_the_config_table():
    assert SEARCH_ALGORITHMS is SEARCH_ENGINES
    assert tuple(ENGINES) == tuple(SEARCH_ENGINES) == ("evolution", "aging", "random", "optuna")
    for name, cls in ENGINES.items():
        assert engine_for(name) is cls and issubclass(cls, SearchEngine) and cls.algorithm == name


def test_a_new_search_algorithm_is_accepted_and_built(monkeypatch):
    from noah_ray.config.resolved import param_limit
    from noah_ray.search.searcher import NoahSearcher

    monkeypatch.setitem(SEARCH_ENGINES, "plain", "noah_ray.evolution.random_search:RandomEngine")
    job = JobConfig.from_dict({"space": SPACE, "search": {"algorithm": "plain", "population": 4, "top_k": 2,
                                                           "mutations": 1, "crossovers": 1, "param_limit": 1.0}})
    searcher = NoahSearcher.from_config(job.search, job.space, param_limit(job, BackboneShape(depth=4)))
    assert type(searcher.engine) is RandomEngine
    with pytest.raises(ConfigError, match=r"algorithm: 'bayes' unknown; use evolution, aging, random, optuna or "
                                          r"plain$"):
        JobConfig.from_dict({"search": {"algorithm": "bayes"}})
    monkeypatch.setitem(SEARCH_ENGINES, "broken", "noah_ray.space:SubnetConfig")
    with pytest.raises(TypeError, match="is not a SearchEngine"):
        engine_for("broken")


# ----------------------------------------------------------------------------- hpo searchers and schedulers
def test_hpo_searchers_and_schedulers_build_tune_objects():
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    from noah_ray.hpo.driver import tune_scheduler, tune_searcher
    from noah_ray.hpo.tpe import RungAwareOptunaSearch

    built = {s: type(tune_searcher(HpoConfig(searcher=s), 4)) for s in HPO_SEARCHERS}
    assert built == {"tpe": RungAwareOptunaSearch, "random": BasicVariantGenerator, "grid": BasicVariantGenerator}
    assert issubclass(RungAwareOptunaSearch, OptunaSearch)
    built = {s: type(tune_scheduler(HpoConfig(scheduler=s), 4)) for s in HPO_SCHEDULERS}
    assert built == {"asha": ASHAScheduler, "fifo": FIFOScheduler}


def test_a_new_hpo_scheduler_is_accepted_and_built(monkeypatch):
    from ray.tune.schedulers import FIFOScheduler

    from noah_ray.hpo.driver import tune_scheduler

    monkeypatch.setitem(HPO_SCHEDULERS, "plain", "noah_ray.hpo.driver:fifo_scheduler")
    job = JobConfig.from_dict({"hpo": {"scheduler": "plain"}})
    assert isinstance(tune_scheduler(job.hpo, 3), FIFOScheduler)
    with pytest.raises(ConfigError, match=r"hpo\.scheduler: 'pbt' unknown; use asha or fifo or plain$"):
        JobConfig.from_dict({"hpo": {"scheduler": "pbt"}})


def test_load_entry_needs_module_and_attribute():
    assert load_entry("noah_ray.space:SubnetConfig") is SubnetConfig
    with pytest.raises(ValueError, match="use 'package.module:attribute'"):
        load_entry("noah_ray.space.SubnetConfig")


# ----------------------------------------------------------------------------- module of a tunable setting
def test_each_model_setting_names_its_module():
    """Written out from what each setting does (docs/recipes.md): the module it configures, or none."""
    expected = {"lora_scale": LORA, "lora_dropout": LORA, "lora_init": LORA,
                "prompt_dropout": VPT, "vpt_init": VPT,
                "adapter_dropout": ADAPTER, "adapter_act": ADAPTER, "adapter_init": ADAPTER,
                "kv_shared": KV_PROMPT, "kv_init": KV_PROMPT}
    got = {f.name: hpo_module(f"model.{f.name}") for f in dataclasses.fields(ModelConfig)}
    assert got == {f.name: expected.get(f.name) for f in dataclasses.fields(ModelConfig)}
    tunable = {"drop_path_rate": None, "lora_scale": LORA, "lora_dropout": LORA, "prompt_dropout": VPT,
               "adapter_dropout": ADAPTER}
    assert {k: hpo_module(hpo_path(k, "t")) for k in tunable} == tunable
    assert hpo_module("retrain.lr") is None and hpo_module("retrain.lora_scale") is None


def test_hpo_tunes_a_module_setting_only_where_the_module_trains():
    from noah_ray.hpo.driver import space_for

    job = JobConfig.from_dict({"hpo": {"space": {"lr": None, "lora_scale": None, "prompt_dropout": None,
                                                 "adapter_dropout": None, "drop_path": None}}})
    common = {"retrain.lr", "model.drop_path_rate"}
    assert set(space_for(job, "vpt", SubnetConfig.uniform(12, vpt=10))) == common | {"model.prompt_dropout"}
    assert set(space_for(job, "lora", SubnetConfig.uniform(12, lora=8))) == common | {"model.lora_scale"}
    assert set(space_for(job, "linear", SubnetConfig.empty(12))) == common


# ----------------------------------------------------------------------------- stages
def test_stage_order_has_one_home():
    from noah_ray.run import pipeline, preflight, sweep

    assert STAGES == ("supernet", "search", "race", "hpo", "retrain")
    assert cli.STAGE_COMMANDS == {"pipeline": STAGES, "supernet": ("supernet",), "search": ("search",),
                                  "race": ("race",), "hpo": ("hpo",), "retrain": ("retrain",)}
    assert set(cli._STAGE_DOCS) == set(cli.STAGE_COMMANDS)
    assert tuple(pipeline._RUNNERS) == STAGES and sweep.SweepSection().stages == STAGES
    assert preflight.resolve.__defaults__[0] == STAGES and pipeline.run_stages.__defaults__[0] == STAGES
    paths = JobPaths.at("/tmp/x", "job")
    assert [paths.stage(s).uri.rsplit("/", 1)[1] for s in STAGES] == list(STAGES)
    with pytest.raises(ValueError, match="use one of supernet, search, race, hpo, retrain"):
        paths.stage("export")


# ----------------------------------------------------------------------------- table width columns
def test_width_columns_follow_the_module_kinds_and_keep_the_schema():
    written = ["vpt_depth", "vpt_widths", "lora_depth", "lora_widths", "adapter_depth", "adapter_widths",
               "kv_prompt_depth", "kv_prompt_widths"]
    assert [f"{m}_{k}" for m in MODULES for k in ("depth", "widths")] == written
    for table in ("trials", "pareto"):
        names = TABLES[table].names
        i = names.index("config_json") + 1
        assert names[i:i + len(written)] == written
        assert all(str(TABLES[table].field(c).type) == ("int16" if c.endswith("depth") else "list<item: int16>")
                   for c in written)


def test_race_schedulers_build_tune_objects(tmp_path):
    """``race.scheduler`` names come from one registry (config.race.RACE_SCHEDULERS); each entry
    builds its Tune scheduler and the variant generator that goes with it."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from noah_ray.config.race import RACE_SCHEDULERS
    from noah_ray.hpo.halving import GatedVariants, KeepingASHA, SyncHalving

    built = {}
    for name, entry in RACE_SCHEDULERS.items():
        job = JobConfig.from_dict({"name": "r", "storage": str(tmp_path), "race": {"scheduler": name}})
        sched, search = load_entry(entry)(job, [100, 200])
        built[name] = (type(sched), type(search))
    assert built == {"asha": (KeepingASHA, BasicVariantGenerator), "sync": (SyncHalving, GatedVariants)}
    assert issubclass(KeepingASHA, ASHAScheduler)          # Tune's ASHA, keeping the race's incumbent
    with pytest.raises(ConfigError, match=r"race.scheduler: 'hyperband' unknown; use one of asha, sync"):
        JobConfig.from_dict({"name": "r", "storage": str(tmp_path), "race": {"scheduler": "hyperband"}})
