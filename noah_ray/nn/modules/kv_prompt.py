"""E2VPT key/value prompts: learnable tokens concatenated to the keys and values of one
attention layer (queries unchanged, so the output length is unchanged and fused SDPA applies).

Shapes ``(heads, max_len, head_dim)``; ``shared=True`` (E2VPT's published runs) uses one tensor
for keys and values.  Token ``j``'s vector is ``key[:, j]`` flattened head-major
(``heads * head_dim`` features).  Init (``init``): ``kaiming`` (E2VPT: Kaiming-uniform, a = 0,
fan_in = ``max_len * head_dim``, bound ``sqrt(6 / (max_len * head_dim))``) or ``xavier``
(bound ``sqrt(6 / (2 * heads * head_dim))``).

``gate`` (optional, ``(max_len, segments)``, not saved in the state dict) multiplies each
token's key and value vectors segment-wise (E2VPT pruning, see :mod:`noah_ray.nn.prune`);
``gate_layout`` as in :func:`~noah_ray.nn.modules.vpt.expand_gate`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from noah_ray.nn.modules.attention import PromptAttention
from noah_ray.nn.modules.base import BuildContext, PromptModule, register
from noah_ray.nn.modules.vpt import GATE_LAYOUTS, expand_gate
from noah_ray.space.kinds import KV_PROMPT

KV_INITS = ("kaiming", "xavier")


def _init(t: torch.Tensor, init: str) -> None:
    if init == "kaiming":
        nn.init.kaiming_uniform_(t, a=0, mode="fan_in", nonlinearity="leaky_relu")
    elif init == "xavier":
        heads, _, head_dim = t.shape
        bound = math.sqrt(6.0 / (2 * head_dim * heads))
        nn.init.uniform_(t, -bound, bound)
    else:
        raise ValueError(f"KV-prompt init {init!r} unknown; use {' or '.join(KV_INITS)}")


@register
class KVPrompt(PromptModule):
    kind, label, gated, token_axis = KV_PROMPT, "KV-prompt length", ("key", "value"), 1

    def __init__(self, num_heads: int, head_dim: int, max_len: int, shared: bool = False, *,
                 init: str = "xavier", gate_layout: str = "contiguous") -> None:
        super().__init__()
        if max_len <= 0:
            raise ValueError(f"KV-prompt max_len must be > 0, got {max_len}")
        if gate_layout not in GATE_LAYOUTS:
            raise ValueError(f"gate layout {gate_layout!r} unknown; use contiguous or strided")
        self.key = nn.Parameter(torch.empty(num_heads, max_len, head_dim))
        self.value = None if shared else nn.Parameter(torch.empty(num_heads, max_len, head_dim))
        with torch.no_grad():
            for t in (self.key, self.value):
                if t is not None:
                    _init(t, init)
        self.shared = shared
        self.gate_layout = gate_layout
        self._init_width(max_len)

    @classmethod
    def build(cls, width: int, ctx: BuildContext) -> KVPrompt:
        heads, r = ctx.shape.num_heads, ctx.recipe
        return cls(heads, ctx.shape.embed_dim // heads, width, r.kv_shared, init=r.kv_init,
                   gate_layout=r.prune_pieces)

    @staticmethod
    def find(pblock: Any) -> KVPrompt | None:
        attn = getattr(pblock.block, "attn", None)
        return attn.kv_prompt if isinstance(attn, PromptAttention) else None

    @classmethod
    def attach(cls, pblock: Any, module: KVPrompt, recipe) -> None:
        pblock.block.attn = PromptAttention(pblock.block.attn, module)  # checks the attention type

    @staticmethod
    def detach(block: Any) -> None:
        if isinstance(getattr(block, "attn", None), PromptAttention):
            block.attn = block.attn.attn

    def gate_multiplier(self, gate: torch.Tensor) -> torch.Tensor:
        """``(n, segments)`` gate -> ``(heads, n, head_dim)`` multiplier of the first ``n`` tokens."""
        heads, _, head_dim = self.key.shape
        n = gate.shape[0]
        return expand_gate(gate, heads * head_dim, self.gate_layout).reshape(n, heads, head_dim).transpose(0, 1)

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``k, v``: (B, heads, N, head_dim) -> (B, heads, n + N, head_dim)."""
        n, b = self.active, k.shape[0]
        val = self.key if self.value is None else self.value
        pk, pv = self.key[:, :n], val[:, :n]
        if self.gate is not None:
            g = self.gate_multiplier(self.gate[:n])
            pk, pv = pk * g, pv * g
        pk = pk.to(k.dtype).unsqueeze(0).expand(b, -1, -1, -1)
        pv = pv.to(v.dtype).unsqueeze(0).expand(b, -1, -1, -1)
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)

    def sliced_state(self, length: int) -> dict[str, torch.Tensor]:
        out = {"key": self.key[:, :length].detach().clone()}
        if self.value is not None:
            out["value"] = self.value[:, :length].detach().clone()
        return out
