"""Ray Train loops: supernet training, subnet retraining and the baselines.

Storage layout under ``<storage>/<job.name>/``::

    backbone.safetensors            the frozen backbone, when the job names no checkpoint
    supernet/ray/<run>/...          Ray Train run (checkpoints: trainable params + optimiser state)
    supernet/final/                 model.safetensors + meta.json (what search loads)
    supernet/train_metrics/         Parquet, one file per epoch (idempotent on resume)
    retrain/ray/<run>/...           one Ray Train run per (method, seed)
    retrain/<run>/best/             best-on-val weights of that run
    retrain/train_metrics/, retrain/runs/   Parquet

Re-running the same job resumes every stage from its last checkpoint (Ray Train V2: same
``RunConfig(name, storage_path)``); a worker that dies is restarted (``FailureConfig``) and
continues from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import torch
import torch.nn.functional as F

from noah_ray import storage
from noah_ray.backbones import create_backbone
from noah_ray.config import JobConfig, TrainConfig
from noah_ray.space import ConfigError, SubnetConfig
from noah_ray.supernet import PromptedViT

METHODS = ("noah", "linear", "full", "vpt", "adapter", "lora", "e2vpt")

#: fixed configs of the baselines (uniform widths in every layer), as in the papers' tables
BASELINE_WIDTHS = {"linear": {}, "full": {}, "vpt": {"vpt": 10}, "adapter": {"adapter": 8},
                   "lora": {"lora": 8}, "e2vpt": {"vpt": 10, "kv_prompt": 5}}


@dataclass
class TrainResult:
    stage: str
    run_name: str
    epochs_done: int
    final_uri: str
    metrics: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers
def job_root(job: JobConfig) -> storage.Location:
    return storage.resolve(job.storage, job.storage_endpoint).join(job.name)


def ensure_backbone(job: JobConfig) -> str | None:
    """The backbone checkpoint every stage loads.  With no ``model.checkpoint`` (demo, tests),
    a backbone is created once with a fixed seed and saved to ``<job>/backbone.safetensors``."""
    if job.model.checkpoint:
        return job.model.checkpoint
    loc = job_root(job).join("backbone.safetensors")
    if not storage.exists(loc):
        from safetensors.torch import save

        gen_state = torch.random.get_rng_state()
        torch.manual_seed(job.supernet.seed)
        vit = create_backbone(job.model.name, 1)
        torch.random.set_rng_state(gen_state)
        state = {k: v.contiguous() for k, v in vit.state_dict().items() if not k.startswith("head.")}
        storage.write_bytes(loc, save(state))
    return loc.uri


def _num_classes(job: JobConfig) -> int:
    from noah_ray.data import num_classes

    return num_classes(job.data)


def subnet_for(method: str, job: JobConfig, subnet: SubnetConfig | None) -> SubnetConfig:
    if method not in METHODS:
        raise ConfigError(f"method {method!r} unknown; use one of {', '.join(METHODS)}")
    layers = job.space.num_layers
    if method == "noah":
        if subnet is None:
            raise ConfigError("retraining NOAH needs a subnet (the search's best_subnet.yaml or retrain.subnet)")
        return job.space.validate(subnet)
    return SubnetConfig.uniform(layers, **BASELINE_WIDTHS[method]) if BASELINE_WIDTHS[method] \
        else SubnetConfig.empty(layers)


def build_model(job: JobConfig, capacity: SubnetConfig | None, backbone_uri: str | None,
                num_classes: int, *, train_backbone: bool = False) -> PromptedViT:
    """A PromptedViT of ``capacity`` (None: the search space's supernet) with the job's switches."""
    vit = create_backbone(job.model.name, num_classes, backbone_uri, endpoint=job.storage_endpoint,
                          drop_path_rate=job.model.drop_path_rate)
    model = PromptedViT(vit, capacity or job.space.largest(), lora_scale=job.model.lora_scale,
                        kv_shared=job.model.kv_shared, train_backbone=train_backbone)
    model.set_fused_attn(job.model.fused_attn)
    model.set_grad_checkpointing(job.model.grad_checkpointing)
    model.set_precision(job.model.precision)
    return model


def lr_lambda(total_steps: int, warmup_steps: int):
    """Linear warm-up then cosine decay, per step."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def eval_subnets(job: JobConfig, count: int) -> dict[str, SubnetConfig]:
    """The fixed subnets a supernet is evaluated on every epoch."""
    rng = random.Random(job.supernet.seed + 7919)
    out = {"smallest": job.space.smallest(), "largest": job.space.largest()}
    out.update({f"random_{i}": job.space.sample(rng) for i in range(count)})
    return out


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader, device) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        logits = model(x.to(device))
        correct += int((logits.argmax(-1).cpu() == y).sum())
        total += int(y.numel())
    return 100.0 * correct / max(total, 1)


