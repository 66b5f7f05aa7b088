"""noah_ray: neural prompt search (NOAH) for timm ViTs on Ray."""

from noah_ray.space import BackboneShape, ConfigError, ModuleSpace, SearchSpace, SubnetConfig

__all__ = ["BackboneShape", "ConfigError", "ModuleSpace", "SearchSpace", "SubnetConfig"]
__version__ = "0.1.0"
