"""Ray Train loops: supernet training, subnet retraining and the baselines.

Every stage is a Ray Train ``TorchTrainer`` (DDP: gloo on CPU, nccl on GPU) whose run directory
lives in the job's storage (a local directory or ``s3://``).  Storage layout under
``<storage>/<job.name>/``::

    backbone.safetensors                frozen backbone, written once when model.checkpoint is unset
    supernet/                           Ray Train run of the supernet (RunConfig(name="supernet"))
      spec.json                         what the run trains; a re-run with other settings fails fast
      checkpoint_e00004/                trainable.safetensors, optimizer.safetensors, state.json,
                                        rng_rank<k>.safetensors (the newest keep_checkpoints kept)
      final/                            model.safetensors + meta.json: what load_supernet / search read
      train_metrics/<run>-e00005.parquet   one file per epoch (numbered from 1), one row per evaluated subnet
      named/<name>/                     a named supernet run (train_supernet(run_name=...)), same layout
    retrain/
      runs/<run>-<fp>.parquet           one row per finished run (val-selected epoch, test once)
      train_metrics/<run>-<fp>-e00005.parquet
      <run>/                            run = <method>-seed<k>: the latest finished config of this run
        best/, final/                     best-on-val weights; last weights + meta.json (test accuracy)
        <fp>/                           Ray Train run of one config (fp: hash of subnet + hyper-parameters)
          spec.json, checkpoint_e*/, best/, final/

Epochs are counted from 1 wherever a user sees them: progress lines, the ``train_metrics`` /
``runs`` tables (``epoch``, ``best_epoch``), the metrics reported to Ray Train and the tracking
steps.  Checkpoint names (``checkpoint_e00004`` = after the 5th epoch), checkpoint ``state.json``
and ``meta.json`` keep the 0-based loop index.

Re-running a stage resumes from its last checkpoint (same RunConfig name and storage); a finished
one returns at once.  A worker that dies is restarted (``FailureConfig``) and continues from the
last checkpoint.  Checkpoints hold only what trains (modules + head), the optimiser, schedule,
loss-scaler, epoch and per-rank RNG state, as safetensors + JSON.

Baselines are fixed configs trained by the same loop (widths overridable with
``retrain.baseline_widths``, learning rate with ``retrain.method_lr``): ``linear`` (head only),
``full`` (backbone + head), ``vpt`` (VPT-Deep, 10 tokens per layer), ``adapter`` (bottleneck 8),
``lora`` (rank 8 on q, k, v), ``e2vpt`` (5 visual + 5 key/value prompts per layer).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import pyarrow as pa
import torch
import torch.nn.functional as F

from noah_ray import optim, progress, storage, tracking
from noah_ray.backbones import create_backbone
from noah_ray.config import JobConfig, TrainConfig
from noah_ray.errors import ConfigError
from noah_ray.layout import JobPaths
from noah_ray.prune import PrunePlan, apply_plan, prune
from noah_ray.recipes import LEGACY, RECIPES, Recipe, recorded
from noah_ray.security import safe_name
from noah_ray.space import SearchSpace, SubnetConfig
from noah_ray.supernet import PromptedViT

METHODS = ("noah", "linear", "full", "vpt", "adapter", "lora", "e2vpt")

#: uniform per-layer widths of the baselines (VPT-Deep 10 tokens, Adapter 8, LoRA rank 8, E2VPT 5 + 5)
BASELINE_WIDTHS: dict[str, dict[str, int]] = {
    "linear": {}, "full": {}, "vpt": {"vpt": 10}, "adapter": {"adapter": 8}, "lora": {"lora": 8},
    "e2vpt": {"vpt": 5, "kv_prompt": 5}}
SUPERNET_RUN = "supernet"
ERROR_FILE = "error.json"                 # a worker's non-retryable error, for the driver
BACKBONE_SEED = 0


@dataclass
class TrainResult:
    stage: str
    run_name: str
    epochs_done: int
    final_uri: str
    metrics: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- models and configs
def job_root(job: JobConfig) -> storage.Location:
    return JobPaths.of(job).root


def ensure_backbone(job: JobConfig) -> str | None:
    """The backbone checkpoint every stage and worker loads: ``model.checkpoint``, or (demo, tests)
    a backbone created once with a fixed seed and saved as ``<job>/backbone.safetensors``."""
    if job.model.checkpoint:
        return job.model.checkpoint
    loc = job_root(job).join("backbone.safetensors")
    if not storage.exists(loc):
        from safetensors.torch import save

        rng = torch.random.get_rng_state()
        torch.manual_seed(BACKBONE_SEED)
        vit = create_backbone(job.model.name, 1)
        torch.random.set_rng_state(rng)
        storage.write_bytes(loc, save({k: v.contiguous() for k, v in vit.state_dict().items()
                                       if not k.startswith("head.")}))
    return loc.uri


def subnet_for(method: str, job: JobConfig, subnet: SubnetConfig | None) -> SubnetConfig:
    """The fixed config ``method`` trains (NOAH: ``subnet``; baselines: uniform widths)."""
    if method not in METHODS:
        raise ConfigError(f"method {method!r} unknown; use one of {', '.join(METHODS)}")
    layers = job.space.num_layers
    if method == "noah":
        if subnet is None:
            raise ConfigError("retraining NOAH needs a subnet (the search's best_subnet.yaml or retrain.subnet)")
        if subnet.num_layers != layers:
            raise ConfigError(f"subnet has {subnet.num_layers} layers, the job's space {layers}; "
                              f"give one width per backbone layer")
        return subnet
    widths = {**BASELINE_WIDTHS[method], **job.retrain.baseline_widths.get(method, {})}
    unknown = sorted(set(job.retrain.baseline_widths) - set(BASELINE_WIDTHS))
    if unknown:
        raise ConfigError(f"retrain.baseline_widths: {unknown[0]!r} is not a baseline; "
                          f"use {', '.join(BASELINE_WIDTHS)}")
    return SubnetConfig.uniform(layers, **widths) if any(widths.values()) else SubnetConfig.empty(layers)


def build_model(job: JobConfig, capacity: SubnetConfig | None, backbone_uri: str | None,
                num_classes: int, *, train_backbone: bool = False, method: str = "noah",
                recipe: Recipe | None = None) -> PromptedViT:
    """A PromptedViT of ``capacity`` (None: the search space's supernet) with the job's switches
    and recipe (``recipe``, e.g. one recorded in a checkpoint, or the job's for ``method``)."""
    vit = create_backbone(job.model.name, num_classes, backbone_uri, endpoint=job.storage_endpoint,
                          drop_path_rate=job.model.drop_path_rate)
    model = PromptedViT(vit, capacity or job.space.largest(), lora_scale=job.model.lora_scale,
                        train_backbone=train_backbone, recipe=recipe or job.model.resolved_recipe(method))
    model.set_fused_attn(job.model.fused_attn)
    model.set_grad_checkpointing(job.model.grad_checkpointing)
    model.set_precision(job.model.precision)
    return model


def step_subnet(space: SearchSpace, seed: int, epoch: int, step: int) -> SubnetConfig:
    """The subnet trained at (epoch, step): a pure function of its arguments, so every worker
    picks the same one without communicating."""
    return space.sample(random.Random(f"noah-step:{seed}:{epoch}:{step}"))


#: per sampling rule (``supernet.sampling``): the subnets one step trains, given its random one
SAMPLING: dict[str, Callable[[SearchSpace, SubnetConfig], list[SubnetConfig]]] = {
    "uniform": lambda space, rnd: [rnd],
    "sandwich": lambda space, rnd: [space.largest(), space.smallest(), rnd],
}


def step_subnets(space: SearchSpace, rule: str, seed: int, epoch: int, step: int) -> list[SubnetConfig]:
    """The subnets trained at (epoch, step) under ``rule``; their gradients are averaged into
    one optimiser step (``uniform``: NOAH's one random subnet; ``sandwich``: largest, smallest
    and one random subnet, BigNAS / AttentiveNAS)."""
    return SAMPLING[rule](space, step_subnet(space, seed, epoch, step))


def eval_subnets(job: JobConfig, count: int) -> dict[str, SubnetConfig]:
    """The fixed subnets a supernet is scored on every epoch: smallest, largest, ``count`` random."""
    rng = random.Random(f"noah-eval:{job.supernet.seed}")
    out = {"smallest": job.space.smallest(), "largest": job.space.largest()}
    out.update({f"random_{i}": job.space.sample(rng) for i in range(count)})
    return out


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader, device: torch.device) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        logits = model(x.to(device, non_blocking=True))
        correct += int((logits.argmax(-1).cpu() == y).sum())
        total += int(y.numel())
    return 100.0 * correct / max(total, 1)


def _say(config: dict, msg: str, *, done: int | None = None, total: int | None = None) -> None:
    """One progress line from a worker: to the driver's console (:mod:`noah_ray.progress`), else
    this worker's stdout (not through Ray Train's print patch, which doubles lines)."""
    progress.say(config.get("progress"), msg, tag=f"{config['stage']} {config['run_id']}", done=done, total=total)


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# ----------------------------------------------------------------------------- the worker loop
def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker; ``config`` holds plain data only (never credentials).

    A :class:`ConfigError` (a bad image, a bad file: every retry would fail the same way) is
    written to ``<run>/error.json``, which the driver turns into one line.  With one worker it is
    not raised (Ray Train would restart the worker ``max_failures`` times); with several it is
    (the others may wait in a collective), and each restarted attempt ends at once on the file."""
    import ray.train

    marker = job_root(JobConfig.from_dict(config["job"])).join(config["run_dir"], ERROR_FILE)
    try:
        if storage.exists(marker):
            raise ConfigError(json.loads(storage.read_text(marker))["error"])
        _train_loop(config)
    except ConfigError as e:
        storage.write_text(marker, json.dumps({"error": str(e)}))
        if ray.train.get_context().get_world_size() > 1:
            raise


def _train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader, DistributedSampler

    from noah_ray.data import build_dataset, build_loader, norm_for

    job = JobConfig.from_dict(config["job"])
    stage, seed, lr = config["stage"], config["seed"], config["lr"]
    tc = job.supernet if stage == "supernet" else job.retrain
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for fp32, as timm's train script
    root = job_root(job)
    run_dir = root.join(config["run_dir"])
    tag = f"[{stage} {config['run_id']}]"
    endpoint = job.storage_endpoint

    torch.manual_seed(seed)  # identical initial weights on every rank
    capacity = SubnetConfig.from_json(config["subnet"]) if config["subnet"] else None
    model = build_model(job, capacity, config["backbone"], config["num_classes"],
                        train_backbone=config["method"] == "full", method=config["method"]).to(device)
    if config.get("prune_plan"):  # E2VPT rewinding: the fresh model holds the same initial values
        plan = PrunePlan.from_dict(config["prune_plan"])
        model, capacity = apply_plan(model, plan), plan.config()
    torch.manual_seed(seed + 1_000_003 * (rank + 1))  # independent drop-path / shuffling per rank
    mean, std, size = norm_for(model)
    size = job.data.img_size or size
    ds = build_dataset(job.data, job.data.train_split, train=True, mean=mean, std=std, img_size=size,
                       endpoint=endpoint)
    sampler = DistributedSampler(ds, world, rank, shuffle=True, seed=seed) if world > 1 else None
    nw = job.data.num_workers
    train_loader = DataLoader(ds, batch_size=job.data.batch_size // world, shuffle=sampler is None,
                              sampler=sampler, num_workers=nw, persistent_workers=nw > 0,
                              pin_memory=device.type == "cuda", drop_last=len(ds) >= 2 * job.data.batch_size)
    val_loader = build_loader(job.data, job.data.val_split, train=False, mean=mean, std=std, img_size=size,
                              endpoint=endpoint) if rank == 0 else None
    steps = len(train_loader)
    opt, sched, scaler = make_optimizer(model, tc, lr, steps, device, job.model.precision)
    state = {"epoch": -1, "best_val": -1.0, "best_epoch": -1, "train_time_s": 0.0, "val_acc": {}, "start_epochs": []}
    ckpt = optim.latest_checkpoint(run_dir)
    if ckpt:
        state = optim.restore(ckpt, model, opt, sched, scaler, rank, device)
    elif config.get("init"):       # retrain.init: start from a subnet artifact's weights (same on every rank)
        from noah_ray.interop import load_init_weights

        load_init_weights(model, config["init"], endpoint=endpoint)
    start = state["epoch"] + 1
    state["start_epochs"] = [*state.get("start_epochs", []), start]  # one entry per (re)start
    if rank == 0:
        _say(config, f"{tag} {world} worker(s) on {device.type}, {len(ds)} images, global batch "
             f"{job.data.batch_size}, {steps} steps/epoch, " +
             (f"resuming at epoch {start + 1}/{tc.epochs} from {ckpt['name']}" if ckpt else f"{tc.epochs} epochs"))
    net = ray.train.torch.prepare_model(model, move_to_device=False,
                                        parallel_strategy_kwargs={"find_unused_parameters": True}) \
        if world > 1 else model
    fixed = eval_subnets(job, tc.eval_random_subnets) if stage == "supernet" else {"model": capacity}
    session_t0 = time.time()
    for epoch in range(start, tc.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        t0, digest = time.time(), hashlib.sha1()

        def step_passes(step: int, epoch: int = epoch) -> list:
            """The supernet's subnets of this step (``supernet.sampling``), each as an activation."""
            def activate(cfg: SubnetConfig) -> None:
                model.set_active(cfg)
                digest.update(cfg.key().encode())
            return [lambda c=cfg: activate(c) for cfg in step_subnets(job.space, tc.sampling, seed, epoch, step)]

        sums = train_epoch(net, train_loader, opt, sched, scaler, device,
                           step_passes if stage == "supernet" else None)
        if world > 1:
            if stage == "supernet":
                _check_same_subnets(digest.hexdigest(), epoch)
            torch.distributed.all_reduce(sums)
        elapsed = time.time() - t0
        state["train_time_s"] += elapsed
        loss_sum, batches, images = sums.tolist()
        metrics = {"epoch": epoch + 1, "train_loss": loss_sum / max(batches, 1), "lr": sched.get_last_lr()[0],
                   "images_per_s": images / max(elapsed, 1e-9)}
        last, val = epoch + 1 == tc.epochs, {}
        if rank == 0 and ((epoch + 1) % tc.eval_every == 0 or last):
            for name, cfg in fixed.items():
                model.set_active(cfg)
                val[name] = accuracy(model, val_loader, device)
            state["val_acc"] = val
            metrics.update({f"val_acc_{k}": v for k, v in val.items()})
            if stage == "retrain" and val["model"] > state["best_val"]:
                state.update(best_val=val["model"], best_epoch=epoch)
                storage.save_state(run_dir.join("best"), model.trainable_state_dict(),
                                   {"epoch": epoch, "val_acc": val["model"], "recipe": model.recipe.to_dict()})
        if rank == 0:
            _write_metrics(root.join(stage), job, config, metrics, val)
            tracking.log_metrics(config.get("tracking"), metrics, step=metrics["epoch"])
            _progress(config, tag, tc, epoch, start, metrics, val, state, time.time() - session_t0, elapsed)
        state["epoch"] = epoch
        with tempfile.TemporaryDirectory(prefix="noah-ckpt-") as d:
            checkpoint = None
            if (epoch + 1) % tc.checkpoint_every == 0 or last:
                optim.save_checkpoint(d, model, opt, sched, scaler, state, rank, world, device)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint,
                             checkpoint_dir_name=f"checkpoint_e{epoch:05d}" if checkpoint else None)
        _maybe_fail(config, epoch, rank)
    if rank == 0:
        _finish(config, job, stage, model, run_dir, state, device, mean, std, size)


