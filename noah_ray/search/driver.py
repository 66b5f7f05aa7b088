"""Subnet search on Ray Tune: the driver.  The searchers live in :mod:`noah_ray.search.searcher`, the
tables and state in :mod:`noah_ray.search.store`, the evaluation trainable in
:mod:`noah_ray.search.trainable`.

* :func:`run_search` - the whole stage for a :class:`~noah_ray.config.JobConfig`: resumable,
  writes the ``trials`` / ``generations`` / ``pareto`` tables, ``best_subnet.yaml`` (what
  retraining reads) and returns a :class:`SearchResult`.

What the stage writes under ``<storage>/<job.name>/search/`` is described in :mod:`noah_ray.store.layout`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from ray import tune

from noah_ray import progress
from noah_ray.config import JobConfig, SearchConfig
from noah_ray.config.resolved import param_limit
from noah_ray.errors import ConfigError, RunError
from noah_ray.evolution import DONE, FAILED, pareto_front
from noah_ray.evolution.ties import select
from noah_ray.search.searcher import NoahSearcher
from noah_ray.search.store import SearchStore
from noah_ray.search.trainable import CandidateEvaluator
from noah_ray.search.warm import warm_configs
from noah_ray.security import safe_name, tune_without_credentials
from noah_ray.space import SubnetConfig
from noah_ray.space.budget import ParamLimit
from noah_ray.space.kinds import BackboneShape
from noah_ray.store import storage, tracking, trial_logging
from noah_ray.store.layout import JobPaths
from noah_ray.store.lease import Fence

#: search settings that change what a run computes; a resumed run must keep them
_FIXED_KEYS = ("algorithm", "population", "top_k", "mutations", "crossovers", "mutation_prob",
               "depth_prob", "param_limit", "param_min", "eval_batches", "seed", "tournament", "warm_start")


def backbone_shape_of(job: JobConfig) -> BackboneShape:
    """The job's backbone shape without allocating weights (meta device)."""
    from noah_ray.nn.backbones import shape_of

    return shape_of(job.model.name, job.data.num_classes or 1)


def make_searcher(job: JobConfig, *, shape: BackboneShape | None = None,
                  store: SearchStore | None = None) -> NoahSearcher:
    """The searcher of the engine named by ``job.search.algorithm``."""
    limit = param_limit(job, shape or backbone_shape_of(job))
    return NoahSearcher.from_config(job.search, job.space, limit, store, warm=warm_configs(job, limit))


def _trial_dirname(trial) -> str:
    return f"{trial.config.get('candidate_id', 'c')}_{trial.trial_id}"

@dataclass
class ParetoPoint:
    trial_id: str
    config: SubnetConfig
    params: int
    val_acc: float


@dataclass
class SearchResult:
    """What a search produced.  ``finished`` is False when it was stopped early (resume it)."""

    run_id: str
    algorithm: str
    finished: bool
    best: SubnetConfig | None
    best_val_acc: float | None
    best_params: int | None
    pareto: list[ParetoPoint]
    evaluated: int
    failed: int
    generations: int
    uri: str
    tables: dict[str, str] = field(default_factory=dict)
    best_subnet_uri: str | None = None
    state_uri: str | None = None
    #: how the winner was picked: the top score, its s.e., how many candidates were tied with the
    #: winner, the rule (:meth:`noah_ray.evolution.ties.Selection.summary`); empty if nothing scored
    selection: dict[str, Any] = field(default_factory=dict)


def load_best_subnet(job: JobConfig, run_name: str | None = None) -> SubnetConfig:
    """The winner of the job's last finished search (or of ``run_name``), as retraining uses it."""
    loc = JobPaths.of(job).best_subnet(run_name)
    if not storage.exists(loc):
        raise ConfigError(f"no search winner at {loc.uri}; run the search stage first (or give retrain.subnet)")
    return SubnetConfig.from_yaml(storage.read_text(loc))


def _settings(job: JobConfig) -> dict[str, Any]:
    s = job.search
    return {**{k: json.loads(json.dumps(getattr(s, k))) for k in _FIXED_KEYS}, "space": job.space.to_dict(),
            "model": job.model.name, "kv_shared": job.model.resolved_recipe().kv_shared,
            "param_count": job.model.resolved_recipe().param_count, "dataset": job.data.dataset,
            "val_split": job.data.val_split}


