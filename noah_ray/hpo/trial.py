"""The Tune side of the hyper-parameter search (:mod:`noah_ray.hpo`): one trial
(:func:`hpo_trial`: train a method with the proposed values, report every epoch with a
checkpoint) and the tables it fills (:class:`TrialTables`: ``hpo_trials`` rows, ``hpo_curves``,
written by :class:`TrialRecorder` as Tune ends each trial)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, cast

import pyarrow as pa
from ray import tune

from noah_ray import progress
from noah_ray.config import HPO_METRICS, JobConfig
from noah_ray.space import SubnetConfig
from noah_ray.space.methods import trains_backbone
from noah_ray.store import storage
from noah_ray.store.lease import Fence


# ====================================================================== tables
@dataclass(frozen=True)
class TrialTables:
    """Where one method's trial rows and curves go; plain data, so Tune pickles it safely.
    ``fence``: the job's lease, checked before every write (None: unfenced)."""

    uri: str                  # <storage>/<job>/hpo
    endpoint: str | None
    job: str
    dataset: str
    method: str
    searcher: str
    scheduler: str
    metric: str
    max_epochs: int
    fence: Fence | None = None
    stage: str = "hpo"        # the stage whose folder ``uri`` is (hpo, race): in progress lines

    @property
    def base(self) -> storage.Location:
        return storage.resolve(self.uri, self.endpoint)

    def check(self) -> None:
        """Before a write: :class:`~noah_ray.store.lease.LeaseLost` once another run took the lease over."""
        if self.fence is not None:
            self.fence.check()

    def _ids(self) -> dict[str, Any]:
        return {"run_id": self.method, "job": self.job, "dataset": self.dataset, "method": self.method}

    def row_loc(self, trial_id: str) -> storage.Location:
        return self.base.join("hpo_trials", f"{self.method}-{trial_id}.parquet")

    def finished(self, trial_id: str) -> dict | None:
        """The last result of a trial whose row is written (None if it has not ended)."""
        import io

        import pyarrow.parquet as pq

        loc = self.row_loc(trial_id)
        if not storage.exists(loc):
            return None
        row = pq.read_table(io.BytesIO(storage.read_bytes(loc))).to_pylist()[0]
        return json.loads(row["config_json"])["last_result"] if row["status"] == "done" else None

    def write_curve(self, trial_id: str, metrics: dict) -> None:
        keys = ("train_loss", "val_acc", "val_loss", "lr", "images_per_s")
        row = {**self._ids(), "trial_id": trial_id, "epoch": metrics["epoch"],   # from 1, as everywhere
               **{k: metrics[k] for k in keys}, "timestamp": datetime.now(timezone.utc)}
        self.check()
        storage.append_table(self.base, "hpo_curves", pa.Table.from_pylist([row]),
                             part=f"{self.method}-{trial_id}-e{metrics['epoch'] - 1:05d}")

    def write_trial(self, trial_id: str, config: dict, result: dict | None, status: str,
                    error: str | None = None, chosen: bool = False) -> None:
        """The trial's row (a fixed part name: rewriting it is idempotent)."""
        r = result or {}
        epochs = int(r.get("epoch", 0))
        values = {k: float(v) for k, v in config.items()}
        row = {**self._ids(), "searcher": self.searcher, "scheduler": self.scheduler, "trial_id": trial_id,
               "config_json": json.dumps({"values": values, "last_result": _plain(r)}, sort_keys=True),
               "metric": self.metric, "status": status, "epochs_run": epochs, "max_epochs": self.max_epochs,
               "stopped_early": status == "done" and epochs < self.max_epochs, "best_val": r.get("best_val"),
               "best_epoch": r.get("best_epoch"), "last_val": r.get(self.metric),
               "wall_time_s": r.get("trial_time_s"), "worker": r.get("worker"), "error": error,
               "chosen": chosen, "timestamp": datetime.now(timezone.utc),
               **{hp_column(k): v for k, v in values.items()}}
        self.check()
        storage.append_table(self.base, "hpo_trials", pa.Table.from_pylist([row]), part=f"{self.method}-{trial_id}")


def hp_column(path: str) -> str:
    """The ``hpo_trials`` column of a tuned setting: ``retrain.lr`` -> ``hp_retrain_lr``."""
    return "hp_" + path.replace(".", "_")


def _plain(result: dict) -> dict:
    keys = ("epoch", "val_acc", "val_loss", "train_loss", "lr", "best_val", "best_epoch", "best_val_acc",
            "trial_time_s", "worker", "images_per_s", "val_images", "val_hits")
    return {k: result[k] for k in keys if k in result}


