"""The Ray Train worker loop: what every worker of a supernet or retraining run executes.

The drivers (:mod:`noah_ray.train.runs`) describe a run as a :class:`RunSpec` (plain data, never
credentials) and start a ``TorchTrainer`` with :func:`train_loop`; every worker then sets up
(:func:`_setup`: model, data, optimiser), resumes from the run's newest checkpoint
(:func:`_resume`), trains epoch by epoch (:func:`_epoch`: train, evaluate on rank 0, write the
metrics, report a checkpoint) and, on rank 0, writes the final artifact (:func:`_finish`).

Epochs are counted from 1 wherever a user sees them: progress lines, the ``train_metrics`` /
``runs`` tables (``epoch``, ``best_epoch``), the metrics reported to Ray Train and the tracking
steps.  Checkpoint names (``checkpoint_e00004`` = after the 5th epoch), checkpoint ``state.json``
and ``meta.json`` keep the 0-based loop index.

Checkpoints hold only what trains (modules + head), the optimiser, schedule, loss-scaler, epoch
and per-rank RNG state, as safetensors + JSON (:mod:`noah_ray.nn.optim`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, cast

import pyarrow as pa
import torch

from noah_ray import progress
from noah_ray.config import JobConfig, SupernetConfig, TrainConfig
from noah_ray.errors import ConfigError
from noah_ray.nn import optim
from noah_ray.nn.epoch import check_loss, make_optimizer, train_epoch
from noah_ray.nn.malloc import keep_freed_memory
from noah_ray.nn.models import build_model, evaluate
from noah_ray.nn.prune import PrunePlan, apply_plan
from noah_ray.nn.supernet import PromptedViT
from noah_ray.space import SearchSpace, SubnetConfig
from noah_ray.space.methods import trains_backbone
from noah_ray.space.sampling import SAMPLING
from noah_ray.store import lease, storage, tracking
from noah_ray.store.layout import JobPaths
from noah_ray.store.records import BestRecord, MetaRecord, SpecRecord
from noah_ray.store.tracking import RunRef
from noah_ray.train.faults import FaultPlan

ERROR_FILE = "error.json"                 # a worker's non-retryable error, for the driver


@dataclass
class RunSpec:
    """One Ray Train run, as every worker receives it (``train_loop_config`` carries
    :meth:`to_dict`).  ``spec`` is what defines the run (its ``spec.json``); ``subnet`` the
    capacity as JSON (None: the search space's supernet).  Test-only fault injection travels
    beside it (:class:`~noah_ray.train.faults.FaultPlan`), never inside."""

    job: JobConfig
    stage: str                            # "supernet" or "retrain"
    run_id: str
    run_dir: str                          # relative to the job's root
    method: str
    seed: int
    lr: float
    num_classes: int
    backbone: str | None
    spec: SpecRecord
    metrics_part: str                     # the train_metrics part name before -e<epoch>
    subnet: str | None = None
    fingerprint: str | None = None
    prune_plan: PrunePlan | None = None   # E2VPT: rewind and retrain the kept prompts
    init: str | None = None               # retrain.init: a subnet artifact's weights
    progress: str | None = None           # the driver's console sink
    lease: str | None = None              # the token of the job's lease: the fence of every write (store.lease)
    tracking: RunRef | None = None        # the MLflow run

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (``train_loop_config``): the nested records as their ``to_dict``."""
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "job": self.job.to_dict(),
                "spec": self.spec.to_dict(), "prune_plan": self.prune_plan.to_dict() if self.prune_plan else None,
                "tracking": self.tracking.to_dict() if self.tracking else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        plan, ref = data.get("prune_plan"), data.get("tracking")
        return cls(**{**data, "job": JobConfig.from_dict(data["job"]), "spec": SpecRecord.from_dict(data["spec"]),
                      "prune_plan": PrunePlan.from_dict(plan) if plan else None,
                      "tracking": RunRef(**ref) if ref else None})

    @property
    def tc(self) -> TrainConfig:
        return self.job.supernet if self.stage == "supernet" else self.job.retrain

    @property
    def tag(self) -> str:
        return f"[{self.stage} {self.run_id}]"

    def fence(self) -> None:
        """Before a write: :class:`~noah_ray.store.lease.LeaseLost` when the job's lease is no longer
        the driver's (another run took the job over while this one was paused)."""
        lease.fence(self.job, self.lease)


@dataclass
class Worker:
    """One worker's training objects (built by :func:`_setup`)."""

    run: RunSpec
    rank: int
    world: int
    device: torch.device
    model: PromptedViT
    capacity: SubnetConfig | None
    train_loader: Any
    sampler: Any
    val_loader: Any
    norm: tuple                           # (mean, std, img_size)
    opt: Any
    sched: Any
    scaler: Any
    infer: torch.nn.Module                # what maps a loader's batch to logits: the model, or its head
                                          # (nn.features.HeadOnly) when the loaders yield cached features
    net: torch.nn.Module | None = None    # ``infer``, DDP-wrapped with several workers
    faults: FaultPlan | None = None       # tests: injected failures
    session: Session | None = None        # kept across the runs of a session

    @property
    def run_dir(self) -> storage.Location:
        return JobPaths.of(self.run.job).root.join(self.run.run_dir)


# ----------------------------------------------------------------------------- subnets per step
def step_subnet(space: SearchSpace, seed: int, epoch: int, step: int) -> SubnetConfig:
    """The subnet trained at (epoch, step): a pure function of its arguments, so every worker
    picks the same one without communicating."""
    return space.sample(random.Random(f"noah-step:{seed}:{epoch}:{step}"))


def step_subnets(space: SearchSpace, rule: str, seed: int, epoch: int, step: int) -> list[SubnetConfig]:
    """The subnets trained at (epoch, step) under ``rule``; their gradients are averaged into
    one optimiser step (the rules: :data:`noah_ray.space.sampling.SAMPLING`; ``uniform``: NOAH's one
    random subnet; ``sandwich``: largest, smallest and one random subnet, BigNAS / AttentiveNAS)."""
    return SAMPLING[rule](space, step_subnet(space, seed, epoch, step))


def eval_subnets(job: JobConfig, count: int) -> dict[str, SubnetConfig]:
    """The fixed subnets a supernet is scored on every epoch: smallest, largest, ``count`` random."""
    rng = random.Random(f"noah-eval:{job.supernet.seed}")
    out = {"smallest": job.space.smallest(), "largest": job.space.largest()}
    out.update({f"random_{i}": job.space.sample(rng) for i in range(count)})
    return out


# ----------------------------------------------------------------------------- the worker loop
def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker; ``config["run"]`` is a :meth:`RunSpec.to_dict`,
    ``config["faults"]`` a test's :meth:`FaultPlan.to_dict` (else None).  A retraining session
    (:func:`noah_ray.train.runs.retrain_methods`) passes ``config["runs"]`` instead: several runs
    that this worker group trains one after another (:func:`_session`), and ``config["run_faults"]``
    (a plan per run id).

    A :class:`ConfigError` (a bad image, a bad file: every retry would fail the same way) is
    written to ``<run>/error.json``, which the driver turns into one line.  With one worker it is
    not raised (Ray Train would restart the worker ``max_failures`` times); with several it is
    (the others may wait in a collective), and each restarted attempt ends at once on the file."""
    if "runs" in config:
        _session([RunSpec.from_dict(r) for r in config["runs"]],
                 {k: FaultPlan.from_dict(f) for k, f in config.get("run_faults", {}).items()})
    else:
        faults = FaultPlan.from_dict(config["faults"]) if config.get("faults") else None
        _guarded(RunSpec.from_dict(config["run"]), faults, Session(direct=False))


@dataclass
class Session:
    """What a worker keeps from one run to the next of a session: the datasets built (their
    decoded images, keyed by what builds them); ``direct``: checkpoints are written straight to the
    run's folder in storage (a session's runs share one Ray Train run, whose checkpoint folder is
    not theirs) instead of through ``ray.train.report``."""

    direct: bool
    datasets: dict = dataclasses.field(default_factory=dict)
    features: dict = dataclasses.field(default_factory=dict)   # cached pre-logit features (nn.features)


def _session(runs: list[RunSpec], faults: dict[str, FaultPlan]) -> None:
    """Train ``runs`` one after another in this worker group: a finished one is skipped, the
    others resume from their newest checkpoint; the first that fails with a ConfigError ends the
    session (the driver raises it)."""
    session = Session(direct=True)
    for run in runs:
        if finished(run):
            continue
        if not _guarded(run, faults.get(run.run_id), session):
            return


def finished(run: RunSpec) -> bool:
    """Whether ``run`` has an intact ``final/`` with all its epochs."""
    final = JobPaths.of(run.job).root.join(run.run_dir, "final")
    if not storage.exists(final.join("meta.json")):
        return False
    try:
        return MetaRecord.from_dict(storage.load_state(final)[1]).epochs_done >= run.tc.epochs
    except (ConfigError, ValueError):
        return False


def _guarded(run: RunSpec, faults: FaultPlan | None, session: Session) -> bool:
    """Train ``run``; False when it ended on a ConfigError (written to its ``error.json``)."""
    import ray.train

    marker = JobPaths.of(run.job).root.join(run.run_dir, ERROR_FILE)
    run.fence()                           # a restarted worker of a run that lost its lease ends here
    try:
        if storage.exists(marker):
            raise ConfigError(json.loads(storage.read_text(marker))["error"])
        _train(run, faults, session)
        return True
    except ConfigError as e:
        storage.write_text(marker, json.dumps({"error": str(e)}))
        if ray.train.get_context().get_world_size() > 1:
            raise
        return False


def _train(run: RunSpec, faults: FaultPlan | None, session: Session) -> None:
    w = _setup(run, session)
    w.faults = faults
    state, start = _resume(w)
    session_t0 = time.time()
    for epoch in range(start, run.tc.epochs):
        _epoch(w, epoch, start, state, session_t0)
    if w.rank == 0:
        _finish(w, state)


def _setup(run: RunSpec, session: Session) -> Worker:
    """The model (the same initial weights on every rank), the loaders and the optimiser."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for fp32, as timm's train script
    else:
        keep_freed_memory()   # a random subnet per step changes tensor sizes: no page faults each step
    torch.manual_seed(run.seed)  # identical initial weights on every rank
    capacity = SubnetConfig.from_json(run.subnet) if run.subnet else None
    model = build_model(run.job, capacity, run.backbone, run.num_classes,
                        train_backbone=trains_backbone(run.method), method=run.method).to(device)
    if run.prune_plan:  # E2VPT rewinding: the fresh model holds the same initial values
        model, capacity = apply_plan(model, run.prune_plan), run.prune_plan.config()
    torch.manual_seed(run.seed + 1_000_003 * (rank + 1))  # independent drop-path / shuffling per rank
    train_loader, sampler, val_loader, norm, infer = _loaders(run, model, rank, world, device, session)
    opt, sched, scaler = make_optimizer(model, run.tc, run.lr, len(train_loader), device, run.job.model.precision)
    return Worker(run, rank, world, device, model, capacity, train_loader, sampler, val_loader, norm,
                  opt, sched, scaler, infer, session=session)


