"""noah_ray: neural prompt search (NOAH) for timm ViTs on Ray."""

from typing import Any

from noah_ray.errors import ConfigError
from noah_ray.space import ModuleSpace, SearchSpace, SubnetConfig
from noah_ray.space.kinds import BackboneShape

__all__ = ["BackboneShape", "ConfigError", "ModuleSpace", "SearchSpace", "SubnetConfig",
           "load_subnet", "results", "save_subnet"]
__version__ = "0.1.0"

# the facade over the layers (docs/architecture.md): names of upper layers, imported on first use so
# that ``import noah_ray`` stays light and no layer below imports one above through this package
_LAZY = {"load_subnet": ("noah_ray.interop.artifact", "load_subnet"),
         "save_subnet": ("noah_ray.interop.artifact", "save_subnet"),
         "results": ("noah_ray.store.results", None)}          # ``from noah_ray import results``


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        found = importlib.import_module(module)
        return getattr(found, attr) if attr else found
    raise AttributeError(f"module 'noah_ray' has no attribute {name!r}")
