"""LoRA on a linear layer (NOAH puts it on the fused qkv: q, k and v).

``delta(x) = scale * drop(x) @ A[:r].T @ B[:, :r].T`` with ``A: max_rank x in``,
``B: out x max_rank``.  A smaller active rank uses the first ``r`` rows of ``A`` and columns of
``B`` (weight entanglement).  ``init="kaiming"`` (LoRA, NOAH): A Kaiming-uniform (a = sqrt 5),
B zero, so a fresh LoRA leaves the layer unchanged; ``"vit"``: both truncated-normal std 0.02.
``dropout`` acts on the LoRA input only (training only).
"""

from __future__ import annotations

import math

import torch
from torch import nn

LORA_INITS = ("kaiming", "vit")


class LoRA(nn.Module):
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
        self.max_width = max_rank
        self.active = max_rank

    def set_width(self, rank: int) -> None:
        if not 0 <= rank <= self.max_width:
            raise ValueError(f"LoRA rank {rank} outside 0..{self.max_width}")
        self.active = rank

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        r = self.active
        return (self.dropout(x) @ self.lora_A[:r].T) @ self.lora_B[:, :r].T * self.scale

    def merged_weight_delta(self) -> torch.Tensor:
        """``scale * B A`` at the active rank: add it to the base weight to merge."""
        r = self.active
        return (self.lora_B[:, :r] @ self.lora_A[:r]) * self.scale

    def sliced_state(self, rank: int) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A[:rank].detach().clone(),
                "lora_B": self.lora_B[:, :rank].detach().clone()}