def _loaders(run: RunSpec, model: PromptedViT, rank: int, world: int, device: torch.device,
             session: Session) -> tuple:
    """``(train loader, its DistributedSampler or None, val loader on rank 0, (mean, std, size),
    the module the loaders' batches go through)``.  When only the head trains and nothing before
    it is random (:func:`~noah_ray.nn.features.frozen_below_head`, a deterministic transform, no
    ``retrain.init``), the loaders yield cached pre-logit features and that module is the head."""
    from torch.utils.data import DataLoader, DistributedSampler

    from noah_ray.data import build_loader, norm_for
    from noah_ray.nn.features import HeadOnly, frozen_below_head

    job = run.job
    mean, std, size = norm_for(model)
    size = job.data.img_size or size
    norm = (mean, std, size)
    ds = _dataset(run, session, job.data.train_split, train=True, norm=norm)
    val_ds = _dataset(run, session, job.data.val_split, train=False, norm=norm) if rank == 0 else None
    cached = run.stage == "retrain" and run.job.retrain.cache_features and run.init is None \
        and not getattr(ds.transform, "random", True) and frozen_below_head(model)
    if cached:
        ds = _features(run, session, model, ds, device)
        val_ds = _features(run, session, model, val_ds, device) if val_ds is not None else None
    sampler: DistributedSampler | None
    sampler = DistributedSampler(ds, world, rank, shuffle=True, seed=run.seed) if world > 1 else None
    nw = job.data.num_workers
    train_loader = DataLoader(ds, batch_size=job.data.batch_size // world, shuffle=sampler is None,
                              sampler=sampler, num_workers=nw, persistent_workers=nw > 0,
                              pin_memory=device.type == "cuda", drop_last=len(ds) >= 2 * job.data.batch_size)
    val_loader = build_loader(job.data, job.data.val_split, train=False, img_size=size, dataset=val_ds) \
        if val_ds is not None else None
    return train_loader, sampler, val_loader, norm, HeadOnly(model) if cached else model


