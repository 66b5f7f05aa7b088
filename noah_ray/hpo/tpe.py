"""TPE that knows which trials ASHA stopped: :class:`RungAwareOptunaSearch`.

Ray Tune's ``OptunaSearch`` reports every result to its Optuna trial (``trial.report(value,
training_iteration)``) and, when the trial ends without error, tells Optuna ``COMPLETE`` with the
last reported value.  A trial the scheduler stopped at a rung therefore reaches TPE as a finished
trial scored at a lower fidelity (1 of 9 epochs, say), and TPE ranks it against fully trained
ones.  Here a trial that ended before ``max_t`` (its last ``time_attr`` value below it) is told
``PRUNED`` instead: Optuna keeps its intermediate values (one per rung reached) and TPE's split
puts completed trials first and ranks pruned ones by how far they got, then by their value at
that step (``optuna.samplers.TPESampler``).  A trial that reached ``max_t`` is ``COMPLETE``; an
errored one ``FAIL`` (as before).
"""

from __future__ import annotations

from typing import Any

from ray.tune.result import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch


class RungAwareOptunaSearch(OptunaSearch):
    """``OptunaSearch`` telling trials stopped before ``max_t`` (in ``time_attr`` units, e.g.
    epochs) as ``PRUNED``.  ``max_t``: the scheduler's full budget per trial.

    Tune hands the searcher every result except the one the scheduler stopped the trial on
    (that one comes only with ``on_trial_complete``), so it is reported here first: the pruned
    trial's last intermediate value is the rung it was stopped at."""

    def __init__(self, *args: Any, max_t: int, time_attr: str = "epoch", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_t, self.time_attr = max_t, time_attr
        self._last_step: dict[str, int] = {}        # trial id -> last step reported to Optuna

    def stopped_early(self, result: dict | None) -> bool:
        """Whether ``result`` (a trial's last) is from before the full budget."""
        t = (result or {}).get(self.time_attr)
        return isinstance(t, (int, float)) and t < self.max_t

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        super().on_trial_result(trial_id, result)
        if isinstance(self.metric, str) and trial_id not in self._completed_trials:
            self._last_step[trial_id] = int(result[TRAINING_ITERATION])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if error or trial_id in self._completed_trials or not self.stopped_early(result) \
                or not isinstance(self.metric, str):
            super().on_trial_complete(trial_id, result, error)
            return
        from optuna.trial import TrialState

        assert result is not None and self._ot_study is not None   # stopped_early(None) is False; set up
        trial = self._ot_trials[trial_id]
        step, value = result.get(TRAINING_ITERATION), result.get(self.metric)
        if isinstance(step, int) and isinstance(value, (int, float)) and step > self._last_step.get(trial_id, 0):
            trial.report(value, step)                   # the rung result the scheduler stopped it on
        self._ot_study.tell(trial, None, state=TrialState.PRUNED)   # Optuna keeps the last value
        self._completed_trials.add(trial_id)
        self._last_step.pop(trial_id, None)
