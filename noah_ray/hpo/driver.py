"""Hyper-parameter search of retraining and the baselines on Ray Tune: Optuna TPE + ASHA.

With an ``hpo:`` section (:class:`~noah_ray.config.HpoConfig`) every retraining method (the
searched subnet and each baseline) first gets the same budget of Tune trials: each trial trains
the method's fixed config on ``data.train_split`` (train800) and reports the validation metric on
``data.val_split`` (val200) after every epoch; the searcher (``tpe``: Ray Tune's ``OptunaSearch``
with Optuna's TPE sampler; ``random`` / ``grid``: Tune's ``BasicVariantGenerator``) proposes the
values and the scheduler (``asha``: ``ASHAScheduler``; ``fifo``) stops weak trials early.  The best
trial (best validation value over its epochs) fixes the values; the final runs then train on
``data.final_train_split`` (train800val200) with them for every seed, keep the last epoch (the
validation images are training images there) and report test once (:func:`tuned_retrain`).

What the stage writes under ``<storage>/<job>/hpo/`` is described in :mod:`noah_ray.store.layout`.

Resuming: a re-run restores the Tune experiment (``Tuner.restore``): ended trials stay ended,
running ones continue from their last epoch checkpoint, the searcher keeps its state.  A trial
whose row is already written (it ended just before a kill, before Tune saved its experiment
state) reports that row again and trains nothing.  Tune does not save the scheduler's state, so a
restored ASHA judges later results against the rungs of the restored session only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ray import tune

from noah_ray import progress
from noah_ray.config import HPO_METRICS, HPO_SCHEDULERS, HPO_SEARCHERS, HpoConfig, HpoParam, JobConfig, hpo_is_int
from noah_ray.config.entries import load_entry
from noah_ray.config.resolved import ResolvedJob, resolved
from noah_ray.config.schema import hpo_module
from noah_ray.errors import ConfigError, RunError
from noah_ray.hpo.trial import TrialRecorder, TrialTables, fmt_values, hpo_trial
from noah_ray.security import tune_without_credentials
from noah_ray.space import SubnetConfig
from noah_ray.space.methods import method_of
from noah_ray.store import storage, tracking, trial_logging
from noah_ray.store.layout import JobPaths
from noah_ray.store.lease import Fence

#: HpoConfig keys that may change between a run and its resumption (resources, not results)
_RESOURCE_KEYS = ("max_concurrent", "cpus_per_trial", "gpus_per_trial", "trial_retries")


# ====================================================================== the space
def space_for(job: JobConfig, method: str, cfg: SubnetConfig) -> dict[str, HpoParam]:
    """The tuned settings of ``method`` (config path -> range): ``hpo.space`` with
    ``hpo.method_space[method]``, minus the settings of modules the method does not train (no
    ``lora_scale`` for VPT) and those limited to other methods."""
    assert job.hpo is not None                   # run_hpo checked it
    active = set(cfg.active_modules())
    out = {}
    for path, p in job.hpo.params(method).items():
        module = hpo_module(path)
        if p.methods is not None:
            keep = method in p.methods
        else:
            keep = module is None or module in active
        if keep:
            out[path] = p
    return out


def grid_values(p: HpoParam, points: int, is_int: bool) -> list[float]:
    """``p``'s values, or ``points`` values spread over its range (log-spaced on a log range)."""
    if p.values is not None:
        return list(p.values)
    assert p.low is not None and p.high is not None   # a range (HpoParam.check)
    if p.log:
        vals = [p.low * (p.high / p.low) ** (i / (points - 1)) for i in range(points)]
    else:
        vals = [p.low + (p.high - p.low) * i / (points - 1) for i in range(points)]
    return sorted({int(round(v)) for v in vals}) if is_int else vals


def _domain(p: HpoParam, is_int: bool):
    if p.values is not None:
        return tune.choice(list(p.values))
    assert p.low is not None and p.high is not None   # a range (HpoParam.check)
    if is_int:
        return tune.lograndint(int(p.low), int(p.high) + 1) if p.log else tune.randint(int(p.low), int(p.high) + 1)
    return tune.loguniform(p.low, p.high) if p.log else tune.uniform(p.low, p.high)


