"""Experiment tracking in MLflow: the optional ``tracking.mlflow`` section of a job.

.. code-block:: yaml

    tracking:
      mlflow: {tracking_uri: sqlite:///mlflow.db, experiment: noah-ray}

One MLflow run per stage run, named ``<stage> <run id>`` and tagged ``noah_ray.job`` /
``noah_ray.stage`` / ``noah_ray.run`` (a resumed or re-run stage continues its run):

* ``supernet supernet`` and ``retrain <method>-seed<k>``: the stage's settings as parameters,
  every epoch's ``train_loss``, ``lr``, ``images_per_s``, ``val_acc*`` (step = epoch, counted
  from 1) logged by the rank-0 Ray Train worker, then the final ``test_acc``, ``best_val``,
  ``best_epoch``, ``params``; artifacts: ``supernet_curves.png``, the retrained NOAH subnet's
  ``subnet.yaml`` and ``architecture.png``.
* ``search <run>``: the settings, per-generation ``best_val_acc`` (step = generation, from 0 as in the tables),
  the winner's ``val_acc`` / ``params``; artifacts ``best_subnet.yaml`` and ``pareto.png``.  Each
  scored candidate is a nested run (Ray Tune's ``MLflowLoggerCallback``, in
  :mod:`noah_ray.store.trial_logging`) with its subnet as
  parameters and its ``val_acc`` / ``params``.

* ``hpo <method>``: the ``hpo`` / ``retrain`` settings, then the chosen values (``chosen.<path>``,
  ``chosen.trial_id``) and the best trial's ``best_val`` / ``val_acc``.  Each Tune trial is a
  nested run (the same callback) with its values as parameters and its per-epoch metrics (step =
  epoch, from 1).  The final runs trained with the chosen values carry them as ``chosen.*`` too.

Ray Train's ``setup_mlflow`` is not used for the epochs: it opens a new MLflow run on every
(re)start, while a resumed noah_ray run continues its own.  Secrets are never logged: the
parameters come from the job config (which holds none; a tracking URI with credentials is
refused), URIs have any ``user:password@`` removed, and MLflow takes its credentials from its
environment variables.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from noah_ray import security
from noah_ray.config import JobConfig, MlflowConfig
from noah_ray.errors import ConfigError
from noah_ray.store.records import MetaRecord

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

KEY_TAG = "noah_ray.key"
_MAX_PARAM = 500


@dataclass(frozen=True)
class RunRef:
    """One MLflow run (plain data: it travels to Ray workers in their config)."""

    tracking_uri: str
    run_id: str

    def to_dict(self) -> dict[str, str]:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id}


def check(job: JobConfig) -> None:
    """mlflow is importable when the job tracks (``pip install 'noah_ray[tracking]'``)."""
    if job.tracking.mlflow is None:
        return
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ConfigError("tracking.mlflow needs MLflow; pip install 'noah_ray[tracking]' (or mlflow-skinny), "
                          "or remove the tracking section") from None


def redact(value: Any) -> str:
    """``value`` as a parameter string, without any ``user:password@`` of a URI, cut to 500 chars."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return security.redact(text, "")[:_MAX_PARAM]


