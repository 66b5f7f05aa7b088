"""Prompt modules, each holding max-width weights and running at any active width by slicing."""

from noah_ray.modules.adapter import Adapter, AdapterMLP
from noah_ray.modules.attention import PromptAttention
from noah_ray.modules.kv_prompt import KVPrompt
from noah_ray.modules.lora import LoRA
from noah_ray.modules.vpt import DeepPrompt

__all__ = ["Adapter", "AdapterMLP", "DeepPrompt", "KVPrompt", "LoRA", "PromptAttention"]
