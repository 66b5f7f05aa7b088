"""Finalist racing (the ``race`` stage, the service's default selection; ``race.enabled: false``
keeps NOAH's plain procedure, the search's winner retrained).

The finalists (:func:`pick_finalists`): the search's winner and its next best distinct candidates
(``race.finalists`` in all; ranked by supernet val accuracy, ties to more parameters) and, with
``race.baselines``, each module kind of the space alone, uniform, at the widest width under the
same parameter limit (:meth:`~noah_ray.space.ParamLimit.widest_uniform`).  Each finalist (with each
learning rate of ``race.lrs``: a grid, every pair one trial) trains standalone from its initial
values as retraining trains NOAH (method ``noah``, its recipe and optimiser; the hpo stage's trial,
:func:`~noah_ray.hpo.trial.train_trial`) on ``data.train_split`` (train800) and reports val accuracy
on ``data.val_split`` (val200) every epoch; successive halving stops the weak ones at the rungs
(:func:`~noah_ray.config.race.rungs`; the cost: :func:`~noah_ray.config.race.race_budget`):
``race.scheduler`` picks Ray Tune's asynchronous ``ASHAScheduler`` (``asha``) or the synchronous
:class:`~noah_ray.hpo.halving.SyncHalving` (``sync``: the same stops whatever order results arrive in).

The survivor (:func:`survivor`, written by :func:`_choose`): among the trials that reached the
top rung (the most epochs any trial ran), the best val accuracy at that last epoch; ties go to the
lower val loss there, then to more parameters, then to the earlier finalist (the search's order,
baselines last), then to the earlier trial.  ``race.ties`` (:data:`RACE_RULES`) may name another:

- ``incumbent`` (the default, :class:`IncumbentRule`): the hand-sized baseline of the kind
  ``race.incumbent`` (LoRA by default) is never cut at a rung, and at the top rung it is the
  survivor unless the best-ranked other trial beats it by McNemar's exact test on the val images'
  paired record (each trial reports which images it got right) at level ``race.alpha`` divided by
  the number of other trials that started.  The service returns something other than what a user
  would size by hand only when the val split shows it better, allowing for having picked the best of
  many challengers on the same images.
- ``baseline`` (:class:`TieRule`): a hand-sized baseline within ``race.tie_se`` binomial standard
  errors of that best is the survivor instead (the best-ranked such baseline), and the synchronous
  scheduler keeps it at every rung where it is so tied.  Retraining trains it (:func:`raced_subnet`, with its
learning rate when ``race.lrs`` raced them and the job has no ``hpo`` section: :func:`raced_job`)
on train800val200 for every seed and tests once.

Storage (:mod:`noah_ray.store.layout`, ``<job>/race/``): ``settings.json`` (a re-run must match),
the trials' ``hpo_trials`` / ``hpo_curves`` rows as the hpo stage writes them, the ``finalists``
table and ``chosen.json``.  A finished race is only read again; an interrupted one resumes
(``Tuner.restore``, as :mod:`noah_ray.hpo.driver` does).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

import pyarrow as pa
from ray import tune

from noah_ray import progress
from noah_ray.config import JobConfig, race_budget
from noah_ray.config.entries import load_entry
from noah_ray.config.race import RACE_SCHEDULERS, rungs
from noah_ray.config.resolved import ResolvedJob, param_limit, resolved
from noah_ray.errors import ConfigError
from noah_ray.evolution.ties import Paired, paired_test, standard_error, tie_floor
from noah_ray.hpo.driver import (
    _check_settings,
    _quiet_snapshots,
    earliest_best,
    finished_rows,
    restored_tuner,
    trial_rows,
    trial_run_config,
)
from noah_ray.hpo.trial import TrialRecorder, TrialResources, TrialTables, train_trial
from noah_ray.security import tune_without_credentials
from noah_ray.space import MODULES, ParamLimit, SubnetConfig
from noah_ray.store import storage
from noah_ray.store.layout import JobPaths
from noah_ray.store.lease import Fence

RUN_ID = "race"
METRIC = "val_acc"
_RESOURCE_KEYS = ("max_concurrent", "cpus_per_trial", "gpus_per_trial", "trial_retries")
#: race options about what follows the race (retraining), not the race itself: not part of its settings
_AFTER_KEYS = ("retrain_plain",)


@dataclass(frozen=True)
class Finalist:
    """One config that races: ``source`` is ``search`` or ``baseline:<kind>``."""

    subnet: SubnetConfig
    source: str
    params: int
    search_rank: int | None = None        # 0: the search's winner
    search_val_acc: float | None = None   # its supernet score
    hand_sized: str | None = None         # the module kind whose hand-sized baseline this config is
                                          # (also when the search found it: it then races as the search's)


@dataclass
class RaceResult:
    """The survivor of a race (``chosen.json``): what retraining trains."""

    subnet: dict
    source: str
    finalist: int
    trial_id: str
    lr: float | None                      # the raced learning rate (None: retrain.lr)
    val_acc: float
    epochs: int
    params: int
    finalists: int
    trials: int
    stopped_early: int
    epochs_trained: int
    budget_epochs: int                    # race_budget of the brackets (synchronous halving)
    uri: str
    decided_at: int = 0                   # the last rung more than one trial reached (0: none did)
    tied: int = 0                         # other trials within one s.e. of the best there
    val_se: float | None = None           # that s.e. (points; None: the images scored are unknown)
    val_images: int | None = None
    ties: str = "best"                    # race.ties the survivor was chosen by
    top_finalist: int | None = None       # the best-ranked trial's finalist at the top rung, when the
    top_val_acc: float | None = None      # tie rule chose another (a baseline tied with it), and its score
    incumbent: int | None = None          # ties: incumbent: the incumbent's finalist (None: none raced)
    paired: dict | None = None            # its paired test against the best-ranked challenger at the top
                                          # rung (n, b, c, p and the level it was held to), when they differ


@dataclass(frozen=True)
class Racer:
    """A trial as a rule sees it at a rung, ranked among the others: its finalist, val accuracy and
    trial id; at the top rung also its per-image record on the val split (``hits``, on ``images``)."""

    finalist: int
    acc: float
    trial_id: str
    hits: str | None = None
    images: int | None = None


@dataclass(frozen=True)
class Verdict:
    """A rule's survivor at the top rung: ``trial_id`` (None: the best-ranked trial) and, when a
    paired test decided it, the test and the level it was held to."""

    trial_id: str | None
    test: Paired | None = None
    level: float | None = None


class RaceRule(Protocol):
    """What ``race.ties`` changes in a race: the finalists no rung may cut (``keeps``, for ASHA), the
    trial that goes on beside a rung's best (``rescue``, synchronous halving), and the survivor at
    the top rung (``top``); ``ranked``: the rung's trials, best first by :func:`rank_key`."""

    @property
    def keeps(self) -> frozenset[int]: ...

    @property
    def incumbent(self) -> int | None: ...

    def rescue(self, ranked: list[Racer]) -> str | None: ...

    def top(self, ranked: list[Racer]) -> Verdict: ...


