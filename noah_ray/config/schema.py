"""The sections of a job config as typed dataclasses: ``data``, ``model``, ``supernet`` /
``retrain`` (on a shared :class:`TrainConfig`), ``prune`` and ``search``, each checked on load
(:func:`noah_ray.config.sections.section_from_dict` then ``check(where)``).  The reflection over
the settings hyper-parameter search may tune (:func:`hpo_path`, :func:`hpo_is_int`) lives here,
with the schema it reflects; :class:`noah_ray.config.job.JobConfig` puts the sections together.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from noah_ray.config.sections import at_most as _at_most
from noah_ray.config.sections import positive as _positive
from noah_ray.config.sections import section_from_dict, type_ok, unknown_key
from noah_ray.errors import ConfigError
from noah_ray.security import safe_name
from noah_ray.space import recipes
from noah_ray.space.kinds import ADAPTER, KV_PROMPT, LORA, PRUNABLE_KINDS, VPT
from noah_ray.space.methods import default_recipe
from noah_ray.space.recipes import Recipe
from noah_ray.space.sampling import SAMPLING

#: short names of the tunable settings; any numeric ``model.*`` key and ``retrain.{lr, weight_decay,
#: warmup_epochs, min_lr}`` may also be named by its path (e.g. ``model.prompt_dropout``)
HPO_ALIASES: dict[str, str] = {"lr": "retrain.lr", "weight_decay": "retrain.weight_decay",
                               "warmup_epochs": "retrain.warmup_epochs", "drop_path": "model.drop_path_rate",
                               "lora_scale": "model.lora_scale"}
HPO_RETRAIN_KEYS: tuple[str, ...] = ("lr", "weight_decay", "warmup_epochs", "min_lr")

#: sane upper bounds: a value above one is a typo (an extra zero) or a run that never ends
MAX_EPOCHS = 100_000
MAX_EPOCHS_MULTIPLE = 100.0
MAX_GENERATIONS = 10_000
MAX_POPULATION = 100_000
MAX_BATCH = 65_536
MAX_IMG_SIZE = 4096
MAX_SEED = 2**32 - 1                      # numpy's seed range


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
        _at_most(where, MAX_BATCH, batch_size=self.batch_size, eval_batch_size=self.eval_batch_size)
        _at_most(where, MAX_IMG_SIZE, img_size=self.img_size)
        for k in ("train_split", "val_split", "final_train_split", "test_split"):   # read under the dataset folder
            safe_name(getattr(self, k), f"{where}.{k}")
        if self.num_workers < 0:
            raise ConfigError(f"{where}.num_workers: {self.num_workers} must be >= 0 (0 loads in the main process)")


def _of(module: str) -> dict[str, str]:
    """Field metadata: the setting belongs to prompt module ``module`` (hpo tunes it only for the
    methods that train that module, :func:`hpo_module`)."""
    return {"module": module}


@dataclass
class ModelConfig:
    name: str = "vit_base_patch16_224.augreg_in21k"
    checkpoint: str | None = None         # .npz (Google), .pth / .safetensors (timm); path or s3://
    drop_path_rate: float = 0.1
    lora_scale: float = field(default=1.0, metadata=_of(LORA))
    kv_shared: bool | None = field(default=None, metadata=_of(KV_PROMPT))         # one K/V prompt tensor (None:
                                                                                  # the recipe's)
    fused_attn: bool = True
    grad_checkpointing: bool = False
    checkpoint_blocks: int | None = field(default=None, metadata={"tunable": "no"})
                                          # with grad_checkpointing: only the first N blocks (None: all)
    precision: str = "fp32"               # fp32 | bf16 | fp16
    # recipe (noah_ray.recipes; docs/recipes.md): noah | e2vpt | modern; None: noah, and e2vpt for
    # the e2vpt baseline.  Each setting below overrides the recipe's value (None: the recipe's).
    recipe: str | None = None
    adapter_act: str | None = field(default=None, metadata=_of(ADAPTER))          # quick_gelu | gelu
    lora_dropout: float | None = field(default=None, metadata=_of(LORA))          # on the LoRA input
    prompt_dropout: float | None = field(default=None, metadata=_of(VPT))         # on the VPT tokens
    adapter_dropout: float | None = field(default=None, metadata=_of(ADAPTER))    # on the adapter's hidden layer
    drop_path: str | None = None          # before_adapter (NOAH) | after_adapter
    vpt_init: str | None = field(default=None, metadata=_of(VPT))                 # xavier_tensor | vpt | xavier_token
    adapter_init: str | None = field(default=None, metadata=_of(ADAPTER))         # xavier | zero_up | vit
    lora_init: str | None = field(default=None, metadata=_of(LORA))               # kaiming | vit
    kv_init: str | None = field(default=None, metadata=_of(KV_PROMPT))            # kaiming | xavier
    prune_pieces: str | None = None       # strided | contiguous (E2VPT pruning segments)
    prune_shared: bool | None = None      # one pruning mask for all layers
    param_count: str | None = None        # exact | noah (the count search.param_limit applies to)

    def settings(self) -> dict[str, Any]:
        """What a resumed trial stage (hpo, race) must match: every field but ``checkpoint_blocks``
        (it changes memory and speed, not what is computed; settings written before it existed lack it)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "checkpoint_blocks"}

    def check(self, where: str) -> None:
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"{where}.precision: {self.precision!r} unknown; use fp32, bf16 or fp16")
        cb = self.checkpoint_blocks
        if cb is not None and (isinstance(cb, bool) or not isinstance(cb, int) or cb < 0):
            raise ConfigError(f"{where}.checkpoint_blocks: {cb!r} must be a whole number >= 0 (the first N blocks "
                              f"are checkpointed; unset: all)")
        if cb is not None and not self.grad_checkpointing:
            raise ConfigError(f"{where}.checkpoint_blocks: {cb} needs grad_checkpointing: true beside it (it says how "
                              f"many blocks are checkpointed); set both, or remove checkpoint_blocks")
        if not 0 <= self.drop_path_rate < 1:
            raise ConfigError(f"{where}.drop_path_rate: {self.drop_path_rate} must be in [0, 1)")
        try:
            self.resolved_recipe()
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}".replace(f"{where}: model.", f"{where}.")) from None

    def resolved_recipe(self, method: str = "noah") -> Recipe:
        """The recipe this model trains with (for retraining baseline ``method``), overrides applied."""
        name = self.recipe or default_recipe(method)
        return recipes.resolve(name, **{k: getattr(self, k, None) for k in recipes.SETTINGS})


