"""Model construction for every stage: the methods and their fixed configs, the job's backbone,
a :class:`~noah_ray.nn.supernet.PromptedViT` built with the job's switches, the trained supernet
read back, and top-1 evaluation.

Used by the Ray Train workers (:mod:`noah_ray.train`), the stage drivers (:mod:`noah_ray.train.runs`),
the search's trainable, the hyper-parameter trials and interop, none of which imports another's
module for this.

Baselines are fixed configs trained by the same loop (widths overridable with
``retrain.baseline_widths``, learning rate with ``retrain.method_lr``): ``linear`` (head only),
``full`` (backbone + head), ``vpt`` (VPT-Deep, 10 tokens per layer), ``adapter`` (bottleneck 8),
``lora`` (rank 8 on q, k, v), ``e2vpt`` (5 visual + 5 key/value prompts per layer); the methods,
their widths and whether the backbone trains are the registry :data:`noah_ray.space.methods.METHODS`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from noah_ray.config import JobConfig
from noah_ray.errors import ConfigError
from noah_ray.nn.backbones import create_backbone
from noah_ray.nn.supernet import PromptedViT
from noah_ray.space import SubnetConfig
from noah_ray.space.methods import METHODS, baseline_widths, baselines
from noah_ray.space.recipes import Recipe
from noah_ray.store import storage
from noah_ray.store.layout import JobPaths
from noah_ray.store.records import MetaRecord

#: uniform per-layer widths of the baselines at import (VPT-Deep 10 tokens, Adapter 8, LoRA rank 8,
#: E2VPT 5 + 5), from the method registry :data:`noah_ray.space.methods.METHODS` (which is read live)
BASELINE_WIDTHS: dict[str, dict[str, int]] = baseline_widths()
BACKBONE_SEED = 0


def backbone_uri(job: JobConfig) -> str:
    """The backbone checkpoint every stage loads: ``model.checkpoint``, else the job's
    ``backbone.safetensors`` (written by :func:`ensure_backbone`)."""
    return job.model.checkpoint or JobPaths.of(job).backbone.uri


def ensure_backbone(job: JobConfig) -> str:
    """:func:`backbone_uri`, writing ``<job>/backbone.safetensors`` first when ``model.checkpoint``
    is unset (demo, tests): a backbone created once with a fixed seed."""
    if job.model.checkpoint:
        return job.model.checkpoint
    loc = JobPaths.of(job).backbone
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
    if METHODS[method].searched:
        if subnet is None:
            raise ConfigError("retraining NOAH needs a subnet (the search's best_subnet.yaml or retrain.subnet)")
        if subnet.num_layers != layers:
            raise ConfigError(f"subnet has {subnet.num_layers} layers, the job's space {layers}; "
                              f"give one width per backbone layer")
        return subnet
    widths = {**METHODS[method].widths, **job.retrain.baseline_widths.get(method, {})}
    unknown = sorted(set(job.retrain.baseline_widths) - set(baselines()))
    if unknown:
        raise ConfigError(f"retrain.baseline_widths: {unknown[0]!r} is not a baseline; "
                          f"use {', '.join(baselines())}")
    return SubnetConfig.uniform(layers, **widths) if any(widths.values()) else SubnetConfig.empty(layers)


def build_model(job: JobConfig, capacity: SubnetConfig | None, backbone: str | None,
                num_classes: int, *, train_backbone: bool = False, method: str = "noah",
                recipe: Recipe | None = None) -> PromptedViT:
    """A PromptedViT of ``capacity`` (None: the search space's supernet) on the backbone weights
    at ``backbone``, with the job's switches and recipe (``recipe``, e.g. one recorded in a
    checkpoint, or the job's for ``method``)."""
    vit = create_backbone(job.model.name, num_classes, backbone, endpoint=job.storage_endpoint,
                          drop_path_rate=job.model.drop_path_rate)
    model = PromptedViT(vit, capacity or job.space.largest(), lora_scale=job.model.lora_scale,
                        train_backbone=train_backbone, recipe=recipe or job.model.resolved_recipe(method))
    model.set_fused_attn(job.model.fused_attn)
    model.set_grad_checkpointing(job.model.grad_checkpointing, job.model.checkpoint_blocks)
    model.set_precision(job.model.precision)
    return model


def supernet_recovery(final: storage.Location) -> str:
    """How to recover from a damaged ``supernet/final``: the run resumes from its last checkpoint."""
    return (f"delete {final.uri} and run the supernet stage again (it resumes from its last checkpoint "
            f"and writes final/ anew)")


def load_supernet(job: JobConfig, run_name: str | None = None, *, uri: str | None = None) -> PromptedViT:
    """The trained supernet of ``job`` in eval mode: the job's backbone with the final trainable
    weights of its supernet run (``run_name``), or with the weights at ``uri`` (written by
    ``storage.save_state``; the backbone is then ``model.checkpoint``).  The head has
    ``num_classes`` of its ``meta.json`` (:class:`~noah_ray.store.records.MetaRecord`), else
    ``data.num_classes``."""
    backbone: str | None
    if uri is None:
        final = JobPaths.of(job).supernet_final(run_name)
        if not storage.exists(final.join("meta.json")):
            raise ConfigError(f"no trained supernet at {final.uri!r}; run the supernet stage first")
        tensors, meta = storage.load_state(final, supernet_recovery(final))
        backbone = backbone_uri(job)
    else:
        tensors, meta = storage.load_state(storage.resolve(uri, job.storage_endpoint))
        backbone = job.model.checkpoint
    record = MetaRecord.from_dict(meta)
    num_classes = record.num_classes or job.data.num_classes
    if not num_classes:
        raise ConfigError(f"{uri}: meta.json has no num_classes and data.num_classes is unset; set it")
    model = build_model(job, None, backbone, int(num_classes), recipe=record.recipe)
    model.load_trainable_state_dict(tensors)
    return model.eval()


def evaluate(model: torch.nn.Module, batches: Iterable, device: Any = "cpu",
             max_batches: int | None = None) -> tuple[float, int]:
    """Top-1 accuracy (percent) of ``model`` on ``batches`` of ``(images, labels)`` (at most
    ``max_batches``), and the number of images scored."""
    correct = total = 0
    model.eval()
    with torch.inference_mode():
        for i, (x, y) in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            logits = model(x.to(device, non_blocking=True))
            correct += int((logits.argmax(-1).cpu() == y.cpu()).sum())
            total += int(y.numel())
    if total == 0:
        raise ConfigError("the validation split is empty; check data.val_split")
    return 100.0 * correct / total, total
