"""Attention that runs a timm ``Attention``'s own weights plus LoRA on the fused qkv and
E2VPT key/value prompts; fused SDPA (dropout only while training) or the explicit path."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from noah_ray.modules.kv_prompt import KVPrompt
from noah_ray.modules.lora import LoRA


class PromptAttention(nn.Module):
    def __init__(self, attn: nn.Module, lora: LoRA | None = None, kv_prompt: KVPrompt | None = None) -> None:
        super().__init__()
        if getattr(attn, "gate", None) is not None:
            raise ValueError("gated timm attention is not supported; use a standard ViT")
        self.attn = attn  # the timm module, kept whole so it can be put back (``base``)
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.fused_attn = bool(getattr(attn, "fused_attn", True))
        self.lora = lora
        self.kv_prompt = kv_prompt

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("prompted attention takes no attention mask")
        a, (B, N, _) = self.attn, x.shape
        qkv = a.qkv(x)
        if self.lora is not None and self.lora.active > 0:
            qkv = qkv + self.lora.delta(x)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        if self.kv_prompt is not None and self.kv_prompt.active > 0:
            k, v = self.kv_prompt.extend(k, v)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=a.attn_drop.p if self.training else 0.0)
        else:
            scores = (q * a.scale) @ k.transpose(-2, -1)
            x = a.attn_drop(scores.softmax(dim=-1)) @ v
        x = getattr(a, "norm", nn.Identity())(x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))
        return a.proj_drop(a.proj(x))