#: supernet sampling rules by name (the registry itself, :data:`noah_ray.space.sampling.SAMPLING`)
SAMPLING_RULES = SAMPLING

_Train = TypeVar("_Train", bound="TrainConfig")


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
        _at_most(where, MAX_EPOCHS, epochs=self.epochs, warmup_epochs=self.warmup_epochs)
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
    def from_dict(cls: type[_Train], data: Mapping[str, Any] | None, where: str) -> _Train:
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
    epochs_multiple: float | None = None  # epochs = this x retrain.epochs, rounded (the paper trains the
                                          # supernet as long as the retraining: 1); instead of epochs, not
                                          # with it; the loaded job holds the resulting epochs

    def check_own(self, where: str) -> None:
        if self.sampling not in SAMPLING:
            raise ConfigError(f"{where}.sampling: {self.sampling!r} unknown; use {' or '.join(SAMPLING)}")
        m = self.epochs_multiple
        if m is not None and not (type_ok(m, float) and 0 < m <= MAX_EPOCHS_MULTIPLE):
            raise ConfigError(f"{where}.epochs_multiple: {m!r} must be a number in (0, {MAX_EPOCHS_MULTIPLE:g}] "
                              f"(supernet epochs as a multiple of retrain.epochs), e.g. 1 or 2")

    def resolve_epochs(self, retrain_epochs: int, explicit_epochs: bool, where: str) -> None:
        """Set ``epochs`` from ``epochs_multiple`` x ``retrain_epochs`` (rounded half up, at least 1), then forget the
        multiple (a saved job holds plain epochs); a section giving both is refused."""
        m = self.epochs_multiple
        if m is None:
            return
        if explicit_epochs:
            raise ConfigError(f"{where}: give supernet.epochs ({self.epochs}) or supernet.epochs_multiple ({m:g} x "
                              f"retrain.epochs), not both; remove one")
        self.epochs, self.epochs_multiple = max(1, int(m * retrain_epochs + 0.5)), None   # half up
        _at_most(where, MAX_EPOCHS, epochs=self.epochs)


