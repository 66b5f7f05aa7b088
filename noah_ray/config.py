"""Job configuration: one schema (typed dataclasses) for the CLI, the Ray jobs and the tests.

A job config is a YAML or JSON file with the sections below; every section and key is
optional and defaults to the paper's settings.  Unknown keys and wrongly typed values are
rejected on load with one line naming the key and the fix.

.. code-block:: yaml

    name: cifar100-noah
    storage: s3://my-bucket/noah            # or a local directory / file:// URI
    data:   {root: /data/vtab-1k, dataset: cifar100}
    model:  {name: vit_base_patch16_224.augreg_in21k, checkpoint: /ckpt/ViT-B_16.npz}
    space:  {num_layers: 12, modules: {vpt: {depths: [3,6,9,12], widths: [1,5,10]}, ...}}
    supernet: {epochs: 500}
    search:   {generations: 20, param_limit: 0.64}
    retrain:  {epochs: 100, seeds: [0, 1, 2]}
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

import yaml

from noah_ray import recipes
from noah_ray.errors import ConfigError
from noah_ray.hpo_config import (HPO_ALIASES, HPO_DEFAULT_RANGES, HPO_DEFAULT_SPACE,  # noqa: F401  (re-exported)
                                 HPO_METHOD_RANGES, HPO_METRICS, HPO_RETRAIN_KEYS, HPO_SCHEDULERS,
                                 HPO_SEARCHERS, HpoConfig, HpoParam, hpo_default, hpo_is_int, hpo_path)
from noah_ray.module_specs import PRUNABLE_KINDS
from noah_ray.recipes import Recipe
from noah_ray.sections import positive as _positive
from noah_ray.sections import section_from_dict, type_ok, unknown_key
from noah_ray.security import safe_name
from noah_ray.space import SearchSpace, yaml_problem
from noah_ray.tracking_config import MlflowConfig, TrackingConfig  # noqa: F401  (re-exported)


@dataclass
class DataConfig:
    root: str = "./data"
    dataset: str = "shapes_count"
    format: str = "vtab"                  # vtab | fewshot | dg | folder
    num_classes: int | None = None        # default: from the dataset registry / the files
    img_size: int | None = None           # default: the backbone's input size
    batch_size: int = 64
    eval_batch_size: int = 128
    num_workers: int = 2
    cache_decoded: bool = False
    skip_corrupt: bool = False
    shots: int | None = None              # few-shot: K
    seed: int = 0                         # few-shot: list seed
    train_split: str = "train800"         # supernet / search use train800 + val200
    val_split: str = "val200"
    final_train_split: str = "train800val200"
    test_split: str = "test"

    def check(self, where: str) -> None:
        if self.format not in ("vtab", "fewshot", "dg", "folder"):
            raise ConfigError(f"{where}.format: {self.format!r} unknown; use vtab, fewshot, dg or folder")
        _positive(where, batch_size=self.batch_size, eval_batch_size=self.eval_batch_size,
                  num_classes=self.num_classes, img_size=self.img_size)
        _positive(where, shots=self.shots)
        if self.num_workers < 0:
            raise ConfigError(f"{where}.num_workers: {self.num_workers} must be >= 0 (0 loads in the main process)")


@dataclass
class ModelConfig:
    name: str = "vit_base_patch16_224.augreg_in21k"
    checkpoint: str | None = None         # .npz (Google), .pth / .safetensors (timm); path or s3://
    drop_path_rate: float = 0.1
    lora_scale: float = 1.0
    kv_shared: bool | None = None         # one K/V prompt tensor (None: the recipe's)
    fused_attn: bool = True
    grad_checkpointing: bool = False
    precision: str = "fp32"               # fp32 | bf16 | fp16
    # recipe (noah_ray.recipes; docs/recipes.md): noah | e2vpt | modern; None: noah, and e2vpt for
    # the e2vpt baseline.  Each setting below overrides the recipe's value (None: the recipe's).
    recipe: str | None = None
    adapter_act: str | None = None        # quick_gelu | gelu
    lora_dropout: float | None = None     # on the LoRA input
    prompt_dropout: float | None = None   # on the VPT tokens
    adapter_dropout: float | None = None  # on the adapter's hidden layer
    drop_path: str | None = None          # before_adapter (NOAH) | after_adapter
    vpt_init: str | None = None           # xavier_tensor | vpt | xavier_token
    adapter_init: str | None = None       # xavier | zero_up | vit
    lora_init: str | None = None          # kaiming | vit
    kv_init: str | None = None            # kaiming | xavier
    prune_pieces: str | None = None       # strided | contiguous (E2VPT pruning segments)
    prune_shared: bool | None = None      # one pruning mask for all layers
    param_count: str | None = None        # exact | noah (the count search.param_limit applies to)

    def check(self, where: str) -> None:
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"{where}.precision: {self.precision!r} unknown; use fp32, bf16 or fp16")
        if not 0 <= self.drop_path_rate < 1:
            raise ConfigError(f"{where}.drop_path_rate: {self.drop_path_rate} must be in [0, 1)")
        try:
            self.resolved_recipe()
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}".replace(f"{where}: model.", f"{where}.")) from None

    def resolved_recipe(self, method: str = "noah") -> Recipe:
        """The recipe this model trains with (for retraining baseline ``method``), overrides applied."""
        name = self.recipe or ("e2vpt" if method == "e2vpt" else "noah")
        return recipes.resolve(name, **{k: getattr(self, k, None) for k in recipes.SETTINGS})


#: supernet sampling rules (noah_ray.train.step_subnets)
SAMPLING_RULES: tuple[str, ...] = ("uniform", "sandwich")


@dataclass
class TrainConfig:
    """The optimisation settings both training stages share; :class:`SupernetConfig` (job section
    ``supernet``) and :class:`RetrainConfig` (``retrain``) add their own keys and defaults."""

    #: the job section this class reads, and the one holding the keys it refuses
    section: ClassVar[str] = ""
    sibling: ClassVar[str] = ""

    epochs: int = 500
    lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup_epochs: int = 10
    num_workers: int = 1                  # Ray Train workers
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    checkpoint_every: int = 1             # epochs between checkpoints (a killed run loses at most this many)
    eval_every: int = 1                   # epochs between val evaluations (the last epoch is always evaluated)
    max_failures: int = 2                 # restarts of a failed worker group from the last checkpoint (-1: no limit)
    min_lr: float = 1e-5                  # floor of the cosine schedule (AutoFormer / NOAH code default)
    keep_checkpoints: int = 2             # Ray Train checkpoints kept in storage (the newest ones)

    def check(self, where: str) -> None:
        _positive(where, epochs=self.epochs, lr=self.lr, num_workers=self.num_workers,
                  checkpoint_every=self.checkpoint_every, eval_every=self.eval_every)
        if self.warmup_epochs < 0 or self.weight_decay < 0:
            raise ConfigError(f"{where}: warmup_epochs and weight_decay must be >= 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"{where}.min_lr: {self.min_lr} must be in [0, lr={self.lr}]")
        _positive(where, keep_checkpoints=self.keep_checkpoints, cpus_per_worker=self.cpus_per_worker)
        if self.max_failures < -1:
            raise ConfigError(f"{where}.max_failures: {self.max_failures} must be >= 0 (or -1: retry forever)")
        self.check_own(where)

    def check_own(self, where: str) -> None:
        """The checks of the keys only this section has."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str) -> "TrainConfig":
        """The section from ``data``; a key of the other training section gets a line saying so."""
        if isinstance(data, Mapping):
            bad = unknown_key(cls, data)
            other = TRAIN_SECTIONS.get(cls.sibling)
            if bad is not None and other is not None and unknown_key(other, {bad: None}) is None:
                raise ConfigError(f"{where}: {bad!r} is a {cls.sibling} setting, not a {cls.section} one; "
                                  f"move it under {cls.sibling}:")
        return section_from_dict(cls, data, where)