def param_space(space: dict[str, HpoParam], h: HpoConfig) -> dict[str, Any]:
    """Tune's ``param_space``: sampled domains, or ``tune.grid_search`` for the grid searcher."""
    if h.searcher == "grid":
        return {k: tune.grid_search(grid_values(p, h.grid_points, hpo_is_int(k))) for k, p in space.items()}
    return {k: _domain(p, hpo_is_int(k)) for k, p in space.items()}


# ====================================================================== searchers and schedulers
# the factories config.HPO_SEARCHERS / HPO_SCHEDULERS name
def tpe_searcher(h: HpoConfig, epochs: int):
    """Optuna TPE; trials the scheduler stopped before ``epochs`` reach it as pruned at their last
    rung, not as completed with a lower-fidelity score (:class:`~noah_ray.hpo.tpe.RungAwareOptunaSearch`)."""
    import optuna

    from noah_ray.hpo.tpe import RungAwareOptunaSearch

    startup = h.startup_trials or max(2, h.trials // 4)
    return RungAwareOptunaSearch(sampler=optuna.samplers.TPESampler(n_startup_trials=startup, seed=h.seed),
                                 max_t=epochs, time_attr="epoch")


def variant_searcher(h: HpoConfig, epochs: int):
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=h.seed, max_concurrent=h.max_concurrent)


def asha_scheduler(h: HpoConfig, epochs: int):
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=min(h.grace_period, epochs),
                         reduction_factor=h.reduction_factor)


def fifo_scheduler(h: HpoConfig, epochs: int):
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


def tune_searcher(h: HpoConfig, epochs: int):
    """Tune's search algorithm for ``hpo.searcher`` (the factory :data:`~noah_ray.config.HPO_SEARCHERS`
    names) for trials of up to ``epochs`` epochs."""
    return load_entry(HPO_SEARCHERS[h.searcher])(h, epochs)


def tune_scheduler(h: HpoConfig, epochs: int):
    """Tune's trial scheduler for ``hpo.scheduler`` (the factory :data:`~noah_ray.config.HPO_SCHEDULERS` names)."""
    return load_entry(HPO_SCHEDULERS[h.scheduler])(h, epochs)


# ====================================================================== the driver
@dataclass
class HpoResult:
    """What one method's search chose.  ``values``: config path -> value."""

    method: str
    values: dict[str, float]
    trial_id: str
    metric: str
    best_val: float
    val_acc: float | None
    trials: int
    stopped_early: int
    epochs_trained: int
    errors: int
    uri: str
    extra: dict = field(default_factory=dict)

    def record(self) -> dict:
        """What the final runs carry (spec, ``meta.json`` key ``hpo``, runs column ``hpo_json``)."""
        return {"values": self.values, "trial_id": self.trial_id, "metric": self.metric,
                "best_val": self.best_val, "val_acc": self.val_acc, "trials": self.trials}


def _trial_job(job: JobConfig) -> dict:
    """The job every trial of the method trains: ``retrain`` with ``hpo.epochs`` epochs."""
    assert job.hpo is not None
    data = job.to_dict()
    data["retrain"]["epochs"] = job.hpo.epochs or job.retrain.epochs
    return data


def _settings(job: JobConfig, method: str, cfg: SubnetConfig, space: dict[str, HpoParam]) -> dict:
    assert job.hpo is not None
    d, r = job.data, job.retrain
    hpo = {k: v for k, v in dataclasses.asdict(job.hpo).items() if k not in _RESOURCE_KEYS}
    return {"method": method, "subnet": cfg.to_dict(), "space": {k: dataclasses.asdict(p) for k, p in space.items()},
            "hpo": hpo, "model": job.model.settings(),
            "data": {"dataset": d.dataset, "format": d.format, "train_split": d.train_split, "val_split": d.val_split,
                     "batch_size": d.batch_size, "img_size": d.img_size, "shots": d.shots, "seed": d.seed},
            "retrain": {"epochs": job.hpo.epochs or r.epochs, "lr": r.method_lr.get(method, r.lr),
                        "weight_decay": r.weight_decay, "warmup_epochs": r.warmup_epochs, "min_lr": r.min_lr}}