@dataclass
class RetrainConfig(TrainConfig):
    """Job section ``retrain``: retraining the chosen subnet and the baselines (``noah_ray.train.retrain``)."""

    section: ClassVar[str] = "retrain"
    sibling: ClassVar[str] = "supernet"

    epochs: int = 100
    lr: float = 1e-3
    seeds: tuple[int, ...] = (0,)         # one run per seed, reported as mean +- std
    method: str = "noah"                  # a retraining method (noah_ray.space.methods.METHODS)
    subnet: str | None = None             # subnet file (default: the search's winner)
    baselines: tuple[str, ...] = ()       # baselines the pipeline trains beside NOAH (linear, vpt, ...)
    baseline_widths: dict[str, dict[str, int]] = field(default_factory=dict)
                                          # per-baseline uniform widths replacing the defaults
                                          # (noah_ray.space.methods.METHODS), e.g. {vpt: {vpt: 50}}
    method_lr: dict[str, float] = field(default_factory=dict)
                                          # per-method learning rate overriding `lr`, e.g. {full: 1.0e-4}
    init: str | None = None               # (noah) start from these weights, a subnet artifact
                                          # (noah-ray import-peft / export --out), instead of a fresh init
    max_concurrent: int = 1               # worker groups training the stage's runs at once (each one session
                                          # of reused workers; the runs dealt among them); 1: one after another
    cache_features: bool = True           # a run that trains the head only (linear) on a deterministic frozen
                                          # network trains on pre-logit features computed once per session
                                          # (noah_ray.nn.features); false: every epoch runs the backbone

    def check_own(self, where: str) -> None:
        v: Any
        _positive(where, max_concurrent=self.max_concurrent)
        seeds = list(self.seeds)
        if not seeds or len(set(seeds)) < len(seeds) or not all(0 <= s <= MAX_SEED for s in seeds):
            raise ConfigError(f"{where}.seeds: {seeds} must be a list of distinct integers in [0, {MAX_SEED}] "
                              f"(one run each), e.g. [0, 1, 2]")
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


#: the search algorithms (``search.algorithm``) and the engine class each names, imported when a
#: search starts (:func:`noah_ray.evolution.engine_for`; :mod:`noah_ray.config.entries`): evolution
#: is NOAH's generational search, aging the asynchronous (barrier-free) regularized evolution
SEARCH_ENGINES: dict[str, str] = {
    "evolution": "noah_ray.evolution.generational:EvolutionEngine",
    "aging": "noah_ray.evolution.aging:AgingEvolutionEngine",
    "random": "noah_ray.evolution.random_search:RandomEngine",
    "optuna": "noah_ray.evolution.nsga2:NSGA2Engine",
}
#: the algorithm names (the registry itself: its keys)
SEARCH_ALGORITHMS = SEARCH_ENGINES


#: ``search.ties``: how the winner is picked among the candidates statistically tied with the top
#: score (the sort keys: :data:`noah_ray.evolution.ties.TIE_BREAKS`)
SEARCH_TIES: dict[str, str] = {
    "more_params": "the most parameters (under the limit)",
    "fewer_params": "the fewest parameters",
    "best": "the top score (NOAH's choice)",
}
MAX_TIE_SE = 10.0
#: ``search.warm_start`` sources of generation 0 configs (:func:`noah_ray.search.driver.warm_configs`)
WARM_STARTS: dict[str, str] = {
    "uniform": "each module alone, uniform over its layers, at the widest width under the limit",
    "sweep": "the winners of the sweep's other tasks that finished their search",
}


