"""E2VPT key/value prompts: learnable tokens concatenated to the keys and values of one
attention layer (queries unchanged, so the output length is unchanged and fused SDPA applies).

Shapes ``(heads, max_len, head_dim)``; ``shared=True`` uses one tensor for keys and values.
Token ``j``'s vector is ``key[:, j]`` flattened head-major (``heads * head_dim`` features).

``gate`` (optional, ``(max_len, segments)``, not saved in the state dict) multiplies each
token's key and value vectors segment-wise (E2VPT pruning, see :mod:`noah_ray.prune`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from noah_ray.modules.vpt import expand_gate


class KVPrompt(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, max_len: int, shared: bool = False) -> None:
        super().__init__()
        if max_len <= 0:
            raise ValueError(f"KV-prompt max_len must be > 0, got {max_len}")
        bound = math.sqrt(6.0 / (2 * head_dim * num_heads))
        self.key = nn.Parameter(torch.empty(num_heads, max_len, head_dim).uniform_(-bound, bound))
        self.value = None if shared else nn.Parameter(
            torch.empty(num_heads, max_len, head_dim).uniform_(-bound, bound))
        self.shared = shared
        self.max_width = max_len
        self.active = max_len
        self.register_buffer("gate", None, persistent=False)

    def set_width(self, length: int) -> None:
        if not 0 <= length <= self.max_width:
            raise ValueError(f"KV-prompt length {length} outside 0..{self.max_width}")
        self.active = length

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``k, v``: (B, heads, N, head_dim) -> (B, heads, n + N, head_dim)."""
        n, b = self.active, k.shape[0]
        val = self.key if self.value is None else self.value
        pk, pv = self.key[:, :n], val[:, :n]
        if self.gate is not None:
            heads, _, head_dim = self.key.shape
            g = expand_gate(self.gate[:n], heads * head_dim).reshape(n, heads, head_dim).transpose(0, 1)
            pk, pv = pk * g, pv * g
        pk = pk.to(k.dtype).unsqueeze(0).expand(b, -1, -1, -1)
        pv = pv.to(v.dtype).unsqueeze(0).expand(b, -1, -1, -1)
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)

    def sliced_state(self, length: int) -> dict[str, torch.Tensor]:
        out = {"key": self.key[:, :length].detach().clone()}
        if self.value is not None:
            out["value"] = self.value[:, :length].detach().clone()
        return out