class TrialRecorder(tune.Callback):
    """Writes a trial's ``hpo_trials`` row the moment Tune ends it (finished or stopped by ASHA);
    one progress line per trial epoch on the driver's console (:func:`noah_ray.progress.echo`)."""

    def __init__(self, tables: TrialTables) -> None:
        # unfenced: Tune pickles its callbacks with the experiment and a resumed search gets them back
        # (Tuner.restore takes no new ones), so a token here would be the killed run's and refuse the
        # resumed run's rows; the driver is fenced by the lease's holder thread, which stops the stage
        # when the lease is lost, and the trials' own writes carry the current token
        self.tables = dataclasses.replace(tables, fence=None)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        t = self.tables
        if "epoch" in result:
            progress.echo(f"[{t.stage} {t.method}] trial {trial.trial_id} epoch {result['epoch']}/{t.max_epochs}: "
                          f"val_acc {result['val_acc']:.2f}% val_loss {result['val_loss']:.4f} "
                          f"({fmt_values(trial.config)})", tag=f"{t.stage} {t.method} {trial.trial_id}",
                          done=result["epoch"], total=t.max_epochs)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.tables.write_trial(trial.trial_id, trial.config, trial.last_result, "done")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.tables.write_trial(trial.trial_id, trial.config, trial.last_result, "error", trial_error(trial))


def trial_error(trial) -> str | None:
    """The last line of a failed trial's error (e.g. :func:`noah_ray.nn.epoch.check_loss`'s), from the
    error file Tune wrote just now."""
    local = trial.error_file
    text = open(local).read() if local and os.path.exists(local) else str(trial.get_error() or "")
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else None


# ====================================================================== the trial
@dataclass(frozen=True)
class ValScore:
    """A model on the validation split: top-1 accuracy (%), mean cross-entropy, how many images, and
    which it got right (:func:`~noah_ray.evolution.ties.hits_hex`, in the split's order: the race's
    paired test)."""

    acc: float
    loss: float
    images: int
    hits: str


def _val_metrics(model, loader, device) -> ValScore:
    """:class:`ValScore` of ``model`` on ``loader`` (unshuffled: the same image order for every trial)."""
    import torch
    import torch.nn.functional as F

    from noah_ray.evolution.ties import hits_hex

    model.eval()
    loss = 0.0
    right: list[bool] = []
    with torch.inference_mode():
        for x, y in loader:
            logits = model(x.to(device, non_blocking=True)).float().cpu()
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            right += (logits.argmax(-1) == y).tolist()
    count = len(right)
    return ValScore(100.0 * sum(right) / max(count, 1), loss / max(count, 1), count, hits_hex(right))


def _better(metric: str, new: float, old: float | None) -> bool:
    return old is None or (new > old if HPO_METRICS[metric] == "max" else new < old)


def hpo_trial(config: dict, job: dict, method: str, subnet: str, backbone: str | None, num_classes: int,
              tables: TrialTables) -> None:
    """One Tune trial: train ``method`` with the values in ``config`` (config path -> value) on
    the training split, report the validation metrics and a checkpoint after every epoch
    (:func:`train_trial`)."""
    trial_id = tune.get_context().get_trial_id()
    ended = tables.finished(trial_id)
    if ended is not None:                 # ended before a kill: report it again, train nothing
        tune.report(ended)
        return
    base = JobConfig.from_dict(job)
    h, tuned = base.hpo, base.with_values(config, method)
    assert h is not None                  # a trial's job has its hpo section (driver._trial_job)
    fix = "lower the learning-rate range in hpo.space ({lr:g} was tried) or model.lora_scale, or train in fp32"
    train_trial(tuned, method, SubnetConfig.from_json(subnet), backbone, num_classes, tables,
                TrialResources(h.cpus_per_trial, h.gpus_per_trial, h.seed, h.metric, fix))


@dataclass(frozen=True)
class TrialResources:
    """How a trial trains: threads, device, torch seed, the metric it tracks, and the fix its
    non-finite-loss line names (``{lr:g}``: the learning rate it trained with)."""

    cpus: float
    gpus: float
    seed: int
    metric: str
    fix: str


