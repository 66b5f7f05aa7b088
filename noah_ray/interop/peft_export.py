"""noah_ray -> peft: :func:`export_peft` writes the LoRA part (and the head) of a subnet as a peft
LoRA adapter for a stock timm ViT; VPT, Adapter and KV prompts cannot be expressed in peft and are
reported.  The other direction (a peft adapter -> subnet + weights) is :mod:`noah_ray.interop.peft_import`.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from noah_ray.errors import ConfigError
from noah_ray.interop.artifact import _active_subnet
from noah_ray.space import ADAPTER, KV_PROMPT, LORA, VPT
from noah_ray.store import storage

#: modules peft's LoRA cannot express, with the name printed to users
PEFT_UNSUPPORTED = {VPT: "VPT prompts", ADAPTER: "Adapter", KV_PROMPT: "KV prompts"}


@dataclass(frozen=True)
class PeftExport:
    """What :func:`export_peft` wrote and what it could not represent."""

    uri: str
    ranks: dict[str, int]                      # target module -> LoRA rank
    unsupported: dict[str, list[int]] = field(default_factory=dict)  # module -> layers left out

    def describe(self) -> str:
        lines = [f"wrote a peft LoRA adapter ({len(self.ranks)} qkv layers, ranks "
                 f"{' '.join(str(r) for r in self.ranks.values())}) and the head to {self.uri}"]
        for m, layers in self.unsupported.items():
            lines.append(f"not in the peft adapter (peft cannot represent it): {PEFT_UNSUPPORTED[m]} "
                         f"in layers {','.join(map(str, layers))}")
        return "\n".join(lines)


def _clean_number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _timm_name(vit: torch.nn.Module) -> str | None:
    """The timm architecture a ViT was created as (its pretrained_cfg); the weights' tag is left
    out, the backbone checkpoint decides them."""
    return (getattr(vit, "pretrained_cfg", None) or {}).get("architecture")


def export_peft(model, uri: str, *, include_head: bool = True, endpoint: str | None = None,
                model_name: str | None = None) -> PeftExport:
    """Write the LoRA part of ``model``'s active subnet as a peft LoRA adapter at ``uri``.

    ``target_modules`` are the ``blocks.N.attn.qkv`` layers with LoRA, ``rank_pattern`` /
    ``alpha_pattern`` reproduce each layer's rank and the scale (``alpha = scale * rank``); the
    head is saved as a peft ``modules_to_save`` module.  Load with
    ``PeftModel.from_pretrained(timm.create_model(name, num_classes=...), dir)`` on the same
    backbone weights.  ``adapter_config.json`` names the base model (``base_model_name_or_path``:
    ``model_name``, default the timm name the backbone was created with).  VPT, Adapter and KV
    prompts have no peft equivalent: they are left out, a warning names them and the returned
    :class:`PeftExport` lists them.  :func:`noah_ray.interop.peft_import.import_peft` reads it back.
    """
    peft = _require_peft()
    from noah_ray.nn.supernet import PromptedViT

    if not isinstance(model, PromptedViT):
        raise ConfigError(f"export_peft needs a PromptedViT, got {type(model).__name__}")
    model = _active_subnet(model)
    cfg = model.capacity
    ranks = {f"blocks.{i}.attn.qkv": r for i, r in enumerate(cfg.layer_widths(LORA)) if r}
    if not ranks:
        raise ConfigError("the subnet has no LoRA layers, so there is nothing to export to peft")
    unsupported = {m: [i for i, w in enumerate(cfg.layer_widths(m)) if w]
                   for m in PEFT_UNSUPPORTED if any(cfg.layer_widths(m))}
    if model.train_backbone:
        warnings.warn("export_peft: the backbone was trained; the peft adapter holds only LoRA and head "
                      "weights, load it on the trained backbone", stacklevel=2)
    pm = _peft_model(peft, model, ranks, include_head, model_name)
    loc = storage.resolve(uri, endpoint)
    with tempfile.TemporaryDirectory(prefix="noah-peft-") as tmp:
        # a ViT has no embedding layer to save; "auto" would look the base model up on the Hugging Face Hub
        pm.save_pretrained(tmp, save_embedding_layers=False)
        for f in sorted(os.listdir(tmp)):
            storage.write_bytes(loc.join(f), Path(tmp, f).read_bytes())
    result = PeftExport(loc.uri, ranks, unsupported)
    if unsupported:
        warnings.warn("export_peft: " + "; ".join(result.describe().splitlines()[1:]), stacklevel=2)
    return result


def _require_peft():
    """The peft module, else one :class:`ConfigError` saying how to install it."""
    try:
        import peft
    except ImportError:
        raise ConfigError("peft is not installed; install it (pip install peft) to export peft adapters") from None
    return peft


def _peft_model(peft, model, ranks: dict[str, int], include_head: bool, model_name: str | None):
    """A peft LoRA model on ``model``'s plain backbone holding ``model``'s LoRA weights (rank and
    alpha per layer: ``rank_pattern`` / ``alpha_pattern``, ``alpha = scale * rank``)."""
    scale = float(model.lora_scale)
    top = max(ranks.values())
    peft_cfg = peft.LoraConfig(r=top, lora_alpha=_clean_number(scale * top), target_modules=list(ranks),
                               rank_pattern=dict(ranks),
                               alpha_pattern={k: _clean_number(scale * r) for k, r in ranks.items()},
                               lora_dropout=float(model.recipe.lora_dropout), bias="none",
                               modules_to_save=["head"] if include_head else None)
    base = model.backbone()
    base.name_or_path = model_name or _timm_name(model.vit)   # peft records it as base_model_name_or_path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, peft_cfg)
    with torch.no_grad():
        for name in ranks:
            i = int(name.split(".")[1])
            lora = model.module(LORA, i)
            layer = pm.base_model.model.blocks[i].attn.qkv
            if layer.scaling["default"] != scale:
                raise ConfigError(f"peft computes scale {layer.scaling['default']} for {name}, expected {scale}")
            layer.lora_A["default"].weight.copy_(lora.lora_A)
            layer.lora_B["default"].weight.copy_(lora.lora_B)
    return pm