@dataclass(frozen=True)
class TieRule:
    """``race.ties: baseline`` as the race applies it: of a rung's trials ranked best first, the
    best-ranked one racing a ``baselines`` finalist whose val accuracy is within ``tie_se``
    binomial standard errors (on ``val_images`` images) of the first's (:meth:`pick`)."""

    baselines: frozenset[int]             # the finalist indices of the hand-sized baselines
    val_images: int | None                # the val split's size (None: unknown, no ties)
    tie_se: float

    @property
    def keeps(self) -> frozenset[int]:
        return frozenset()                # a tied baseline is kept by its score, never by name

    @property
    def incumbent(self) -> int | None:
        return None                       # no baseline is preferred by name

    @classmethod
    def of(cls, job: JobConfig, finalists: list[Finalist],
           val_images: Callable[[JobConfig], int | None]) -> TieRule | None:
        """The rule of ``job.race`` (None under ``ties: best`` or without baselines); ``val_images(job)``
        is asked only when the rule applies."""
        base = frozenset(i for i, f in enumerate(finalists) if f.source.startswith("baseline:"))
        return cls(base, val_images(job), job.race.tie_se) if job.race.ties == "baseline" and base else None

    def pick(self, ranked: list[Racer]) -> str | None:
        """Of the trials best first, the best-ranked tied baseline's trial id (None: none)."""
        if not ranked or not self.val_images:
            return None
        best = ranked[0].acc
        floor = tie_floor(best, standard_error(best, self.val_images), self.tie_se)
        return next((r.trial_id for r in ranked if r.finalist in self.baselines and r.acc >= floor), None)

    def rescue(self, ranked: list[Racer]) -> str | None:
        return self.pick(ranked)

    def top(self, ranked: list[Racer]) -> Verdict:
        return Verdict(self.pick(ranked))


