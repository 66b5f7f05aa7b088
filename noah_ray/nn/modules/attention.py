"""Attention with E2VPT key/value prompts, and where prompt modules sit in a timm block.

:class:`PromptAttention` replaces a block's ``attn`` only in layers with KV prompts: it runs the
timm ``Attention``'s own weights (``qkv`` possibly a LoRA-wrapped linear) with the prompt tokens
concatenated to the keys and values; fused SDPA (dropout only while training) or the explicit
path.  Every other layer keeps timm's attention and its forward.

On disk the trainable state keeps the names of the first layout, where every block's attention
was wrapped (``block.attn.attn.<timm>``, ``block.attn.lora.*``, ``block.attn.kv_prompt.*``):
:func:`legacy_names` maps the current module names to those.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

from noah_ray.errors import ConfigError


def timm_attention(block: nn.Module) -> nn.Module:
    """The timm attention module of ``block`` (inside a :class:`PromptAttention` if wrapped)."""
    attn = getattr(block, "attn", None)
    if attn is None:
        raise ConfigError(f"{type(block).__name__} blocks have no attn module (parallel blocks?); "
                          f"prompt modules need a ViT with timm Block blocks")
    return attn.attn if isinstance(attn, PromptAttention) else attn


def check_kv_support(attn: nn.Module) -> None:
    """KV prompts extend the keys and values of timm's standard ``Attention`` only."""
    if type(attn) is not Attention or getattr(attn, "gate", None) is not None:
        kind = "gated Attention" if type(attn) is Attention else type(attn).__name__
        raise ConfigError(f"KV prompts need timm's standard Attention, this backbone has {kind}; "
                          f"use a standard ViT or set kv_prompt widths to 0")


class PromptAttention(nn.Module):
    attn: Any                    # a timm Attention: its submodules and settings are read by name
    num_heads: int
    head_dim: int
    kv_prompt: Any               # a KVPrompt

    def __init__(self, attn: nn.Module, kv_prompt: nn.Module) -> None:
        super().__init__()
        check_kv_support(attn)
        self.attn = attn  # the timm module, kept whole so it can be put back
        self.num_heads, self.head_dim = cast(int, attn.num_heads), cast(int, attn.head_dim)
        self.kv_prompt = kv_prompt

    @property
    def fused_attn(self) -> bool:
        return bool(self.attn.fused_attn)

    @fused_attn.setter
    def fused_attn(self, enable: bool) -> None:
        self.attn.fused_attn = enable

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("prompted attention takes no attention mask")
        a, (B, N, _) = self.attn, x.shape
        qkv = a.qkv(x)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        if self.kv_prompt.active > 0:
            k, v = self.kv_prompt.extend(k, v)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=a.attn_drop.p if self.training else 0.0)
        else:
            scores = (q * a.scale) @ k.transpose(-2, -1)
            x = a.attn_drop(scores.softmax(dim=-1)) @ v
        x = a.norm(x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))
        return a.proj_drop(a.proj(x))


def legacy_names(attn: nn.Module) -> dict[str, str]:
    """State-dict names under a block's ``attn.`` -> the names the first layout wrote.

    Current: ``[attn.]qkv.base.*`` (LoRA-wrapped qkv), ``[attn.]qkv.lora.*``, ``[attn.]<timm>``
    (the ``attn.`` when KV prompts wrap it), ``kv_prompt.*``.  Written: ``attn.qkv.*``,
    ``lora.*``, ``attn.<timm>``, ``kv_prompt.*``."""
    wrapped = isinstance(attn, PromptAttention)
    core: nn.Module = cast(PromptAttention, attn).attn if wrapped else attn
    out = {}
    for k in core.state_dict(keep_vars=True):
        if k.startswith("qkv.base."):
            old = "attn.qkv." + k[len("qkv.base."):]
        elif k.startswith("qkv.lora."):
            old = "lora." + k[len("qkv.lora."):]
        else:
            old = "attn." + k
        out[("attn." if wrapped else "") + k] = old
    return out
