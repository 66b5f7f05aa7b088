"""The prompt-module kinds as data (pure Python, no torch): one :class:`ModuleSpec` per kind.

This table is the torch-free half of the prompt-module registry.  :mod:`noah_ray.space` counts
parameters with it, and the torch classes in :mod:`noah_ray.nn.modules` (one
:class:`~noah_ray.nn.modules.base.PromptModule` subclass per kind, registered in
:data:`noah_ray.nn.modules.REGISTRY`) name their kind by the same ``name``.  A new kind is one entry
here plus one subclass there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class BackboneShape:
    """What the parameter count needs to know about a ViT."""

    embed_dim: int = 768
    num_heads: int = 12
    depth: int = 12
    num_classes: int = 100

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


VPT = "vpt"
LORA = "lora"
ADAPTER = "adapter"
KV_PROMPT = "kv_prompt"


@dataclass(frozen=True)
class ModuleSpec:
    """One prompt-module kind: its name, what its width counts and its parameters per layer.

    ``params(width, shape, kv_shared)`` is the exact number of trainable parameters one module
    of ``width`` adds to one layer of a backbone of ``shape`` (0 for width 0).  ``prunable``:
    E2VPT pruning can remove its tokens (the module carries a pruning gate).
    ``passes_tokens_on``: a layer of width 0 lets the previous layer's tokens through instead of
    having none (VPT-Deep), so pruning keeps at least one token there."""

    name: str
    width_of: str
    params: Callable[[int, BackboneShape, bool], int]
    prunable: bool = False
    passes_tokens_on: bool = False

    def count(self, width: int, shape: BackboneShape, kv_shared: bool = False) -> int:
        return self.params(width, shape, kv_shared) if width else 0


SPECS: dict[str, ModuleSpec] = {s.name: s for s in (
    # width prompt tokens of size d
    ModuleSpec(VPT, "tokens", lambda w, s, kv: w * s.embed_dim, prunable=True, passes_tokens_on=True),
    # A: r x d, B: 3d x r on the fused qkv
    ModuleSpec(LORA, "rank", lambda w, s, kv: 4 * s.embed_dim * w),
    # down d -> r (+ bias), up r -> d (+ bias)
    ModuleSpec(ADAPTER, "hidden units", lambda w, s, kv: 2 * s.embed_dim * w + w + s.embed_dim),
    # key and value prompts (one tensor when shared), heads x n x head_dim each
    ModuleSpec(KV_PROMPT, "tokens", lambda w, s, kv: (1 if kv else 2) * w * s.embed_dim, prunable=True),
)}

#: every kind, in the canonical order of configs and tables
MODULES: tuple[str, ...] = tuple(SPECS)
#: the kinds E2VPT pruning can prune
PRUNABLE_KINDS: tuple[str, ...] = tuple(m for m, s in SPECS.items() if s.prunable)