@dataclass(frozen=True)
class IncumbentRule:
    """``race.ties: incumbent``: finalist ``incumbent`` (the hand-sized baseline of ``race.incumbent``'s
    kind) goes on at every rung and survives the top rung unless the best-ranked other trial beats it
    by McNemar's exact test at level ``alpha / challengers`` (``challengers``: the other trials that
    started; the best of them on these images is the one tested)."""

    incumbent: int
    challengers: int
    alpha: float

    @property
    def keeps(self) -> frozenset[int]:
        return frozenset({self.incumbent})

    @classmethod
    def of(cls, job: JobConfig, finalists: list[Finalist]) -> IncumbentRule | None:
        """The rule of ``job.race``; None (with a line) when no finalist is the incumbent's kind's baseline."""
        kind = job.race.incumbent_kind(list(job.space.modules))
        at = next((i for i, f in enumerate(finalists) if kind is not None and f.hand_sized == kind), None)
        if at is None:
            progress.echo(f"[race] no {kind} baseline races (over the limit, or race.baselines: false): "
                          f"race.ties: incumbent has no incumbent, the best score survives")
            return None
        lrs = max(1, len(job.race.lrs))
        return cls(at, (len(finalists) - 1) * lrs, job.race.alpha)

    def rescue(self, ranked: list[Racer]) -> str | None:
        return next((r.trial_id for r in ranked if r.finalist == self.incumbent), None)

    def top(self, ranked: list[Racer]) -> Verdict:
        inc = next((r for r in ranked if r.finalist == self.incumbent), None)
        if inc is None or ranked[0] is inc:
            return Verdict(None)
        best, level = ranked[0], self.alpha / max(1, self.challengers)
        if best.hits is None or inc.hits is None or not best.images:
            return Verdict(inc.trial_id)      # no paired record (a trial reported before they existed)
        test = paired_test(best.hits, inc.hits, best.images)
        return Verdict(None if test.p < level else inc.trial_id, test, level)


def _tie_rule(job: JobConfig, finalists: list[Finalist]) -> TieRule | None:
    return TieRule.of(job, finalists, _val_images)


#: race.ties -> the rule of a race over ``finalists`` (None: plain halving, the best score)
RACE_RULES: dict[str, Callable[[JobConfig, list[Finalist]], RaceRule | None]] = {
    "incumbent": IncumbentRule.of, "baseline": _tie_rule, "best": lambda job, finalists: None}


def _rescue(rule: RaceRule, ranked: list[tuple[dict, tuple[float, float], str]]) -> str | None:
    """:meth:`RaceRule.rescue` of the synchronous scheduler's rung (``(config, score, trial id)``)."""
    return rule.rescue([Racer(int(c["finalist"]), s[0], t) for c, s, t in ranked])


@dataclass(frozen=True)
class RungTies:
    """How close the race's last contested rung was: at epoch ``rung`` (the last rung that more
    than one trial reached) the best val accuracy ``best``, its binomial s.e. ``se`` on ``n``
    images, and how many other trials scored within one s.e. of it (``tied``)."""

    rung: int
    best: float
    se: float | None
    n: int | None
    tied: int


def rung_ties(curves: dict[str, dict[int, float]], marks: list[int], n: int | None) -> RungTies | None:
    """:class:`RungTies` of the trials' val accuracy ``curves`` (trial -> epoch -> %) at the rungs
    ``marks``, scored on ``n`` images each; None when no rung was reached by two trials."""
    for rung in sorted(marks, reverse=True):
        scores = [c[rung] for c in curves.values() if rung in c]
        if len(scores) > 1:
            best = max(scores)
            se = standard_error(best, n) if n else None
            tied = sum(x >= tie_floor(best, se) for x in scores) - 1 if se is not None else 0
            return RungTies(rung, best, se, n, tied)
    return None


# ====================================================================== finalists
def race_applies(job: JobConfig) -> bool:
    """Whether the race chooses what NOAH retrains: enabled, NOAH retrained, no ``retrain.subnet``."""
    return job.race.enabled and not job.retrain.subnet and "noah" in (job.retrain.method, *job.retrain.baselines)