def _features(run: RunSpec, session: Session, model: PromptedViT, dataset: Any, device: torch.device) -> Any:
    """The pre-logit features of ``dataset`` (:func:`~noah_ray.nn.features.pre_logit_dataset`),
    computed once per session for its backbone (weights file and model settings): the seeds of a
    linear probe share them."""
    from noah_ray.nn.features import pre_logit_dataset

    key = (id(dataset), run.backbone, json.dumps(dataclasses.asdict(run.job.model), sort_keys=True, default=str))
    if key not in session.features:
        session.features[key] = pre_logit_dataset(model, dataset, run.job.data.eval_batch_size, device)
    return session.features[key]


def _dataset(run: RunSpec, session: Session, split: str, *, train: bool, norm: tuple) -> Any:
    """The dataset of ``split``, built once per session (its images decoded once: building one
    draws no random numbers, so a cached one trains exactly as a fresh one)."""
    from noah_ray.data import build_dataset

    job = run.job
    mean, std, size = norm
    key = json.dumps([dataclasses.asdict(job.data), job.storage_endpoint, split, train, list(mean), list(std), size],
                     sort_keys=True, default=str)
    if key not in session.datasets:
        session.datasets[key] = build_dataset(job.data, split, train=train, mean=mean, std=std, img_size=size,
                                              endpoint=job.storage_endpoint)
    return session.datasets[key]


