"""peft -> noah_ray: read a peft LoRA adapter for a timm ViT as a subnet and its weights.

:func:`import_peft` is the inverse of :func:`noah_ray.interop.peft_export.export_peft`, and also reads
adapters made with peft's own API: peft itself resolves ``target_modules``, ``rank_pattern``
and ``alpha_pattern`` (``PeftModel.from_pretrained`` on a stock timm ViT), then each layer's LoRA
becomes the ``lora`` width of that block (rank per layer) and its weights.  noah_ray's LoRA has
one scale per model (``model.lora_scale``): a layer whose ``alpha / r`` differs has the ratio
folded into its ``B``, so the output is identical.

What a NOAH subnet cannot hold is refused in one line (:class:`ConfigError`): DoRA, rsLoRA,
LoRA on anything but the fused ``blocks.N.attn.qkv``, trained biases, saved modules other than
the head, and peft features that change the forward pass (layer replication, LoRA on raw
parameters, trainable tokens, QA-LoRA, ...).

The result is a subnet artifact (:func:`noah_ray.interop.artifact.save_subnet`, loaded with
:func:`noah_ray.load_subnet` for evaluation) plus ``subnet.yaml``; retraining reads them with
``retrain.subnet: <out>/subnet.yaml`` and ``retrain.init: <out>`` (start from these weights).
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from noah_ray.errors import ConfigError
from noah_ray.space import LORA, SubnetConfig

if TYPE_CHECKING:
    from noah_ray.nn.modules import LoRA

QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv$")
#: LoraConfig fields that change what the adapter computes, beyond B·A on a linear layer
_UNREPRESENTABLE = {"use_dora": "DoRA (use_dora)", "use_rslora": "rsLoRA (use_rslora)",
                    "lora_bias": "a trained LoRA bias (lora_bias)", "layer_replication": "layer_replication",
                    "target_parameters": "LoRA on parameters (target_parameters)",
                    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
                    "use_qalora": "QA-LoRA (use_qalora)", "use_bdlora": "use_bdlora",
                    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)"}


@dataclass(frozen=True)
class PeftImport:
    """What :func:`import_peft` read: the subnet, the model it runs on, the per-layer LoRA."""

    model: Any                       # PromptedViT (eval mode)
    subnet: SubnetConfig
    model_name: str
    num_classes: int
    ranks: dict[int, int]            # block -> rank
    alphas: dict[int, float]         # block -> lora_alpha
    lora_scale: float
    head: bool                       # the adapter carried the head (else a fresh one)

    def describe(self) -> str:
        ranks = " ".join(str(self.subnet.layer_widths(LORA)[i]) for i in range(self.subnet.num_layers))
        return (f"peft LoRA adapter for {self.model_name} ({self.num_classes} classes): LoRA on "
                f"{len(self.ranks)} qkv layers, ranks per layer {ranks}, scale {self.lora_scale:g}"
                + ("" if self.head else "; no head in the adapter, a new one is initialised (retrain it)"))


def _adapter_config(folder: Path):
    from peft import LoraConfig, PeftConfig

    if not (folder / "adapter_config.json").is_file():
        raise ConfigError(f"{str(folder)!r} is not a peft adapter (no adapter_config.json); give the directory "
                          f"written by save_pretrained / noah-ray export --peft")
    try:
        cfg = PeftConfig.from_pretrained(str(folder))
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{folder}/adapter_config.json cannot be read by peft: {str(e).splitlines()[0][:160]}") \
            from None
    if not isinstance(cfg, LoraConfig):
        raise ConfigError(f"{folder} holds a peft {getattr(cfg, 'peft_type', '?')} adapter; only LoRA maps "
                          f"onto a NOAH subnet")
    return cfg


def check_representable(cfg) -> None:
    """One :class:`ConfigError` for the first thing in a LoraConfig a NOAH subnet cannot hold."""
    for key, what in _UNREPRESENTABLE.items():
        if getattr(cfg, key, None):
            raise ConfigError(f"peft adapter uses {what}, which a NOAH subnet cannot represent (plain LoRA B·A "
                              f"on the fused qkv only)")
    if cfg.bias != "none":
        raise ConfigError(f"peft adapter trains biases (bias={cfg.bias!r}), which a NOAH subnet cannot "
                          f"represent; export it with bias='none'")
    extra = sorted(set(cfg.modules_to_save or ()) - {"head"})
    if extra:
        raise ConfigError(f"peft adapter saves module {extra[0]!r}; a NOAH subnet keeps only LoRA and the "
                          f"classifier 'head' trainable")


def _model_name(cfg, model_name: str | None) -> str:
    from noah_ray.nn.backbones import is_backbone

    name = model_name or cfg.base_model_name_or_path
    if not name:
        raise ConfigError("the adapter does not name its base model (base_model_name_or_path); pass the timm "
                          "name, e.g. --model vit_base_patch16_224.augreg_in21k")
    name = name.removeprefix("timm/").removeprefix("hf-hub:timm/")
    if not is_backbone(name):
        raise ConfigError(f"base model {name!r} is not a timm model; pass the timm name with --model")
    return name


def _num_classes(folder: Path, num_classes: int | None) -> tuple[int, bool]:
    from peft.utils import load_peft_weights

    heads = [v for k, v in load_peft_weights(str(folder), device="cpu").items()
             if re.search(r"(^|\.)head(\.modules_to_save\.[^.]+)?\.weight$", k)]
    if heads:
        n = int(heads[0].shape[0])
        if num_classes not in (None, n):
            raise ConfigError(f"the adapter's head has {n} classes, not --num-classes {num_classes}")
        return n, True
    if num_classes is None:
        raise ConfigError("the adapter holds no head, so the class count is unknown; pass --num-classes N")
    return num_classes, False


def _lora_layers(pm) -> dict[str, Any]:
    """Every peft LoRA layer of ``pm``, by its name in the timm model; refuses non-qkv targets."""
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, mod in pm.base_model.model.named_modules():
        if isinstance(mod, LoraLayer):
            if not QKV.match(name):
                raise ConfigError(f"peft adapter puts LoRA on {name!r}; a NOAH subnet has LoRA only on the fused "
                                  f"qkv (blocks.N.attn.qkv)")
            layers[name] = mod
    if not layers:
        raise ConfigError("the peft adapter has no LoRA layer on this model; check --model")
    return layers


def _scale(alphas: dict[int, float], ranks: dict[int, int]) -> float:
    """The model-wide LoRA scale: the one most layers have (ties: the largest rank's)."""
    scales = [alphas[i] / ranks[i] for i in sorted(ranks, key=lambda i: -ranks[i])]
    return max(scales, key=scales.count)


def import_peft(folder: str | Path, *, model_name: str | None = None, backbone_checkpoint: str | None = None,
                num_classes: int | None = None, endpoint: str | None = None) -> PeftImport:
    """Read the peft LoRA adapter in ``folder`` as a NOAH subnet on ``model_name`` (default: the
    adapter's ``base_model_name_or_path``) with backbone weights ``backbone_checkpoint`` (the
    weights the adapter was trained on).  Returns the :class:`PromptedViT` and what was read."""
    from peft import PeftModel

    from noah_ray.nn.backbones import create_backbone
    from noah_ray.nn.supernet import PromptedViT

    folder = Path(folder)
    cfg = _adapter_config(folder)
    check_representable(cfg)
    name = _model_name(cfg, model_name)
    n, has_head = _num_classes(folder, num_classes)
    base = create_backbone(name, n, backbone_checkpoint, endpoint=endpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(create_backbone(name, n, backbone_checkpoint, endpoint=endpoint),
                                       str(folder))
    adapter = pm.active_adapter
    layers = {int(cast(re.Match[str], QKV.match(k)).group(1)): m for k, m in _lora_layers(pm).items()}  # qkv only
    ranks = {i: int(m.r[adapter]) for i, m in layers.items()}
    alphas = {i: float(m.lora_alpha[adapter]) for i, m in layers.items()}
    scale = _scale(alphas, ranks)
    depth = len(base.blocks)
    subnet = SubnetConfig({LORA: tuple(ranks.get(i, 0) for i in range(depth))})
    model = PromptedViT(base, subnet, lora_scale=scale)
    with torch.no_grad():
        for i, layer in layers.items():
            lora = cast("LoRA", model.module(LORA, i))
            lora.lora_A.copy_(layer.lora_A[adapter].weight)
            lora.lora_B.copy_(layer.lora_B[adapter].weight * (layer.scaling[adapter] / scale))
        if has_head:
            head: Any = cast(Any, pm.base_model).model.head
            head = head.modules_to_save[adapter] if hasattr(head, "modules_to_save") else head
            model.vit.head.load_state_dict(head.state_dict())
    return PeftImport(model.eval(), subnet, name, n, ranks, alphas, scale, has_head)
