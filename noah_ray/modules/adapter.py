"""Bottleneck adapter after the MLP: ``h + up(act(down(h)))``.

Max-width weights; the active width uses the first ``r`` hidden units.  ``up`` starts at
zero, so a fresh adapter is the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Adapter(nn.Module):
    def __init__(self, dim: int, max_width: int) -> None:
        super().__init__()
        if max_width <= 0:
            raise ValueError(f"Adapter max_width must be > 0, got {max_width}")
        self.down_weight = nn.Parameter(torch.empty(max_width, dim))
        self.down_bias = nn.Parameter(torch.zeros(max_width))
        self.up_weight = nn.Parameter(torch.zeros(dim, max_width))
        self.up_bias = nn.Parameter(torch.zeros(dim))
        nn.init.xavier_uniform_(self.down_weight)
        self.max_width = max_width
        self.active = max_width

    def set_width(self, width: int) -> None:
        if not 0 <= width <= self.max_width:
            raise ValueError(f"Adapter width {width} outside 0..{self.max_width}")
        self.active = width

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        r = self.active
        if r == 0:
            return h
        z = F.gelu(F.linear(h, self.down_weight[:r], self.down_bias[:r]))
        return h + F.linear(z, self.up_weight[:, :r], self.up_bias)

    def sliced_state(self, width: int) -> dict[str, torch.Tensor]:
        return {"down_weight": self.down_weight[:width].detach().clone(),
                "down_bias": self.down_bias[:width].detach().clone(),
                "up_weight": self.up_weight[:, :width].detach().clone(),
                "up_bias": self.up_bias.detach().clone()}


class AdapterMLP(nn.Module):
    """A timm MLP followed by an adapter; drops into ``block.mlp``."""

    def __init__(self, mlp: nn.Module, adapter: Adapter) -> None:
        super().__init__()
        self.mlp = mlp
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.mlp(x))