def _resume(w: Worker) -> tuple[dict, int]:
    """The loop state and the first epoch: from the run's newest checkpoint, else fresh (from
    ``retrain.init``'s weights when set); then the model is wrapped for DDP."""
    import ray.train.torch

    run, tc = w.run, w.run.tc
    state: dict[str, Any]
    state = {"epoch": -1, "best_val": -1.0, "best_epoch": -1, "train_time_s": 0.0, "val_acc": {}, "start_epochs": []}
    ckpt = optim.latest_checkpoint(w.run_dir)
    if ckpt:
        state = optim.restore(ckpt, w.model, w.opt, w.sched, w.scaler, w.rank, w.device)
    elif run.init:       # retrain.init: start from a subnet artifact's weights (same on every rank)
        from noah_ray.interop.artifact import load_init_weights

        load_init_weights(w.model, run.init, endpoint=run.job.storage_endpoint)
    start = state["epoch"] + 1
    state["start_epochs"] = [*state.get("start_epochs", []), start]  # one entry per (re)start
    if w.rank == 0:
        data = run.job.data
        _say(run, f"{run.tag} {w.world} worker(s) on {w.device.type}, {len(w.train_loader.dataset)} images, "
             f"global batch {data.batch_size}, {len(w.train_loader)} steps/epoch, " +
             (f"resuming at epoch {start + 1}/{tc.epochs} from {ckpt['name']}" if ckpt else f"{tc.epochs} epochs") +
             (", the head on cached features" if w.infer is not w.model else ""))
    w.net = ray.train.torch.prepare_model(w.infer, move_to_device=False,
                                          parallel_strategy_kwargs={"find_unused_parameters": True}) \
        if w.world > 1 else w.infer
    return state, start