@dataclass
class SupernetConfig(TrainConfig):
    """Job section ``supernet``: training the weight-sharing supernet (``noah_ray.train.train_supernet``)."""

    section: ClassVar[str] = "supernet"
    sibling: ClassVar[str] = "retrain"

    eval_random_subnets: int = 3          # smallest + largest + this many fixed random subnets evaluated
    seed: int = 0                         # init, per-step subnet sampling, shuffling
    sampling: str = "uniform"             # subnets trained per step; uniform (NOAH: one random) |
                                          # sandwich (largest + smallest + one random, BigNAS / AttentiveNAS)

    def check_own(self, where: str) -> None:
        if self.sampling not in SAMPLING_RULES:
            raise ConfigError(f"{where}.sampling: {self.sampling!r} unknown; use {' or '.join(SAMPLING_RULES)}")


@dataclass
class RetrainConfig(TrainConfig):
    """Job section ``retrain``: retraining the chosen subnet and the baselines (``noah_ray.train.retrain``)."""

    section: ClassVar[str] = "retrain"
    sibling: ClassVar[str] = "supernet"

    epochs: int = 100
    lr: float = 1e-3
    seeds: tuple[int, ...] = (0,)         # one run per seed, reported as mean +- std
    method: str = "noah"                  # noah | linear | full | vpt | adapter | lora | e2vpt
    subnet: str | None = None             # subnet file (default: the search's winner)
    baselines: tuple[str, ...] = ()       # baselines the pipeline trains beside NOAH (linear, vpt, ...)
    baseline_widths: dict[str, dict[str, int]] = field(default_factory=dict)
                                          # per-baseline uniform widths replacing the defaults
                                          # (noah_ray.models.BASELINE_WIDTHS), e.g. {vpt: {vpt: 50}}
    method_lr: dict[str, float] = field(default_factory=dict)
                                          # per-method learning rate overriding `lr`, e.g. {full: 1.0e-4}
    init: str | None = None               # (noah) start from these weights, a subnet artifact
                                          # (noah-ray import-peft / export --out), instead of a fresh init

    def check_own(self, where: str) -> None:
        for k, v in self.method_lr.items():
            if not type_ok(v, float) or v <= 0:
                raise ConfigError(f"{where}.method_lr.{k}: {v!r} must be a learning rate > 0")
        for k, v in self.baseline_widths.items():
            if not isinstance(v, Mapping) or not all(isinstance(w, int) and w >= 0 for w in v.values()):
                raise ConfigError(f"{where}.baseline_widths.{k}: {v!r} must map module names to widths >= 0, "
                                  f"e.g. {{vpt: 10}}")