def _check_settings(loc: storage.Location, settings: dict, tables: TrialTables) -> None:
    """Refuse to resume a search started with other settings (one line naming the first); a new
    search writes them (after the fence, :meth:`TrialTables.check`)."""
    f = loc.join("settings.json")
    if not storage.exists(f):
        tables.check()
        storage.write_text(f, json.dumps(settings, indent=1, sort_keys=True, default=list))
        return
    old = json.loads(storage.read_text(f))
    new = json.loads(json.dumps(settings, default=list))
    for k in new:
        if old.get(k) != new[k]:
            sub = next((s for s in new[k] if old.get(k, {}).get(s) != new[k][s]), None) \
                if isinstance(new[k], dict) and isinstance(old.get(k), dict) else None
            what = f"{k}.{sub}" if sub else k
            raise ConfigError(f"hyper-parameter search {loc.uri!r} was started with other {what} "
                              f"({json.dumps(old.get(k) if sub is None else old[k].get(sub))[:100]}, now "
                              f"{json.dumps(new[k] if sub is None else new[k][sub])[:100]}); restore the "
                              f"setting, or use another job name")


def restored_tuner(tune_dir: storage.Location, name: str, trainable, what: str, resume_errored: bool = True):
    """The interrupted Tune experiment ``name`` under ``tune_dir`` restored (ended trials stay
    ended, errored ones run again unless ``resume_errored`` is false), saying ``what`` first; None
    when there is none to restore."""
    path = tune_dir.join(name)
    if not tune.Tuner.can_restore(path.path, storage_filesystem=path.fs):
        return None
    progress.echo(f"{what} from {path.uri}")
    return tune.Tuner.restore(path.path, trainable, resume_errored=resume_errored, storage_filesystem=path.fs)


def trial_run_config(tune_dir: storage.Location, name: str, callbacks: list, retries: int):
    """The ``RunConfig`` of a trial experiment (HPO, race): in storage, quiet, ``retries`` per
    trial, one checkpoint kept per trial (what a resume needs)."""
    return tune.RunConfig(
        name=name, storage_path=tune_dir.path, storage_filesystem=tune_dir.fs, verbose=0, callbacks=callbacks,
        failure_config=tune.FailureConfig(max_failures=retries), checkpoint_config=tune.CheckpointConfig(num_to_keep=1))


def _tuner(job: JobConfig, method: str, trainable, space: dict[str, HpoParam], tables: TrialTables,
           callbacks: list):
    """A new Tune experiment for ``method`` (``callbacks`` beside the table writer), or the
    interrupted one restored (``Tuner.restore``: with the callbacks it started with)."""
    assert job.hpo is not None
    h = job.hpo
    tune_dir = JobPaths.of(job).hpo_tune
    restored = restored_tuner(tune_dir, method, trainable, f"[hpo {method}] resuming the search")
    if restored is not None:
        return restored
    epochs = job.hpo.epochs or job.retrain.epochs
    run_config = trial_run_config(tune_dir, method, [TrialRecorder(tables), *callbacks], h.trial_retries)
    tune_config = tune.TuneConfig(
        metric=h.metric, mode=HPO_METRICS[h.metric], search_alg=tune_searcher(h, epochs),
        scheduler=tune_scheduler(h, epochs), num_samples=1 if h.searcher == "grid" else h.trials,
        max_concurrent_trials=h.max_concurrent if h.searcher == "tpe" else None,   # variants limit themselves
        reuse_actors=True)
    return tune.Tuner(trainable, param_space=param_space(space, h), tune_config=tune_config, run_config=run_config)


@contextlib.contextmanager
def _quiet_snapshots():
    """Tune warns on every forced experiment snapshot (one per trial checkpoint with
    ``num_to_keep=1``); those snapshots are what a resume needs, so keep them and drop the warning."""
    logger = logging.getLogger("ray.tune.execution.experiment_state")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _error_line(err: BaseException | None) -> str | None:
    if err is None:
        return None
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(err).__name__)[:300]


def trial_rows(results, tables: TrialTables) -> list[dict]:
    """Per Tune result: its ``trial_id``, ``config``, last metrics ``m``, ``status`` and ``error``;
    each trial's table row rewritten from it (idempotent).  ``trial_id`` None: the trial failed
    before reporting (:class:`TrialRecorder` wrote its row)."""
    out = []
    for r in results:
        config, metrics = _result_of(r)
        trial_id = metrics.get("trial_id")
        status = "error" if r.error else "done"
        if trial_id is not None:
            tables.write_trial(trial_id, config, metrics, status, _error_line(r.error))
        out.append({"trial_id": trial_id, "config": config, "m": metrics, "status": status, "error": r.error})
    return out


