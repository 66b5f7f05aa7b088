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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from noah_ray import recipes
from noah_ray.recipes import Recipe
from noah_ray.security import safe_name
from noah_ray.space import ConfigError, SearchSpace, yaml_problem


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin in (dict, Mapping):
        return isinstance(value, Mapping)
    return isinstance(value, tp)


def section_from_dict(cls: type, data: Mapping[str, Any] | None, where: str) -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(names))}")
    kwargs = {}
    for k, v in data.items():
        if not _type_ok(v, hints[k]):
            raise ConfigError(f"{where}.{k}: {v!r} is not a valid {getattr(hints[k], '__name__', hints[k])}")
        if typing.get_origin(hints[k]) is tuple and isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check:
        check(where)
    return obj


def _positive(where: str, **values: float) -> None:
    for k, v in values.items():
        if v is not None and v <= 0:
            raise ConfigError(f"{where}.{k}: {v} must be > 0")


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
    """Optimisation settings shared by supernet training and retraining."""

    epochs: int = 500
    lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup_epochs: int = 10
    num_workers: int = 1                  # Ray Train workers
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    checkpoint_every: int = 1             # epochs between checkpoints (a killed run loses at most this many)
    eval_every: int = 1                   # epochs between val evaluations (the last epoch is always evaluated)
    eval_random_subnets: int = 3          # supernet: smallest + largest + this many fixed random
    max_failures: int = 2                 # restarts of a failed worker group from the last checkpoint (-1: no limit)
    seed: int = 0                         # supernet: init, per-step subnet sampling, shuffling
    seeds: tuple[int, ...] = (0,)         # retrain: one run per seed, reported as mean +- std
    method: str = "noah"                  # retrain: noah | linear | full | vpt | adapter | lora | e2vpt
    subnet: str | None = None             # retrain: subnet file (default: the search's winner)
    baselines: tuple[str, ...] = ()       # retrain: baselines the pipeline trains beside NOAH (linear, vpt, ...)
    min_lr: float = 1e-5                  # floor of the cosine schedule (AutoFormer / NOAH code default)
    keep_checkpoints: int = 2             # Ray Train checkpoints kept in storage (the newest ones)
    baseline_widths: dict[str, dict[str, int]] = field(default_factory=dict)
                                          # retrain: per-baseline uniform widths replacing the defaults
                                          # (noah_ray.train.BASELINE_WIDTHS), e.g. {vpt: {vpt: 50}}
    method_lr: dict[str, float] = field(default_factory=dict)
                                          # retrain: per-method learning rate overriding `lr`, e.g. {full: 1.0e-4}
    init: str | None = None               # retrain (noah): start from these weights, a subnet artifact
                                          # (noah-ray import-peft / export --out), instead of a fresh init
    sampling: str = "uniform"             # supernet: subnets trained per step; uniform (NOAH: one random) |
                                          # sandwich (largest + smallest + one random, BigNAS / AttentiveNAS)

    def check(self, where: str) -> None:
        _positive(where, epochs=self.epochs, lr=self.lr, num_workers=self.num_workers,
                  checkpoint_every=self.checkpoint_every, eval_every=self.eval_every)
        if self.warmup_epochs < 0 or self.weight_decay < 0:
            raise ConfigError(f"{where}: warmup_epochs and weight_decay must be >= 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"{where}.min_lr: {self.min_lr} must be in [0, lr={self.lr}]")
        _positive(where, keep_checkpoints=self.keep_checkpoints, cpus_per_worker=self.cpus_per_worker)
        for k, v in self.method_lr.items():
            if not _type_ok(v, float) or v <= 0:
                raise ConfigError(f"{where}.method_lr.{k}: {v!r} must be a learning rate > 0")
        if self.sampling not in SAMPLING_RULES:
            raise ConfigError(f"{where}.sampling: {self.sampling!r} unknown; use {' or '.join(SAMPLING_RULES)}")
        if self.max_failures < -1:
            raise ConfigError(f"{where}.max_failures: {self.max_failures} must be >= 0 (or -1: retry forever)")
        for k, v in self.baseline_widths.items():
            if not isinstance(v, Mapping) or not all(isinstance(w, int) and w >= 0 for w in v.values()):
                raise ConfigError(f"{where}.baseline_widths.{k}: {v!r} must map module names to widths >= 0, "
                                  f"e.g. {{vpt: 10}}")


PRUNABLE: tuple[str, ...] = ("vpt", "kv_prompt")
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


def _retrain_default() -> TrainConfig:
    return TrainConfig(epochs=100, lr=1e-3)


#: search algorithms (``noah_ray.search.SEARCHERS``): evolution is NOAH's generational search,
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


#: short names of the tunable settings; any numeric ``model.*`` key and ``retrain.{lr, weight_decay,
#: warmup_epochs, min_lr}`` may also be named by its path (e.g. ``model.prompt_dropout``)
HPO_ALIASES: dict[str, str] = {"lr": "retrain.lr", "weight_decay": "retrain.weight_decay",
                               "warmup_epochs": "retrain.warmup_epochs", "drop_path": "model.drop_path_rate",
                               "lora_scale": "model.lora_scale"}
HPO_RETRAIN_KEYS: tuple[str, ...] = ("lr", "weight_decay", "warmup_epochs", "min_lr")
HPO_SEARCHERS: tuple[str, ...] = ("tpe", "random", "grid")
HPO_SCHEDULERS: tuple[str, ...] = ("asha", "fifo")
HPO_METRICS: dict[str, str] = {"val_acc": "max", "val_loss": "min"}


@dataclass(frozen=True)
class HpoParam:
    """One dimension of the hyper-parameter space: a range (``low``..``high``, log-uniform when
    ``log``) or a fixed set of ``values``; ``methods`` limits it to some retraining methods."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    values: tuple[float, ...] | None = None
    methods: tuple[str, ...] | None = None

    def check(self, where: str) -> None:
        if self.values is not None:
            if not self.values or not all(_type_ok(v, float) for v in self.values):
                raise ConfigError(f"{where}.values: {list(self.values)!r} must be a non-empty list of numbers")
            if self.log and min(self.values) <= 0:
                raise ConfigError(f"{where}.values: log scale needs values > 0")
            return
        if self.low is None or self.high is None:
            raise ConfigError(f"{where}: give low and high (or values)")
        if not self.low < self.high:
            raise ConfigError(f"{where}: low {self.low} must be below high {self.high}")
        if self.log and self.low <= 0:
            raise ConfigError(f"{where}: low {self.low} must be > 0 on a log scale (log: true)")

    def __post_init__(self) -> None:
        for k in ("values", "methods"):
            if isinstance(getattr(self, k), list):
                object.__setattr__(self, k, tuple(getattr(self, k)))

    def bounds(self) -> tuple[float, float]:
        vals = self.values if self.values is not None else (self.low, self.high)
        return min(vals), max(vals)


#: default range of each tunable setting; per method where it differs (``full`` trains the backbone)
HPO_DEFAULT_RANGES: dict[str, HpoParam] = {
    "retrain.lr": HpoParam(1e-4, 3e-2, log=True), "retrain.weight_decay": HpoParam(1e-5, 1e-1, log=True),
    "retrain.warmup_epochs": HpoParam(0, 10), "retrain.min_lr": HpoParam(1e-7, 1e-4, log=True),
    "model.drop_path_rate": HpoParam(0.0, 0.2), "model.lora_scale": HpoParam(0.25, 4.0, log=True)}
HPO_METHOD_RANGES: dict[str, dict[str, HpoParam]] = {"full": {"retrain.lr": HpoParam(1e-5, 1e-3, log=True)}}
HPO_DEFAULT_SPACE: tuple[str, ...] = ("lr", "weight_decay")


def _numeric(tp: Any) -> bool:
    """``float``, ``int`` or an optional one (not ``bool``)."""
    return tp in (float, int) or (typing.get_origin(tp) in (typing.Union, types.UnionType)
                                  and any(t in (float, int) for t in typing.get_args(tp)))


def hpo_path(name: str, where: str) -> str:
    """The config path a space name stands for (``lr`` -> ``retrain.lr``; a bare numeric model key
    such as ``prompt_dropout`` -> ``model.prompt_dropout``); one-line error if none."""
    numeric = [k for k, t in typing.get_type_hints(ModelConfig).items() if _numeric(t)]
    path = HPO_ALIASES.get(name) or (f"model.{name}" if name in numeric else name)
    section, _, key = path.partition(".")
    if not ((section == "retrain" and key in HPO_RETRAIN_KEYS) or (section == "model" and key in numeric)):
        raise ConfigError(f"{where}: {name!r} is not a tunable setting; use {', '.join(HPO_ALIASES)}, "
                          f"retrain.<{'|'.join(HPO_RETRAIN_KEYS)}> or model.<{'|'.join(numeric)}>")
    return path


def hpo_is_int(path: str) -> bool:
    section, _, key = path.partition(".")
    cls = ModelConfig if section == "model" else TrainConfig
    return typing.get_type_hints(cls)[key] is int


def hpo_default(path: str, method: str | None = None) -> HpoParam | None:
    """The default range of ``path`` for ``method`` (dropout rates: 0..0.3); None when there is none."""
    if method in HPO_METHOD_RANGES and path in HPO_METHOD_RANGES[method]:
        return HPO_METHOD_RANGES[method][path]
    if path in HPO_DEFAULT_RANGES:
        return HPO_DEFAULT_RANGES[path]
    return HpoParam(0.0, 0.3) if path.endswith("dropout") else None


@dataclass
class HpoConfig:
    """Hyper-parameter search of retraining and the baselines (``noah_ray.hpo``): per method,
    ``trials`` Tune trials on ``data.train_split`` reporting ``metric`` on ``data.val_split``
    every epoch; ``searcher`` proposes (``tpe``: Optuna TPE, ``random``, ``grid``), ``scheduler``
    stops weak trials (``asha``) or not (``fifo``); the best trial's values then train the final
    runs on ``data.final_train_split`` for every seed.  Every method gets the same budget."""

    trials: int = 16                      # per method (grid: the number of grid points instead)
    epochs: int | None = None             # epochs per trial (ASHA's max_t); default: retrain.epochs
    max_concurrent: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0           # fractions share a GPU, e.g. 0.25
    searcher: str = "tpe"                 # tpe | random | grid
    scheduler: str = "asha"               # asha | fifo
    grace_period: int = 1                 # ASHA: epochs before the first stop decision
    reduction_factor: float = 4.0         # ASHA: keep the top 1/reduction_factor at each rung
    metric: str = "val_acc"               # val_acc (max) | val_loss (min), reported every epoch
    startup_trials: int | None = None     # TPE: random trials before the model; default max(2, trials // 4)
    grid_points: int = 4                  # grid: points per range (log-spaced on a log range)
    trial_retries: int = 1                # Tune retries of a crashed trial (from its last checkpoint)
    seed: int = 0
    space: dict[str, Any] = field(default_factory=dict)
                                          # name -> {low, high, log, values, methods} or null (the default
                                          # range); empty: lr and weight_decay
    method_space: dict[str, dict[str, Any]] = field(default_factory=dict)
                                          # per-method entries replacing / adding to `space`, e.g. {full: {lr: ...}}

    def check(self, where: str) -> None:
        for k, allowed in (("searcher", HPO_SEARCHERS), ("scheduler", HPO_SCHEDULERS), ("metric", HPO_METRICS)):
            if getattr(self, k) not in allowed:
                raise ConfigError(f"{where}.{k}: {getattr(self, k)!r} unknown; use {' or '.join(allowed)}")
        _positive(where, trials=self.trials, max_concurrent=self.max_concurrent, cpus_per_trial=self.cpus_per_trial,
                  grace_period=self.grace_period, epochs=self.epochs, startup_trials=self.startup_trials)
        if self.reduction_factor <= 1 or self.grid_points < 2:
            raise ConfigError(f"{where}: reduction_factor {self.reduction_factor} must be > 1 and grid_points "
                              f"{self.grid_points} >= 2")
        if self.gpus_per_trial < 0 or self.trial_retries < 0:
            raise ConfigError(f"{where}: gpus_per_trial and trial_retries must be >= 0")
        for method, extra in self.method_space.items():
            if not isinstance(extra, Mapping):
                raise ConfigError(f"{where}.method_space.{method}: expected a mapping of space entries")
        for method in (None, *self.method_space):
            self.params(method, where)

    def params(self, method: str | None = None, where: str = "hpo") -> dict[str, HpoParam]:
        """The space for ``method``: config path -> range (defaults filled in, not yet filtered by
        the modules the method trains)."""
        base = dict(self.space) if self.space else dict.fromkeys(HPO_DEFAULT_SPACE)
        entries = {**base, **self.method_space.get(method, {})} if method else base
        out: dict[str, HpoParam] = {}
        for name, spec in entries.items():
            w = f"{where}.space.{name}" if name in self.space else f"{where}.method_space.{method}.{name}"
            path = hpo_path(name, w)
            if spec is None or spec == {}:
                default = hpo_default(path, method)
                if default is None:
                    raise ConfigError(f"{w}: no default range for {path}; give low and high (or values)")
                out[path] = default
                continue
            if not isinstance(spec, Mapping):
                raise ConfigError(f"{w}: {spec!r} must be a mapping {{low, high, log, values, methods}} or null")
            spec = dict(spec)
            default = hpo_default(path, method)
            if "values" not in spec and default is not None:
                spec.setdefault("log", default.log)
            out[path] = section_from_dict(HpoParam, spec, w)
        return out


@dataclass
class MlflowConfig:
    """Where MLflow runs go (``noah_ray.tracking``).  Credentials never go here: MLflow reads them
    from ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` / ``MLFLOW_TRACKING_TOKEN``."""

    tracking_uri: str = ""                # e.g. sqlite:///mlflow.db, http://mlflow:5000, databricks
    experiment: str = "noah-ray"
    artifact_location: str | None = None  # artifact root of a new experiment (default: MLflow's)

    def check(self, where: str) -> None:
        if not self.tracking_uri.strip() or not self.experiment.strip():
            raise ConfigError(f"{where}: tracking_uri and experiment must be set, e.g. "
                              f"{{tracking_uri: sqlite:///mlflow.db, experiment: noah-ray}}")
        if "@" in self.tracking_uri.split("://", 1)[-1].split("/", 1)[0]:
            raise ConfigError(f"{where}.tracking_uri: credentials in the URI would be logged and sent to Ray "
                              f"workers; set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD instead")


@dataclass
class TrackingConfig:
    """Optional experiment tracking; ``mlflow`` unset: nothing is tracked."""

    mlflow: MlflowConfig | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str) -> "TrackingConfig":
        out = section_from_dict(cls, {**(data or {}), "mlflow": None} if isinstance(data, Mapping) else data, where)
        raw = (data or {}).get("mlflow")
        if raw is not None:
            out.mlflow = section_from_dict(MlflowConfig, raw, f"{where}.mlflow")
        return out


@dataclass
class JobConfig:
    name: str = "noah"
    storage: str = "./noah-results"
    storage_endpoint: str | None = None   # S3 endpoint override (no credentials here, ever)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    space: SearchSpace = field(default_factory=SearchSpace)
    supernet: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    retrain: TrainConfig = field(default_factory=_retrain_default)
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
            out.supernet = section_from_dict(TrainConfig, data["supernet"], f"{where}.supernet")
        if "search" in data:
            out.search = section_from_dict(SearchConfig, data["search"], f"{where}.search")
        if "retrain" in data:
            if not isinstance(data["retrain"] or {}, Mapping):
                raise ConfigError(f"{where}.retrain: expected a mapping, got {data['retrain']!r}")
            merged = {"epochs": 100, "lr": 1e-3, **(data["retrain"] or {})}
            out.retrain = section_from_dict(TrainConfig, merged, f"{where}.retrain")
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
        for k in ("supernet", "retrain"):
            out[k]["seeds"] = list(out[k]["seeds"])
            out[k]["baselines"] = list(out[k]["baselines"])
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
