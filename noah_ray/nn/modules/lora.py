"""LoRA on a linear layer (NOAH puts it on the fused qkv: q, k and v).

``delta(x) = scale * drop(x) @ A[:r].T @ B[:, :r].T`` with ``A: max_rank x in``,
``B: out x max_rank``.  A smaller active rank uses the first ``r`` rows of ``A`` and columns of
``B`` (weight entanglement).  ``init="kaiming"`` (LoRA, NOAH): A Kaiming-uniform (a = sqrt 5),
B zero, so a fresh LoRA leaves the layer unchanged; ``"vit"``: both truncated-normal std 0.02.
``dropout`` acts on the LoRA input only (training only; :func:`~noah_ray.nn.modules.fast_ops.dropout`).

peft's way: :class:`LoRALinear` replaces ``attn.qkv`` and computes ``base(x) + delta(x)``, so the
timm attention's own forward runs unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from noah_ray.errors import ConfigError
from noah_ray.nn.modules.attention import timm_attention
from noah_ray.nn.modules.base import BuildContext, PromptModule, register
from noah_ray.nn.modules.fast_ops import dropout, thin_linear
from noah_ray.space.kinds import LORA

LORA_INITS = ("kaiming", "vit")


@register
class LoRA(PromptModule):
    kind, label = LORA, "LoRA rank"

    def __init__(self, in_features: int, out_features: int, max_rank: int, scale: float = 1.0, *,
                 dropout: float = 0.0, init: str = "kaiming") -> None:
        super().__init__()
        if max_rank <= 0:
            raise ValueError(f"LoRA max_rank must be > 0, got {max_rank}")
        if init not in LORA_INITS:
            raise ValueError(f"LoRA init {init!r} unknown; use {' or '.join(LORA_INITS)}")
        self.lora_A = nn.Parameter(torch.empty(max_rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, max_rank))
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            nn.init.trunc_normal_(self.lora_A, std=0.02)
            nn.init.trunc_normal_(self.lora_B, std=0.02)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        self._init_width(max_rank)

    @classmethod
    def build(cls, width: int, ctx: BuildContext) -> LoRA:
        d = ctx.shape.embed_dim
        return cls(d, 3 * d, width, ctx.lora_scale, dropout=ctx.recipe.lora_dropout, init=ctx.recipe.lora_init)

    @staticmethod
    def find(pblock: Any) -> LoRA | None:
        qkv = timm_attention(pblock.block).qkv
        return qkv.lora if isinstance(qkv, LoRALinear) else None

    @classmethod
    def attach(cls, pblock: Any, module: LoRA, recipe) -> None:
        attn = timm_attention(pblock.block)
        qkv = getattr(attn, "qkv", None)
        if not isinstance(qkv, nn.Linear) or qkv.out_features != module.lora_B.shape[0] \
                or qkv.in_features != module.lora_A.shape[1]:
            raise ConfigError(f"LoRA needs a fused qkv linear layer in {type(attn).__name__} "
                              f"({type(qkv).__name__} found); use a ViT with timm Attention or set lora widths to 0")
        attn.qkv = LoRALinear(qkv, module)

    @staticmethod
    def detach(block: Any) -> None:
        attn: Any = timm_attention(block)
        if isinstance(getattr(attn, "qkv", None), LoRALinear):
            attn.qkv = attn.qkv.base

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        r = self.active
        return (dropout(x, self.dropout.p, self.training) @ self.lora_A[:r].T) @ self.lora_B[:, :r].T * self.scale

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out + delta(x)``: the rank-``r`` products, the scale and the sum with no full-size delta
        tensor and no separate scale or add pass, forward or backward
        (:func:`~noah_ray.nn.modules.fast_ops.thin_linear`)."""
        r = self.active
        h = thin_linear(dropout(x, self.dropout.p, self.training), self.lora_A[:r])
        return thin_linear(h, self.lora_B[:, :r], base=out, alpha=self.scale)

    def merged_weight_delta(self) -> torch.Tensor:
        """``scale * B A`` at the active rank: add it to the base weight to merge."""
        r = self.active
        return (self.lora_B[:, :r] @ self.lora_A[:r]) * self.scale

    def sliced_state(self, rank: int) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A[:rank].detach().clone(),
                "lora_B": self.lora_B[:, :rank].detach().clone()}


class LoRALinear(nn.Module):
    """A linear layer plus its LoRA delta (``base(x) + lora.delta(x)`` while the rank is > 0)."""

    def __init__(self, base: nn.Linear, lora: LoRA) -> None:
        super().__init__()
        self.base = base
        self.lora = lora

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return self.lora.add_to(out, x) if self.lora.active > 0 else out