def make_optimizer(model: torch.nn.Module, tc: TrainConfig, lr: float, steps: int, device: torch.device,
                   precision: str) -> tuple:
    """AdamW (``tc.weight_decay``), the per-step warm-up + cosine schedule over ``tc.epochs`` and
    the fp16 loss scaler (a no-op otherwise): ``(opt, sched, scaler)``."""
    opt = optim.adamw(model, lr, tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, optim.warmup_cosine(tc.epochs * steps, tc.warmup_epochs * steps, min(1.0, tc.min_lr / lr)))
    return opt, sched, torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def train_epoch(net: torch.nn.Module, loader, opt, sched, scaler, device: torch.device,
                passes: Callable[[int], list[Callable[[], None]]] | None = None) -> torch.Tensor:
    """One pass over ``loader`` (cross-entropy, one optimiser and schedule step per batch).
    ``passes(step)``: zero-argument callables (e.g. activating a subnet); the batch's forward and
    backward run once after each, the gradients averaged into the one step (default: once).
    Returns ``[loss sum, batches, images]`` (float64)."""
    net.train()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for step, (x, y) in enumerate(loader):
        todo = passes(step) if passes is not None else [lambda: None]
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=device)
        for before in todo:
            before()
            part = F.cross_entropy(net(x).float(), y) / len(todo)
            scaler.scale(part).backward()
            loss += part.detach()
        scaler.step(opt)
        scaler.update()
        sched.step()
        sums += torch.stack([loss.detach().double(), sums.new_tensor(1.0), sums.new_tensor(float(y.numel()))])
    return sums