#: the two training sections by job key
TRAIN_SECTIONS: dict[str, type[TrainConfig]] = {"supernet": SupernetConfig, "retrain": RetrainConfig}


PRUNABLE: tuple[str, ...] = PRUNABLE_KINDS             # the registry's prunable kinds
PRUNE_SCORES: tuple[str, ...] = ("abs", "signed")


@dataclass(frozen=True)
class PruneConfig:
    """E2VPT pruning (``noah_ray.prune``); as the job section ``prune``, the ``e2vpt`` retraining
    prunes its trained prompts, rewinds the kept ones to their initial values and retrains them
    (rows ``e2vpt`` = before pruning, ``e2vpt-pruned`` = after).  Fractions are per layer."""

    token_fraction: float = 0.5       # of each layer's prompt tokens removed
    segment_fraction: float = 0.25    # of each layer's remaining segments zeroed (0: none)
    num_segments: int = 16            # segments per token vector; must divide the embed dim
    score: str = "abs"                # abs | signed (see noah_ray.prune)
    score_batches: int = 16           # training batches used for each scoring pass
    min_vpt_tokens: int = 1           # a VPT layer keeps at least this many tokens
    modules: tuple[str, ...] | None = None   # None: the recipe's (noah, e2vpt: vpt; modern: vpt, kv_prompt)

    def __post_init__(self) -> None:
        for name in ("token_fraction", "segment_fraction"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise ConfigError(f"prune.{name}: {v} must be in [0, 1)")
        if self.score not in PRUNE_SCORES:
            raise ConfigError(f"prune.score: {self.score!r} unknown; use abs or signed")
        for name in ("num_segments", "score_batches", "min_vpt_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"prune.{name}: {getattr(self, name)} must be >= 1")
        if self.modules is None:
            return
        bad = [m for m in self.modules if m not in PRUNABLE]
        if bad or not self.modules:
            raise ConfigError(f"prune.modules: {bad[0] if bad else 'an empty list'!r} cannot be pruned; "
                              f"use vpt and/or kv_prompt")
        object.__setattr__(self, "modules", tuple(self.modules))


#: search algorithms (``noah_ray.evolution.ENGINES``): evolution is NOAH's generational search,
#: aging the asynchronous (barrier-free) regularized evolution
SEARCH_ALGORITHMS: tuple[str, ...] = ("evolution", "aging", "random", "optuna")


@dataclass
class SearchConfig:
    algorithm: str = "evolution"          # evolution | aging | random | optuna
    generations: int = 20
    population: int = 50
    top_k: int = 10
    mutations: int = 25
    crossovers: int = 25
    mutation_prob: float = 0.2
    depth_prob: float = 0.4
    param_limit: float = 0.64             # millions of trainable module parameters (head excluded)
    param_min: float = 0.0
    max_concurrent: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    eval_batches: int | None = None       # None: the whole val split
    seed: int = 0
    trial_retries: int = 1                # Tune retries of a crashed candidate evaluation before it counts as failed
    cache_val: bool = True                # evaluation actors keep the decoded val batches in memory (val200 at 224px: ~120 MB)
    hold_actors: bool = True              # while a generation's last candidates run, idle actors get short placeholder
                                          # trials, so Tune keeps them (and their loaded supernet) for the next generation
    tournament: int = 0                   # aging: each parent is the best of this many living members (0: top_k parents)

    def check(self, where: str) -> None:
        if self.algorithm not in SEARCH_ALGORITHMS:
            raise ConfigError(f"{where}.algorithm: {self.algorithm!r} unknown; use "
                              f"{', '.join(SEARCH_ALGORITHMS[:-1])} or {SEARCH_ALGORITHMS[-1]}")
        _positive(where, generations=self.generations, population=self.population, top_k=self.top_k,
                  param_limit=self.param_limit, max_concurrent=self.max_concurrent)
        if self.top_k > self.population:
            raise ConfigError(f"{where}.top_k: {self.top_k} exceeds population {self.population}")
        if not 0 <= self.tournament <= self.population:
            raise ConfigError(f"{where}.tournament: {self.tournament} must be between 0 (top_k parents) and "
                              f"population {self.population}")
        if self.param_min >= self.param_limit:
            raise ConfigError(f"{where}.param_min: {self.param_min} must be below param_limit {self.param_limit}")
        if self.mutations < 0 or self.crossovers < 0 or self.mutations + self.crossovers > self.population:
            raise ConfigError(f"{where}: mutations {self.mutations} + crossovers {self.crossovers} must be >= 0 "
                              f"and at most population {self.population}")
        for k in ("mutation_prob", "depth_prob"):
            if not 0 <= getattr(self, k) <= 1:
                raise ConfigError(f"{where}.{k}: {getattr(self, k)} must be in [0, 1]")
        _positive(where, cpus_per_trial=self.cpus_per_trial, eval_batches=self.eval_batches)
        if self.gpus_per_trial < 0 or self.trial_retries < 0 or self.param_min < 0:
            raise ConfigError(f"{where}: gpus_per_trial, trial_retries and param_min must be >= 0")


@dataclass
class JobConfig:
    name: str = "noah"
    storage: str = "./noah-results"
    storage_endpoint: str | None = None   # S3 endpoint override (no credentials here, ever)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    space: SearchSpace = field(default_factory=SearchSpace)
    supernet: SupernetConfig = field(default_factory=SupernetConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    prune: PruneConfig | None = None      # E2VPT pruning + rewinding after the e2vpt retraining
    hpo: HpoConfig | None = None          # hyper-parameter search before retraining (noah_ray.hpo)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)   # MLflow (noah_ray.tracking)

    # ------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "config") -> "JobConfig":
        if data is not None and not isinstance(data, Mapping):
            raise ConfigError(f"{where}: the top level must be a mapping of sections (name, storage, data, "
                              f"model, space, ...), got a {type(data).__name__}")
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown section {unknown[0]!r}; known: {', '.join(sorted(known))}")
        out = cls()
        for k in ("name", "storage", "storage_endpoint"):
            if k in data:
                if not (isinstance(data[k], str) or (k == "storage_endpoint" and data[k] is None)):
                    raise ConfigError(f"{where}.{k}: {data[k]!r} must be a string")
                setattr(out, k, data[k])
        if "data" in data:
            out.data = section_from_dict(DataConfig, data["data"], f"{where}.data")
        if "model" in data:
            out.model = section_from_dict(ModelConfig, data["model"], f"{where}.model")
        if "space" in data:
            out.space = SearchSpace.from_dict(data["space"], f"{where}.space")
        if "supernet" in data:
            out.supernet = SupernetConfig.from_dict(data["supernet"], f"{where}.supernet")
        if "search" in data:
            out.search = section_from_dict(SearchConfig, data["search"], f"{where}.search")
        if "retrain" in data:
            out.retrain = RetrainConfig.from_dict(data["retrain"], f"{where}.retrain")
        if data.get("prune") is not None:
            out.prune = section_from_dict(PruneConfig, data["prune"], f"{where}.prune")
        if data.get("hpo") is not None:
            out.hpo = section_from_dict(HpoConfig, data["hpo"], f"{where}.hpo")
            out._check_hpo_bounds(f"{where}.hpo")
        if data.get("tracking") is not None:
            out.tracking = TrackingConfig.from_dict(data["tracking"], f"{where}.tracking")
        safe_name(out.name, f"{where}.name")
        return out

    @classmethod
    def load(cls, path: str | Path) -> "JobConfig":
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; check the path")
        try:
            data = json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: cannot parse ({str(e).splitlines()[0]}); fix the file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: cannot parse ({yaml_problem(e)}); fix the file") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not a text (UTF-8) file; give a YAML or JSON job config") from None
        return cls.from_dict(data, where=str(p))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["space"] = self.space.to_dict()
        out["retrain"]["seeds"] = list(out["retrain"]["seeds"])
        out["retrain"]["baselines"] = list(out["retrain"]["baselines"])
        if out["prune"] is not None and out["prune"]["modules"] is not None:
            out["prune"]["modules"] = list(out["prune"]["modules"])
        if out["hpo"] is None:
            del out["hpo"]
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    # ------------------------------------------------------------ hyper-parameters
    def with_values(self, values: Mapping[str, float], method: str | None = None) -> "JobConfig":
        """A copy with hyper-parameters set (config path -> value, as :class:`HpoConfig` names them);
        a tuned learning rate replaces ``retrain.method_lr[method]`` and lowers ``min_lr`` to it if
        needed.  The copy (without the ``hpo`` section) is validated like a loaded config."""
        data = self.to_dict()
        data.pop("hpo", None)
        for path, v in values.items():
            section, _, key = path.partition(".")
            data[section][key] = int(round(v)) if hpo_is_int(path) else float(v)
            if path == "retrain.lr":
                data["retrain"]["method_lr"].pop(method, None)
                data["retrain"]["min_lr"] = min(data["retrain"]["min_lr"], float(v))
        return JobConfig.from_dict(data, where="config (with tuned values)")

    def _check_hpo_bounds(self, where: str) -> None:
        """Both ends of every range give a valid job (``drop_path`` up to 1.5 is refused here)."""
        for method in (None, *self.hpo.method_space):
            for path, p in self.hpo.params(method, where).items():
                for v in p.bounds():
                    try:
                        self.with_values({path: v}, method)
                    except ConfigError as e:
                        raise ConfigError(f"{where}: {path} = {v} is outside what the setting allows "
                                          f"({str(e).split(': ', 1)[-1]}); narrow the range") from None
