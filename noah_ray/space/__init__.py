"""The search space, pure Python (no torch, no Ray): the prompt-module kinds and
:class:`BackboneShape` (:mod:`.kinds`), :class:`SubnetConfig` and :class:`SearchSpace`
(:mod:`.subnet`), the recipe table (:mod:`.recipes`) and the parameter budget (:mod:`.budget`).

The layer above the ground (``errors``, ``progress``, ``security``); it imports nothing else of
the package.  Its public names are re-exported here.
"""

from noah_ray.space.budget import ParamLimit
from noah_ray.space.kinds import ADAPTER, KV_PROMPT, LORA, MODULES, SPECS, VPT, BackboneShape, ModuleSpec
from noah_ray.space.subnet import (
                                   PAPER_DEPTHS,
                                   PAPER_FEWSHOT_WIDTHS,
                                   PAPER_VTAB_WIDTHS,
                                   ModuleSpace,
                                   ParamCount,
                                   SearchSpace,
                                   SubnetConfig,
                                   module_params,
                                   yaml_problem,
)

__all__ = ["ADAPTER", "KV_PROMPT", "LORA", "MODULES", "PAPER_DEPTHS", "PAPER_FEWSHOT_WIDTHS", "PAPER_VTAB_WIDTHS",
           "SPECS", "VPT", "BackboneShape", "ModuleSpace", "ModuleSpec", "ParamCount", "ParamLimit", "SearchSpace",
           "SubnetConfig", "module_params", "yaml_problem"]