def _check_same_subnets(digest: str, epoch: int) -> None:
    digests = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"epoch {epoch}: workers trained different subnets ({digests}); "
                           f"every worker must run the same noah_ray version")


def _progress(config, tag, tc, epoch, start, metrics, val, state, session_s, epoch_s) -> None:
    eta = session_s / (epoch + 1 - start) * (tc.epochs - epoch - 1)
    shown = " ".join(f"{k} {v:.1f}%" for k, v in list(val.items())[:3])
    if "model" in val:
        shown = f"val {val['model']:.1f}% (best {state['best_val']:.1f}% @ {state['best_epoch'] + 1})"
    _say(config, f"{tag} epoch {metrics['epoch']}/{tc.epochs} loss {metrics['train_loss']:.4f} lr {metrics['lr']:.2e} "
         f"{shown + ' ' if shown else ''}{metrics['images_per_s']:.0f} img/s {epoch_s:.1f}s/epoch "
         f"ETA {_fmt_s(eta)}", done=metrics["epoch"], total=tc.epochs)


def _write_metrics(stage_root, job, config, metrics, val: dict) -> None:
    base = {"run_id": config["run_id"], "job": job.name, "dataset": job.data.dataset, "stage": config["stage"],
            "method": config["method"], "seed": config["seed"], "epoch": metrics["epoch"],
            "train_loss": metrics["train_loss"], "lr": metrics["lr"], "images_per_s": metrics["images_per_s"],
            "timestamp": datetime.now(timezone.utc)}
    rows = [{**base, "subnet": k, "val_acc": v} for k, v in val.items()] or [{**base, "subnet": None,
                                                                              "val_acc": None}]
    storage.append_table(stage_root, "train_metrics", pa.Table.from_pylist(rows),
                         part=f"{config['metrics_part']}-e{metrics['epoch']:05d}")