def _epoch(w: Worker, epoch: int, start: int, state: dict, session_t0: float) -> None:
    """Train one epoch, evaluate it (rank 0), record it and report it with a checkpoint."""
    run, tc = w.run, w.run.tc
    if w.sampler is not None:
        w.sampler.set_epoch(epoch)
    t0 = time.time()
    loss_sum, batches, images = _train_epoch(w, epoch).tolist()
    _check_loss(run, epoch, loss_sum / max(batches, 1))
    elapsed = time.time() - t0
    state["train_time_s"] += elapsed
    metrics = {"epoch": epoch + 1, "train_loss": loss_sum / max(batches, 1), "lr": w.sched.get_last_lr()[0],
               "images_per_s": images / max(elapsed, 1e-9)}
    last = epoch + 1 == tc.epochs
    val = _evaluate(w, epoch, state, metrics) if w.rank == 0 and ((epoch + 1) % tc.eval_every == 0 or last) else {}
    if w.rank == 0:
        _write_metrics(JobPaths.of(run.job).root.join(run.stage), run, metrics, val)
        tracking.log_metrics(run.tracking, metrics, step=metrics["epoch"])
        _progress(run, epoch, start, metrics, val, state, time.time() - session_t0, elapsed)
    state["epoch"] = epoch
    _report(w, epoch, state, metrics, (epoch + 1) % tc.checkpoint_every == 0 or last)
    if w.faults is not None:
        w.faults.maybe_fail(epoch, w.rank)


def _check_loss(run: RunSpec, epoch: int, loss: float) -> None:
    """Stop at the first epoch whose mean training loss is not finite (summed over the workers, so
    every rank stops alike), before its metrics, checkpoint or any result is written: the
    :class:`ConfigError` ends the run with one line (:func:`train_loop`), never a retry."""
    key = f"retrain.method_lr.{run.method}" if run.lr != run.job.retrain.lr and run.stage == "retrain" \
        else f"{run.stage}.lr"
    check_loss(loss, f"{run.tag} epoch {epoch + 1}/{run.tc.epochs}",
               f"lower {key} ({run.lr:g}) or model.lora_scale, or train in fp32")


def _train_epoch(w: Worker, epoch: int) -> torch.Tensor:
    """The epoch's ``[loss sum, batches, images]`` summed over the workers; a supernet trains
    the subnets of each step (``supernet.sampling``), the same on every worker (checked)."""
    run, digest = w.run, hashlib.sha1()
    supernet = run.stage == "supernet"

    def step_passes(step: int) -> list:
        def activate(cfg: SubnetConfig) -> None:
            w.model.set_active(cfg)
            digest.update(cfg.key().encode())
        return [lambda c=cfg: activate(c)
                for cfg in step_subnets(run.job.space, cast(SupernetConfig, run.tc).sampling, run.seed, epoch, step)]

    assert w.net is not None                  # _resume wrapped the model
    sums = train_epoch(w.net, w.train_loader, w.opt, w.sched, w.scaler, w.device,
                       step_passes if supernet else None)
    if w.world > 1:
        if supernet:
            _check_same_subnets(digest.hexdigest(), epoch)
        torch.distributed.all_reduce(sums)
    return sums