def search_finalists(job: JobConfig, limit: ParamLimit, k: int) -> list[Finalist]:
    """The search's winner, then its best distinct candidates by val accuracy (ties: more params),
    ``k`` in all, from the search run's ``trials`` table."""
    from noah_ray.search.driver import load_best_subnet

    winner = load_best_subnet(job)
    rows = _scored_candidates(job)
    rows.sort(key=lambda r: (-r["val_acc"], -r["params"]))
    score = {SubnetConfig.from_json(r["config_json"]).key(): r["val_acc"] for r in reversed(rows)}
    first = Finalist(winner, "search", limit.count(winner), 0, score.get(winner.key()))
    out: dict[str, Finalist] = {winner.key(): first}
    for r in rows:
        cfg = SubnetConfig.from_json(r["config_json"])
        if len(out) >= k:
            break
        if cfg.key() not in out and limit.ok(cfg):
            out[cfg.key()] = Finalist(cfg, "search", limit.count(cfg), len(out), r["val_acc"])
    return list(out.values())


def _scored_candidates(job: JobConfig) -> list[dict]:
    """The rows of the job's last search run's ``trials`` table with a finite val accuracy."""
    from noah_ray.search.driver import search_run_name

    table = storage.read_table(JobPaths.of(job).search, "trials")
    return [] if table is None else [
        r for r in table.to_pylist() if r["run_id"] == search_run_name(job, None) and r["status"] == "done"
        and r["val_acc"] is not None and math.isfinite(r["val_acc"])]


def top_scored(job: JobConfig) -> SubnetConfig:
    """NOAH's own choice (the paper's procedure): the search's candidate with the highest val
    accuracy (the search scores only candidates under the limit), fewer parameters on equal scores
    (``search.ties: best``)."""
    rows = _scored_candidates(job)
    if not rows:
        raise ConfigError(f"no scored search candidate at {JobPaths.of(job).search.uri}; run the search "
                          f"stage first")
    best = min(rows, key=lambda r: (-r["val_acc"], r["params"], str(r["trial_id"])))
    return SubnetConfig.from_json(best["config_json"])


def pick_finalists(job: JobConfig, limit: ParamLimit) -> list[Finalist]:
    """:func:`search_finalists`, then (``race.baselines``) each kind of the space alone at the limit;
    a baseline equal to a search finalist races once, as the search's."""
    out = search_finalists(job, limit, job.race.finalists)
    seen = {f.subnet.key() for f in out}
    for kind in job.space.modules if job.race.baselines else ():
        cfg = limit.widest_uniform(kind, job.space.num_layers)
        if cfg is None:
            progress.echo(f"[race] no {kind} baseline: width 1 in every layer is over the limit")
        elif cfg.key() in seen:
            progress.echo(f"[race] the {kind} baseline is a search finalist already")
            out = [dataclasses.replace(f, hand_sized=kind) if f.subnet.key() == cfg.key() else f for f in out]
        else:
            seen.add(cfg.key())
            out.append(Finalist(cfg, f"baseline:{kind}", limit.count(cfg), hand_sized=kind))
    return out


# ====================================================================== the trial
def race_trial(config: dict, job: dict, subnets: list[str], backbone: str | None, num_classes: int,
               tables: TrialTables, res: TrialResources) -> None:
    """One Tune trial of the race: finalist ``config["finalist"]`` (with ``config["lr"]`` when
    learning rates race) trained as NOAH's retraining trains it (:func:`train_trial`)."""
    ended = tables.finished(tune.get_context().get_trial_id())
    if ended is not None:                 # ended before a kill: report it again, train nothing
        tune.report(ended)
        return
    base = JobConfig.from_dict(job, where="race trial")
    tuned = base.with_values({"retrain.lr": config["lr"]}, "noah") if "lr" in config else base
    train_trial(tuned, "noah", SubnetConfig.from_json(subnets[int(config["finalist"])]), backbone, num_classes,
                tables, res)


def _trial_job(job: JobConfig) -> dict:
    data = job.to_dict()
    data["retrain"]["epochs"] = job.race.epochs(job.retrain.epochs)
    return data