def _maybe_fail(config: dict, epoch: int, rank: int) -> None:
    """Test hook: fail once after ``epoch`` (``raise`` an error or ``kill`` the worker process)."""
    for i, (at, mode) in enumerate(config.get("faults") or []):
        marker = os.path.join(config["fault_dir"], f"fault-{i}")
        if at == epoch and rank == 0 and not os.path.exists(marker):
            open(marker, "w").close()
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure after epoch {epoch}")


def _finish(config, job, stage, model, run_dir, state, device, mean, std, size) -> None:
    """Rank 0 after the last epoch: the final artifact; for retraining, the test accuracy of the
    best-on-val weights (evaluated once, here)."""
    from noah_ray.data import build_loader

    counts = model.num_trainable()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    meta = {"stage": stage, "run_id": config["run_id"], "epochs_done": state["epoch"] + 1,
            "epochs": state["epoch"] + 1, "num_classes": config["num_classes"], "model": job.model.name,
            "backbone": config["backbone"], "spec": config["spec"], "seed": config["seed"],
            "subnet": json.loads(config["subnet"]) if config["subnet"] else None,    # SubnetConfig.to_dict()
            "method": config["method"], "backbone_trained": config["method"] == "full",
            "train_time_s": state["train_time_s"],
            "fingerprint": config["fingerprint"], "start_epochs": state["start_epochs"],
            "val_acc": state["val_acc"], "params_head": counts["head"], "recipe": model.recipe.to_dict(),
            "params": trainable - counts["head"] if config["method"] == "full" else
            sum(v for k, v in counts.items() if k != "head")}
    if config["spec"].get("hpo"):
        meta["hpo"] = config["spec"]["hpo"]
    if config.get("prune_plan"):
        meta["prune_plan"] = config["prune_plan"]
        meta["params_materialised"] = meta["params"]
        meta["params"] = PrunePlan.from_dict(config["prune_plan"]).effective_params(model.shape, model.kv_shared)
    last = model.trainable_state_dict()
    if stage == "supernet":
        meta["space"] = job.space.to_dict()
        storage.save_state(run_dir.join("final"), last, meta)
        return
    best, best_meta = storage.load_state(run_dir.join("best"))
    model.load_trainable_state_dict(best)
    test = build_loader(job.data, job.data.test_split, train=False, mean=mean, std=std, img_size=size,
                        endpoint=job.storage_endpoint)
    meta.update(test_acc=accuracy(model, test, device), best_val=best_meta["val_acc"], best_epoch=best_meta["epoch"],
                best_uri=run_dir.join("best").uri)
    _say(config, f"[retrain {config['run_id']}] test {meta['test_acc']:.2f}% with the weights of epoch "
         f"{best_meta['epoch'] + 1} (val {best_meta['val_acc']:.2f}%)")
    storage.save_state(run_dir.join("final"), last, meta)


