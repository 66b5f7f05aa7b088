"""Synchronous successive halving, a Ray Tune scheduler (``race.scheduler: sync``).

Every trial pauses at each rung until all trials still in the race have reported there; then the
best ``ceil(n / reduction_factor)`` of them go on (and the one trial a ``rescue`` rule names: the
race's tied baseline) and the others stop.  Each decision sees every
result of its rung, so which trials stop (and so the survivor) does not depend on the order results
arrive, unlike Ray Tune's asynchronous ``ASHAScheduler`` with several trials at once.  A paused
trial gives its CPU back and resumes from its checkpoint when its rung is decided (the race
checkpoints every epoch).

The decisions are a pure function of the rung scores (:func:`cohorts`), replayed at every result,
and a decision once made never changes: a trial that fails for good (withdrawn) leaves the rungs it
had not reached, never one it had scored.  A race restored after its driver died (``Tuner.restore``
re-creates this scheduler empty; its errored trials stay errored) takes the scores recorded so far
from ``history`` (the race's ``hpo_curves`` rows) and decides exactly as before; a restored trial
that trains past an undecided rung before it is paused changes no score (training is deterministic
and resumable), it only spends an epoch.

Concurrency: Tune starts every pending trial by itself, so :class:`GatedVariants` creates the next
trial only while fewer than ``max_concurrent`` are running or pending, and the scheduler resumes a
paused trial only then (a search algorithm's own limit counts paused trials and would wait for ever).
On a restore Tune makes every unfinished trial pending at once, so for about one epoch more than
``max_concurrent`` may run (as resources allow).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator

#: trial id -> epoch -> (val accuracy, val loss)
Scores = dict[str, dict[int, tuple[float, float]]]
_BUSY = (Trial.RUNNING, Trial.PENDING)


@dataclass(frozen=True)
class Standing:
    """Where the race stands: the trials still racing, and the first rung not yet decided
    (None: every rung below the top is decided)."""

    racing: tuple[str, ...]
    pending: int | None


#: ``rescue(ranked)``: of a rung's trials with their scores there, best first, the one that goes on
#: beside the rung's best (None: none)
Rescue = Callable[[list[tuple[str, tuple[float, float]]]], str | None]


def cohorts(order: Sequence[str], scores: Scores, marks: Sequence[int], reduction_factor: float,
            rank: Callable[[str, tuple[float, float]], tuple], withdrawn: frozenset[str] = frozenset(),
            rescue: Rescue | None = None) -> Standing:
    """Replay the decisions: all of ``order`` (trial ids in creation order) start; at each rung of
    ``marks`` (the decision rungs, ascending) the ``withdrawn`` trials without a score there leave,
    and once every trial still racing has one, the best ``ceil(n / reduction_factor)`` by
    ``rank(trial id, score)`` (highest first; equal keys: the earlier trial) go on, and the trial
    ``rescue`` names, if any."""
    racing = list(order)
    for mark in marks:
        racing = [t for t in racing if t not in withdrawn or mark in scores.get(t, {})]
        if len(racing) <= 1:
            return Standing(tuple(racing), None)
        if any(mark not in scores.get(t, {}) for t in racing):
            return Standing(tuple(racing), mark)
        keep = max(1, math.ceil(len(racing) / reduction_factor))
        ranked = sorted(racing, key=lambda t: rank(t, scores[t][mark]), reverse=True)   # stable: ties
        best = set(ranked[:keep])
        saved = rescue([(t, scores[t][mark]) for t in ranked]) if rescue is not None else None
        racing = [t for t in racing if t in best or t == saved]
    return Standing(tuple(racing), None)


class SyncHalving(FIFOScheduler):
    """Synchronous successive halving of ``size`` trials (all of them race, also those Tune has not
    created yet) over ``marks`` (all rungs, the top one last; decisions at every rung below the
    top).  ``rank(config, (val_acc, val_loss), trial_id)``: a trial's sort key at a rung (highest
    goes on); ``rescue(ranked)``: of a rung's ``(config, score, trial_id)``, best first, the trial
    id that goes on beside the best (None: none).  ``history()``: the scores already recorded, for
    a restored race."""

    _supports_buffered_results = False

    def __init__(self, size: int, marks: Sequence[int], reduction_factor: float, max_concurrent: int,
                 rank: Callable[[dict, tuple[float, float], str], tuple],
                 history: Callable[[], Scores] | None = None, time_attr: str = "epoch",
                 metrics: tuple[str, str] = ("val_acc", "val_loss"),
                 rescue: Callable[[list[tuple[dict, tuple[float, float], str]]], str | None] | None = None) -> None:
        super().__init__()
        self.rescue = rescue
        self.size, self.marks = size, tuple(sorted(marks)[:-1])
        self.reduction_factor, self.max_concurrent = reduction_factor, max_concurrent
        self.rank, self.history, self.time_attr, self.metrics = rank, history, time_attr, metrics
        self.trials: dict[str, Trial] = {}
        self.withdrawn: set[str] = set()            # failed for good: not waited for where they had no score
        self.stopped: set[str] = set()              # cut by a decision and stopped here (Tune calls back at once)
        self.scores: Scores = {}
        self.seeded = False

    # ------------------------------------------------------------------ the decisions
    def standing(self) -> Standing:
        # ended trials never score again: where they have no score they leave (a cut or finished one
        # has its scores, so no decision changes; Tune sets some errors without telling the scheduler)
        ended = (Trial.ERROR, Trial.TERMINATED)
        gone = self.withdrawn | {t for t, trial in self.trials.items() if trial.status in ended}
        # trials not created yet race too (they have no score anywhere, so no rung is decided
        # before they exist); "~" sorts after Tune's ids, which then stay in creation order
        unborn = [f"~{i:05d}" for i in range(self.size - len(self.trials))]
        rescue = None if self.rescue is None else \
            (lambda ranked, r=self.rescue: r([(self.trials[t].config, s, t) for t, s in ranked]))
        return cohorts(sorted(self.trials) + unborn, self.scores, self.marks, self.reduction_factor,
                       lambda t, s: self.rank(self.trials[t].config, s, t), frozenset(gone), rescue)

    def busy(self) -> int:
        """Trials running or about to (pending): what ``max_concurrent`` bounds."""
        return sum(t.status in _BUSY for t in self.trials.values())

    def _must_wait(self, tid: str, st: Standing) -> bool:
        """Racing, with a score at the rung not yet decided: it may not train past it."""
        return st.pending is not None and tid in st.racing and st.pending in self.scores.get(tid, {})

    def _apply(self, tune_controller, st: Standing) -> None:
        """Stop the paused, pausing or restored pending trials the decisions cut (a running one
        stops at its next result; so does a pending one that never started: one the generator made
        again after a restore, whose scores were recorded before.  Tune cannot report on a trial
        stopped before it had a folder)."""
        for tid, trial in list(self.trials.items()):
            if tid in st.racing or tid in self.withdrawn or tid in self.stopped:
                continue
            has_folder = bool(getattr(trial, "relative_logdir", None))
            if trial.is_saving or trial.status == Trial.PAUSED or (trial.status == Trial.PENDING and has_folder):
                self.stopped.add(tid)                # before the call: stop_trial calls on_trial_remove back
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
        if epoch in self.marks:                      # the first report counts (a resumed trial may repeat one)
            acc, loss = self.metrics
            self.scores.setdefault(tid, {}).setdefault(epoch, (float(result[acc]),
                                                               float(result.get(loss, math.inf))))
        st = self.standing()
        self._apply(tune_controller, st)
        if tid not in st.racing:
            return TrialScheduler.STOP
        return TrialScheduler.PAUSE if self._must_wait(tid, st) else TrialScheduler.CONTINUE

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        if trial.status == Trial.ERROR:              # Tune retries it (it is added again at once): still racing
            return
        self.withdrawn.add(trial.trial_id)           # failed for good
        self._apply(tune_controller, self.standing())

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._apply(tune_controller, self.standing())

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._apply(tune_controller, self.standing())

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        """A paused trial let through its rung, while a slot is free (Tune starts pending trials itself)."""
        st = self.standing()
        self._apply(tune_controller, st)             # a cut trial restored as pending must not start
        if self.busy() >= self.max_concurrent:
            return None
        for tid in sorted(self.trials):
            trial = self.trials[tid]
            if trial.status == Trial.PAUSED and tid in st.racing and not self._must_wait(tid, st):
                return trial
        return None

    def debug_string(self) -> str:
        st = self.standing()
        return f"SyncHalving: {len(st.racing)} racing, rung {st.pending} pending"


class KeepingASHA(ASHAScheduler):
    """Ray Tune's asynchronous ASHA, except that the trials of the finalists ``keep`` (``config["finalist"]``)
    go on to ``max_t`` whatever their rung scores (which still count for the others: ``race.ties:
    incumbent`` under ``race.scheduler: asha``)."""

    def __init__(self, keep: frozenset[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.keep = keep

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        kept = int(trial.config.get("finalist", -1)) in self.keep
        if action == TrialScheduler.STOP and kept and result.get(self._time_attr, 0) < self._max_t:
            return TrialScheduler.CONTINUE
        return action


class GatedVariants(BasicVariantGenerator):
    """Tune's grid and random variants, each created only while ``scheduler`` has a free slot
    (fewer than its ``max_concurrent`` trials running or pending; paused ones do not count)."""

    def __init__(self, scheduler: SyncHalving, **kwargs) -> None:
        super().__init__(max_concurrent=0, **kwargs)
        self.scheduler = scheduler

    def next_trial(self):
        if self.scheduler.busy() >= self.scheduler.max_concurrent:
            return None
        return super().next_trial()

    # Tune saves the generator's state (a copy of its attributes) in every experiment checkpoint and
    # sets it back on restore: the scheduler is not part of it (a restored copy would be frozen, and
    # the gate would never open again); the restored generator keeps the live one it was built with.
    def get_state(self):
        state = super().get_state()
        if state:
            state.pop("scheduler", None)
        return state

    def set_state(self, state) -> None:
        super().set_state({k: v for k, v in state.items() if k != "scheduler"})