def train_trial(tuned: JobConfig, method: str, cfg: SubnetConfig, backbone: str | None, num_classes: int,
                tables: TrialTables, res: TrialResources) -> None:
    """The body of a trial (the hpo trials and the finalist race, :mod:`noah_ray.hpo.race`): train
    ``cfg`` as ``method`` with ``tuned.retrain`` (its epochs) on the training split from its initial
    values, report the validation metrics with a checkpoint after every epoch, resume from Tune's
    checkpoint.  A non-finite training loss ends the trial as an error with one line
    (:func:`noah_ray.nn.epoch.check_loss`) before that epoch's curve or report."""
    import torch

    from noah_ray.nn import optim
    from noah_ray.nn.epoch import make_optimizer
    from noah_ray.nn.malloc import keep_freed_memory
    from noah_ray.nn.models import build_model

    trial_id = tune.get_context().get_trial_id()
    torch.set_num_threads(max(1, int(res.cpus)))
    device = torch.device("cuda" if res.gpus > 0 and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(res.seed)
    model = build_model(tuned, cfg, backbone, num_classes,
                        train_backbone=trains_backbone(method), method=method).to(device)   # the method's recipe
    loaders = _loaders(tuned, model)
    tc = tuned.retrain
    lr = tc.method_lr.get(method, tc.lr)
    opt, sched, scaler = make_optimizer(model, tc, lr, len(loaders[0]), device, tuned.model.precision)
    objects = (model, opt, sched, scaler)
    state: dict[str, Any]
    state = {"epoch": -1, "best_val": None, "best_epoch": -1, "best_val_acc": None, "trial_time_s": 0.0}
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = optim.restore(cast(dict, optim.latest_checkpoint(storage.resolve(d))), *objects,
                                  0, device)                   # Tune's checkpoint holds one (_report)
    if state["epoch"] + 1 >= tc.epochs and "metrics" in state:   # killed after its last report
        tune.report(state["metrics"])
    for epoch in range(state["epoch"] + 1, tc.epochs):
        where = f"[{tables.stage} {method}] trial {trial_id} epoch {epoch + 1}/{tc.epochs}"
        metrics = _epoch(objects, loaders, device, res.metric, state, epoch, where, res.fix.format(lr=lr))
        tables.write_curve(trial_id, metrics)
        state["metrics"] = metrics
        _report(metrics, state, objects, device)


def _epoch(objects: tuple[Any, Any, Any, Any], loaders: tuple, device, metric: str, state: dict, epoch: int,
           where: str, fix: str) -> dict:
    """Train and validate one epoch of a trial (``objects``: model, optimiser, schedule, scaler);
    stop on a non-finite loss first; update ``state`` (best so far); returns the epoch's metrics."""
    from noah_ray.nn.epoch import check_loss, train_epoch

    model, opt, sched, scaler = objects
    t0 = time.time()
    loss_sum, batches, images = train_epoch(model, loaders[0], opt, sched, scaler, device).tolist()
    check_loss(loss_sum / max(batches, 1), where, fix)
    val = _val_metrics(model, loaders[1], device)
    state["trial_time_s"] += time.time() - t0
    value = val.acc if metric == "val_acc" else val.loss
    if _better(metric, value, state["best_val"]):
        state.update(best_val=value, best_epoch=epoch, best_val_acc=val.acc)
    state["epoch"] = epoch
    return {"epoch": epoch + 1, "val_acc": val.acc, "val_loss": val.loss, "val_images": val.images,
            "val_hits": val.hits,
            "train_loss": loss_sum / max(batches, 1),
            "lr": sched.get_last_lr()[0], "images_per_s": images / max(time.time() - t0, 1e-9),
            "best_val": state["best_val"], "best_epoch": state["best_epoch"] + 1,   # reported from 1
            "best_val_acc": state["best_val_acc"], "trial_time_s": state["trial_time_s"],
            "worker": f"{socket.gethostname()}:{os.getpid()}"}


def _loaders(job: JobConfig, model) -> tuple:
    """The training and validation loaders of a trial (the model's normalisation and input size)."""
    from noah_ray.data import build_loader, norm_for

    mean, std, size = norm_for(model)
    kw: dict[str, Any]
    kw = {"mean": mean, "std": std, "img_size": job.data.img_size or size, "endpoint": job.storage_endpoint}
    return (build_loader(job.data, job.data.train_split, train=True, **kw),
            build_loader(job.data, job.data.val_split, train=False, **kw))


def _report(metrics: dict, state: dict, objects: tuple[Any, Any, Any, Any], device) -> None:
    """Report an epoch to Tune with a checkpoint (``checkpoint_e<epoch>/`` in the format of
    :mod:`noah_ray.nn.optim`, so the trial resumes exactly there)."""
    from noah_ray.nn import optim

    with tempfile.TemporaryDirectory(prefix="noah-hpo-") as d:
        sub = os.path.join(d, f"checkpoint_e{state['epoch']:05d}")
        os.makedirs(sub)
        optim.save_checkpoint(sub, *objects, state, 0, 1, device)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def fmt_values(values: dict[str, float]) -> str:
    return ", ".join(f"{k.rpartition('.')[2]}={v:.4g}" for k, v in values.items())