def _now() -> datetime:
    return datetime.now(timezone.utc)


# ----------------------------------------------------------------------------- the loop
def _loaders(job: JobConfig, model: PromptedViT, train_split: str, rank: int, world: int):
    from torch.utils.data import DataLoader, DistributedSampler

    from noah_ray.data import build_dataset, build_loader, norm_for

    mean, std, size = norm_for(model)
    size = job.data.img_size or size
    ds = build_dataset(job.data, train_split, train=True, mean=mean, std=std, img_size=size)
    sampler = DistributedSampler(ds, world, rank, shuffle=True, seed=job.supernet.seed) if world > 1 else None
    per_worker = max(1, job.data.batch_size // world)
    train = DataLoader(ds, batch_size=per_worker, shuffle=sampler is None, sampler=sampler,
                       num_workers=job.data.num_workers, persistent_workers=job.data.num_workers > 0,
                       drop_last=len(ds) >= per_worker * world * 2)
    val = build_loader(job.data, job.data.val_split, train=False, mean=mean, std=std, img_size=size)
    return train, val, sampler


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker; ``config`` holds plain data only (no credentials)."""
    import ray.train
    import ray.train.torch

    job = JobConfig.from_dict(config["job"])
    stage, tc = config["stage"], _train_config(config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    seed = config["seed"]
    torch.manual_seed(seed)
    capacity = SubnetConfig.from_json(config["subnet"]) if config["subnet"] else None
    model = build_model(job, capacity, config["backbone"], config["num_classes"],
                        train_backbone=config["method"] == "full")
    train_loader, val_loader, sampler = _loaders(job, model, config["train_split"], rank, world)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    steps_per_epoch = len(train_loader)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(tc.epochs * steps_per_epoch, tc.warmup_epochs * steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=job.model.precision == "fp16")
    start_epoch, best = 0, {"val_acc": -1.0, "epoch": -1}
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            from safetensors.torch import load_file

            model.load_trainable_state_dict(load_file(os.path.join(d, "trainable.safetensors")))
            extra = torch.load(os.path.join(d, "train_state.pt"), map_location="cpu", weights_only=False)
            opt.load_state_dict(extra["optimizer"])
            sched.load_state_dict(extra["scheduler"])
            scaler.load_state_dict(extra["scaler"])
            torch.random.set_rng_state(extra["torch_rng"])
            start_epoch, best = extra["epoch"] + 1, extra["best"]
        if rank == 0:
            print(f"[{stage}] resuming from epoch {start_epoch}", flush=True)
    ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True}) \
        if world > 1 else model
    root = storage.resolve(job.storage, job.storage_endpoint).join(job.name)
    fixed = eval_subnets(job, tc.eval_random_subnets) if stage == "supernet" else {"model": capacity}
    t_start = time.time()
    for epoch in range(start_epoch, tc.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        t0, seen, loss_sum, n_batches = time.time(), 0, 0.0, 0
        for step, (x, y) in enumerate(train_loader):
            if stage == "supernet":  # same subnet on every worker in this step
                model.set_active(job.space.sample(random.Random(hash((seed, epoch, step)))))
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(ddp(x).float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            loss_sum, n_batches, seen = loss_sum + loss.item(), n_batches + 1, seen + int(y.numel()) * world
        ips = seen / max(time.time() - t0, 1e-9)
        metrics = {"epoch": epoch, "train_loss": loss_sum / max(n_batches, 1), "images_per_s": ips,
                   "lr": sched.get_last_lr()[0]}
        do_eval = (epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.epochs
        do_ckpt = (epoch + 1) % tc.checkpoint_every == 0 or epoch + 1 == tc.epochs
        rows = []
        if rank == 0 and do_eval:
            for name, cfg in fixed.items():
                model.set_active(cfg)
                acc = accuracy(model, val_loader, device)
                metrics[f"val_acc_{name}"] = acc
                rows.append({"subnet": name, "val_acc": acc})
            if stage != "supernet" and metrics["val_acc_model"] > best["val_acc"]:
                best = {"val_acc": metrics["val_acc_model"], "epoch": epoch}
                storage.save_state(root.join(config["run_dir"], "best"), model.trainable_state_dict(),
                                   {"epoch": epoch, "val_acc": best["val_acc"]})
        if rank == 0:
            _write_metrics(root.join(stage), job, stage, config, epoch, metrics, rows)
            done = epoch + 1 - start_epoch
            eta = (time.time() - t_start) / done * (tc.epochs - epoch - 1)
            shown = metrics.get("val_acc_largest", metrics.get("val_acc_model"))
            print(f"[{stage}] epoch {epoch + 1}/{tc.epochs} loss {metrics['train_loss']:.4f} "
                  + (f"val {shown:.1f}% " if shown is not None else "")
                  + f"{ips:.0f} img/s ETA {eta:.0f}s", flush=True)
        checkpoint = None
        tmp = None
        if do_ckpt and rank == 0:
            tmp = tempfile.mkdtemp(prefix="noah-ckpt-")
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous().cpu() for k, v in model.trainable_state_dict().items()},
                      os.path.join(tmp, "trainable.safetensors"))
            torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "scaler": scaler.state_dict(), "torch_rng": torch.random.get_rng_state(),
                        "epoch": epoch, "best": best}, os.path.join(tmp, "train_state.pt"))
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump({"epoch": epoch, "stage": stage}, f)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({k: v for k, v in metrics.items()}, checkpoint=checkpoint)
        fail_at = config.get("fail_once_at_epoch")
        if fail_at is not None and epoch == fail_at and rank == 0 and not os.path.exists(config["fail_marker"]):
            open(config["fail_marker"], "w").close()
            raise RuntimeError(f"injected failure after epoch {epoch}")
    if rank == 0:
        meta = {"stage": stage, "epochs": tc.epochs, "num_classes": config["num_classes"],
                "model": job.model.name, "backbone": config["backbone"], "space": job.space.to_dict(),
                "subnet": config["subnet"], "best": best}
        storage.save_state(root.join(config["run_dir"], "final"), model.trainable_state_dict(), meta)


def _train_config(data: dict) -> TrainConfig:
    return TrainConfig(**{**data, "seeds": tuple(data["seeds"]), "baselines": tuple(data["baselines"])})


def _write_metrics(stage_root, job, stage, config, epoch, metrics, rows) -> None:
    base = {"run_id": config["run_name"], "job": job.name, "dataset": job.data.dataset, "stage": stage,
            "method": config["method"], "seed": config["seed"], "epoch": epoch,
            "train_loss": metrics["train_loss"], "lr": metrics["lr"], "images_per_s": metrics["images_per_s"],
            "timestamp": _now()}
    rows = rows or [{"subnet": None, "val_acc": None}]
    table = pa.Table.from_pylist([{**base, **r} for r in rows])
    storage.append_table(stage_root, "train_metrics", table, part=f"{config['run_name']}-e{epoch:05d}")


# ----------------------------------------------------------------------------- drivers
def _fit(job: JobConfig, stage: str, run_name: str, run_dir: str, tc: TrainConfig, *, method: str,
         seed: int, subnet: SubnetConfig | None, train_split: str, _fail_once_at_epoch: int | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    root = storage.resolve(job.storage, job.storage_endpoint)
    storage.check_writable(root)
    backbone = ensure_backbone(job)
    num_classes = _num_classes(job)
    config = {"job": job.to_dict(), "stage": stage, "train": dataclasses.asdict(tc),
              "seed": seed, "method": method, "subnet": subnet.to_json() if subnet else None,
              "backbone": backbone, "num_classes": num_classes, "train_split": train_split,
              "run_name": run_name, "run_dir": run_dir}
    if _fail_once_at_epoch is not None:
        config["fail_once_at_epoch"] = _fail_once_at_epoch
        config["fail_marker"] = os.path.join(tempfile.gettempdir(), f"noah-fail-{job.name}-{run_name}-{os.getpid()}")
    ray_root = root.join(job.name, stage, "ray")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker,
                                                           **({"GPU": 1} if tc.use_gpu else {})}),
        run_config=RunConfig(name=run_name, storage_path=ray_root.path, storage_filesystem=ray_root.fs,
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    final = root.join(job.name, run_dir, "final")
    _, meta = storage.load_state(final)
    return TrainResult(stage, run_name, meta["epochs"], final.uri, dict(result.metrics or {}))


def train_supernet(job: JobConfig, *, run_name: str | None = None,
                   _fail_once_at_epoch: int | None = None) -> TrainResult:
    """Train the job's supernet (a random subnet per step); resumes if run before."""
    run_name = run_name or "supernet"
    return _fit(job, "supernet", run_name, "supernet", job.supernet, method="noah", seed=job.supernet.seed,
                subnet=None, train_split=job.data.train_split, _fail_once_at_epoch=_fail_once_at_epoch)


def load_supernet(job: JobConfig, run_name: str | None = None) -> PromptedViT:
    """The trained supernet of ``job`` (backbone + the saved trainable weights)."""
    final = job_root(job).join("supernet", "final")
    if not storage.exists(final.join("meta.json")):
        raise ConfigError(f"no trained supernet at {final.uri!r}; run the supernet stage first")
    tensors, meta = storage.load_state(final)
    model = build_model(job, None, meta["backbone"], meta["num_classes"])
    model.load_trainable_state_dict(tensors)
    return model.eval()


def retrain(job: JobConfig, subnet: SubnetConfig | None, *, method: str = "noah", seed: int = 0,
            _fail_once_at_epoch: int | None = None) -> TrainResult:
    """Train one fixed config from scratch; select the epoch on val, evaluate test once; add a
    row to the ``runs`` table."""
    cfg = subnet_for(method, job, subnet)
    run_name = f"{method}-seed{seed}"
    t0 = time.time()
    res = _fit(job, "retrain", run_name, f"retrain/{run_name}", job.retrain, method=method, seed=seed,
               subnet=cfg, train_split=job.data.train_split, _fail_once_at_epoch=_fail_once_at_epoch)
    root = job_root(job)
    tensors, best = storage.load_state(root.join("retrain", run_name, "best"))
    model = build_model(job, cfg, ensure_backbone(job), _num_classes(job), train_backbone=method == "full")
    model.load_trainable_state_dict(tensors)
    from noah_ray.data import build_loader, norm_for

    mean, std, size = norm_for(model)
    test = build_loader(job.data, job.data.test_split, train=False, mean=mean, std=std,
                        img_size=job.data.img_size or size)
    test_acc = accuracy(model, test, torch.device("cpu"))
    count = cfg.param_count(model.shape, kv_shared=job.model.kv_shared)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad) - count.head \
        if method == "full" else count.modules
    row = {"run_id": run_name, "job": job.name, "dataset": job.data.dataset, "method": method, "seed": seed,
           "config_json": cfg.to_json(), "params": params, "params_head": count.head,
           "val_acc": best["val_acc"], "test_acc": test_acc, "best_epoch": best["epoch"],
           "epochs": job.retrain.epochs, "wall_time_s": time.time() - t0,
           "checkpoint_uri": root.join("retrain", run_name, "best").uri, "timestamp": _now()}
    storage.append_table(root.join("retrain"), "runs", pa.Table.from_pylist([row]), part=run_name)
    print(f"[retrain] {method} seed {seed}: val {best['val_acc']:.2f}% (epoch {best['epoch'] + 1}) "
          f"test {test_acc:.2f}% params {params / 1e6:.4f}M", flush=True)
    res.metrics.update(row)
    return res


def retrain_seeds(job: JobConfig, subnet: SubnetConfig | None, method: str = "noah") -> dict:
    """Retrain for every seed in ``job.retrain.seeds``; test accuracy as mean and std."""
    accs = [retrain(job, subnet, method=method, seed=s).metrics["test_acc"] for s in job.retrain.seeds]
    return {"method": method, "test_acc_mean": statistics.fmean(accs),
            "test_acc_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0, "runs": accs}
