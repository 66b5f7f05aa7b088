"""Subnet search on Ray Tune: searchers, the candidate-evaluation trainable and ``run_search``.

* :class:`EvolutionSearcher`, :class:`AgingSearcher`, :class:`RandomSearcher`,
  :class:`OptunaSearcher` - Tune
  ``Searcher`` s wrapping the pure engines of :mod:`noah_ray.evolution`.  They never suggest an
  out-of-limit or already-seen subnet, count failed trials, and ``save``/``restore`` JSON
  state (Tune's experiment checkpoints, ``Tuner.restore``).  Pick one by name with
  ``search.algorithm``.
* :class:`CandidateEvaluator` - a class trainable (actors are reused): each actor loads the
  supernet and the validation batches once, then scores one candidate per trial with inherited
  weights.
* :func:`run_search` - the whole stage for a :class:`~noah_ray.config.JobConfig`: resumable,
  writes the ``trials`` / ``generations`` / ``pareto`` tables, ``best_subnet.yaml`` (what
  retraining reads) and returns a :class:`SearchResult`.

Layout under ``<storage>/<job.name>/search/``::

    trials/<run>-g0000.parquet ...   one file per closed generation (rewritten idempotently)
    generations/<run>-g0000.parquet
    pareto/<run>.parquet             the accuracy-vs-params front of the finished run
    best_subnet.yaml                 the winner of the last finished run
    runs/<run>/best_subnet.yaml      the winner of each run
    state/<run>/                     searcher state: snapshot + a record appended per result (resume;
                                     noah_ray.statelog; state/<run>.json is the older format)
    tune/<run>-a<attempt>/           Ray Tune's experiment directories
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Sequence

import pyarrow as pa
from ray import tune
from ray.tune.search import Searcher

from noah_ray import progress, storage, tracking
from noah_ray.config import JobConfig, SearchConfig
from noah_ray.evolution import (DONE, FAILED, AgingEvolutionEngine, Candidate, EvolutionEngine, GenerationRecord,
                                NSGA2Engine, ParamLimit, RandomEngine, SearchEngine, apply_deltas, pareto_front)
from noah_ray.recipes import recorded
from noah_ray.security import safe_name, tune_without_credentials
from noah_ray.space import MODULES, VPT, BackboneShape, ConfigError, RunError, SearchSpace, SubnetConfig
from noah_ray.statelog import StateLog

log = logging.getLogger(__name__)
METRIC = "val_acc"
#: search settings that change what a run computes; a resumed run must keep them
_FIXED_KEYS = ("algorithm", "population", "top_k", "mutations", "crossovers", "mutation_prob",
               "depth_prob", "param_limit", "param_min", "eval_batches", "seed", "tournament")


# ====================================================================== searchers
class NoahSearcher(Searcher):
    """A Tune Searcher around a :class:`~noah_ray.evolution.SearchEngine`.

    ``suggest`` returns ``{"subnet": {module: widths}, "candidate_id": ..., "config_key": ...}``;
    the trial reports ``metric`` (higher is better unless ``mode="min"``).  A trial that errors
    counts as failed; a trial that ends without the metric and without error (stopped before
    scoring) puts its candidate back in the queue.  ``store`` (optional) persists state and
    tables as results arrive.
    """

    engine_cls: type[SearchEngine] = SearchEngine

    def __init__(self, space: SearchSpace, limit: ParamLimit, *, metric: str = METRIC, mode: str = "max",
                 store: "SearchStore | None" = None, hold_actors: bool = False, **engine_kwargs: Any) -> None:
        super().__init__(metric=metric, mode=mode)
        self.engine = self.engine_cls(space, limit, **engine_kwargs)
        self.store = store
        self.hold_actors = hold_actors and self.engine.batch    # only a generation barrier makes actors wait
        self._holds: set[str] = set()
        self.abort_after = 3                      # stop if this many results in a row fail before any success
        self.fatal = False                        # a deterministic error (ConfigError) stopped the search
        self._streak = 0                          # failures in a row since this process started, before a success
        self.aborted = False
        self.extra_state: dict[str, Any] = {}     # saved alongside the engine (run settings)
        self._logged_extra: dict[str, Any] = {}   # extra_state as last appended to the store

    @classmethod
    def from_config(cls, search: SearchConfig, space: SearchSpace, limit: ParamLimit,
                    store: "SearchStore | None" = None, hold_actors: bool = False) -> "NoahSearcher":
        return cls(space, limit, store=store, hold_actors=hold_actors, **_engine_kwargs(cls.engine_cls, search))

    # -------------------------------------------------------------- Tune API
    def suggest(self, trial_id: str) -> dict | str | None:
        if self.aborted:
            return Searcher.FINISHED
        c = self.engine.ask(trial_id)
        if c is not None:
            return {"subnet": c.config.to_dict(), "candidate_id": c.cid, "config_key": c.config.key()}
        if self.engine.finished:
            return Searcher.FINISHED
        if self.hold_actors and self.engine.running:
            # Waiting for the generation's last results.  Tune would shut the idle actor down
            # and restart it (reloading the supernet) for the next generation; a placeholder
            # trial of about half an evaluation keeps it.
            self._holds.add(trial_id)
            return {"hold_s": self._hold_seconds(), "candidate_id": "hold"}
        return None

    def _hold_seconds(self) -> float:
        times = [c.info["eval_time_s"] for c in list(self.engine.candidates.values())[-20:]
                 if "eval_time_s" in c.info]
        return min(max(0.5 * sorted(times)[len(times) // 2], 0.05), 2.0) if times else 0.2

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._holds:
            self._holds.discard(trial_id)
            return
        cid = self.engine.running.get(trial_id)
        if cid is None:
            return
        if error:
            closed = self.engine.tell(trial_id, failed=True)       # the error text: note_error
        elif not result:
            closed = self.engine.tell(trial_id)                 # stopped before scoring: requeue
        else:
            value = result.get(self.metric)
            ok = isinstance(value, (int, float)) and math.isfinite(value)
            info = {k: result[k] for k in ("eval_time_s", "worker", "params_head", "error") if k in result}
            self.fatal = self.fatal or bool(result.get("fatal"))
            closed = self.engine.tell(trial_id, (value if self.mode == "max" else -value) if ok else None,
                                      failed=not ok, info=info)
        status = self.engine.candidates[cid].status
        if status == FAILED and self._streak >= 0:
            self._streak += 1
            self.aborted = bool(self.abort_after) and self._streak >= self.abort_after
        elif status == DONE:
            self._streak = -1                      # a success: failures no longer abort the search
        self.aborted = self.aborted or self.fatal
        if self.aborted:
            self.extra_state["aborted"] = True     # never reported as finished; a re-run retries
        for rec in closed:
            self._report(rec)
        if self.store is not None:
            for rec in closed:
                self.store.write_generation(rec, self.engine)
            self._persist()

    def _persist(self) -> None:
        """Append what changed to the store: the engine's delta, and the run's own fields (settings,
        ``aborted``, ...) when they changed."""
        delta: dict[str, Any] = {"engine": self.engine.take_delta()}
        changed = {k: v for k, v in self.extra_state.items()
                   if k not in self._logged_extra or self._logged_extra[k] != v}
        if changed:
            delta["searcher"] = changed
            self._logged_extra = dict(self.extra_state)
        self.store.append_state(delta, self.get_state)

    def _report(self, rec: GenerationRecord) -> None:
        """The generation's progress line (the driver's console, else the ``noah_ray.search`` logger).
        It names the generation as the ``trials`` / ``generations`` tables do (from 0), then how
        many of the search's generations are done: ``generation 0 (1/20)``."""
        run = self.store.run_id if self.store is not None else self.engine.algorithm
        best = "no candidate scored" if rec.best_score is None else (
            f"best {self.metric} {rec.best_score if self.mode == 'max' else -rec.best_score:.2f} with "
            f"{(rec.best_params or 0) / 1e6:.4f} M params")
        progress.echo(f"[search {run}] generation {rec.generation} ({rec.generation + 1}/{self.engine.generations}): "
                      f"{rec.evaluated} scored, {rec.failed} failed; {best}", logger=log,
                      tag=f"search {run}", done=rec.generation + 1, total=self.engine.generations)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return False        # Tune's ConcurrencyLimiter does it

    @property
    def finished(self) -> bool:
        return self.engine.finished

    # ----------------------------------------------------------------- state
    def get_state(self) -> dict:
        return {**self.extra_state, "engine": self.engine.get_state(), "metric": self.metric, "mode": self.mode}

    def set_state(self, state: dict, *, requeue_running: bool = False, requeue_failed: bool = False) -> None:
        self.engine.set_state(state["engine"], requeue_running=requeue_running, requeue_failed=requeue_failed)

    def note_error(self, candidate_id: str | None, error: str) -> None:
        """Keep a failed evaluation's error (from Tune) with its candidate; saved with the state."""
        c = self.engine.candidates.get(candidate_id or "")
        if c is not None and c.status == FAILED and "error" not in c.info:
            c.info["error"] = error
            self.engine.touch(c.cid)
            if self.store is not None:
                self._persist()

    def first_error(self) -> str | None:
        """The error of the earliest failed candidate of this attempt, if one was recorded."""
        failed = [c for c in self.engine.candidates.values()
                  if c.status == FAILED and isinstance(c.info.get("error"), str)]
        return min(failed, key=lambda c: (c.info.get("t", 0.0), c.cid)).info["error"] if failed else None

    def save(self, checkpoint_path: str) -> None:
        tmp = checkpoint_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.get_state(), f)
        os.replace(tmp, checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            self.set_state(json.load(f))


class EvolutionSearcher(NoahSearcher):
    """NOAH's evolutionary search; defaults are the paper's (population 50, top-k 10,
    25 mutations + 25 crossovers + random fill, mutation prob 0.2, depth prob 0.4)."""

    engine_cls = EvolutionEngine


class AgingSearcher(NoahSearcher):
    """Asynchronous regularized (aging) evolution: no generation barrier, no placeholder
    trials; a free worker at once gets a child of the living population."""

    engine_cls = AgingEvolutionEngine


class RandomSearcher(NoahSearcher):
    """Random feasible, unseen subnets (baseline)."""

    engine_cls = RandomEngine


class OptunaSearcher(NoahSearcher):
    """Optuna NSGA-II on (accuracy up, parameters down) with the parameter limit as constraint."""

    engine_cls = NSGA2Engine


SEARCHERS: dict[str, type[NoahSearcher]] = {"evolution": EvolutionSearcher, "random": RandomSearcher,
                                            "optuna": OptunaSearcher, "aging": AgingSearcher}


def _engine_kwargs(engine_cls: type[SearchEngine], s: SearchConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {"population": s.population, "generations": s.generations, "seed": s.seed}
    if issubclass(engine_cls, EvolutionEngine):
        kw.update(top_k=s.top_k, mutations=s.mutations, crossovers=s.crossovers,
                  mutation_prob=s.mutation_prob, depth_prob=s.depth_prob)
    if issubclass(engine_cls, AgingEvolutionEngine):
        kw.update(tournament=s.tournament)
    return kw


def backbone_shape_of(job: JobConfig) -> BackboneShape:
    """The job's backbone shape without allocating weights (meta device)."""
    from noah_ray.backbones import shape_of

    return shape_of(job.model.name, job.data.num_classes or 1)


def param_limit(job: JobConfig, shape: BackboneShape | None = None) -> ParamLimit:
    """The job's limit; raises :class:`ConfigError` if no subnet of the space fits it."""
    recipe = job.model.resolved_recipe()
    vpt = job.space.modules.get(VPT)
    limit = ParamLimit(job.search.param_limit, shape or backbone_shape_of(job), job.search.param_min,
                       recipe.kv_shared, recipe.param_count, vpt.max_width if vpt else 0)
    limit.check(job.space)
    return limit


def make_searcher(job: JobConfig, *, shape: BackboneShape | None = None,
                  store: "SearchStore | None" = None) -> NoahSearcher:
    """The searcher named by ``job.search.algorithm``."""
    cls = SEARCHERS[job.search.algorithm]
    return cls.from_config(job.search, job.space, param_limit(job, shape), store)


# ====================================================================== storage
def _rows(cands: Sequence[Candidate], extra: dict[str, Any]) -> dict[str, list]:
    cols: dict[str, list] = {k: [] for k in ("trial_id", "config_json", "params", "params_head", "val_acc")}
    for m in MODULES:
        cols[f"{m}_depth"], cols[f"{m}_widths"] = [], []
    for c in cands:
        cols["trial_id"].append(c.cid)
        cols["config_json"].append(c.config.to_json())
        cols["params"].append(c.params)
        cols["params_head"].append(c.info.get("params_head"))
        cols["val_acc"].append(c.score)
        for m in MODULES:
            cols[f"{m}_depth"].append(c.config.depth(m))
            cols[f"{m}_widths"].append(list(c.config.layer_widths(m)))
    n = len(cands)
    cols.update({k: [v] * n for k, v in extra.items()})
    return cols


def _attempts(c: Candidate) -> list[Candidate]:
    """Rows of one candidate: each earlier failed attempt, then the last one."""
    old = [dataclasses.replace(c, status=FAILED, score=None, info={**a, "attempt": i})
           for i, a in enumerate(c.info.get("attempts", []))]
    return old + [dataclasses.replace(c, info={**c.info, "attempt": len(old)})]


def _error_text(err: Any) -> str | None:
    return err if isinstance(err, str) else None


def _utc(t: float | None = None) -> datetime:
    return datetime.fromtimestamp(time.time() if t is None else t, tz=timezone.utc)


@dataclass
class SearchStore:
    """Where one search run keeps its tables, state and winner (``uri`` = the search folder)."""

    uri: str
    endpoint: str | None
    run_id: str
    job: str
    dataset: str
    algorithm: str

    @functools.cached_property
    def base(self) -> storage.Location:
        return storage.resolve(self.uri, self.endpoint)

    @property
    def state_loc(self) -> storage.Location:
        return self.base.join("state", self.run_id)

    @functools.cached_property
    def state_log(self) -> StateLog:
        return StateLog(self.state_loc, legacy=self.base.join("state", f"{self.run_id}.json"))

    def load_state(self) -> dict | None:
        """The searcher state: the snapshot with every logged result replayed (or the older
        single-file format)."""
        got = self.state_log.load()
        if got is None:
            return None
        state, deltas = got
        for d in deltas:
            state.update(d.get("searcher", {}))
        apply_deltas(state["engine"], [d["engine"] for d in deltas])
        return state

    def save_state(self, state: dict) -> None:
        """A full snapshot (run start, resume)."""
        self.state_log.snapshot(state)

    def append_state(self, delta: dict, full: Callable[[], dict]) -> None:
        """One result's changes; ``full()`` gives the whole state when the log is compacted."""
        self.state_log.append(delta, full)

    def _ids(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "job": self.job, "dataset": self.dataset, "algorithm": self.algorithm}

    def write_generation(self, rec: GenerationRecord, engine: SearchEngine) -> None:
        """The generation's trial rows and its summary row (fixed part names: idempotent)."""
        ms = [c for c in engine.members(rec.generation) if c.status in (DONE, FAILED)]
        ms = [a for c in ms for a in _attempts(c)]
        cols = _rows(ms, self._ids())
        cols["error"] = [_error_text(c.info.get("error")) for c in ms]
        cols["attempt"] = [c.info.get("attempt", 0) for c in ms]
        cols["config_key"] = [c.config.key() for c in ms]
        cols["generation"] = [c.generation for c in ms]
        cols["origin"] = [c.origin for c in ms]
        cols["parent_ids"] = [list(c.parents) for c in ms]
        cols["status"] = [c.status for c in ms]
        cols["wall_time_s"] = [c.info.get("eval_time_s") for c in ms]
        cols["worker"] = [c.info.get("worker") for c in ms]
        cols["timestamp"] = [_utc(c.info.get("t")) for c in ms]
        part = f"{self.run_id}-g{rec.generation:04d}"
        storage.append_table(self.base, "trials", pa.table(cols), part=part)
        best = engine.candidates.get(rec.best_cid) if rec.best_cid else None
        gen = {**{k: [v] for k, v in self._ids().items()}, "generation": [rec.generation],
               "evaluated": [rec.evaluated], "failed": [rec.failed], "best_val_acc": [rec.best_score],
               "best_params": [rec.best_params], "best_config_json": [best.config.to_json() if best else None],
               "timestamp": [_utc()]}
        storage.append_table(self.base, "generations", pa.table(gen), part=part)

    def write_final(self, front: Sequence[Candidate], best: Candidate | None) -> str | None:
        """The Pareto table and the winner's subnet file; returns the winner's URI."""
        cols = _rows(front, self._ids())
        cols["timestamp"] = [_utc(c.info.get("t")) for c in front]      # when it was scored, as in trials
        storage.append_table(self.base, "pareto", pa.table(cols), part=self.run_id)
        if best is None:
            return None
        head = (f"# noah-ray search winner: job {self.job}, run {self.run_id}, val_acc {best.score:.4f}, "
                f"{best.params} module parameters (head excluded)\n"
                f"# retraining reads this file directly (retrain.subnet)\n")
        text = head + best.config.to_yaml()
        storage.write_text(self.base.join("runs", self.run_id, "best_subnet.yaml"), text)
        loc = self.base.join("best_subnet.yaml")
        storage.write_text(loc, text)
        return loc.uri


# ====================================================================== evaluation
def evaluate(model, batches: Iterable, device: Any = "cpu", max_batches: int | None = None) -> tuple[float, int]:
    """Top-1 accuracy (percent) of ``model`` on ``batches`` of ``(images, labels)``; and the count."""
    import torch

    correct = total = 0
    model.eval()
    with torch.inference_mode():
        for i, (x, y) in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            logits = model(x.to(device, non_blocking=True))
            correct += int((logits.argmax(-1).cpu() == y.cpu()).sum())
            total += int(y.numel())
    if total == 0:
        raise ConfigError("the validation split is empty; check data.val_split")
    return 100.0 * correct / total, total


def default_val_batches(job: JobConfig, model) -> Iterable:
    """The validation loader of ``job.data`` with the model's normalisation and input size."""
    from noah_ray import data

    mean, std, img_size = data.norm_for(model)
    return data.build_loader(job.data, job.data.val_split, train=False, mean=mean, std=std,
                             img_size=job.data.img_size or img_size, endpoint=job.storage_endpoint)


def default_loader(job: JobConfig):
    """The job's trained supernet (``noah_ray.train.load_supernet``)."""
    from noah_ray.train import load_supernet

    return load_supernet(job)


def load_supernet_state(job: JobConfig, uri: str):
    """The job's supernet with trainable weights from ``uri`` (written by ``storage.save_state``;
    ``meta["num_classes"]`` sets the head, else ``job.data.num_classes``).  The backbone comes
    from ``job.model.checkpoint``."""
    from noah_ray.supernet import PromptedViT

    tensors, meta = storage.load_state(storage.resolve(uri, job.storage_endpoint))
    num_classes = meta.get("num_classes") or job.data.num_classes
    if not num_classes:
        raise ConfigError(f"{uri}: meta.json has no num_classes and data.num_classes is unset; set it")
    model = PromptedViT.supernet(job.model.name, int(num_classes), job.space, job.model.checkpoint,
                                 lora_scale=job.model.lora_scale, recipe=recorded(meta))
    model.load_trainable_state_dict(tensors)
    return model


class CandidateEvaluator(tune.Trainable):
    """Scores one candidate subnet per trial with the supernet's inherited weights.

    The supernet and the validation batches are loaded once per actor (``reuse_actors=True``
    sends later candidates to ``reset_config``).  ``loader(job) -> PromptedViT`` and
    ``val_data(job, model) -> iterable of (images, labels)`` default to the job's trained
    supernet and validation split.
    """

    def setup(self, config: dict, job: dict, loader: Callable | None = None,
              val_data: Callable | None = None) -> None:
        self.error = None
        try:
            self._setup(job, loader, val_data)
        except ConfigError as e:               # deterministic: every retry would fail the same way
            self.error = str(e)
        self.reset_config(config)

    def _setup(self, job: dict, loader: Callable | None, val_data: Callable | None) -> None:
        import torch

        t0 = time.perf_counter()
        self.job = JobConfig.from_dict(job)
        s = self.job.search
        torch.set_num_threads(max(1, int(round(s.cpus_per_trial))))
        use_gpu = s.gpus_per_trial > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_gpu else "cpu")
        model = (loader or default_loader)(self.job)
        model.set_precision(self.job.model.precision)
        model.set_fused_attn(self.job.model.fused_attn)
        self.model = model.to(self.device).eval()
        batches = (val_data or default_val_batches)(self.job, self.model)
        if s.cache_val:
            n = s.eval_batches
            batches = [(x.to(self.device), y) for i, (x, y) in enumerate(batches) if n is None or i < n]
        self.batches = batches
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.setup_time_s = time.perf_counter() - t0
        self._first = True

    def reset_config(self, new_config: dict) -> bool:
        self.hold_s = new_config.get("hold_s")
        self.subnet = None if self.hold_s is not None else SubnetConfig.from_dict(new_config["subnet"])
        return True

    def step(self) -> dict:
        if self.hold_s is not None:                     # placeholder: keeps this actor alive
            time.sleep(self.hold_s)
            return {METRIC: float("nan"), "hold": True, "done": True}
        if self.error is not None:
            return {METRIC: float("nan"), "error": self.error, "fatal": True, "done": True}
        t0 = time.perf_counter()
        self.model.set_active(self.subnet)
        acc, n = evaluate(self.model, self.batches, self.device, self.job.search.eval_batches)
        counts = self.subnet.param_count(self.model.shape, self.model.kv_shared)
        out = {METRIC: acc, "val_images": n, "params": counts.modules, "params_head": counts.head,
               "config_key": self.subnet.key(), "eval_time_s": time.perf_counter() - t0,
               "worker": self.worker, "setup_time_s": self.setup_time_s if self._first else 0.0,
               "done": True}
        self._first = False
        return out


def _trial_dirname(trial) -> str:
    return f"{trial.config.get('candidate_id', 'c')}_{trial.trial_id}"


# ====================================================================== run_search
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


def search_location(job: JobConfig) -> storage.Location:
    """``<storage>/<job.name>/search``: where :func:`run_search` writes."""
    return storage.resolve(job.storage, job.storage_endpoint).join(job.name, "search")


def load_best_subnet(job: JobConfig, run_name: str | None = None) -> SubnetConfig:
    """The winner of the job's last finished search (or of ``run_name``), as retraining uses it."""
    base = search_location(job)
    loc = base.join("runs", run_name, "best_subnet.yaml") if run_name else base.join("best_subnet.yaml")
    if not storage.exists(loc):
        raise ConfigError(f"no search winner at {loc.uri}; run the search stage first (or give retrain.subnet)")
    return SubnetConfig.from_yaml(storage.read_text(loc))


def _settings(job: JobConfig) -> dict[str, Any]:
    s = job.search
    return {**{k: getattr(s, k) for k in _FIXED_KEYS}, "space": job.space.to_dict(),
            "model": job.model.name, "kv_shared": job.model.resolved_recipe().kv_shared,
            "param_count": job.model.resolved_recipe().param_count, "dataset": job.data.dataset,
            "val_split": job.data.val_split}


def _check_settings(run: str, old: dict, new: dict) -> None:
    for k in new:
        if k in old and old[k] != new[k]:
            raise ConfigError(f"search run {run!r} was started with {k}={old[k]!r}, now {new[k]!r}; "
                              f"resume with the same setting or choose another run_name")


def _run_name(job: JobConfig, run_name: str | None) -> str:
    return safe_name(run_name or f"{job.search.algorithm}-seed{job.search.seed}", "search run_name")


def run_search(job: JobConfig, *, run_name: str | None = None, resume: bool = True,
               loader: Callable | None = None, val_data: Callable | None = None,
               callbacks: Sequence[tune.Callback] = (), stop: Any = None) -> SearchResult:
    """Search ``job.space`` for the best subnet under ``job.search.param_limit``.

    ``run_name`` (default ``<algorithm>-seed<seed>``) names the run; with ``resume`` an
    existing run continues from its saved state (nothing is scored twice; a finished run just
    returns its result; raising ``search.generations`` extends it).  ``loader`` / ``val_data``
    replace the supernet loader and validation data of :class:`CandidateEvaluator`;
    ``callbacks`` / ``stop`` go to Tune's ``RunConfig``.
    """
    s = job.search
    run = _run_name(job, run_name)
    limit = param_limit(job)                      # fails before anything is written
    base = search_location(job)
    store = SearchStore(base.uri, job.storage_endpoint, run, job.name, job.data.dataset, s.algorithm)
    searcher = SEARCHERS[s.algorithm].from_config(s, job.space, limit, store, hold_actors=s.hold_actors)
    prior = store.load_state()
    attempt = 0
    if prior is not None:
        if not resume:
            raise ConfigError(f"search run {run!r} already exists under {base.uri}; pass resume=True to "
                              f"continue it or choose another run_name")
        _check_settings(run, prior.get("settings", {}), _settings(job))
        retry = not _succeeded(searcher, prior)   # unfinished, aborted or nothing scored: retry the failed
        if retry:
            searcher = SEARCHERS[s.algorithm].from_config(s, job.space, limit, store, hold_actors=s.hold_actors)
        searcher.set_state(prior, requeue_running=True, requeue_failed=retry)
        attempt = prior.get("attempt", 0) + 1
        for rec in searcher.engine.history:      # idempotent: covers a crash between result and table
            store.write_generation(rec, searcher.engine)
    else:
        storage.check_writable(base)
    searcher.extra_state = {"settings": _settings(job), "attempt": attempt, "run_id": run}
    store.save_state(searcher.get_state())
    if searcher.finished:
        return _finish(searcher, store, base, run)
    ref = tracking.start_run(job, "search", run)
    callbacks = [*callbacks, *tracking.trial_callbacks(job, ref)]
    try:
        results = _fit(job, searcher, base, f"{run}-a{attempt:02d}", loader, val_data, callbacks, stop)
        if searcher.aborted:
            raise RunError(_failure(searcher, run, results, "stopped: " + (
                "a candidate evaluation failed with an error that no retry can fix" if searcher.fatal else
                f"its first {searcher.abort_after} candidate evaluations failed")))
    except BaseException:
        tracking.end_run(ref, "FAILED")
        raise
    result = _finish(searcher, store, base, run)
    tracking.finish_search(job, ref, result)
    return result


def search_done(job: JobConfig, run_name: str | None = None) -> bool:
    """Whether the job's search run finished with a winner (so running it again only reads it)."""
    run = _run_name(job, run_name)
    store = SearchStore(search_location(job).uri, job.storage_endpoint, run, job.name, job.data.dataset,
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
    tune_dir = base.join("tune")
    run_config = tune.RunConfig(
        name=name, storage_path=tune_dir.path, storage_filesystem=tune_dir.fs, verbose=0,
        failure_config=tune.FailureConfig(max_failures=s.trial_retries), stop=stop,
        callbacks=[_ErrorNotes(searcher), *callbacks],
        checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False, checkpoint_frequency=0))
    tune_config = tune.TuneConfig(search_alg=searcher, num_samples=-1, max_concurrent_trials=s.max_concurrent,
                                  reuse_actors=True, trial_dirname_creator=_trial_dirname)
    with tune_without_credentials(), storage.tidy(base):   # no AWS secrets in trial runtime_envs (Ray logs those)
        return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config).fit()


def _finish(searcher: NoahSearcher, store: SearchStore, base: storage.Location, run: str) -> SearchResult:
    eng = searcher.engine
    cands = list(eng.candidates.values())
    front = pareto_front(cands)
    best = eng.best()
    if eng.finished and best is None:
        raise RunError(_failure(searcher, run, None, f"ended with none of its {len(cands)} candidates scored"))
    best_uri = store.write_final(front, best) if eng.finished else None
    sign = 1.0 if searcher.mode == "max" else -1.0
    return SearchResult(
        run_id=store.run_id, algorithm=eng.algorithm, finished=eng.finished,
        best=best.config if best else None, best_val_acc=sign * best.score if best else None,
        best_params=best.params if best else None,
        pareto=[ParetoPoint(c.cid, c.config, c.params, sign * c.score) for c in front],
        evaluated=sum(c.status == DONE for c in cands), failed=sum(c.status == FAILED for c in cands),
        generations=len(eng.history), uri=base.uri,
        tables={t: base.join(t).uri for t in ("trials", "generations", "pareto")},
        best_subnet_uri=best_uri, state_uri=store.state_loc.uri)
