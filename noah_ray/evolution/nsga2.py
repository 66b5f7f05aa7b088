"""Optuna's NSGA-II as an engine (:class:`NSGA2Engine`): (score up, parameters down) with the parameter
limit as a constraint.
"""

from __future__ import annotations

from typing import Any, cast

from noah_ray.evolution.candidate import DONE, FAILED, Candidate
from noah_ray.evolution.engine import SearchEngine
from noah_ray.space import SearchSpace, SubnetConfig
from noah_ray.space.budget import ParamLimit


class NSGA2Engine(SearchEngine):
    """Optuna NSGA-II over (score up, parameters down) with the parameter limit as constraint.

    Each config is encoded as ``<module>_depth`` plus ``<module>_w<i>`` for every layer a module
    can reach (widths beyond the depth are ignored).  Infeasible or already-seen proposals are
    told to Optuna at once (infeasible: constraint violation; seen: the known score) and never
    handed out.  On restore the study is rebuilt by replaying every candidate.
    """

    algorithm = "optuna"

    def __init__(self, space: SearchSpace, limit: ParamLimit, *, population: int = 50,
                 generations: int = 20, seed: int = 0, mutation_prob: float | None = None,
                 max_attempts: int = 200) -> None:
        super().__init__(space, limit, population=population, generations=generations, seed=seed,
                         max_attempts=max_attempts)
        self.mutation_prob = mutation_prob
        self._live: dict[str, Any] = {}              # cid -> live optuna Trial
        self._asked: Any = None                         # trial behind the candidate being added
        self._study = self._new_study(seed)

    def _new_study(self, seed: int) -> Any:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._dists: dict[str, optuna.distributions.BaseDistribution] = {}
        for m, s in self.space.modules.items():
            self._dists[f"{m}_depth"] = optuna.distributions.CategoricalDistribution(list(s.depths))
            for i in range(max(s.depths)):
                self._dists[f"{m}_w{i}"] = optuna.distributions.CategoricalDistribution(list(s.widths))
        self._set_constraint = hasattr(optuna.trial.Trial, "set_constraint")
        kwargs: dict[str, Any] = \
            {} if self._set_constraint else {"constraints_func": lambda t: (t.user_attrs["violation"],)}
        sampler = optuna.samplers.NSGAIISampler(population_size=max(self.population, 2), seed=seed,
                                                mutation_prob=self.mutation_prob, **kwargs)
        return optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)

    def decode(self, params: dict[str, Any]) -> SubnetConfig:
        n = self.space.num_layers
        return SubnetConfig({m: tuple(params[f"{m}_w{i}"] if i < params[f"{m}_depth"] else 0 for i in range(n))
                             for m in self.space.modules})

    def encode(self, cfg: SubnetConfig) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for m, s in self.space.modules.items():
            d, ws = cfg.depth(m), cfg.layer_widths(m)
            out[f"{m}_depth"] = d if d in s.depths else min(s.depths)
            for i in range(max(s.depths)):
                out[f"{m}_w{i}"] = ws[i] if ws[i] in s.widths else s.widths[0]
        return out

    def _constrain(self, trial: Any, violation: float) -> None:
        if self._set_constraint:
            trial.set_constraint("params", violation)
        else:
            trial.set_user_attr("violation", violation)

    def _ask_fixed(self, cfg: SubnetConfig) -> Any:
        """A live Optuna trial carrying exactly ``cfg`` (feasible)."""
        self._study.enqueue_trial(self.encode(cfg))
        trial = self._study.ask(self._dists)
        self._constrain(trial, 0.0)
        return trial

    def _create_one(self, generation: int) -> Candidate | None:
        from optuna.trial import TrialState

        for _ in range(self.max_attempts):
            trial = self._study.ask(self._dists)
            cfg = self.decode(trial.params)
            params = self.limit.count(cfg)
            violation = self.limit.violation(params)
            self._constrain(trial, violation)
            seen = self.candidates.get(self._by_key.get(cfg.key(), ""))
            if violation > 0:                    # infeasible: answered by the count alone
                self._study.tell(trial, [0.0, params / 1e6])
            elif seen is not None and seen.status == DONE:
                self._study.tell(trial, [seen.score, params / 1e6])
            elif seen is not None:               # being evaluated or failed
                self._study.tell(trial, state=TrialState.FAIL)
            else:
                self._asked = trial
                return Candidate("", cfg, params, generation, "nsga2")
        got = self._random(generation, 1, set())     # the sampler is stuck: fall back to random
        return got[0] if got else None

    def _add(self, c: Candidate) -> Candidate:
        super()._add(c)
        trial, self._asked = self._asked, None
        self._live[c.cid] = trial if trial is not None else self._ask_fixed(c.config)
        return c

    def _on_result(self, c: Candidate) -> None:
        from optuna.trial import TrialState

        trial = self._live.pop(c.cid)
        if c.status == DONE:
            self._study.tell(trial, [c.score, c.params / 1e6])
        else:
            self._study.tell(trial, state=TrialState.FAIL)

    def _restored(self) -> None:
        """Rebuild the study: scored and failed candidates are replayed, the others re-asked."""
        import optuna
        from optuna.trial import TrialState

        self._study = self._new_study(self.seed + 7919 * len(self.candidates))
        self._live, self._asked = {}, None
        for c in self.candidates.values():
            if c.status in (DONE, FAILED):
                done = c.status == DONE
                extra: dict[str, Any] = {"constraints": {"params": 0.0}} if self._set_constraint else \
                    {"user_attrs": {"violation": 0.0}}
                self._study.add_trial(optuna.trial.create_trial(
                    state=TrialState.COMPLETE if done else TrialState.FAIL,
                    values=[cast(float, c.score), c.params / 1e6] if done else None,
                    params=self.encode(c.config), distributions=self._dists, **extra))
            else:
                self._live[c.cid] = self._ask_fixed(c.config)