def _settings(job: JobConfig, finalists: list[Finalist]) -> dict:
    d, r = job.data, job.retrain
    race = {k: v for k, v in dataclasses.asdict(job.race).items() if k not in _RESOURCE_KEYS + _AFTER_KEYS}
    if race["scheduler"] == "asha":              # the default: races started before the setting existed lack it
        del race["scheduler"]
    if race["ties"] != "incumbent":              # races started before race.incumbent existed
        del race["incumbent"], race["alpha"]
    if race["ties"] == "best":                   # the rule of races started before race.ties existed
        del race["ties"], race["tie_se"]
    return {"finalists": [{"subnet": f.subnet.to_dict(), "source": f.source} for f in finalists], "race": race,
            "model": job.model.settings(),
            "data": {"dataset": d.dataset, "format": d.format, "train_split": d.train_split, "val_split": d.val_split,
                     "batch_size": d.batch_size, "img_size": d.img_size, "shots": d.shots, "seed": d.seed},
            "retrain": {"epochs": job.race.epochs(r.epochs), "lr": r.method_lr.get("noah", r.lr),
                        "weight_decay": r.weight_decay, "warmup_epochs": r.warmup_epochs, "min_lr": r.min_lr}}


def asha_race(job: JobConfig, params: list[int], rule: RaceRule | None = None) -> tuple[Any, Any]:
    """Ray Tune's asynchronous ASHA; the variant generator keeps ``max_concurrent`` trials live.
    ``rule``: its ``keeps`` are never cut (:class:`~noah_ray.hpo.halving.KeepingASHA`); otherwise it
    applies at the top rung only (:func:`survivor`): ASHA decides its rungs itself."""
    from ray.tune.search import BasicVariantGenerator

    from noah_ray.hpo.halving import KeepingASHA

    r, e = job.race, job.retrain.epochs
    return (KeepingASHA(rule.keeps if rule is not None else frozenset(), time_attr="epoch", max_t=r.epochs(e),
                        grace_period=r.grace(e), reduction_factor=r.reduction_factor),
            BasicVariantGenerator(random_state=r.seed, max_concurrent=r.max_concurrent))


def sync_race(job: JobConfig, params: list[int], rule: RaceRule | None = None) -> tuple[Any, Any]:
    """Synchronous successive halving (:mod:`noah_ray.hpo.halving`), with the variant generator
    that creates trials only while the scheduler has a free slot; ``rule`` names the trial kept
    beside each rung's best (:meth:`RaceRule.rescue`)."""
    from noah_ray.hpo.halving import GatedVariants, SyncHalving

    r, e = job.race, job.retrain.epochs
    sched = SyncHalving(len(params) * max(1, len(r.lrs)), rungs(r.grace(e), r.reduction_factor, r.epochs(e)),
                        r.reduction_factor, r.max_concurrent, rank=functools.partial(_trial_rank, params),
                        history=functools.partial(_scores, job),
                        rescue=None if rule is None else functools.partial(_rescue, rule))
    return sched, GatedVariants(sched, random_state=r.seed)


def _tuner(job: JobConfig, trainable, params: list[int], tables: TrialTables, rule: RaceRule | None):
    """A new Tune experiment (a grid over finalists x lrs under ``race.scheduler``), or the
    interrupted one restored.  ``params``: per finalist."""
    r, tune_dir = job.race, JobPaths.of(job).race_tune
    # errored trials run again under ASHA; the synchronous race decided its rungs without them
    restored = restored_tuner(tune_dir, RUN_ID, trainable, "[race] resuming the race",
                              resume_errored=r.scheduler != "sync")
    if restored is not None:
        return restored
    space: dict = {"finalist": tune.grid_search(list(range(len(params))))}
    if r.lrs:
        space["lr"] = tune.grid_search(list(r.lrs))
    run_config = trial_run_config(tune_dir, RUN_ID, [TrialRecorder(tables)], r.trial_retries)
    scheduler, search = load_entry(RACE_SCHEDULERS[r.scheduler])(job, params, rule)
    tune_config = tune.TuneConfig(metric=METRIC, mode="max", search_alg=search, scheduler=scheduler, num_samples=1,
                                  reuse_actors=True)
    return tune.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config)