def _result_of(r) -> tuple[dict, dict]:
    """A Tune result's config and last metrics.  A trial stopped while paused, in an experiment
    restored later, comes back with neither (Ray Tune 2.60 keeps no last result for it): they are
    read from its last reported row (``metrics_dataframe``, from the trial's own result files)."""
    if r.config is not None:
        return r.config, r.metrics
    df = r.metrics_dataframe
    if df is None or not len(df):
        return {}, dict(r.metrics or {})
    last = df.iloc[-1].to_dict()
    config = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("config/")}
    return config, {k: v for k, v in last.items() if not k.startswith("config/")}


def finished_rows(rows: list[dict], metric: str, what: str) -> list[dict]:
    """The rows of trials that finished with a finite ``metric``; none: :class:`RunError` naming
    the first error and the command that retries the failed trials."""
    ok = [x for x in rows if x["status"] == "done" and isinstance(x["m"].get(metric), (int, float))
          and math.isfinite(x["m"][metric])]
    if not ok:
        first = next((_error_line(x["error"]) for x in rows if x["error"] is not None), "no trial reported a result")
        raise RunError(f"{what}: no trial finished (first error: {first}); fix the cause and run the same command "
                       f"again: it retries the failed trials")
    return ok


def earliest_best(rows: list[dict], key: Callable[[dict], Any]) -> dict:
    """The trial row with the highest ``key``; equal keys go to the earlier trial (Tune's trial ids
    end in the trial's creation index).  Not the order Tune returns results in: that follows
    completion, which a retried trial changes."""
    return max(sorted(rows, key=lambda x: str(x["trial_id"])), key=key)


def best_row(ok: list[dict], mode: str) -> dict:
    """The best finished trial by its best validation value (``mode`` max or min); ties: more
    epochs, then the earlier trial (:func:`earliest_best`)."""
    sign = 1.0 if mode == "max" else -1.0
    return earliest_best(ok, lambda x: (sign * x["m"]["best_val"], x["m"].get("epoch", 0)))


def _choose(method: str, h: HpoConfig, results, tables: TrialTables, loc: storage.Location) -> HpoResult:
    """Rewrite every trial's row from Tune's results (idempotent), pick the best trial by its best
    validation value over epochs (ties: more epochs, then the earlier trial) and save it."""
    rows = trial_rows(results, tables)
    ok = finished_rows(rows, "best_val", f"hyper-parameter search of {method!r}")
    best = best_row(ok, HPO_METRICS[h.metric])
    tid, config, m = best["trial_id"], best["config"], best["m"]
    res = HpoResult(method=method, values={k: float(v) for k, v in config.items()}, trial_id=tid, metric=h.metric,
                    best_val=float(m["best_val"]), val_acc=m.get("best_val_acc"), trials=len(rows),
                    stopped_early=sum(x["status"] == "done" and x["m"].get("epoch", 0) < tables.max_epochs
                                      for x in rows),
                    epochs_trained=sum(int(x["m"].get("epoch", 0)) for x in rows), errors=len(rows) - len(ok),
                    uri=loc.uri)
    tables.write_trial(tid, config, m, "done", chosen=True)
    tables.check()
    storage.write_text(loc.join("best.json"), json.dumps(dataclasses.asdict(res), indent=1, sort_keys=True))
    return res