@dataclass
class SearchConfig:
    algorithm: str = "evolution"          # evolution | aging | random | optuna (SEARCH_ENGINES)
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
    cache_val: bool = True                # evaluation actors keep the decoded val batches in memory
                                          # (val200 at 224px: ~120 MB)
    hold_actors: bool = True              # while a generation's last candidates run, idle actors get short placeholder
                                          # trials, so Tune keeps them (and their loaded supernet) for the next
                                          # generation
    tournament: int = 0                   # aging: each parent is the best of this many living
                                          # members (0: top_k parents)
    ties: str = "more_params"             # the winner among candidates within tie_se standard errors
                                          # (binomial, val split) of the top score: more_params (most
                                          # parameters under the limit) | fewer_params | best (NOAH: the top
                                          # score) (SEARCH_TIES; noah_ray.evolution.ties)
    tie_se: float = 1.0                   # the tie window in standard errors of the top score
    warm_start: tuple[str, ...] = ("uniform",)
                                          # generation 0 also holds: uniform (each module alone, uniform,
                                          # at the widest width under the limit) and/or sweep (winners of
                                          # the sweep's finished tasks, warm_jobs); [] : all random (NOAH)
    warm_jobs: tuple[str, ...] = ()       # sweep: the other tasks' job names (set by the sweep)

    def check(self, where: str) -> None:
        if self.algorithm not in SEARCH_ENGINES:
            *others, last = SEARCH_ENGINES
            raise ConfigError(f"{where}.algorithm: {self.algorithm!r} unknown; use {', '.join(others)} or {last}")
        _positive(where, generations=self.generations, population=self.population, top_k=self.top_k,
                  param_limit=self.param_limit, max_concurrent=self.max_concurrent)
        _at_most(where, MAX_GENERATIONS, generations=self.generations)
        _at_most(where, MAX_POPULATION, population=self.population)
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
        if self.ties not in SEARCH_TIES:
            raise ConfigError(f"{where}.ties: {self.ties!r} unknown; use {', '.join(SEARCH_TIES)}")
        if not (type_ok(self.tie_se, float) and 0 <= self.tie_se <= MAX_TIE_SE):
            raise ConfigError(f"{where}.tie_se: {self.tie_se!r} must be a number of standard errors in "
                              f"[0, {MAX_TIE_SE}] (0: exact ties only)")
        bad = [w for w in self.warm_start if w not in WARM_STARTS]
        if bad or len(set(self.warm_start)) < len(self.warm_start):
            raise ConfigError(f"{where}.warm_start: {list(self.warm_start)!r} must list distinct sources out of "
                              f"{', '.join(WARM_STARTS)} (or be [] for an all-random generation 0)")
        if self.gpus_per_trial < 0 or self.trial_retries < 0 or self.param_min < 0:
            raise ConfigError(f"{where}: gpus_per_trial, trial_retries and param_min must be >= 0")


# ------------------------------------------------------------ tunable settings (hpo)
def _numeric(tp: Any) -> bool:
    """``float``, ``int`` or an optional one (not ``bool``)."""
    return tp in (float, int) or (typing.get_origin(tp) in (typing.Union, types.UnionType)
                                  and any(t in (float, int) for t in typing.get_args(tp)))


def hpo_path(name: str, where: str) -> str:
    """The config path a space name stands for (``lr`` -> ``retrain.lr``; a bare numeric model key
    such as ``prompt_dropout`` -> ``model.prompt_dropout``); one-line error if none."""
    fixed = {f.name for f in dataclasses.fields(ModelConfig) if f.metadata.get("tunable") == "no"}
    numeric = [k for k, t in typing.get_type_hints(ModelConfig).items() if _numeric(t) and k not in fixed]
    path = HPO_ALIASES.get(name) or (f"model.{name}" if name in numeric else name)
    section, _, key = path.partition(".")
    if not ((section == "retrain" and key in HPO_RETRAIN_KEYS) or (section == "model" and key in numeric)):
        raise ConfigError(f"{where}: {name!r} is not a tunable setting; use {', '.join(HPO_ALIASES)}, "
                          f"retrain.<{'|'.join(HPO_RETRAIN_KEYS)}> or model.<{'|'.join(numeric)}>")
    return path


def hpo_is_int(path: str) -> bool:
    section, _, key = path.partition(".")
    cls = ModelConfig if section == "model" else RetrainConfig
    return typing.get_type_hints(cls)[key] is int


def hpo_module(path: str) -> str | None:
    """The prompt module the setting at ``path`` belongs to (its field's ``module`` metadata, e.g.
    ``model.lora_scale`` -> ``lora``); None for settings every method has (``retrain.lr``)."""
    section, _, key = path.partition(".")
    if section != "model":
        return None
    module = next((f.metadata.get("module") for f in dataclasses.fields(ModelConfig) if f.name == key), None)
    return module if isinstance(module, str) else None
