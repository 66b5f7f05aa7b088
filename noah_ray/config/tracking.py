"""The ``tracking:`` section of a job: where MLflow runs go (``noah_ray.store.tracking``).  Nothing
here imports MLflow; :class:`~noah_ray.config.JobConfig` holds the section."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from noah_ray.config.sections import section_from_dict
from noah_ray.errors import ConfigError
from noah_ray.security import has_userinfo


@dataclass
class MlflowConfig:
    """Where MLflow runs go (``noah_ray.store.tracking``).  Credentials never go here: MLflow reads them
    from ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` / ``MLFLOW_TRACKING_TOKEN``."""

    tracking_uri: str = ""                # e.g. sqlite:///mlflow.db, http://mlflow:5000, databricks
    experiment: str = "noah-ray"
    artifact_location: str | None = None  # artifact root of a new experiment (default: MLflow's)

    def check(self, where: str) -> None:
        if not self.tracking_uri.strip() or not self.experiment.strip():
            raise ConfigError(f"{where}: tracking_uri and experiment must be set, e.g. "
                              f"{{tracking_uri: sqlite:///mlflow.db, experiment: noah-ray}}")
        if has_userinfo(self.tracking_uri):
            raise ConfigError(f"{where}.tracking_uri: credentials in the URI would be logged and sent to Ray "
                              f"workers; set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD instead")


@dataclass
class TrackingConfig:
    """Optional experiment tracking; ``mlflow`` unset: nothing is tracked."""

    mlflow: MlflowConfig | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str) -> TrackingConfig:
        out = section_from_dict(cls, {**(data or {}), "mlflow": None} if isinstance(data, Mapping) else data, where)
        raw = (data or {}).get("mlflow")
        if raw is not None:
            out.mlflow = section_from_dict(MlflowConfig, raw, f"{where}.mlflow")
        return out