# ----------------------------------------------------------------------------- drivers
def _spec(job: JobConfig, stage: str, method: str, subnet: SubnetConfig | None, lr: float, seed: int,
          num_classes: int) -> dict:
    """What defines a run (its checkpoints are only valid for this); ``epochs`` may grow."""
    tc, d, m = (job.supernet if stage == "supernet" else job.retrain), job.data, job.model
    recipe = m.resolved_recipe(method)
    spec = {"stage": stage, "method": method, "model": m.name, "checkpoint": m.checkpoint,
            "drop_path_rate": m.drop_path_rate, "lora_scale": m.lora_scale, "kv_shared": recipe.kv_shared,
            "recipe": recipe.to_dict(),
            "space": job.space.to_dict() if stage == "supernet" else None,
            "subnet": subnet.to_dict() if subnet else None, "num_classes": num_classes,
            "data": {"dataset": d.dataset, "format": d.format, "train_split": d.train_split,
                     "batch_size": d.batch_size, "img_size": d.img_size, "shots": d.shots, "seed": d.seed},
            "lr": lr, "weight_decay": tc.weight_decay, "warmup_epochs": tc.warmup_epochs,
            "min_lr": tc.min_lr, "seed": seed,
            **({"sampling": tc.sampling} if stage == "supernet" else {})}
    if stage == "retrain" and method == "noah" and job.retrain.init:
        spec["init"] = job.retrain.init       # only when set: the fingerprints of other runs stay as they were
    return spec


def _fingerprint(spec: dict) -> str:
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


def _check_spec(run_dir: storage.Location, spec: dict) -> None:
    loc = run_dir.join("spec.json")
    if storage.exists(loc):
        old = json.loads(storage.read_text(loc))
        old.setdefault("recipe", RECIPES[LEGACY].to_dict())  # a run from before recipes existed
        old.setdefault("sampling", "uniform")                # a supernet from before sampling rules
        diff = next((k for k in spec if old.get(k) != spec[k]), None)
        if diff is not None:
            raise ConfigError(f"{run_dir.uri!r} was trained with {diff} = {json.dumps(old.get(diff))[:120]}, "
                              f"this job has {json.dumps(spec[diff])[:120]}; restore the setting, or use "
                              f"another run_name or job name")
    else:
        storage.write_text(loc, json.dumps(spec, indent=1, sort_keys=True))