def _evaluate(w: Worker, epoch: int, state: dict, metrics: dict) -> dict[str, float]:
    """Rank 0: validation accuracy of the run's fixed subnets (a supernet: smallest, largest and
    random ones; retraining: its model, whose best-on-val weights are saved as ``best/``)."""
    run = w.run
    fixed = eval_subnets(run.job, cast(SupernetConfig, run.tc).eval_random_subnets) if run.stage == "supernet" \
        else {"model": cast(SubnetConfig, w.capacity)}                       # retraining: its subnet
    val = {}
    for name, cfg in fixed.items():
        w.model.set_active(cfg)
        val[name] = evaluate(w.infer, w.val_loader, w.device)[0]
    state["val_acc"] = val
    metrics.update({f"val_acc_{k}": v for k, v in val.items()})
    if run.stage == "retrain" and val["model"] > state["best_val"]:
        state.update(best_val=val["model"], best_epoch=epoch)
        run.fence()
        storage.save_state(w.run_dir.join("best"), w.model.trainable_state_dict(),
                           BestRecord(epoch, val["model"], w.model.recipe).to_dict())
    return val


def _report(w: Worker, epoch: int, state: dict, metrics: dict, checkpoint: bool) -> None:
    """``ray.train.report`` the epoch, with a checkpoint (``checkpoint_e<epoch>``) when due; in a
    session the checkpoint is written to the run's folder directly (:func:`_save_direct`)."""
    import ray.train

    name = f"checkpoint_e{epoch:05d}"
    if w.session is not None and w.session.direct:
        if checkpoint:
            _save_direct(w, state, name)
        return
    with tempfile.TemporaryDirectory(prefix="noah-ckpt-") as d:
        ckpt = None
        if checkpoint:
            w.run.fence()
            optim.save_checkpoint(d, w.model, w.opt, w.sched, w.scaler, state, w.rank, w.world, w.device)
            ckpt = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name if ckpt else None)


def _save_direct(w: Worker, state: dict, name: str) -> None:
    """Every rank writes its part of checkpoint ``name`` into the run's folder (each part checked by
    its manifest: a partial one is skipped on resume); once all have written, rank 0 deletes the
    checkpoints beyond ``keep_checkpoints`` (what Ray Train's ``num_to_keep`` does for a run)."""
    w.run.fence()
    optim.save_checkpoint(w.run_dir.join(name), w.model, w.opt, w.sched, w.scaler, state, w.rank, w.world,
                          w.device)
    if w.world > 1:
        torch.distributed.barrier()
    keep = w.run.tc.keep_checkpoints
    if w.rank == 0 and keep:
        for old in optim.checkpoint_names(w.run_dir)[keep:]:
            storage.delete(w.run_dir.join(old))


def _finish(w: Worker, state: dict) -> None:
    """Rank 0 after the last epoch: the final artifact; for retraining, the test accuracy of the
    best-on-val weights (evaluated once, here)."""
    from noah_ray.data import build_loader

    run, model, job = w.run, w.model, w.run.job
    assert w.session is not None              # _setup sets it
    meta = _final_meta(run, model, state)
    last = model.trainable_state_dict()
    if run.stage == "supernet":
        meta = dataclasses.replace(meta, space=job.space.to_dict())
        run.fence()
        storage.save_state(w.run_dir.join("final"), last, meta.to_dict())
        return
    best_tensors, best_meta = storage.load_state(w.run_dir.join("best"))
    best = BestRecord.from_dict(best_meta)
    model.load_trainable_state_dict(best_tensors)
    mean, std, size = w.norm
    test_ds = _dataset(run, w.session, job.data.test_split, train=False, norm=w.norm)
    if w.infer is not model:                # the head on cached features
        test_ds = _features(run, w.session, model, test_ds, w.device)
    test = build_loader(job.data, job.data.test_split, train=False, img_size=size, dataset=test_ds)
    meta = dataclasses.replace(meta, test_acc=evaluate(w.infer, test, w.device)[0], best_val=best.val_acc,
                               best_epoch=best.epoch, best_uri=w.run_dir.join("best").uri)
    _say(run, f"[retrain {run.run_id}] test {meta.test_acc:.2f}% with the weights of epoch "
         f"{best.epoch + 1} (val {best.val_acc:.2f}%)")
    run.fence()
    storage.save_state(w.run_dir.join("final"), last, meta.to_dict())