def run_hpo(job: JobConfig | ResolvedJob, method: str, subnet: SubnetConfig | None = None) -> HpoResult:
    """Tune ``method``'s hyper-parameters (Ray must be initialised); returns the chosen values.
    A finished search returns its saved choice without starting Tune; an interrupted one resumes.
    ``job``: as :func:`noah_ray.run.preflight.resolve` checked it (a plain job is resolved here)."""
    from noah_ray.nn.models import ensure_backbone, subnet_for

    rj = resolved(job, "hpo")
    job = rj.job
    h = job.hpo
    if h is None:
        raise ConfigError("the job has no hpo section; add one (e.g. hpo: {trials: 16}) to tune hyper-parameters")
    cfg = subnet_for(method, job, subnet)
    space = space_for(job, method, cfg)
    if not space:
        raise ConfigError(f"hpo: nothing to tune for {method!r} (every setting in hpo.space belongs to modules "
                          f"{method} does not train); add lr or weight_decay to hpo.space")
    loc = JobPaths.of(job).hpo_method(method)
    epochs = h.epochs or job.retrain.epochs
    tables = TrialTables(JobPaths.of(job).hpo.uri, job.storage_endpoint, job.name, job.data.dataset, method,
                         h.searcher, h.scheduler, h.metric, epochs, Fence.of(job, rj.lease))
    _check_settings(loc, _settings(job, method, cfg, space), tables)
    saved = saved_result(job, method)
    if saved is not None:
        progress.echo(f"[hpo {method}] finished earlier: {fmt_values(saved.values)}")
        return saved
    n = rj.num_classes
    trainable = tune.with_parameters(hpo_trial, job=_trial_job(job), method=method, subnet=cfg.to_json(),
                                     backbone=ensure_backbone(job), num_classes=n, tables=tables)
    trainable = tune.with_resources(trainable, {"cpu": h.cpus_per_trial, "gpu": h.gpus_per_trial})
    progress.echo(f"[hpo {method}] {h.searcher} + {h.scheduler}: {h.trials if h.searcher != 'grid' else 'grid'} "
                  f"trial(s) x up to {epochs} epoch(s), {h.max_concurrent} at a time, over {', '.join(space)}")
    ref = tracking.start_run(job, "hpo", method, params=tracking.hpo_params(job, method, list(space)))
    try:
        with _quiet_snapshots(), tune_without_credentials():   # no AWS secrets in trial runtime_envs
            tuner = _tuner(job, method, trainable, space, tables, trial_logging.trial_callbacks(job, ref, "hpo-trial"))
            results = tuner.fit()
        res = _choose(method, h, results, tables, loc)
    except BaseException:
        tracking.end_run(ref, "FAILED")
        raise
    tracking.finish_hpo(ref, res)
    progress.echo(f"[hpo {method}] best trial {res.trial_id}: {h.metric} {res.best_val:.4g} with "
                  f"{fmt_values(res.values)} ({res.trials} trials, {res.stopped_early} stopped early, "
                  f"{res.epochs_trained} epochs)")
    return res


def saved_result(job: JobConfig, method: str) -> HpoResult | None:
    """The finished search of ``method`` (its ``best.json``), or None."""
    loc = JobPaths.of(job).hpo_method(method).join("best.json")
    return HpoResult(**json.loads(storage.read_text(loc))) if storage.exists(loc) else None


def hpo_done(job: JobConfig, method: str) -> bool:
    return saved_result(job, method) is not None


def tuned_retrain_done(job: JobConfig, subnet: SubnetConfig | None, method: str, seed: int,
                       num_classes: int) -> bool:
    """Whether the final run of ``method`` / ``seed`` with the chosen values finished earlier."""
    from noah_ray.train.runs import retrain_done

    res = saved_result(job, method_of(method))
    return res is not None and retrain_done(final_job(job, res), subnet, method, seed, num_classes, res.record())


def final_job(job: JobConfig, res: HpoResult) -> JobConfig:
    """The job of the final runs: the chosen values, ``data.final_train_split`` for training and
    validation evaluated only at the last epoch (whose weights are kept and tested)."""
    out = job.with_values(res.values, res.method)
    out.data.train_split = job.data.final_train_split
    out.retrain.eval_every = out.retrain.epochs
    return out


def tuned_retrain(job: JobConfig | ResolvedJob, subnet: SubnetConfig | None, method: str,
                  label: str | None = None) -> dict:
    """The retrain stage of a method under ``hpo``: search (or reuse the search), then the final
    runs for every seed with the chosen values (:func:`noah_ray.train.runs.retrain_seeds`), as the
    result rows ``label`` (default: the method's name; ``noah+`` for the race's survivor)."""
    from noah_ray.train.runs import retrain_seeds

    rj = resolved(job, "hpo")
    res = run_hpo(rj, method, subnet)
    out = retrain_seeds(rj.with_job(final_job(rj.job, res)), subnet, label or method, hpo=res.record())
    return {**out, "hpo": res.record()}