# ====================================================================== the driver
def run_race(job: ResolvedJob | JobConfig) -> RaceResult | None:
    """Race the finalists (Ray must be initialised); returns the survivor.  None when the race does
    not apply (:func:`race_applies`); a finished race returns its saved survivor without Tune."""
    from noah_ray.nn.models import ensure_backbone

    rj = resolved(job, "race")
    job = rj.job
    if not race_applies(job):
        return None
    saved = saved_race(job)
    if saved is not None:
        progress.echo(f"[race] finished earlier: {saved.source} finalist {saved.finalist} "
                      f"(val {saved.val_acc:.2f}%)")
        return saved
    finalists = pick_finalists(job, rj.limit or param_limit(job, rj.shape))
    r, paths = job.race, JobPaths.of(job)
    top, grace = r.epochs(job.retrain.epochs), r.grace(job.retrain.epochs)
    tables = TrialTables(paths.race.uri, job.storage_endpoint, job.name, job.data.dataset, RUN_ID, "grid", r.scheduler,
                         METRIC, top, Fence.of(job, rj.lease), stage="race")
    _check_settings(paths.race, _settings(job, finalists), tables)
    rule = RACE_RULES[job.race.ties](job, finalists)
    n_trials = len(finalists) * max(1, len(r.lrs))
    budget = race_budget(n_trials, grace, r.reduction_factor, top)
    marks = rungs(grace, r.reduction_factor, top)
    progress.echo(f"[race] {len(finalists)} finalist(s) ({sum(f.source == 'search' for f in finalists)} from the "
                  f"search) x {max(1, len(r.lrs))} lr: {n_trials} trial(s), rungs {marks}, about {budget} "
                  f"epochs ({budget / top:.1f} retrainings of {top} epochs)")
    fix = "lower retrain.lr / race.lrs ({lr:g} was tried) or model.lora_scale, or train in fp32"
    trainable = tune.with_parameters(race_trial, job=_trial_job(job), subnets=[f.subnet.to_json() for f in finalists],
                                     backbone=ensure_backbone(job), num_classes=rj.num_classes, tables=tables,
                                     res=TrialResources(r.cpus_per_trial, r.gpus_per_trial, r.seed, METRIC, fix))
    trainable = tune.with_resources(trainable, {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial})
    with _quiet_snapshots(), tune_without_credentials():
        results = _tuner(job, trainable, [f.params for f in finalists], tables, rule).fit()
    res = _choose(job, finalists, results, tables, budget, rule)
    progress.echo(f"[race] survivor: {res.source} finalist {res.finalist} (val {res.val_acc:.2f}% after "
                  f"{res.epochs} epochs, {res.params / 1e6:.4f} M params; {res.stopped_early} of {res.trials} trials "
                  f"stopped early, {res.epochs_trained} epochs trained{tie_clause(dataclasses.asdict(res))})")
    return res


def _val_images(job: JobConfig) -> int:
    """How many images the race's trials are scored on (the val split's size), for the tie rule."""
    from noah_ray.data.readers import read_split

    return len(read_split(job.data, job.data.val_split, endpoint=job.storage_endpoint))


def rank_key(finalist: int, acc: float, loss: float, params: list[int]) -> tuple:
    """A race trial's standing at a rung (highest first): val accuracy, then the lower val loss,
    then more parameters, then the earlier finalist."""
    return (acc, -loss, params[finalist], -finalist)


def _trial_rank(params: list[int], config: dict, score: tuple[float, float], trial_id: str) -> tuple:
    """:func:`rank_key` of a Tune trial (the synchronous scheduler's key; equal keys go to the earlier trial)."""
    return rank_key(int(config["finalist"]), score[0], score[1], params)


def _scores(job: JobConfig) -> dict[str, dict[int, tuple[float, float]]]:
    """trial id -> epoch -> (val accuracy, val loss), from the race's ``hpo_curves`` rows."""
    t = storage.read_table(JobPaths.of(job).race, "hpo_curves")
    out: dict[str, dict[int, tuple[float, float]]] = {}
    for row in [] if t is None else t.to_pylist():
        loss = row.get("val_loss")
        out.setdefault(row["trial_id"], {})[int(row["epoch"])] = (row["val_acc"], math.inf if loss is None else loss)
    return out


def survivor(ok: list[dict], params: list[int], rule: RaceRule | None = None) -> dict:
    """The race's survivor among finished trial rows (``config.finalist``, metrics ``m``; ``params``
    per finalist): of those that reached the top rung, the best by :func:`rank_key` there; equal keys
    go to the earlier trial (:func:`~noah_ray.hpo.driver.earliest_best`; two learning rates of one
    finalist can tie).  ``rule``: the trial its :meth:`RaceRule.top` names instead (:func:`decide`)."""
    return decide(ok, params, rule)[0]


