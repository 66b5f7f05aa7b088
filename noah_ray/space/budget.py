"""The parameter budget of a search: :class:`ParamLimit` (pure Python)."""

from __future__ import annotations

from dataclasses import dataclass

from noah_ray.errors import ConfigError
from noah_ray.space.kinds import BackboneShape
from noah_ray.space.recipes import module_count
from noah_ray.space.subnet import SearchSpace, SubnetConfig


@dataclass(frozen=True)
class ParamLimit:
    """Allowed trainable parameters of the prompt modules (head excluded), in millions, counted
    by ``convention``: ``exact`` (what a subnet materialises) or ``noah`` (NOAH's search count,
    ``(VPT[0] + max_vpt) * dim`` more when layer 0 has VPT tokens)."""

    max_m: float
    shape: BackboneShape
    min_m: float = 0.0
    kv_shared: bool = False
    convention: str = "exact"     # exact | noah (noah_ray.recipes.module_count)
    max_vpt: int = 0              # the space's largest VPT width (the noah count needs it)

    def count(self, cfg: SubnetConfig) -> int:
        return module_count(cfg, self.shape, kv_shared=self.kv_shared, convention=self.convention,
                            max_vpt=self.max_vpt)

    def violation(self, params: int) -> float:
        """How far (millions) ``params`` lies outside the limit; 0 inside."""
        return max(params / 1e6 - self.max_m, self.min_m - params / 1e6, 0.0)

    def ok(self, cfg: SubnetConfig) -> bool:
        return self.violation(self.count(cfg)) == 0.0

    def check(self, space: SearchSpace) -> None:
        """Raise :class:`ConfigError` if no subnet of ``space`` can satisfy the limit."""
        if not self.max_m > 0 or self.min_m < 0 or self.min_m >= self.max_m:
            raise ConfigError(f"search.param_limit {self.max_m} / param_min {self.min_m}: need "
                              f"0 <= param_min < param_limit (millions of module parameters)")
        low, high = self.count(space.smallest()) / 1e6, self.count(space.largest()) / 1e6
        if low > self.max_m:
            raise ConfigError(f"search.param_limit {self.max_m} M is below the smallest subnet of the "
                              f"space ({low:.4f} M); raise param_limit to at least {low:.4f} or shrink the space")
        if high < self.min_m:
            raise ConfigError(f"search.param_min {self.min_m} M is above the largest subnet of the "
                              f"space ({high:.4f} M); lower param_min below {high:.4f}")


def uniform_at_limit(space: SearchSpace, limit: ParamLimit) -> list[SubnetConfig]:
    """The hand-sized configs at the limit: each module of ``space`` alone, the same width in each
    of its layers (its deepest allowed depth), at the widest width of the space that fits
    ``limit``; in the space's module order.  The other modules are absent even where the space's
    depths lack 0 (``SearchSpace.validate(absent_ok=True)``: the supernet evaluates them switched
    off).  A module is left out when even its narrowest width exceeds the limit."""
    out = []
    zeros = {k: (0,) * space.num_layers for k in space.modules}
    for m, ms in space.modules.items():
        depth = max(ms.depths)
        for w in sorted(ms.widths, reverse=True) if depth else ():
            cfg = SubnetConfig({**zeros, m: (w,) * depth + (0,) * (space.num_layers - depth)})
            if limit.ok(cfg) and space.contains(cfg, absent_ok=True):
                out.append(cfg)
                break
    return out
