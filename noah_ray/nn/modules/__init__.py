"""Prompt modules, each holding max-width weights and running at any active width by slicing.

Importing this package registers every kind in :data:`REGISTRY` (see :mod:`noah_ray.nn.modules.base`).
"""

from noah_ray.nn.modules.adapter import Adapter, AdapterMLP
from noah_ray.nn.modules.attention import PromptAttention, legacy_names, timm_attention
from noah_ray.nn.modules.base import REGISTRY, BuildContext, PromptModule, modules_of
from noah_ray.nn.modules.kv_prompt import KVPrompt
from noah_ray.nn.modules.lora import LoRA, LoRALinear
from noah_ray.nn.modules.vpt import DeepPrompt
from noah_ray.space.kinds import MODULES

if set(REGISTRY) != set(MODULES):  # pragma: no cover - a kind added to one table only
    raise ImportError(f"module kinds {sorted(set(MODULES) ^ set(REGISTRY))} lack a spec or a class")
_ordered = {m: REGISTRY[m] for m in MODULES}  # canonical order, in place (base.modules_of reads it)
REGISTRY.clear()
REGISTRY.update(_ordered)

__all__ = ["REGISTRY", "Adapter", "AdapterMLP", "BuildContext", "DeepPrompt", "KVPrompt", "LoRA", "LoRALinear",
           "PromptAttention", "PromptModule", "legacy_names", "modules_of", "timm_attention"]
