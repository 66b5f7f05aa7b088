"""Asynchronous regularized (aging) evolution (:class:`AgingEvolutionEngine`), no generation barrier."""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any

from noah_ray.errors import ConfigError
from noah_ray.evolution.candidate import DONE, Candidate, rank_key
from noah_ray.evolution.generational import EvolutionEngine
from noah_ray.space import SearchSpace
from noah_ray.space.budget import ParamLimit

if TYPE_CHECKING:
    from noah_ray.config import SearchConfig


class AgingEvolutionEngine(EvolutionEngine):
    """Asynchronous evolution without a generation barrier: regularized (aging) evolution,
    Real et al. 2019, with NOAH's operators.

    The first ``population`` candidates are random.  Afterwards each ``ask`` creates one child
    at once from the *living population*, the ``population`` most recently scored candidates
    (when a new one is scored the oldest member leaves, however good: aging).  A child is a
    mutation with probability ``mutations / population``, a crossover with ``crossovers /
    population``, else random; each parent is drawn uniformly from the top-k of the living
    population, or with ``tournament`` S > 0 it is the best of S members sampled at random.
    Until ``max(top_k, tournament)`` candidates are scored children are random.  ``ask``
    returns a candidate whenever budget (``generations x population``) remains, so no worker
    waits; ``generation`` is the batch index ``i // population`` of the i-th candidate.
    """

    algorithm = "aging"
    batch = False

    def __init__(self, space: SearchSpace, limit: ParamLimit, *, tournament: int = 0, **kwargs: Any) -> None:
        super().__init__(space, limit, **kwargs)
        if not 0 <= tournament <= self.population:
            raise ConfigError(f"search.tournament {tournament} must be between 0 (top-k parents) and "
                              f"population {self.population}")
        self.tournament = tournament
        self.alive: collections.deque[str] = collections.deque()     # living population, oldest first
        self._seq = 0                                                  # scored candidates so far

    @classmethod
    def config_kwargs(cls, s: SearchConfig) -> dict[str, Any]:
        return {**super().config_kwargs(s), "tournament": s.tournament}

    def living(self) -> list[Candidate]:
        return [self.candidates[cid] for cid in self.alive]

    def parents(self) -> list[Candidate]:
        return sorted(self.living(), key=rank_key)[: self.top_k]

    def _pick(self, exclude: Candidate | None = None) -> Candidate:
        pool = [c for c in self.living() if c is not exclude]
        if self.tournament:
            return min(self.rng.sample(pool, min(self.tournament, len(pool))), key=rank_key)
        return self.rng.choice([c for c in self.parents() if c is not exclude])

    def _child(self, generation: int, op: str) -> Candidate | None:
        a = self._pick()
        if op == "mutation":
            cfg = self.space.mutate(a.config, self.rng, self.mutation_prob, self.depth_prob)
            return self._new(cfg, generation, op, (a.cid,))
        b = self._pick(exclude=a)
        return self._new(self.space.crossover(a.config, b.config, self.rng), generation, op, (a.cid, b.cid))

    def _create_one(self, generation: int) -> Candidate | None:
        if len(self.candidates) >= self.population and len(self.alive) >= max(self.top_k, self.tournament, 1):
            r = self.rng.random() * self.population
            op = "mutation" if r < self.mutations else "crossover" if r < self.mutations + self.crossovers else None
            if op == "crossover" and min(self.top_k, len(self.alive)) < 2:
                op = "mutation"
            for _ in range(self.op_attempts if op else 0):
                assert op is not None
                c = self._child(generation, op)
                if c is not None:
                    return c
        return super()._create_one(generation)

    def _on_result(self, c: Candidate) -> None:
        if c.status == DONE:
            c.info["seq"] = self._seq
            self._seq += 1
            self.alive.append(c.cid)
            while len(self.alive) > self.population:
                self.alive.popleft()                 # aging: the oldest member leaves

    def _restored(self) -> None:
        done = sorted((c for c in self.candidates.values() if c.status == DONE), key=lambda c: c.info["seq"])
        self.alive = collections.deque(c.cid for c in done[-self.population:])
        self._seq = done[-1].info["seq"] + 1 if done else 0
