"""VPT-Deep prompt tokens of one layer.

A prompted layer replaces the prompt tokens that came out of the previous layer with its own
first ``w`` tokens; the sequence is ``[prefix tokens, prompts, patch tokens]`` and its length
varies from layer to layer.

``gate`` (optional, ``(max_tokens, segments)``, not saved in the state dict) multiplies each
token's vector segment-wise: E2VPT pruning uses it for mask-gradient scores (all ones, with
grad) and to hold pruned segments at zero (see :mod:`noah_ray.prune`).  ``None`` = no gate.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class DeepPrompt(nn.Module):
    def __init__(self, dim: int, max_tokens: int, init_scale: float | None = None) -> None:
        super().__init__()
        if max_tokens <= 0:
            raise ValueError(f"VPT max_tokens must be > 0, got {max_tokens}")
        self.prompts = nn.Parameter(torch.empty(max_tokens, dim))
        bound = init_scale if init_scale is not None else math.sqrt(6.0 / (dim + dim))
        nn.init.uniform_(self.prompts, -bound, bound)
        self.max_width = max_tokens
        self.active = max_tokens
        self.register_buffer("gate", None, persistent=False)

    def set_width(self, tokens: int) -> None:
        if not 0 <= tokens <= self.max_width:
            raise ValueError(f"VPT tokens {tokens} outside 0..{self.max_width}")
        self.active = tokens

    def insert(self, x: torch.Tensor, num_prefix: int, num_previous: int) -> torch.Tensor:
        """Replace ``num_previous`` prompt tokens after the prefix with this layer's active ones."""
        p = self.prompts[: self.active]
        if self.gate is not None:
            p = p * expand_gate(self.gate[: self.active], p.shape[-1])
        p = p.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :num_prefix], p, x[:, num_prefix + num_previous:]], dim=1)

    def sliced_state(self, tokens: int) -> dict[str, torch.Tensor]:
        return {"prompts": self.prompts[:tokens].detach().clone()}


def expand_gate(gate: torch.Tensor, dim: int) -> torch.Tensor:
    """``(tokens, segments)`` -> ``(tokens, dim)``: each segment covers ``dim // segments``
    consecutive features."""
    segments = gate.shape[-1]
    if dim % segments:
        raise ValueError(f"{segments} segments do not divide the prompt dim {dim}")
    return gate.repeat_interleave(dim // segments, dim=-1)