def _client(uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(cfg: MlflowConfig) -> str:
    """The experiment's id, created (with ``artifact_location``) if it does not exist yet."""
    from mlflow.exceptions import MlflowException

    client = _client(cfg.tracking_uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(cfg.experiment, artifact_location=cfg.artifact_location)
    except MlflowException:                         # created meanwhile by another process
        created = client.get_experiment_by_name(cfg.experiment)
        assert created is not None
        return created.experiment_id


def stage_params(job: JobConfig, stage: str) -> dict[str, str]:
    """What defines a stage, as MLflow parameters (the tracking section itself excluded)."""
    import dataclasses

    section: Any = {"supernet": job.supernet, "retrain": job.retrain, "search": job.search, "hpo": job.hpo}.get(stage)
    params: dict[str, Any] = {"job": job.name, "storage": job.storage, "space": job.space.to_dict()}
    for prefix, obj in ((stage, section), ("model", job.model), ("data", job.data)):
        if obj is not None:
            params.update({f"{prefix}.{k}": v for k, v in dataclasses.asdict(obj).items()})
    return {k: redact(v) for k, v in params.items()}


def start_run(job: JobConfig, stage: str, run_id: str, *, params: dict[str, Any] | None = None,
              extra: dict[str, Any] | None = None) -> RunRef | None:
    """The MLflow run of one stage run (None when the job does not track): found by its key
    (``<job>/<stage>/<run id>``) so that a resumed run continues it, else created with
    ``params`` (default :func:`stage_params`) and ``extra``."""
    cfg = job.tracking.mlflow
    if cfg is None:
        return None
    client, exp = _client(cfg.tracking_uri), experiment_id(cfg)
    key = f"{job.name}/{stage}/{run_id}"
    found = client.search_runs([exp], filter_string=f"tags.`{KEY_TAG}` = '{key}'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return RunRef(cfg.tracking_uri, found[0].info.run_id)
    tags = {KEY_TAG: key, "noah_ray.job": job.name, "noah_ray.stage": stage, "noah_ray.run": run_id}
    run = client.create_run(exp, run_name=f"{stage} {run_id}", tags=tags)
    ref = RunRef(cfg.tracking_uri, run.info.run_id)
    log_params(ref, {**(stage_params(job, stage) if params is None else params), **(extra or {})})
    return ref


def log_params(ref: RunRef | None, params: dict[str, Any]) -> None:
    """``params`` (redacted, :func:`redact`) on the run, in batches of 100."""
    if ref is None:
        return
    from mlflow.entities import Param

    items = [Param(k, redact(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        _client(ref.tracking_uri).log_batch(ref.run_id, params=items[i:i + 100])


def log_metrics(ref: RunRef | dict[str, str] | None, metrics: dict[str, Any], step: int | None = None) -> None:
    """The numeric entries of ``metrics`` at ``step`` (nothing when ``ref`` is None)."""
    if not ref:
        return
    from mlflow.entities import Metric

    ref = ref if isinstance(ref, RunRef) else RunRef(**ref)
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"]
    if items:
        _client(ref.tracking_uri).log_batch(ref.run_id, metrics=items)


def log_artifact(ref: RunRef | None, path: str | Path) -> None:
    if ref is not None:
        _client(ref.tracking_uri).log_artifact(ref.run_id, str(path))


def log_text(ref: RunRef | None, text: str, name: str) -> None:
    if ref is not None:
        _client(ref.tracking_uri).log_text(ref.run_id, text, name)


def end_run(ref: RunRef | None, status: str = "FINISHED") -> None:
    if ref is not None:
        _client(ref.tracking_uri).set_terminated(ref.run_id, status)


# ------------------------------------------------------------------------------ per stage
def finish_training(job: JobConfig, stage: str, ref: RunRef | None, meta: MetaRecord) -> None:
    """After a supernet / retrain run: its final numbers and plots, then the run is ended."""
    if ref is None:
        return
    from noah_ray.store import results

    numbers = {"test_acc": meta.test_acc, "best_val": meta.best_val, "params": meta.params,
               "params_head": meta.params_head, "train_time_s": meta.train_time_s}
    final: dict[str, float | int] = {k: v for k, v in numbers.items() if v is not None}
    if meta.best_epoch is not None:
        final["best_epoch"] = meta.best_epoch + 1              # counted from 1, as in the runs table
    log_metrics(ref, final, step=meta.epochs_done)
    uri = _job_uri(job)
    with tempfile.TemporaryDirectory(prefix="noah-mlflow-") as tmp:
        if stage == "supernet" and not results.supernet_curves(uri, job.storage_endpoint).empty:
            log_artifact(ref, results.plot_supernet_curves(uri, Path(tmp, "supernet_curves.png"), job.storage_endpoint))
        subnet = meta.subnet if stage == "retrain" else None
        if subnet is not None and meta.method == "noah":
            log_text(ref, subnet.to_yaml(), "subnet.yaml")
            if any(any(subnet.layer_widths(m)) for m in subnet.widths):
                log_artifact(ref, results.plot_architecture(subnet, Path(tmp, "architecture.png")))
    end_run(ref)


def finish_search(job: JobConfig, ref: RunRef | None, result: Any) -> None:
    """After a search: per-generation best, the winner, ``best_subnet.yaml`` and the Pareto plot."""
    if ref is None:
        return
    from noah_ray.store import results, storage

    gens = results.generations(_job_uri(job), job.storage_endpoint)
    for row in gens[gens["run_id"] == result.run_id].itertuples():
        if row.best_val_acc == row.best_val_acc:                 # not NaN
            log_metrics(ref, {"best_val_acc": row.best_val_acc, "evaluated": row.evaluated,
                              "failed": row.failed}, step=int(row.generation))    # as in the table
    sel = {k: result.selection[k] for k in ("val_se", "tied", "top_val_acc")
           if isinstance(result.selection.get(k), (int, float))}
    log_metrics(ref, {"val_acc": result.best_val_acc, "params": result.best_params, "evaluated": result.evaluated,
                      "failed": result.failed, **sel}, step=result.generations)
    if result.best_subnet_uri:
        log_text(ref, storage.read_text(storage.resolve(result.best_subnet_uri, job.storage_endpoint)),
                 "best_subnet.yaml")
    with tempfile.TemporaryDirectory(prefix="noah-mlflow-") as tmp:
        if result.evaluated:
            log_artifact(ref, results.plot_pareto(_job_uri(job), Path(tmp, "pareto.png"), job.storage_endpoint))
    end_run(ref, "FINISHED" if result.finished else "KILLED")


def hpo_params(job: JobConfig, method: str, tuned: list[str]) -> dict[str, Any]:
    """The parameters of one method's hyper-parameter search run: the ``hpo`` and ``retrain``
    sections (the trials' base), the method and the tuned settings."""
    return {**stage_params(job, "retrain"), **stage_params(job, "hpo"), "hpo.for_method": method,
            "hpo.tuned": sorted(tuned)}


def chosen_params(record: dict[str, Any] | None) -> dict[str, Any]:
    """What a method's search chose (:meth:`noah_ray.hpo.HpoResult.record`) as parameters:
    ``chosen.<setting path>`` per value and ``chosen.trial_id`` (logged on the search's run and
    on every final run trained with them)."""
    if not record:
        return {}
    return {**{f"chosen.{k}": v for k, v in record["values"].items()}, "chosen.trial_id": record["trial_id"]}


def finish_hpo(ref: RunRef | None, res: Any) -> None:
    """After a method's hyper-parameter search: the chosen values (parameters) and the best
    trial's numbers, then the run is ended."""
    if ref is None:
        return
    log_params(ref, chosen_params(res.record()))
    log_metrics(ref, {"best_val": res.best_val, "val_acc": res.val_acc, "trials": res.trials,
                      "stopped_early": res.stopped_early, "epochs_trained": res.epochs_trained,
                      "errors": res.errors})
    end_run(ref)


def _job_uri(job: JobConfig) -> str:
    from noah_ray.store import storage

    return storage.resolve(job.storage, job.storage_endpoint).join(job.name).uri
