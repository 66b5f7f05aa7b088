"""Bottleneck adapter after the MLP: ``h + up(drop(act(down(h))))``.

Max-width weights; the active width uses the first ``r`` hidden units.  ``act`` is NOAH's
QuickGELU or exact GELU; ``dropout`` acts on the hidden layer (training only); ``init`` picks
the initialisation (:data:`ADAPTER_INITS`; ``zero_up`` makes a fresh adapter the identity).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from noah_ray.errors import ConfigError
from noah_ray.nn.modules.base import BuildContext, PromptModule, register
from noah_ray.nn.modules.fast_ops import dropout, thin_linear
from noah_ray.space.kinds import ADAPTER


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(1.702 x)`` (CLIP's and NOAH's adapter activation)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"quick_gelu": quick_gelu, "gelu": F.gelu}


def _init_xavier(a: Adapter) -> None:
    """NOAH's module init: both weights Xavier-uniform, biases N(0, 1e-6)."""
    for w, b in ((a.down_weight, a.down_bias), (a.up_weight, a.up_bias)):
        nn.init.xavier_uniform_(w)
        nn.init.normal_(b, std=1e-6)


def _init_zero_up(a: Adapter) -> None:
    """Down Xavier-uniform, up and biases zero: the identity at start."""
    nn.init.xavier_uniform_(a.down_weight)
    for t in (a.down_bias, a.up_weight, a.up_bias):
        nn.init.zeros_(t)


def _init_vit(a: Adapter) -> None:
    """timm's ViT linear init: weights truncated-normal std 0.02, biases zero."""
    for w, b in ((a.down_weight, a.down_bias), (a.up_weight, a.up_bias)):
        nn.init.trunc_normal_(w, std=0.02)
        nn.init.zeros_(b)


ADAPTER_INITS: dict[str, Callable[[Adapter], None]] = {
    "xavier": _init_xavier, "zero_up": _init_zero_up, "vit": _init_vit}


@register
class Adapter(PromptModule):
    kind, label = ADAPTER, "Adapter width"

    def __init__(self, dim: int, max_width: int, *, act: str = "gelu", dropout: float = 0.0,
                 init: str = "zero_up") -> None:
        super().__init__()
        if max_width <= 0:
            raise ValueError(f"Adapter max_width must be > 0, got {max_width}")
        if act not in ACTIVATIONS or init not in ADAPTER_INITS:
            raise ValueError(f"adapter act {act!r} / init {init!r} unknown; use {list(ACTIVATIONS)} / "
                             f"{list(ADAPTER_INITS)}")
        self.down_weight = nn.Parameter(torch.empty(max_width, dim))
        self.down_bias = nn.Parameter(torch.empty(max_width))
        self.up_weight = nn.Parameter(torch.empty(dim, max_width))
        self.up_bias = nn.Parameter(torch.empty(dim))
        with torch.no_grad():
            ADAPTER_INITS[init](self)
        self.act_name = act
        self.act = ACTIVATIONS[act]
        self.dropout = nn.Dropout(dropout)
        self._init_width(max_width)

    @classmethod
    def build(cls, width: int, ctx: BuildContext) -> Adapter:
        r = ctx.recipe
        return cls(ctx.shape.embed_dim, width, act=r.adapter_act, dropout=r.adapter_dropout, init=r.adapter_init)

    @staticmethod
    def find(pblock: Any) -> Adapter | None:
        mlp = getattr(pblock.block, "mlp", None)
        return mlp.adapter if isinstance(mlp, AdapterMLP) else None

    @classmethod
    def attach(cls, pblock: Any, module: Adapter, recipe) -> None:
        """After the block's MLP; the recipe's ``before_adapter`` moves the block's drop-path
        in between (NOAH: ``x + adapter(drop_path(mlp(norm2 x)))``)."""
        blk = pblock.block
        if not isinstance(getattr(blk, "mlp", None), nn.Module):
            raise ConfigError(f"an adapter needs a block with an mlp, {type(blk).__name__} has none; "
                              f"use a ViT with timm Block blocks or set adapter widths to 0")
        moved = None
        if recipe.drop_path == "before_adapter":
            moved, blk.drop_path2 = blk.drop_path2, nn.Identity()
        blk.mlp = AdapterMLP(blk.mlp, module, moved)

    @staticmethod
    def detach(block: Any) -> None:
        if isinstance(getattr(block, "mlp", None), AdapterMLP):
            if block.mlp.block_drop_path is not None:
                block.drop_path2 = block.mlp.block_drop_path
            block.mlp = block.mlp.mlp

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        r = self.active
        if r == 0:
            return h
        z = dropout(self.act(thin_linear(h, self.down_weight[:r], self.down_bias[:r])), self.dropout.p, self.training)
        return thin_linear(z, self.up_weight[:, :r], self.up_bias, base=h)

    def sliced_state(self, width: int) -> dict[str, torch.Tensor]:
        return {"down_weight": self.down_weight[:width].detach().clone(),
                "down_bias": self.down_bias[:width].detach().clone(),
                "up_weight": self.up_weight[:, :width].detach().clone(),
                "up_bias": self.up_bias.detach().clone()}


class AdapterMLP(nn.Module):
    """A timm MLP followed by an adapter; drops into ``block.mlp``.

    With ``drop_path`` (NOAH's placement) the block's own drop-path moves in here, between the
    MLP and the adapter: the block computes ``x + adapter(drop_path(mlp(norm2 x)))`` instead of
    ``x + drop_path(adapter(mlp(norm2 x)))``; :attr:`block_drop_path` is what the block had."""

    def __init__(self, mlp: nn.Module, adapter: Adapter, drop_path: nn.Module | None = None) -> None:
        super().__init__()
        self.mlp = mlp
        self.adapter = adapter
        self.drop_path = drop_path if drop_path is not None else nn.Identity()
        self.block_drop_path = drop_path  # None: the block keeps its drop-path (after the adapter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.drop_path(self.mlp(x)))
