"""noah_ray: neural prompt search (NOAH) for timm ViTs on Ray."""

from typing import Any

from noah_ray.errors import ConfigError
from noah_ray.space import BackboneShape, ModuleSpace, SearchSpace, SubnetConfig

__all__ = ["BackboneShape", "ConfigError", "ModuleSpace", "SearchSpace", "SubnetConfig",
           "load_subnet", "save_subnet"]
__version__ = "0.1.0"

# torch-dependent API, imported on first use so that ``import noah_ray`` stays light
_LAZY = {"load_subnet": "noah_ray.artifact", "save_subnet": "noah_ray.artifact"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'noah_ray' has no attribute {name!r}")