def _check_settings(run: str, old: dict, new: dict) -> None:
    for k in new:
        if k in old and old[k] != new[k]:
            raise ConfigError(f"search run {run!r} was started with {k}={old[k]!r}, now {new[k]!r}; "
                              f"resume with the same setting or choose another run_name")


def search_run_name(job: JobConfig, run_name: str | None) -> str:
    """The name of a search run: ``run_name``, else ``<algorithm>-seed<seed>`` (a safe name)."""
    return safe_name(run_name or f"{job.search.algorithm}-seed{job.search.seed}", "search run_name")


def run_search(job: JobConfig, *, run_name: str | None = None, resume: bool = True,
               loader: Callable | None = None, val_data: Callable | None = None,
               callbacks: Sequence[tune.Callback] = (), stop: Any = None,
               limit: ParamLimit | None = None, lease: str | None = None) -> SearchResult:
    """Search ``job.space`` for the best subnet under ``job.search.param_limit``.

    ``run_name`` (default ``<algorithm>-seed<seed>``) names the run; with ``resume`` an
    existing run continues from its saved state (nothing is scored twice; a finished run just
    returns its result; raising ``search.generations`` extends it).  ``loader`` / ``val_data``
    replace the supernet loader and validation data of :class:`CandidateEvaluator`;
    ``callbacks`` / ``stop`` go to Tune's ``RunConfig``.  ``limit``: the limit
    :func:`noah_ray.run.preflight.resolve` checked (with the storage); None: checked here.
    ``lease``: the token of the job's lease the command holds (``ResolvedJob.lease``): every table,
    state and winner write checks it first (:class:`~noah_ray.store.lease.Fence`); None: unfenced.
    """
    s = job.search
    run = search_run_name(job, run_name)
    # the limit fails before anything is written
    resolved, limit = limit is not None, limit or param_limit(job, backbone_shape_of(job))
    base = JobPaths.of(job).search
    store = SearchStore(base.uri, job.storage_endpoint, run, job.name, job.data.dataset, s.algorithm,
                        Fence.of(job, lease))
    warm = warm_configs(job, limit)
    searcher = NoahSearcher.from_config(s, job.space, limit, store, hold_actors=s.hold_actors, warm=warm)
    prior = store.load_state()
    attempt = 0
    if prior is not None:
        if not resume:
            raise ConfigError(f"search run {run!r} already exists under {base.uri}; pass resume=True to "
                              f"continue it or choose another run_name")
        _check_settings(run, prior.get("settings", {}), _settings(job))
        retry = not _succeeded(searcher, prior)   # unfinished, aborted or nothing scored: retry the failed
        if retry:
            searcher = NoahSearcher.from_config(s, job.space, limit, store, hold_actors=s.hold_actors, warm=warm)
        searcher.set_state(prior, requeue_running=True, requeue_failed=retry)
        attempt = prior.get("attempt", 0) + 1
        for rec in searcher.engine.history:      # idempotent: covers a crash between result and table
            store.write_generation(rec, searcher.engine)
    elif not resolved:
        storage.check_writable(base)
    searcher.extra_state = {"settings": _settings(job), "attempt": attempt, "run_id": run}
    store.save_state(searcher.get_state())
    if searcher.finished:
        return _finish(searcher, store, base, run, s)
    ref = tracking.start_run(job, "search", run)
    callbacks = [*callbacks, *trial_logging.trial_callbacks(job, ref)]
    try:
        results = _fit(job, searcher, base, f"{run}-a{attempt:02d}", loader, val_data, callbacks, stop)
        if searcher.aborted:
            raise RunError(_failure(searcher, run, results, "stopped: " + (
                "a candidate evaluation failed with an error that no retry can fix" if searcher.fatal else
                f"its first {searcher.abort_after} candidate evaluations failed")))
    except BaseException:
        tracking.end_run(ref, "FAILED")
        raise
    result = _finish(searcher, store, base, run, s)
    tracking.finish_search(job, ref, result)
    return result