def _final_meta(run: RunSpec, model: PromptedViT, state: dict) -> MetaRecord:
    """``final/meta.json``: what was trained, for how long, and its parameter counts."""
    counts = model.num_trainable()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    modules = sum(v for k, v in counts.items() if k != "head")
    params = trainable - counts["head"] if trains_backbone(run.method) else modules
    plan = run.prune_plan
    return MetaRecord(
        stage=run.stage, run_id=run.run_id, epochs_done=state["epoch"] + 1, num_classes=run.num_classes,
        model=run.job.model.name, backbone=run.backbone, spec=run.spec.content(), seed=run.seed,
        subnet=SubnetConfig.from_json(run.subnet) if run.subnet else None, method=run.method,
        backbone_trained=trains_backbone(run.method), train_time_s=state["train_time_s"], fingerprint=run.fingerprint,
        start_epochs=state["start_epochs"], val_acc=state["val_acc"], params_head=counts["head"],
        recipe=model.recipe, hpo=run.spec.hpo or None,
        prune_plan=run.spec.prune_plan if plan else None, params_materialised=params if plan else None,
        params=plan.effective_params(model.shape, model.kv_shared) if plan else params)


# ----------------------------------------------------------------------------- worker helpers
def _check_same_subnets(digest: str, epoch: int) -> None:
    digests: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"epoch {epoch}: workers trained different subnets ({digests}); "
                           f"every worker must run the same noah_ray version")


def _say(run: RunSpec, msg: str, *, done: int | None = None, total: int | None = None) -> None:
    """One progress line from a worker: to the driver's console (:mod:`noah_ray.progress`), else
    this worker's stdout (not through Ray Train's print patch, which doubles lines)."""
    progress.say(run.progress, msg, tag=f"{run.stage} {run.run_id}", done=done, total=total)


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _progress(run: RunSpec, epoch: int, start: int, metrics: dict, val: dict, state: dict, session_s: float,
              epoch_s: float) -> None:
    tc = run.tc
    eta = session_s / (epoch + 1 - start) * (tc.epochs - epoch - 1)
    shown = " ".join(f"{k} {v:.1f}%" for k, v in list(val.items())[:3])
    if "model" in val:
        shown = f"val {val['model']:.1f}% (best {state['best_val']:.1f}% @ {state['best_epoch'] + 1})"
    _say(run, f"{run.tag} epoch {metrics['epoch']}/{tc.epochs} loss {metrics['train_loss']:.4f} "
         f"lr {metrics['lr']:.2e} {shown + ' ' if shown else ''}{metrics['images_per_s']:.0f} img/s "
         f"{epoch_s:.1f}s/epoch ETA {_fmt_s(eta)}", done=metrics["epoch"], total=tc.epochs)


def _write_metrics(stage_root: storage.Location, run: RunSpec, metrics: dict, val: dict) -> None:
    base = {"run_id": run.run_id, "job": run.job.name, "dataset": run.job.data.dataset, "stage": run.stage,
            "method": run.method, "seed": run.seed, "epoch": metrics["epoch"],
            "train_loss": metrics["train_loss"], "lr": metrics["lr"], "images_per_s": metrics["images_per_s"],
            "timestamp": datetime.now(timezone.utc)}
    rows = [{**base, "subnet": k, "val_acc": v} for k, v in val.items()] or [{**base, "subnet": None,
                                                                              "val_acc": None}]
    run.fence()
    storage.append_table(stage_root, "train_metrics", pa.Table.from_pylist(rows),
                         part=f"{run.metrics_part}-e{metrics['epoch']:05d}")
