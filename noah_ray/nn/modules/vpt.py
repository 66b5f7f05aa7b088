"""VPT-Deep prompt tokens of one layer.

A prompted layer replaces the prompt tokens that came out of the previous layer with its own
first ``w`` tokens; the sequence is ``[prefix tokens, prompts, patch tokens]`` and its length
varies from layer to layer.  ``dropout`` acts on the inserted tokens (per sample, training only).

Init (``init``): ``xavier_tensor`` (NOAH) Xavier-uniform over the whole ``(1, max_tokens, dim)``
tensor, bound ``sqrt(6 / (max_tokens*dim + dim))``; ``vpt`` (VPT, E2VPT) bound
``sqrt(6 / (3*patch_area + dim))``; ``xavier_token`` bound ``sqrt(6 / (2*dim))``.

``gate`` (optional, ``(max_tokens, segments)``, not saved in the state dict) multiplies each
token's vector segment-wise: E2VPT pruning uses it for mask-gradient scores (all ones, with
grad) and to hold pruned segments at zero (see :mod:`noah_ray.nn.prune`).  ``None`` = no gate.
``gate_layout`` says which features a segment covers (:func:`expand_gate`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from noah_ray.nn.modules.base import BuildContext, PromptModule, register
from noah_ray.nn.modules.fast_ops import dropout, splice
from noah_ray.space.kinds import VPT

GATE_LAYOUTS = ("contiguous", "strided")


def prompt_bound(init: str, max_tokens: int, dim: int, patch_area: int | None = None) -> float:
    """Half-width of the uniform init of a ``(max_tokens, dim)`` prompt tensor."""
    if init == "xavier_tensor":
        return math.sqrt(6.0 / (max_tokens * dim + dim))
    if init == "vpt":
        return math.sqrt(6.0 / (3 * (patch_area if patch_area is not None else dim // 3) + dim))
    if init == "xavier_token":
        return math.sqrt(6.0 / (dim + dim))
    raise ValueError(f"VPT init {init!r} unknown; use xavier_tensor, vpt or xavier_token")


@register
class DeepPrompt(PromptModule):
    kind, label, gated, token_axis = VPT, "VPT tokens", ("prompts",), 0

    def __init__(self, dim: int, max_tokens: int, init_scale: float | None = None, *,
                 init: str = "xavier_token", patch_area: int | None = None, dropout: float = 0.0,
                 gate_layout: str = "contiguous") -> None:
        super().__init__()
        if max_tokens <= 0:
            raise ValueError(f"VPT max_tokens must be > 0, got {max_tokens}")
        if gate_layout not in GATE_LAYOUTS:
            raise ValueError(f"gate layout {gate_layout!r} unknown; use contiguous or strided")
        self.prompts = nn.Parameter(torch.empty(max_tokens, dim))
        bound = init_scale if init_scale is not None else prompt_bound(init, max_tokens, dim, patch_area)
        nn.init.uniform_(self.prompts, -bound, bound)
        self.dropout = nn.Dropout(dropout)
        self.gate_layout = gate_layout
        self._init_width(max_tokens)

    @classmethod
    def build(cls, width: int, ctx: BuildContext) -> DeepPrompt:
        r = ctx.recipe
        return cls(ctx.shape.embed_dim, width, init=r.vpt_init, patch_area=ctx.patch_area,
                   dropout=r.prompt_dropout, gate_layout=r.prune_pieces)

    @staticmethod
    def find(pblock: Any) -> DeepPrompt | None:
        return pblock.vpt

    @classmethod
    def attach(cls, pblock: Any, module: DeepPrompt, recipe) -> None:
        pblock.vpt = module  # PromptBlock inserts the tokens before its block

    def gate_multiplier(self, gate: torch.Tensor) -> torch.Tensor:
        """``(n, segments)`` gate -> ``(n, dim)`` multiplier of the first ``n`` tokens."""
        return expand_gate(gate, self.prompts.shape[-1], self.gate_layout)

    def insert(self, x: torch.Tensor, num_prefix: int, num_previous: int) -> torch.Tensor:
        """Replace ``num_previous`` prompt tokens after the prefix with this layer's active ones."""
        p = self.prompts[: self.active]
        if self.gate is not None:
            p = p * self.gate_multiplier(self.gate[: self.active])
        p = dropout(p.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1), self.dropout.p, self.training)
        return splice(x, p, num_prefix, num_previous)

    def sliced_state(self, tokens: int) -> dict[str, torch.Tensor]:
        return {"prompts": self.prompts[:tokens].detach().clone()}


def expand_gate(gate: torch.Tensor, dim: int, layout: str = "contiguous") -> torch.Tensor:
    """``(tokens, segments)`` -> ``(tokens, dim)``.  ``contiguous``: segment ``s`` covers the
    ``dim // segments`` consecutive features from ``s * dim // segments``; ``strided`` (E2VPT):
    feature ``f`` belongs to segment ``f % segments``."""
    segments = gate.shape[-1]
    if dim % segments:
        raise ValueError(f"{segments} segments do not divide the prompt dim {dim}")
    if layout == "strided":
        return gate.repeat(*([1] * (gate.dim() - 1)), dim // segments)
    if layout != "contiguous":
        raise ValueError(f"gate layout {layout!r} unknown; use contiguous or strided")
    return gate.repeat_interleave(dim // segments, dim=-1)
