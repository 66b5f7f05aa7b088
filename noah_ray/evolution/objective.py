"""A synthetic objective with a known optimum (:class:`TargetObjective`) for tests and benchmarks."""

from __future__ import annotations

import random
from dataclasses import dataclass

from noah_ray.errors import ConfigError
from noah_ray.space import SearchSpace, SubnetConfig
from noah_ray.space.budget import ParamLimit


@dataclass(frozen=True)
class TargetObjective:
    """A cheap synthetic objective with a known optimum (1.0 at ``target``), for testing and
    benchmarking searchers without a model: one minus the mean per-layer width distance to
    ``target``, each layer's distance scaled by the module's maximum width."""

    space: SearchSpace
    target: SubnetConfig

    @classmethod
    def random(cls, space: SearchSpace, limit: ParamLimit, seed: int) -> TargetObjective:
        """A target drawn at random among the subnets inside ``limit``."""
        rng = random.Random(seed)
        for _ in range(100_000):
            cfg = space.sample(rng)
            if limit.ok(cfg):
                return cls(space, cfg)
        raise ConfigError("no random subnet fits the limit; widen it")

    optimum = 1.0

    def __call__(self, cfg: SubnetConfig) -> float:
        total = cells = 0.0
        for m, s in self.space.modules.items():
            for a, b in zip(cfg.layer_widths(m), self.target.layer_widths(m)):
                total += abs(a - b) / s.max_width
                cells += 1
        return 1.0 - total / cells
