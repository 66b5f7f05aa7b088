"""Candidates and their bookkeeping: :class:`Candidate`, its statuses, :class:`GenerationRecord`
and :func:`pareto_front` (the parameter budget is :class:`noah_ray.space.budget.ParamLimit`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from noah_ray.space import SubnetConfig

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
#: what a failed attempt keeps when its candidate is tried again
ATTEMPT_KEYS = ("error", "t", "worker", "eval_time_s")


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
    def from_dict(cls, d: dict[str, Any]) -> Candidate:
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
                    key=lambda c: (c.params, -cast(float, c.score), c.cid))   # done: scored
    front: list[Candidate] = []
    for c in scored:
        if not front or cast(float, c.score) > cast(float, front[-1].score):
            front.append(c)
    return front


def rank_key(c: Candidate) -> tuple[float, int, str]:
    return (-cast(float, c.score), c.params, c.cid)   # ranks scored candidates
