"""Warm starts of the subnet search (``search.warm_start``): :func:`warm_configs`, the configs
generation 0 holds before its random ones, from the sources :data:`WARM_SOURCES`:

* ``uniform`` - the hand-sized configs at the limit (:func:`noah_ray.space.budget.uniform_at_limit`):
  each module alone, uniform over its layers, at the widest width that fits; the search then
  never ends below a hand-sized module on the supernet's own ranking.
* ``sweep`` - the winners (``best_subnet.yaml``) of the sweep's other tasks (``search.warm_jobs``,
  set by :mod:`noah_ray.run.sweep`) that had finished their search when this one starts.

Configs outside the space or the limit are skipped by the engine (``SearchEngine._warm``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from noah_ray.config import JobConfig
from noah_ray.space import SubnetConfig
from noah_ray.space.budget import ParamLimit, uniform_at_limit
from noah_ray.store import storage
from noah_ray.store.layout import JobPaths


def _uniform(job: JobConfig, limit: ParamLimit) -> list[SubnetConfig]:
    return uniform_at_limit(job.space, limit)


def _sweep(job: JobConfig, limit: ParamLimit) -> list[SubnetConfig]:
    out = []
    for name in job.search.warm_jobs:
        loc = JobPaths.of(dataclasses.replace(job, name=name)).best_subnet()
        if name != job.name and storage.exists(loc):
            out.append(SubnetConfig.from_yaml(storage.read_text(loc)))
    return out


#: the ``search.warm_start`` sources (names: :data:`noah_ray.config.schema.WARM_STARTS`)
WARM_SOURCES: dict[str, Callable[[JobConfig, ParamLimit], list[SubnetConfig]]] = {
    "uniform": _uniform,
    "sweep": _sweep,
}


def warm_configs(job: JobConfig, limit: ParamLimit) -> list[SubnetConfig]:
    """The warm-start configs of ``job`` (its ``search.warm_start`` sources in order, no repeats)."""
    out: dict[str, SubnetConfig] = {}
    for source in job.search.warm_start:
        for cfg in WARM_SOURCES[source](job, limit):
            out.setdefault(cfg.key(), cfg)
    return list(out.values())
