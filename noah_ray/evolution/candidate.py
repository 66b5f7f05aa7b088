"""Candidates and their bookkeeping: :class:`Candidate`, its statuses, :class:`ParamLimit` (the
parameter budget), :class:`GenerationRecord` and :func:`pareto_front`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from noah_ray.errors import ConfigError
from noah_ray.recipes import module_count
from noah_ray.space import BackboneShape, SearchSpace, SubnetConfig


QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
#: what a failed attempt keeps when its candidate is tried again
ATTEMPT_KEYS = ("error", "t", "worker", "eval_time_s")


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


@dataclass
class Candidate:
    """One proposed subnet and what became of it."""

    cid: str                      # stable id, e.g. "g003-017" (generation 3, 18th candidate)
    config: SubnetConfig
    params: int                   # module parameters (head excluded)
    generation: int
    origin: str                   # random | mutation | crossover | nsga2
    parents: tuple[str, ...] = ()
    status: str = QUEUED
    score: float | None = None
    info: dict[str, Any] = field(default_factory=dict)   # wall_time_s, worker, params_head, ...

    def to_dict(self) -> dict[str, Any]:
        return {"cid": self.cid, "config": self.config.to_dict(), "params": self.params,
                "generation": self.generation, "origin": self.origin, "parents": list(self.parents),
                "status": self.status, "score": self.score, "info": self.info}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Candidate":
        return cls(d["cid"], SubnetConfig.from_dict(d["config"]), int(d["params"]), int(d["generation"]),
                   d["origin"], tuple(d["parents"]), d["status"], d["score"], dict(d["info"]))


@dataclass(frozen=True)
class GenerationRecord:
    """Bookkeeping of one closed generation; ``best_*`` is the best over all generations so far."""

    generation: int
    evaluated: int
    failed: int
    best_cid: str | None
    best_score: float | None
    best_params: int | None


def pareto_front(cands: Sequence[Candidate]) -> list[Candidate]:
    """Scored candidates not dominated in (higher score, fewer params), by increasing params."""
    scored = sorted((c for c in cands if c.status == DONE),
                    key=lambda c: (c.params, -c.score, c.cid))
    front: list[Candidate] = []
    for c in scored:
        if not front or c.score > front[-1].score:
            front.append(c)
    return front


def rank_key(c: Candidate) -> tuple:
    return (-c.score, c.params, c.cid)