def _preflight(job: JobConfig, tc: TrainConfig, splits: tuple[str, ...]) -> int:
    """Everything that can be checked before Ray starts: storage, batch split, data files."""
    from noah_ray.data import build_dataset, num_classes

    storage.check_writable(storage.resolve(job.storage, job.storage_endpoint))
    if job.data.batch_size % tc.num_workers:
        raise ConfigError(f"data.batch_size {job.data.batch_size} does not split evenly over "
                          f"{tc.num_workers} workers; use a multiple of {tc.num_workers}")
    n = num_classes(job.data, endpoint=job.storage_endpoint)
    light = dataclasses.replace(job.data, cache_decoded=False, skip_corrupt=False)
    for split in splits:
        build_dataset(light, split, train=False, endpoint=job.storage_endpoint)
    if job.model.checkpoint and not storage.exists(storage.resolve(job.model.checkpoint, job.storage_endpoint)):
        raise ConfigError(f"model.checkpoint {job.model.checkpoint!r} does not exist; check the path")
    return n


def _fit(job: JobConfig, stage: str, run_id: str, run_dir: str, *, method: str, seed: int,
         subnet: SubnetConfig | None, lr: float, spec: dict, num_classes: int, metrics_part: str,
         fingerprint: str | None = None, faults: list | None = None, prune_plan: dict | None = None,
         init: str | None = None) -> dict:
    """Run (or resume, or skip when finished) one Ray Train run; returns the final meta."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    tc = job.supernet if stage == "supernet" else job.retrain
    loc = job_root(job).join(run_dir)
    _check_spec(loc, spec)
    final = loc.join("final", "meta.json")
    if storage.exists(final):
        meta = json.loads(storage.read_text(final))
        if meta.get("epochs_done", 0) >= tc.epochs:
            progress.echo(f"[{stage} {run_id}] finished earlier ({meta['epochs_done']} epochs) at {loc.uri}")
            return meta
    ref = tracking.start_run(job, stage, run_id, extra=tracking.chosen_params(spec.get("hpo")))
    config = {"job": job.to_dict(), "stage": stage, "run_id": run_id, "run_dir": run_dir,
              "fingerprint": fingerprint, "metrics_part": metrics_part, "method": method, "seed": seed, "lr": lr,
              "subnet": subnet.to_json() if subnet else None, "backbone": ensure_backbone(job),
              "num_classes": num_classes, "spec": spec, "faults": faults, "prune_plan": prune_plan, "init": init,
              "progress": progress.sink_name(), "tracking": ref.to_dict() if ref else None,
              "fault_dir": tempfile.mkdtemp(prefix="noah-faults-") if faults else None}
    parent = loc.path.rsplit("/", 1)[0]
    trainer = TorchTrainer(
        train_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker,
                                                           **({"GPU": 1} if tc.use_gpu else {})}),
        run_config=RunConfig(name=run_dir.rsplit("/", 1)[-1], storage_path=parent, storage_filesystem=loc.fs,
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints)))
    error = loc.join(ERROR_FILE)
    if storage.exists(error):                    # left by an earlier attempt whose cause may be fixed now
        loc.fs.delete_file(error.path)
    try:
        with storage.tidy(job_root(job)):
            trainer.fit()
        if storage.exists(error):
            raise ConfigError(json.loads(storage.read_text(error))["error"])
    except TrainingFailedError as e:
        tracking.end_run(ref, "FAILED")
        _raise_config_error(e)
        raise
    except BaseException:
        tracking.end_run(ref, "FAILED")
        raise
    finally:
        progress.drain()         # the workers' last lines before the driver's next one
    meta = json.loads(storage.read_text(final))
    tracking.finish_training(job, stage, ref, meta)
    return meta


def _raise_config_error(err: BaseException) -> None:
    """A ConfigError raised inside a worker reaches the caller as itself (one line)."""
    seen, todo = set(), [err, *getattr(err, "worker_failures", {}).values()]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ConfigError):
            raise ConfigError(str(e)) from None
        todo += [getattr(e, "cause", None), e.__cause__]


def _check_run_name(name: str) -> str:
    return safe_name(name, "supernet run name")


def supernet_recovery(final: storage.Location) -> str:
    """How to recover from a damaged ``supernet/final``: the run resumes from its last checkpoint."""
    return (f"delete {final.uri} and run the supernet stage again (it resumes from its last checkpoint "
            f"and writes final/ anew)")


def _supernet_dir(run_name: str | None) -> str:
    return "supernet" if run_name in (None, SUPERNET_RUN) else f"supernet/named/{_check_run_name(run_name)}"


def train_supernet(job: JobConfig, *, run_name: str | None = None, _faults: list | None = None) -> TrainResult:
    """Train the job's supernet, a random subnet per step (the same on every worker); resumes
    from the last checkpoint if run before, returns at once if finished.

    ``_faults`` (tests): ``[(epoch, "raise" | "kill"), ...]``, each triggered once on rank 0."""
    tc = job.supernet
    run_id, run_dir = run_name or SUPERNET_RUN, _supernet_dir(run_name)
    n = _preflight(job, tc, (job.data.train_split, job.data.val_split))
    spec = _spec(job, "supernet", "noah", None, tc.lr, tc.seed, n)
    meta = _fit(job, "supernet", run_id, run_dir, method="noah", seed=tc.seed, subnet=None, lr=tc.lr,
                spec=spec, num_classes=n, metrics_part=run_id, faults=_faults)
    return TrainResult("supernet", run_id, meta["epochs_done"], job_root(job).join(run_dir, "final").uri,
                       {f"val_acc_{k}": v for k, v in meta.get("val_acc", {}).items()})


def _finished(run_dir: storage.Location, spec: dict, epochs: int) -> bool:
    """Whether ``run_dir`` holds a finished run of ``spec`` with at least ``epochs`` epochs."""
    spec_loc, final = run_dir.join("spec.json"), run_dir.join("final", "meta.json")
    if not (storage.exists(spec_loc) and storage.exists(final)):
        return False
    try:
        same = json.loads(storage.read_text(spec_loc)) == json.loads(json.dumps(spec))
        return same and json.loads(storage.read_text(final)).get("epochs_done", 0) >= epochs
    except ValueError:
        return False


def supernet_done(job: JobConfig, num_classes: int) -> bool:
    """Whether the job's supernet is trained (so the stage only reads it back)."""
    tc = job.supernet
    spec = _spec(job, "supernet", "noah", None, tc.lr, tc.seed, num_classes)
    return _finished(job_root(job).join(_supernet_dir(None)), spec, tc.epochs)