def search_done(job: JobConfig, run_name: str | None = None) -> bool:
    """Whether the job's search run finished with a winner (so running it again only reads it)."""
    run = search_run_name(job, run_name)
    store = SearchStore(JobPaths.of(job).search.uri, job.storage_endpoint, run, job.name, job.data.dataset,
                        job.search.algorithm)
    prior = store.load_state()
    want = json.loads(json.dumps(_settings(job)))
    if prior is None or any(prior.get("settings", {}).get(k) != v for k, v in want.items()):
        return False
    return _succeeded(make_searcher(job), prior)


def _succeeded(searcher: NoahSearcher, state: dict) -> bool:
    """Whether saved ``state`` is a finished search with a winner (so a re-run only reads it)."""
    searcher.set_state(state)
    return not state.get("aborted") and searcher.finished and searcher.engine.best() is not None


def _failure(searcher: NoahSearcher, run: str, results: tune.ResultGrid | None, what: str) -> str:
    first = searcher.first_error()
    if first is None and results is not None and results.errors:
        first = str(results.errors[0])
    first = _last_line(first) if first else "no error recorded"
    return (f"search {run!r} {what} (first error: {first}); fix the cause and run the same command again: "
            f"it retries the failed candidates")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:300]


class _ErrorNotes(tune.Callback):
    """Hands each failed trial's error text to the searcher (Tune's Searcher API only says 'error')."""

    def __init__(self, searcher: NoahSearcher) -> None:
        self.searcher = searcher

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        local = trial.error_file                  # written by Tune just now; storage gets it later
        err = open(local).read() if local and os.path.exists(local) else trial.get_error()
        self.searcher.note_error(trial.config.get("candidate_id"), _last_line(err) if err else "trial crashed")


def _fit(job: JobConfig, searcher: NoahSearcher, base: storage.Location, name: str, loader, val_data,
         callbacks, stop) -> tune.ResultGrid:
    s = job.search
    trainable = tune.with_parameters(CandidateEvaluator, job=job.to_dict(), loader=loader, val_data=val_data)
    trainable = tune.with_resources(trainable, {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial})
    tune_dir = JobPaths.of(job).search_tune
    run_config = tune.RunConfig(
        name=name, storage_path=tune_dir.path, storage_filesystem=tune_dir.fs, verbose=0,
        failure_config=tune.FailureConfig(max_failures=s.trial_retries), stop=stop,
        callbacks=[_ErrorNotes(searcher), *callbacks],
        checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False, checkpoint_frequency=0))
    tune_config = tune.TuneConfig(search_alg=searcher, num_samples=-1, max_concurrent_trials=s.max_concurrent,
                                  reuse_actors=True, trial_dirname_creator=_trial_dirname)
    with tune_without_credentials(), storage.tidy(base):   # no AWS secrets in trial runtime_envs (Ray logs those)
        return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config).fit()


def _finish(searcher: NoahSearcher, store: SearchStore, base: storage.Location, run: str,
            s: SearchConfig) -> SearchResult:
    """The result; a finished search also writes its Pareto table and winner: among the candidates
    within ``s.tie_se`` standard errors of the top score, the one ``s.ties`` prefers
    (:func:`noah_ray.evolution.ties.select`)."""
    eng = searcher.engine
    cands = list(eng.candidates.values())
    front = pareto_front(cands)
    sel = select(cands, s.ties, s.tie_se) if searcher.mode == "max" else None
    best = sel.winner if sel is not None else eng.best()
    if eng.finished and best is None:
        raise RunError(_failure(searcher, run, None, f"ended with none of its {len(cands)} candidates scored"))
    best_uri = store.write_final(front, best, sel) if eng.finished else None
    if eng.finished and sel is not None:
        progress.echo(f"[search {store.run_id}] winner: {sel.line()}")
    sign = 1.0 if searcher.mode == "max" else -1.0
    return SearchResult(
        run_id=store.run_id, algorithm=eng.algorithm, finished=eng.finished,
        best=best.config if best else None, best_val_acc=sign * cast(float, best.score) if best else None,
        best_params=best.params if best else None,
        pareto=[ParetoPoint(c.cid, c.config, c.params, sign * cast(float, c.score)) for c in front],
        evaluated=sum(c.status == DONE for c in cands), failed=sum(c.status == FAILED for c in cands),
        generations=len(eng.history), uri=base.uri,
        tables={t: base.join(t).uri for t in ("trials", "generations", "pareto")},
        best_subnet_uri=best_uri, state_uri=store.state_loc.uri,
        selection=sel.summary() if sel is not None else {})
