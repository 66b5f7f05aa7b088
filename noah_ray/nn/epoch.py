"""One training epoch and the optimiser it steps, shared by the Ray Train workers
(:mod:`noah_ray.train`) and the hyper-parameter trials (:mod:`noah_ray.hpo`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from noah_ray.config import TrainConfig
from noah_ray.errors import ConfigError
from noah_ray.nn import optim


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


def check_loss(loss: float, where: str, fix: str) -> None:
    """Stop at the first epoch whose mean training loss is not finite, before anything of that
    epoch is written: one-line :class:`ConfigError` (``where``: the run and epoch; ``fix``: what
    to change), never a result with nan.  The Ray Train workers (:mod:`noah_ray.train.worker`) and
    the hpo trials (:mod:`noah_ray.hpo.trial`) call it."""
    if not math.isfinite(loss):
        raise ConfigError(f"{where}: the training loss is {loss} (not finite), so training stopped and nothing of "
                          f"this run was recorded as a result; {fix}")
