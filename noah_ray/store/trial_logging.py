"""Tune trials as nested MLflow runs: Ray Tune's ``MLflowLoggerCallback`` for the search and HPO
drivers (see :mod:`noah_ray.store.tracking`).  Its own module so that MLflow and Ray AIR are
imported only by a driver that tracks, never by a training worker (about 1.5 s per process)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray.air.integrations.mlflow import MLflowLoggerCallback

from noah_ray.config import JobConfig
from noah_ray.store.tracking import RunRef, experiment_id

if TYPE_CHECKING:
    from ray.tune.experiment import Trial


class TrialLogger(MLflowLoggerCallback):
    """Ray Tune's MLflow callback, one nested run per scored candidate (its subnet as parameters);
    the placeholder trials that keep evaluation actors alive are not logged."""

    @staticmethod
    def _hold(trial: Trial) -> bool:
        return "hold_s" in (trial.config or {})

    def log_trial_start(self, trial: Trial) -> None:
        if not self._hold(trial):
            super().log_trial_start(trial)

    def log_trial_result(self, iteration: int, trial: Trial, result: dict[str, Any]) -> None:
        if not self._hold(trial):
            super().log_trial_result(iteration, trial, result)

    def log_trial_end(self, trial: Trial, failed: bool = False) -> None:
        if trial in self._trial_runs:
            super().log_trial_end(trial, failed)


def trial_callbacks(job: JobConfig, parent: RunRef | None, stage: str = "search-trial") -> list[TrialLogger]:
    """The Tune callbacks that log a Tune experiment's trials as runs nested under ``parent``,
    tagged ``noah_ray.stage`` = ``stage`` ([] when not tracking)."""
    cfg = job.tracking.mlflow
    if cfg is None or parent is None:
        return []
    experiment_id(cfg)                                 # exists, with its artifact location
    return [TrialLogger(tracking_uri=cfg.tracking_uri, experiment_name=cfg.experiment, save_artifact=False,
                        tags={"mlflow.parentRunId": parent.run_id, "noah_ray.job": job.name,
                              "noah_ray.stage": stage})]
