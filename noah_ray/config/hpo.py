"""The ``hpo:`` section of a job (``noah_ray.hpo``): which settings are tuned over which ranges,
the searcher, the scheduler and the budget.  Read like every other section
(:func:`noah_ray.config.sections.section_from_dict`); :class:`~noah_ray.config.JobConfig` holds it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from noah_ray.config.schema import hpo_path
from noah_ray.config.sections import positive, section_from_dict, type_ok
from noah_ray.errors import ConfigError

#: ``hpo.searcher`` / ``hpo.scheduler`` names and the factory each names (``factory(hpo, epochs)``,
#: ``epochs`` the trials' budget -> Ray Tune's searcher / scheduler), imported when a search starts
#: (:mod:`noah_ray.config.entries`)
HPO_SEARCHERS: dict[str, str] = {"tpe": "noah_ray.hpo.driver:tpe_searcher",
                                 "random": "noah_ray.hpo.driver:variant_searcher",
                                 "grid": "noah_ray.hpo.driver:variant_searcher"}
HPO_SCHEDULERS: dict[str, str] = {"asha": "noah_ray.hpo.driver:asha_scheduler",
                                  "fifo": "noah_ray.hpo.driver:fifo_scheduler"}
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
            if not self.values or not all(type_ok(v, float) for v in self.values):
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
        # check() makes low and high set whenever values is not
        vals = self.values if self.values is not None else (cast(float, self.low), cast(float, self.high))
        return min(vals), max(vals)


#: default range of each tunable setting; per method where it differs (``full`` trains the backbone)
HPO_DEFAULT_RANGES: dict[str, HpoParam] = {
    "retrain.lr": HpoParam(1e-4, 3e-2, log=True), "retrain.weight_decay": HpoParam(1e-5, 1e-1, log=True),
    "retrain.warmup_epochs": HpoParam(0, 10), "retrain.min_lr": HpoParam(1e-7, 1e-4, log=True),
    "model.drop_path_rate": HpoParam(0.0, 0.2), "model.lora_scale": HpoParam(0.25, 4.0, log=True)}
HPO_METHOD_RANGES: dict[str, dict[str, HpoParam]] = {"full": {"retrain.lr": HpoParam(1e-5, 1e-3, log=True)}}
HPO_DEFAULT_SPACE: tuple[str, ...] = ("lr", "weight_decay")


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
    searcher: str = "tpe"                 # tpe | random | grid (HPO_SEARCHERS)
    scheduler: str = "asha"               # asha | fifo (HPO_SCHEDULERS)
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
        method: str | None
        for k, allowed in (("searcher", HPO_SEARCHERS), ("scheduler", HPO_SCHEDULERS), ("metric", HPO_METRICS)):
            if getattr(self, k) not in allowed:
                raise ConfigError(f"{where}.{k}: {getattr(self, k)!r} unknown; use {' or '.join(allowed)}")
        positive(where, trials=self.trials, max_concurrent=self.max_concurrent, cpus_per_trial=self.cpus_per_trial,
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
