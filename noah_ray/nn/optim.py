"""Optimiser, learning-rate schedule and training checkpoints for :mod:`noah_ray.train`.

A checkpoint directory ``checkpoint_e<epoch>/`` holds ``trainable.safetensors`` (modules + head),
``optimizer.safetensors`` (AdamW moments, keyed ``<param index>.<name>``), ``rng_rank<k>.safetensors``
(torch RNG of every worker) and ``state.json`` (epoch, best val accuracy, step counters, param
groups, LR-schedule and loss-scaler state): tensors as safetensors, the rest as JSON, no pickles,
so a checkpoint can be inspected and loaded without executing code.  Each rank's files are listed
with their sha256 in a manifest (``checksums.json``, ``checksums_rank<k>.json``) checked on load;
a checkpoint that fails it is skipped, and before a resume set aside (``corrupt_checkpoint_e*``).
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
from collections.abc import Callable
from typing import Any, cast

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from noah_ray.errors import ConfigError
from noah_ray.store import storage
from noah_ray.store.storage import Location

log = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two AdamW groups by timm's rule
    (:func:`timm.optim.param_groups_weight_decay`): matrices / prompt tokens with
    ``weight_decay``; 1-D parameters (biases, norm weights) and the model's
    ``no_weight_decay()`` names (position / class / register tokens) without.

    The decay group comes first and both groups exist even when ``weight_decay`` is 0, as the
    checkpoints written so far expect (optimizer state is keyed by the parameters' order)."""
    skip = cast(Any, model).no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_weight_decay(model, 1.0, no_weight_decay_list=sorted(skip))  # 1.0: never "no decay at all"
    decay = [p for g in groups if g["weight_decay"] for p in g["params"]]
    no_decay = [p for g in groups if not g["weight_decay"] for p in g["params"]]
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


#: optimizer options that choose how the step is computed, not what it computes
IMPLEMENTATION = ("fused", "foreach")


def adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, torch's fused kernel where it has one (CPU and CUDA
    floating-point parameters on one device): one kernel per parameter instead of ~30 small ops
    (the NOAH supernet has 86 trainable tensors; docs/benchmarks.md, "Supernet step")."""
    groups = param_groups(model, weight_decay)
    params = [p for g in groups for p in g["params"]]
    devices = {p.device.type for p in params}
    fused = len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier per optimiser step: linear warm-up to 1 over ``warmup_steps``, then cosine
    decay to ``min_ratio`` (= min_lr / lr) at ``total_steps``."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


# ----------------------------------------------------------------------------- state <-> tensors + JSON
def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """``opt.state_dict()`` split into tensors (``"<param index>.<name>"``) and JSON data."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], data: dict) -> None:
    """Inverse of :func:`optimizer_state`; tensors move to the parameters' devices.  How the step
    is computed (``fused`` / ``foreach``) stays as ``opt`` was built, not as the checkpoint's writer
    had it (older checkpoints were written by the for-loop AdamW)."""
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(data["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    kernel = {k: opt.defaults[k] for k in IMPLEMENTATION if k in opt.defaults}
    groups = [{**{k: (tuple(v) if k == "betas" else v) for k, v in g.items()}, **kernel} for g in data["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The torch RNG state of this process (CPU, and the current CUDA device when used)."""
    out = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------- checkpoints
#: written with a checksum manifest per rank (``checksums.json`` for rank 0's files,
#: ``checksums_rank<k>.json`` for rank k's RNG); format 1 (no manifest) still loads, unverified
CHECKPOINT_FORMAT = 2
CORRUPT_PREFIX = "corrupt_"               # a checkpoint set aside by :func:`set_aside_bad`
_RANK0 = ("state.json", "trainable.safetensors", "optimizer.safetensors")


def _manifest(rank: int) -> str:
    return storage.MANIFEST if rank == 0 else f"checksums_rank{rank}.json"


def save_checkpoint(d: str | Location, model, opt, sched, scaler, state: dict, rank: int, world: int,
                    device: torch.device) -> None:
    """Write rank ``rank``'s part of a checkpoint into directory ``d`` (a local path or a storage
    location): every rank its RNG state,
    rank 0 the trainable weights, optimiser tensors and ``state.json`` (state, schedule, scaler);
    each rank then the checksums of its files (:func:`noah_ray.store.storage.write_checked`)."""
    from safetensors.torch import save

    files = {f"rng_rank{rank}.safetensors": save({k: v.contiguous().cpu() for k, v in rng_state(device).items()})}
    if rank == 0:
        tensors, opt_json = optimizer_state(opt)
        files["trainable.safetensors"] = save({k: v.detach().contiguous().cpu()
                                               for k, v in model.trainable_state_dict().items()})
        files["optimizer.safetensors"] = save(tensors)
        files["state.json"] = json.dumps({
            **state, "format": CHECKPOINT_FORMAT, "world_size": world, "optimizer": opt_json,
            "scheduler": sched.state_dict(), "scaler": scaler.state_dict()}).encode()
    storage.write_checked(d if isinstance(d, Location) else storage.resolve(d), files, _manifest(rank))


def checkpoint_names(run_dir: Location) -> list[str]:
    """The run's ``checkpoint_e*`` folders in storage (those with a ``state.json``), newest first."""
    dirs = {posixpath.dirname(f.path) for f in storage.list_files(run_dir, "state.json")}
    return sorted((posixpath.basename(d) for d in dirs if posixpath.dirname(d) == run_dir.path
                   and posixpath.basename(d).startswith("checkpoint_e")), reverse=True)


def read_checkpoint(d: Location) -> dict:
    """One checkpoint folder, every file checked against its rank's manifest; raises
    :class:`ConfigError` (one line naming the bad file) for a truncated, corrupt or incomplete one.
    A format-1 checkpoint (written before checksums) is read unverified."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        first = storage.read_checked(d, [*_RANK0, "rng_rank0.safetensors"], _manifest(0))
        st = json.loads(first.files["state.json"])
        if st.get("format", 1) >= 2 and not first.verified:
            raise ConfigError(f"{d.join(storage.MANIFEST).uri} is missing (an incomplete upload)")
        rng = [load(first.files["rng_rank0.safetensors"])]
        for k in range(1, st["world_size"]):
            part = storage.read_checked(d, [f"rng_rank{k}.safetensors"], _manifest(k))
            if st.get("format", 1) >= 2 and not part.verified:
                raise ConfigError(f"{d.join(_manifest(k)).uri} is missing (an incomplete upload)")
            rng.append(load(part.files[f"rng_rank{k}.safetensors"]))
        return {"name": posixpath.basename(d.path), "state": st, "rng": rng,
                "trainable": load(first.files["trainable.safetensors"]),
                "optimizer": load(first.files["optimizer.safetensors"])}
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise ConfigError(f"{d.uri} is truncated or corrupt ({type(e).__name__})") from None


def latest_checkpoint(run_dir: Location) -> dict | None:
    """The newest good ``checkpoint_e*`` of the run, read from storage (:func:`read_checkpoint`).

    Ray registers a reported checkpoint when its controller next polls the workers, so a worker
    killed right after reporting leaves an uploaded but unregistered checkpoint; reading storage
    resumes from it instead of losing that epoch.  Every rank applies the same test to the same
    files, so all ranks pick the same checkpoint."""
    for name in checkpoint_names(run_dir):
        try:
            return read_checkpoint(run_dir.join(name))
        except ConfigError as e:  # partial upload or corrupt: use an older one
            log.warning("skipping checkpoint %s: %s", name, e)
    return None


def set_aside_bad(run_dir: Location) -> tuple[list[str], str | None]:
    """Before a run resumes: move every checkpoint newer than the newest good one aside (to
    ``corrupt_<name>``, kept for inspection), so that the resumed run neither loads nor reuses
    their names.  Returns ``(names set aside, the newest good checkpoint or None)``."""
    bad: list[str] = []
    for name in checkpoint_names(run_dir):
        try:
            read_checkpoint(run_dir.join(name))
            return bad, name
        except ConfigError as e:
            log.warning("checkpoint %s is bad: %s", name, e)
            aside, n = run_dir.join(CORRUPT_PREFIX + name), 1
            while storage.exists(aside):
                aside, n = run_dir.join(f"{CORRUPT_PREFIX}{name}.{n}"), n + 1
            storage.move_dir(run_dir.join(name), aside)
            bad.append(name)
    return bad, None


def restore(ckpt: dict, model, opt, sched, scaler, rank: int, device: torch.device) -> dict:
    """Load a :func:`latest_checkpoint` into the training objects; returns the loop state."""
    st = dict(ckpt["state"])
    model.load_trainable_state_dict(ckpt["trainable"])
    load_optimizer_state(opt, ckpt["optimizer"], st.pop("optimizer"))
    sched.load_state_dict(st.pop("scheduler"))
    scaler_state = st.pop("scaler")
    if scaler_state and scaler.is_enabled():
        scaler.load_state_dict(scaler_state)
    if rank < len(ckpt["rng"]):  # a rank added since (more workers) keeps its fresh seed
        set_rng_state(ckpt["rng"][rank], device)
    return st
