"""Synchronous successive halving, a Ray Tune scheduler (``race.scheduler: sync``).

Every trial pauses at each rung until all trials still in the race have reported there; then the
best ``ceil(n / reduction_factor)`` of them go on and the others stop.  Each decision sees every
result of its rung, so which trials stop (and so the survivor) does not depend on the order results
arrive, unlike Ray Tune's asynchronous ``ASHAScheduler`` with several trials at once.  A paused
trial gives its CPU back and resumes from its checkpoint when its rung is decided (the race
checkpoints every epoch).

The decisions are a pure function of the rung scores (:func:`cohorts`), replayed from the scores
at every result, so nothing else is state: a race restored after its driver died (``Tuner.restore``
re-creates this scheduler empty) gets the scores recorded so far from ``history`` (the race's
``hpo_curves`` rows) and decides exactly as before.

Concurrency is the scheduler's (``max_concurrent`` trials started and not yet paused or ended): a
search algorithm's limit would count paused trials and wait for ever.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

#: trial id -> epoch -> (val accuracy, val loss)
Scores = dict[str, dict[int, tuple[float, float]]]


@dataclass(frozen=True)
class Standing:
    """Where the race stands: the trials still racing, and the first rung not yet decided
    (None: every rung below the top is decided)."""

    racing: tuple[str, ...]
    pending: int | None


def cohorts(order: Sequence[str], scores: Scores, marks: Sequence[int], reduction_factor: float,
            rank: Callable[[str, tuple[float, float]], tuple]) -> Standing:
    """Replay the decisions: all of ``order`` (trial ids, withdrawn ones left out) start; at each
    rung of ``marks`` (the decision rungs, ascending), once every trial still racing has a score
    there, the best ``ceil(n / reduction_factor)`` by ``rank(trial id, score)`` (highest first) go on."""
    racing = list(order)
    for mark in marks:
        if len(racing) <= 1:
            return Standing(tuple(racing), None)
        if any(mark not in scores.get(t, {}) for t in racing):
            return Standing(tuple(racing), mark)
        keep = max(1, math.ceil(len(racing) / reduction_factor))
        racing = sorted(racing, key=lambda t: rank(t, scores[t][mark]), reverse=True)[:keep]
        racing.sort(key=order.index)
    return Standing(tuple(racing), None)


class SyncHalving(FIFOScheduler):
    """Synchronous successive halving over ``marks`` (all rungs, the top one last; decisions at
    every rung below the top).  ``rank(config, (val_acc, val_loss), trial_id)``: a trial's sort key
    at a rung (highest goes on).  ``history()``: the scores already recorded, for a restored race."""

    def __init__(self, marks: Sequence[int], reduction_factor: float, max_concurrent: int,
                 rank: Callable[[dict, tuple[float, float], str], tuple],
                 history: Callable[[], Scores] | None = None, time_attr: str = "epoch",
                 metrics: tuple[str, str] = ("val_acc", "val_loss")) -> None:
        super().__init__()
        self.marks = tuple(sorted(marks)[:-1])
        self.reduction_factor, self.max_concurrent = reduction_factor, max_concurrent
        self.rank, self.history, self.time_attr, self.metrics = rank, history, time_attr, metrics
        self.trials: dict[str, Trial] = {}          # every trial, in the order Tune added them
        self.withdrawn: set[str] = set()            # ended with an error: no longer waited for
        self.active: set[str] = set()               # started by this scheduler, not paused or ended since
        self.stopped: set[str] = set()              # cut by a decision and stopped here (Tune calls back at once)
        self.scores: Scores = {}
        self.seeded = False

    # ------------------------------------------------------------------ the decisions
    def standing(self) -> Standing:
        order = [t for t in self.trials if t not in self.withdrawn]
        return cohorts(order, self.scores, self.marks, self.reduction_factor,
                       lambda t, s: self.rank(self.trials[t].config, s, t))

    def _must_wait(self, tid: str, st: Standing) -> bool:
        """Racing, with a score at the rung not yet decided: it may not train past it."""
        return st.pending is not None and tid in st.racing and st.pending in self.scores.get(tid, {})

    def _apply(self, tune_controller, st: Standing) -> None:
        """Stop the paused, pausing or waiting trials the decisions cut (a running one stops at its
        next result)."""
        for tid, trial in list(self.trials.items()):
            if tid in st.racing or tid in self.withdrawn or tid in self.stopped:
                continue
            if trial.status in (Trial.PAUSED, Trial.PENDING) or trial.is_saving:   # is_saving: pausing
                self.stopped.add(tid)                # before the call: stop_trial calls on_trial_remove back
                self.active.discard(tid)
                tune_controller.stop_trial(trial)

    # ------------------------------------------------------------------ Tune's hooks
    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        if not self.seeded and self.history is not None:       # a restored race: the scores so far
            for tid, per_epoch in self.history().items():
                for epoch, score in per_epoch.items():
                    if epoch in self.marks:
                        self.scores.setdefault(tid, {})[epoch] = score
        self.seeded = True
        self.trials[trial.trial_id] = trial
        if trial.status == Trial.ERROR:
            self.withdrawn.add(trial.trial_id)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        epoch, tid = int(result.get(self.time_attr, 0)), trial.trial_id
        if epoch in self.marks:
            acc, loss = self.metrics
            self.scores.setdefault(tid, {})[epoch] = (float(result[acc]), float(result.get(loss, math.inf)))
        st = self.standing()
        self._apply(tune_controller, st)
        if tid not in st.racing:
            self.active.discard(tid)
            return TrialScheduler.STOP
        if self._must_wait(tid, st):
            self.active.discard(tid)
            return TrialScheduler.PAUSE
        return TrialScheduler.CONTINUE

    def _ended(self, tune_controller, trial: Trial) -> None:
        self.active.discard(trial.trial_id)
        self._apply(tune_controller, self.standing())

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._ended(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self.withdrawn.add(trial.trial_id)           # a decision no longer waits for it
        self._ended(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._ended(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        st = self.standing()
        waiting = [t for t in tune_controller.get_trials() if t.status in (Trial.PENDING, Trial.PAUSED)]
        for trial in waiting:                        # one already counted (a retry after a failure)
            if trial.trial_id in self.active and trial.status == Trial.PENDING:
                return trial
        if len(self.active) >= self.max_concurrent:
            return None
        for trial in waiting:
            tid = trial.trial_id
            if tid in st.racing and not self._must_wait(tid, st):
                self.active.add(tid)
                return trial
        return None

    def debug_string(self) -> str:
        st = self.standing()
        return f"SyncHalving: {len(st.racing)} racing, rung {st.pending} pending"
