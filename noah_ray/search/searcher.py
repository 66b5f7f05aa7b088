"""The Tune searcher of the subnet search: :class:`NoahSearcher` wraps one pure engine of
:mod:`noah_ray.evolution` (picked by name with ``search.algorithm`` from
:func:`~noah_ray.evolution.engine_for`) behind Ray Tune's ``Searcher`` API.  It never suggests an
out-of-limit or already-seen subnet, counts failed trials, and ``save``/``restore`` JSON state
(Tune's experiment checkpoints, ``Tuner.restore``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from ray.tune.search import Searcher

from noah_ray import progress
from noah_ray.config import SearchConfig
from noah_ray.evolution import DONE, FAILED, GenerationRecord, SearchEngine, engine_for
from noah_ray.space import SearchSpace, SubnetConfig
from noah_ray.space.budget import ParamLimit

if TYPE_CHECKING:
    from noah_ray.search.store import SearchStore

#: the generation lines' logger (when no console session is active); named for the search stage
log = logging.getLogger("noah_ray.search")
METRIC = "val_acc"


class NoahSearcher(Searcher):
    """A Tune Searcher around a :class:`~noah_ray.evolution.SearchEngine` (``engine``).

    ``suggest`` returns ``{"subnet": {module: widths}, "candidate_id": ..., "config_key": ...}``;
    the trial reports ``metric`` (higher is better unless ``mode="min"``).  A trial that errors
    counts as failed; a trial that ends without the metric and without error (stopped before
    scoring) puts its candidate back in the queue.  ``store`` (optional) persists state and
    tables as results arrive.
    """

    def __init__(self, engine: SearchEngine, *, metric: str = METRIC, mode: str = "max",
                 store: SearchStore | None = None, hold_actors: bool = False) -> None:
        super().__init__(metric=metric, mode=mode)
        self.engine = engine
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
                    store: SearchStore | None = None, hold_actors: bool = False,
                    warm: Sequence[SubnetConfig] = ()) -> NoahSearcher:
        """The searcher of engine ``search.algorithm``, built from the ``search`` section; ``warm``:
        the warm-start configs of generation 0 (:func:`noah_ray.search.warm.warm_configs`)."""
        engine = engine_for(search.algorithm).from_config(search, space, limit, warm)
        return cls(engine, store=store, hold_actors=hold_actors)

    # -------------------------------------------------------------- Tune API
    def suggest(self, trial_id: str) -> dict | str | None:  # type: ignore[override]  # Searcher.FINISHED is a str
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
            info = {k: result[k] for k in ("eval_time_s", "worker", "params_head", "error", "val_images")
                    if k in result}
            self.fatal = self.fatal or bool(result.get("fatal"))
            closed = self.engine.tell(trial_id, (value if self.mode == "max" else -cast(float, value)) if ok else None,
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
        assert self.store is not None                   # called only with a store
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