def retrain_done(job: JobConfig, subnet: SubnetConfig | None, method: str, seed: int, num_classes: int,
                 hpo: dict | None = None) -> bool:
    """Whether retraining ``method`` with ``seed`` finished earlier (E2VPT with pruning: unknown, False)."""
    if method == "e2vpt" and job.prune is not None:
        return False
    cfg = subnet_for(method, job, subnet)
    lr = float(job.retrain.method_lr.get(method, job.retrain.lr))
    spec = _spec(job, "retrain", method, cfg, lr, seed, num_classes)
    if hpo:
        spec["hpo"] = hpo
    run_id = f"{method}-seed{seed}"
    return _finished(job_root(job).join("retrain", run_id, _fingerprint(spec)), spec, job.retrain.epochs)


def load_supernet(job: JobConfig, run_name: str | None = None) -> PromptedViT:
    """The trained supernet of ``job`` (its backbone + the final trainable weights), in eval mode."""
    final = job_root(job).join(_supernet_dir(run_name), "final")
    if not storage.exists(final.join("meta.json")):
        raise ConfigError(f"no trained supernet at {final.uri!r}; run the supernet stage first")
    tensors, meta = storage.load_state(final, supernet_recovery(final))
    backbone = job.model.checkpoint or job_root(job).join("backbone.safetensors").uri
    model = build_model(job, None, backbone, int(meta["num_classes"]), recipe=recorded(meta))
    model.load_trainable_state_dict(tensors)
    return model.eval()


def retrain(job: JobConfig, subnet: SubnetConfig | None, *, method: str = "noah", seed: int = 0,
            hpo: dict | None = None, _faults: list | None = None) -> TrainResult:
    """Train one fixed config from scratch on ``data.train_split``; pick the epoch on
    ``data.val_split``, evaluate ``data.test_split`` once with it; add a row to ``runs``.

    With a ``prune`` section, ``e2vpt`` then prunes the trained prompts (token-wise, then
    segment-wise, scored on training batches), rewinds the kept ones to their initial values and
    retrains them: a second run and row, ``e2vpt-pruned``, which is what is returned.

    ``hpo`` (from :mod:`noah_ray.hpo`: the chosen values and their trial) is recorded with the run:
    in its spec and ``meta.json`` (key ``hpo``) and the ``runs`` row (``hpo_json``)."""
    cfg = subnet_for(method, job, subnet)
    tc = job.retrain
    lr = float(tc.method_lr.get(method, tc.lr))
    n = _preflight(job, tc, (job.data.train_split, job.data.val_split, job.data.test_split))
    init = tc.init if method == "noah" else None
    if init:
        from noah_ray.interop import check_init_artifact

        check_init_artifact(init, model_name=job.model.name, subnet=cfg, num_classes=n, endpoint=job.storage_endpoint)
    result = _retrain_run(job, method, cfg, lr, seed, n, faults=_faults, hpo=hpo, init=init)
    if method != "e2vpt" or job.prune is None:
        return result
    plan = _prune_plan(job, cfg, seed, n, result.metrics["checkpoint_uri"])
    return _retrain_run(job, "e2vpt-pruned", cfg, lr, seed, n, prune_plan=plan, hpo=hpo)


