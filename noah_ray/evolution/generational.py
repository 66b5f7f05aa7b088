"""NOAH's generational evolution (:class:`EvolutionEngine`): top-k parents, mutations, crossovers and
random fill, one generation at a time behind a barrier.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from noah_ray.errors import ConfigError
from noah_ray.evolution.candidate import Candidate, rank_key
from noah_ray.evolution.engine import SearchEngine
from noah_ray.space import SearchSpace
from noah_ray.space.budget import ParamLimit

if TYPE_CHECKING:
    from noah_ray.config import SearchConfig


class EvolutionEngine(SearchEngine):
    """NOAH's evolutionary search (defaults: the paper's)."""

    algorithm = "evolution"
    batch = True

    def __init__(self, space: SearchSpace, limit: ParamLimit, *, population: int = 50, top_k: int = 10,
                 mutations: int = 25, crossovers: int = 25, mutation_prob: float = 0.2,
                 depth_prob: float = 0.4, generations: int = 20, seed: int = 0, max_attempts: int = 200,
                 op_attempts: int = 10) -> None:
        if not 1 <= top_k <= population:
            raise ConfigError(f"search.top_k {top_k} must be between 1 and population {population}")
        if mutations < 0 or crossovers < 0 or mutations + crossovers > population:
            raise ConfigError(f"search.mutations {mutations} + crossovers {crossovers} must be >= 0 "
                              f"and at most population {population}")
        for name, p in (("mutation_prob", mutation_prob), ("depth_prob", depth_prob)):
            if not 0 <= p <= 1:
                raise ConfigError(f"search.{name} {p} must be in [0, 1]")
        super().__init__(space, limit, population=population, generations=generations, seed=seed,
                         max_attempts=max_attempts)
        self.top_k, self.mutations, self.crossovers = top_k, mutations, crossovers
        self.mutation_prob, self.depth_prob, self.op_attempts = mutation_prob, depth_prob, op_attempts

    @classmethod
    def config_kwargs(cls, s: SearchConfig) -> dict[str, Any]:
        return {**super().config_kwargs(s), "top_k": s.top_k, "mutations": s.mutations, "crossovers": s.crossovers,
                "mutation_prob": s.mutation_prob, "depth_prob": s.depth_prob}

    def parents(self) -> list[Candidate]:
        return sorted(self.scored(), key=rank_key)[: self.top_k]

    def _propose(self, generation: int) -> list[Candidate]:
        taken: set[str] = set()
        out: list[Candidate] = []
        parents = self.parents() if generation > 0 else []
        if parents:
            for _ in range(self.mutations * self.op_attempts):
                if sum(c.origin == "mutation" for c in out) >= self.mutations:
                    break
                p = self.rng.choice(parents)
                child = self.space.mutate(p.config, self.rng, self.mutation_prob, self.depth_prob)
                c = self._new(child, generation, "mutation", (p.cid,), taken)
                if c is not None:
                    out.append(c)
            for _ in range(self.crossovers * self.op_attempts if len(parents) > 1 else 0):
                if sum(c.origin == "crossover" for c in out) >= self.crossovers:
                    break
                a, b = self.rng.sample(parents, 2)
                child = self.space.crossover(a.config, b.config, self.rng)
                c = self._new(child, generation, "crossover", (a.cid, b.cid), taken)
                if c is not None:
                    out.append(c)
        out += self._random(generation, self.population - len(out), taken)
        return out