def decide(ok: list[dict], params: list[int], rule: RaceRule | None = None) -> tuple[dict, Verdict | None]:
    """:func:`survivor`, and the rule's verdict (None without a rule)."""
    top = max(int(x["m"]["epoch"]) for x in ok)

    def rank(x: dict) -> tuple:
        return rank_key(int(x["config"]["finalist"]), x["m"][METRIC], x["m"].get("val_loss", math.inf), params)

    at_top = [x for x in ok if int(x["m"]["epoch"]) == top]
    best = earliest_best(at_top, rank)
    if rule is None:
        return best, None
    ranked = sorted(sorted(at_top, key=lambda x: str(x["trial_id"])), key=rank, reverse=True)   # stable
    verdict = rule.top([Racer(int(x["config"]["finalist"]), float(x["m"][METRIC]), x["trial_id"],
                              x["m"].get("val_hits"), x["m"].get("val_images")) for x in ranked])
    return next((x for x in ranked if x["trial_id"] == verdict.trial_id), best), verdict


def _choose(job: JobConfig, finalists: list[Finalist], results, tables: TrialTables, budget: int,
            rule: RaceRule | None) -> RaceResult:
    """The survivor (the module docstring says how ties go); writes the ``finalists`` table and
    ``chosen.json``."""
    rows = trial_rows(results, tables)
    ok = finished_rows(rows, METRIC, "race")
    top = max(int(x["m"]["epoch"]) for x in ok)
    params = [f.params for f in finalists]
    (best, verdict), first = decide(ok, params, rule), survivor(ok, params)
    f = int(best["config"]["finalist"])
    n = best["m"].get("val_images")
    marks, curves = _marks(job, tables), _curves(job)
    ties = rung_ties(curves, marks, int(n) if n else None)
    res = RaceResult(subnet=finalists[f].subnet.to_dict(), source=finalists[f].source, finalist=f,
                     trial_id=best["trial_id"], lr=best["config"].get("lr"), val_acc=float(best["m"][METRIC]),
                     epochs=top, params=finalists[f].params, finalists=len(finalists), trials=len(rows),
                     stopped_early=sum(int(x["m"].get("epoch", 0)) < tables.max_epochs for x in ok),
                     epochs_trained=sum(int(x["m"].get("epoch", 0)) for x in rows), budget_epochs=budget,
                     uri=JobPaths.of(job).race.uri)
    if ties is not None:
        res = dataclasses.replace(res, decided_at=ties.rung, tied=ties.tied, val_se=ties.se, val_images=ties.n)
    res = dataclasses.replace(res, ties=job.race.ties, incumbent=None if rule is None else rule.incumbent)
    if verdict is not None and verdict.test is not None:
        res = dataclasses.replace(res, paired={**dataclasses.asdict(verdict.test), "level": verdict.level})
    if first["trial_id"] != best["trial_id"]:
        res = dataclasses.replace(res, top_finalist=int(first["config"]["finalist"]),
                                  top_val_acc=float(first["m"][METRIC]))
    tables.write_trial(best["trial_id"], best["config"], best["m"], "done", chosen=True)
    _write_finalists(job, finalists, rows, best["trial_id"], tables, marks, curves)
    tables.check()
    storage.write_text(JobPaths.of(job).race_chosen, json.dumps(dataclasses.asdict(res), indent=1, sort_keys=True))
    return res


def _marks(job: JobConfig, tables: TrialTables) -> list[int]:
    """The race's rungs (epochs)."""
    r = job.race
    return rungs(r.grace(job.retrain.epochs), r.reduction_factor, tables.max_epochs)


def _curves(job: JobConfig) -> dict[str, dict[int, float]]:
    """Every trial's val accuracy per epoch, from the race's ``hpo_curves``."""
    return {t: {e: acc for e, (acc, _) in per.items()} for t, per in _scores(job).items()}


def tie_clause(res: dict) -> str:
    """Of a race's result (:class:`RaceResult` as a dict): ``; at epoch 4, 2 other trial(s) within
    1 s.e. (2.10 points on 200 images) of the best``, or nothing when no rung was contested or the
    images scored are unknown (a race recorded before they were); then what the rule decided at the
    top (:func:`rule_clause`)."""
    kept = rule_clause(res)
    if not res.get("decided_at") or res.get("val_se") is None:
        return kept
    return (f"; at epoch {res['decided_at']}, {res['tied']} other trial(s) within 1 s.e. ({res['val_se']:.2f} "
            f"points on {res['val_images']} images) of the best{kept}")