def _retrain_run(job: JobConfig, label: str, cfg: SubnetConfig, lr: float, seed: int, n: int, *,
                 faults: list | None = None, prune_plan: dict | None = None, hpo: dict | None = None,
                 init: str | None = None) -> TrainResult:
    method = "e2vpt" if prune_plan else label
    run_id = f"{label}-seed{seed}"
    spec = _spec(job, "retrain", method, cfg, lr, seed, n)
    if prune_plan:
        spec["prune_plan"] = prune_plan
    if hpo:
        spec["hpo"] = hpo
    fp = _fingerprint(spec)
    meta = _fit(job, "retrain", run_id, f"retrain/{run_id}/{fp}", method=method, seed=seed, subnet=cfg, lr=lr,
                spec=spec, num_classes=n, metrics_part=f"{run_id}-{fp}", fingerprint=fp, faults=faults,
                prune_plan=prune_plan, init=init)
    root = job_root(job)
    _publish(root.join("retrain", run_id, fp), root.join("retrain", run_id), fp)
    trained = PrunePlan.from_dict(prune_plan).config() if prune_plan else cfg
    row = {"run_id": run_id, "job": job.name, "dataset": job.data.dataset, "method": label, "seed": seed,
           "config_json": trained.to_json(), "params": meta["params"], "params_head": meta["params_head"],
           "val_acc": meta["best_val"], "test_acc": meta["test_acc"], "best_epoch": meta["best_epoch"] + 1,
           "epochs": meta["epochs_done"], "wall_time_s": meta["train_time_s"], "checkpoint_uri": meta["best_uri"],
           "timestamp": datetime.now(timezone.utc), "hpo_json": json.dumps(hpo, sort_keys=True) if hpo else None}
    if hpo and hpo.get("val_acc") is not None:   # a tuned run trains on its val images: report the search's val
        row["val_acc"] = hpo["val_acc"]
    storage.append_table(root.join("retrain"), "runs", pa.Table.from_pylist([row]), part=f"{run_id}-{fp}")
    progress.echo(f"[retrain] {label} seed {seed}: val {row['val_acc']:.2f}% (epoch {row['best_epoch']}) "
                  f"test {row['test_acc']:.2f}% params {row['params'] / 1e6:.4f}M")
    return TrainResult("retrain", run_id, meta["epochs_done"], root.join("retrain", run_id, fp, "final").uri,
                       {**row, "fingerprint": fp})


def _prune_plan(job: JobConfig, cfg: SubnetConfig, seed: int, n: int, best_uri: str) -> dict:
    """Score the trained E2VPT prompts (best-on-val weights at ``best_uri``) on training batches
    in a Ray task (the retraining's resources) and plan the pruning; the plan is stored next to
    the weights (``prune_plan.json``) and reused when the job is re-run."""
    import ray

    loc = storage.resolve(best_uri, job.storage_endpoint).join("prune_plan.json")
    want = {"prune": dataclasses.asdict(job.prune), "weights": best_uri}
    if storage.exists(loc):
        saved = json.loads(storage.read_text(loc))
        if saved.get("for") == want:
            return saved["plan"]
    tc = job.retrain
    task = ray.remote(_score_and_plan).options(num_cpus=tc.cpus_per_worker, num_gpus=1 if tc.use_gpu else 0)
    plan = ray.get(task.remote(job.to_dict(), cfg.to_json(), ensure_backbone(job), n, best_uri, seed))
    storage.write_text(loc, json.dumps({"for": want, "plan": plan}, indent=1))
    return plan


def _score_and_plan(job_dict: dict, cfg_json: str, backbone: str | None, n: int, best_uri: str, seed: int) -> dict:
    from noah_ray.data import build_loader, norm_for

    job = JobConfig.from_dict(job_dict)
    device = torch.device("cuda" if job.retrain.use_gpu and torch.cuda.is_available() else "cpu")
    tensors, meta = storage.load_state(storage.resolve(best_uri, job.storage_endpoint))
    model = build_model(job, SubnetConfig.from_json(cfg_json), backbone, n, recipe=recorded(meta)).to(device)
    model.load_trainable_state_dict(tensors)
    mean, std, size = norm_for(model)
    torch.manual_seed(seed)
    batches = build_loader(job.data, job.data.train_split, train=False, mean=mean, std=std,
                           img_size=job.data.img_size or size, shuffle=True, endpoint=job.storage_endpoint)
    _, plan = prune(model, batches, job.prune)
    return plan.to_dict()


def _publish(attempt: storage.Location, alias: storage.Location, fp: str) -> None:
    """Make ``<run>/best`` and ``<run>/final`` hold this config's result (meta.json written last)."""
    current = alias.join("final", "meta.json")
    if storage.exists(current) and json.loads(storage.read_text(current)).get("fingerprint") == fp:
        return
    for part in ("best", "final"):
        for name in ("model.safetensors", "meta.json"):
            storage.write_bytes(alias.join(part, name), storage.read_bytes(attempt.join(part, name)))


def retrain_seeds(job: JobConfig, subnet: SubnetConfig | None, method: str = "noah",
                  hpo: dict | None = None) -> dict:
    """Retrain for every seed in ``retrain.seeds``; test accuracy as mean and (population) std."""
    results = [retrain(job, subnet, method=method, seed=s, hpo=hpo) for s in job.retrain.seeds]
    accs = [r.metrics["test_acc"] for r in results]
    return {"method": results[0].metrics["method"], "test_acc_mean": statistics.fmean(accs),
            "test_acc_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0, "runs": accs,
            "val_acc_mean": statistics.fmean(r.metrics["val_acc"] for r in results),
            "run_ids": [r.run_name for r in results]}
