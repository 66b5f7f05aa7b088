"""Lazy registry entries (Ray Tune's style): a config name maps to the ``"module:attribute"`` that
implements it, so the name list lives in one place at the config layer (checked when a job is
loaded) while the implementation stays in a higher layer, imported only when it is used.

:data:`noah_ray.config.schema.SEARCH_ENGINES` (``search.algorithm`` -> the engine class in
:mod:`noah_ray.evolution`) and :data:`noah_ray.config.hpo.HPO_SEARCHERS` / ``HPO_SCHEDULERS``
(``hpo.searcher`` / ``hpo.scheduler`` -> the factory in :mod:`noah_ray.hpo.driver`) are such tables.
"""

from __future__ import annotations

import importlib
from typing import Any


def load_entry(spec: str) -> Any:
    """The object ``"package.module:attribute"`` names (the module is imported on first use)."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"registry entry {spec!r}: use 'package.module:attribute'")
    return getattr(importlib.import_module(module), attr)