def rule_clause(res: dict) -> str:
    """When ``race.ties`` kept a baseline over a better-scored trial, which one and its score; under
    ``incumbent``, the paired test that decided between the incumbent and the best challenger."""
    t = res.get("paired")
    if t is not None:
        test = (f"McNemar p {t['p']:.3g}: {t['b']} of {t['n']} val images right only for the challenger, "
                f"{t['c']} only for the incumbent; level {t['level']:.3g}")
        if res.get("top_finalist") is not None:
            return (f"; kept the incumbent, finalist {res['incumbent']}, over finalist {res['top_finalist']} "
                    f"(val {res['top_val_acc']:.2f}%; {test})")
        return f"; beat the incumbent, finalist {res['incumbent']} ({test})"
    if res.get("top_finalist") is None:
        return ""
    return (f"; kept as tied with the best, finalist {res['top_finalist']} (val {res['top_val_acc']:.2f}%), "
            f"under race.ties: {res.get('ties', 'baseline')}")


def _write_finalists(job: JobConfig, finalists: list[Finalist], rows: list[dict], chosen: str | None,
                     tables: TrialTables, marks: list[int], curves: dict[str, dict[int, float]]) -> None:
    """The ``finalists`` table: one row per trial (a fixed part name: rewriting it is idempotent);
    ``marks`` the race's rungs, ``curves`` every trial's val accuracy per epoch."""
    now = datetime.now(timezone.utc)
    out = []
    for x in rows:
        f = finalists[int(x["config"]["finalist"])]
        curve = curves.get(x["trial_id"] or "", {})
        reached = [e for e in marks if e in curve]
        epochs = int(x["m"].get("epoch", 0))
        out.append({"run_id": RUN_ID, "job": job.name, "dataset": job.data.dataset, "trial_id": x["trial_id"],
                    "finalist": int(x["config"]["finalist"]), "source": f.source, "search_rank": f.search_rank,
                    "search_val_acc": f.search_val_acc, "config_key": f.subnet.key(),
                    "config_json": f.subnet.to_json(), "params": f.params, "lr": x["config"].get("lr"),
                    **{f"{m}_depth": f.subnet.depth(m) for m in MODULES},
                    **{f"{m}_widths": list(f.subnet.layer_widths(m)) for m in MODULES},
                    "rungs": reached, "rung_scores": [curve[e] for e in reached], "epochs_run": epochs,
                    "max_epochs": tables.max_epochs, "last_val_acc": x["m"].get(METRIC),
                    "last_val_loss": x["m"].get("val_loss"),
                    "stopped": x["status"] == "done" and epochs < tables.max_epochs, "status": x["status"],
                    "chosen": x["trial_id"] == chosen, "timestamp": now})
    tables.check()
    storage.append_table(JobPaths.of(job).race, "finalists", pa.Table.from_pylist(out), part=RUN_ID)


# ====================================================================== what retraining reads
def saved_race(job: JobConfig) -> RaceResult | None:
    """The finished race's survivor (``chosen.json``), or None."""
    loc = JobPaths.of(job).race_chosen
    return RaceResult(**json.loads(storage.read_text(loc))) if storage.exists(loc) else None


def race_done(job: JobConfig) -> bool:
    """Whether the race has nothing left to do: it does not apply, or it finished."""
    return not race_applies(job) or saved_race(job) is not None


def raced_subnet(job: JobConfig) -> SubnetConfig:
    """The survivor's subnet (the race must have finished)."""
    res = saved_race(job)
    if res is None:
        raise ConfigError(f"no race survivor at {JobPaths.of(job).race_chosen.uri}; run the race stage first "
                          f"(noah-ray race), or set race.enabled: false to retrain the search's winner")
    return SubnetConfig.from_dict(res.subnet)


def raced_job(job: JobConfig) -> JobConfig:
    """The job NOAH's retraining runs: with the survivor's learning rate when ``race.lrs`` raced
    them (and no ``hpo`` section tunes it afterwards), else ``job`` itself."""
    res = saved_race(job) if race_applies(job) else None
    if res is None or res.lr is None or job.hpo is not None:
        return job
    return job.with_values({"retrain.lr": res.lr}, "noah")
