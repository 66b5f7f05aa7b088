"""The ``race:`` section: finalist racing, the service's default selection between the search and
retraining (:mod:`noah_ray.hpo.race`).  Pure Python, no torch, no Ray.

The finalists (the search's ``finalists`` best distinct candidates and, with ``baselines``, each
module kind of the space alone at the widest uniform width under the limit) train standalone on
``data.train_split`` and are scored on ``data.val_split`` every epoch under successive halving
(Ray Tune's ``ASHAScheduler``: first decision after ``grace_period`` epochs, the best
``1/reduction_factor`` go on at each rung, ``max_epochs`` at the top).  The survivor is what
retraining trains.  ``enabled: false`` keeps NOAH's plain procedure (the search's winner is
retrained).  The survivor's result rows are named ``noah+``; ``retrain_plain: true`` also retrains
the search's top-scored candidate (NOAH's choice, ``search.ties: best``) as the rows ``noah``, so
one job compares both procedures on the same supernet and search.  The cost of the default
brackets: :func:`race_budget`.  ASHA is asynchronous: a trial reaching a rung is compared with the
results recorded there so far, so with ``max_concurrent`` above 1 which trials stop depends on the
order results arrive; ``scheduler: sync`` (every trial waits at each rung until the rung is
decided on all its results: :mod:`noah_ray.hpo.halving`) or ``max_concurrent: 1`` makes the race
repeatable.

``ties: incumbent`` (the default) makes the race a challenge to what a user would size by hand:
the hand-sized baseline of the kind ``incumbent`` (default: LoRA when the space has it, else the
space's first kind) goes on at every rung, under either scheduler, and at the top rung it is the
survivor unless the best-ranked other trial beats it on the val images by McNemar's exact paired
test at level ``alpha`` divided by the number of other trials that started (Bonferroni: that trial
was picked as the best of them on the same images; :func:`noah_ray.evolution.ties.paired_test`).

``ties: baseline`` is the unpaired rule: a trial's val accuracy is a binomial
estimate on the val split's ``n`` images (its s.e.: the search's,
:func:`noah_ray.evolution.ties.standard_error`), and a hand-sized baseline within ``tie_se`` s.e.
of a rung's best goes on (the best-ranked such baseline, beside the rung's top
``1/reduction_factor``) and, at the top rung, is the survivor: a search finalist replaces it
only by beating it by more than that (any baseline: the best-ranked tied one).  Under ``scheduler:
asha`` (Ray Tune decides its rungs) this rule applies at the top rung only.  ``ties: best`` takes
the best score everywhere (plain successive halving).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from noah_ray.config.sections import at_most, positive
from noah_ray.errors import ConfigError

#: race.ties: how a rung and the survivor treat the hand-sized baselines (module docstring); the
#: rules themselves: noah_ray.hpo.race.RACE_RULES
RACE_TIES = ("incumbent", "baseline", "best")
#: more finalists than this is a typo (each is a standalone training)
MAX_FINALISTS = 256
#: race.scheduler -> the factory of its (Tune scheduler, variant generator), as HPO_SCHEDULERS names
#: the hpo stage's (``"package.module:attribute"``, imported on first use)
RACE_SCHEDULERS: dict[str, str] = {"asha": "noah_ray.hpo.race:asha_race", "sync": "noah_ray.hpo.race:sync_race"}


@dataclass
class RaceConfig:
    enabled: bool = True                  # false: retrain the search's winner (NOAH's plain procedure)
    finalists: int = 8                    # the search's top-K distinct candidates that race
    baselines: bool = True                # also race each module kind alone, uniform, widest under the limit
    max_epochs: int | None = None         # the top rung (ASHA's max_t); default: retrain.epochs
    grace_period: int | None = None       # epochs before the first stop decision; default max(1, max_epochs // 16)
    reduction_factor: float = 4.0         # ASHA: the best 1/reduction_factor of a rung go on
    scheduler: str = "asha"               # asha (Ray Tune's, asynchronous) | sync (each rung decided on all
                                          # its results: repeatable at any max_concurrent; noah_ray.hpo.halving)
    ties: str = "incumbent"               # incumbent: the hand-sized `incumbent` goes on at every rung and
                                          # wins at the top unless a paired test says otherwise; baseline: a
                                          # baseline within tie_se s.e. of the best goes on and wins at the
                                          # top; best: the best score (plain halving)
    tie_se: float = 1.0                   # ties: baseline's window, in standard errors of the val accuracy
    incumbent: str | None = None          # ties: incumbent's module kind (None: lora if the space has it,
                                          # else the space's first kind)
    alpha: float = 0.05                   # ties: incumbent's test level, shared by the challengers
    lrs: list[float] = field(default_factory=list)
                                          # learning rates raced per finalist (each pair a trial);
                                          # empty: retrain.lr (or retrain.method_lr.noah)
    max_concurrent: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    trial_retries: int = 1                # Tune retries of a crashed trial (from its last checkpoint)
    seed: int = 0
    retrain_plain: bool = False           # also retrain the search's top-scored candidate as the row
                                          # ``noah`` (NOAH's plain procedure) beside the survivor ``noah+``

    def check(self, where: str) -> None:
        positive(where, finalists=self.finalists, max_epochs=self.max_epochs, grace_period=self.grace_period,
                 max_concurrent=self.max_concurrent, cpus_per_trial=self.cpus_per_trial)
        at_most(where, MAX_FINALISTS, finalists=self.finalists)
        if self.scheduler not in RACE_SCHEDULERS:
            raise ConfigError(f"{where}.scheduler: {self.scheduler!r} unknown; use one of {', '.join(RACE_SCHEDULERS)}")
        if self.ties not in RACE_TIES:
            raise ConfigError(f"{where}.ties: {self.ties!r} unknown; use one of {', '.join(RACE_TIES)}")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"{where}.alpha: {self.alpha} must be between 0 and 1 (e.g. 0.05)")
        if not 0 <= self.tie_se <= 10:
            raise ConfigError(f"{where}.tie_se: {self.tie_se} must be between 0 and 10 standard errors (e.g. 1)")
        if self.reduction_factor <= 1:
            raise ConfigError(f"{where}.reduction_factor: {self.reduction_factor} must be > 1 (e.g. 4: the best "
                              f"quarter of each rung goes on)")
        if self.max_epochs is not None and self.grace_period is not None and self.grace_period > self.max_epochs:
            raise ConfigError(f"{where}.grace_period: {self.grace_period} exceeds max_epochs {self.max_epochs}; "
                              f"lower it")
        bad = next((lr for lr in self.lrs if not lr > 0), None)
        if bad is not None:
            raise ConfigError(f"{where}.lrs: {bad} must be > 0, e.g. lrs: [0.001, 0.003, 0.01]")
        if len(set(self.lrs)) != len(self.lrs):
            raise ConfigError(f"{where}.lrs: {self.lrs} names a value twice; list each learning rate once")
        if self.gpus_per_trial < 0 or self.trial_retries < 0:
            raise ConfigError(f"{where}: gpus_per_trial and trial_retries must be >= 0")

    def check_space(self, kinds: Sequence[str], where: str) -> None:
        """``incumbent`` names a module kind of the search space ``kinds``."""
        if self.incumbent is not None and self.incumbent not in kinds:
            raise ConfigError(f"{where}.incumbent: {self.incumbent!r} is not a module kind of the search space; "
                              f"use one of {', '.join(kinds)}")

    def incumbent_kind(self, kinds: Sequence[str]) -> str | None:
        """The kind of ``ties: incumbent``'s hand-sized baseline (module docstring); None without kinds."""
        return self.incumbent or ("lora" if "lora" in kinds else next(iter(kinds), None))

    def epochs(self, retrain_epochs: int) -> int:
        """The top rung: ``max_epochs``, else the retraining's epochs."""
        return self.max_epochs or retrain_epochs

    def grace(self, retrain_epochs: int) -> int:
        """The first rung: ``grace_period``, else 1/16 of the top rung (at least 1), at most the top."""
        top = self.epochs(retrain_epochs)
        return min(self.grace_period or max(1, top // 16), top)


def rungs(grace: int, reduction_factor: float, max_epochs: int) -> list[int]:
    """The epochs at which ASHA decides (Ray Tune's milestones ``grace * rf**k`` below
    ``max_epochs``), then ``max_epochs`` itself, where every survivor ends."""
    count = int(math.log(max_epochs / grace) / math.log(reduction_factor) + 1)
    out = sorted({int(grace * reduction_factor ** k) for k in range(count)} | {max_epochs})
    return [r for r in out if r <= max_epochs]


def race_budget(trials: int, grace: int, reduction_factor: float, max_epochs: int) -> int:
    """Epochs a race of ``trials`` spends under synchronous successive halving: every trial to the
    first rung, then the best ``ceil(n / rf)`` (at least one) of each rung to the next.  ASHA is
    asynchronous and promotes a little more freely early on (a rung's first arrivals go on).

    The defaults (8 search finalists + 3 baselines, ``rf`` 4, grace ``max_epochs // 16``) with
    100 epochs: rungs 6, 24, 96, 100 -> 11 x 6 + 3 x 18 + 1 x 72 + 1 x 4 = 196 epochs, 1.96
    retrainings; with 6 epochs (the demo): rungs 1, 4, 6 -> 11 + 3 x 3 + 1 x 2 = 22 epochs, 3.7
    retrainings (a short top rung leaves little to halve).  A grid of ``lrs`` multiplies the
    trials (3 rates: 5.9 retrainings at 100 epochs)."""
    total, alive, prev = 0, trials, 0
    for r in rungs(grace, reduction_factor, max_epochs):
        total += alive * (r - prev)
        prev, alive = r, max(1, math.ceil(alive / reduction_factor))
    return total
