"""Search engines over :class:`~noah_ray.space.SubnetConfig` (pure Python: no Ray, no torch).

An engine hands out candidates (``ask``) and takes their scores back (``tell``); it never
proposes a config twice and never proposes one outside the parameter limit.  Ray Tune
searchers in :mod:`noah_ray.searchers` wrap these engines; tests and benchmarks drive them
directly.

* :class:`EvolutionEngine` - NOAH's evolution: generation 0 is random; each later generation
  takes the top-k of everything scored so far as parents, makes ``mutations`` mutants and
  ``crossovers`` children and fills up to ``population`` with random configs.  A generation
  is evaluated completely before the next is proposed (a barrier, as in the paper).
* :class:`RandomEngine` - feasible unseen random configs, no barrier.
* :class:`AgingEvolutionEngine` - asynchronous steady-state evolution with aging (regularized
  evolution, Real et al. 2019): no barrier, every free worker at once gets a child of the
  living population (the ``population`` most recently scored candidates; the oldest leaves).
* :class:`NSGA2Engine` - Optuna's NSGA-II on (maximise score, minimise parameters) with the
  parameter limit as a constraint; infeasible proposals are answered from the parameter count
  alone and never evaluated.

Every engine counts ``generations`` x ``population`` candidates (failed ones included) and
groups them into generations for bookkeeping.  ``get_state`` / ``set_state`` round-trip
through JSON, so an interrupted search resumes exactly where it stopped; ``take_delta`` gives
what changed since its last call (constant size per result) and :func:`apply_deltas` replays
such deltas onto a saved state (incremental persistence, :mod:`noah_ray.statelog`).
"""

from __future__ import annotations

import base64
import collections
import math
import random
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from noah_ray.recipes import module_count
from noah_ray.space import BackboneShape, ConfigError, SearchSpace, SubnetConfig

if TYPE_CHECKING:
    from noah_ray.config import SearchConfig

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
#: what a failed attempt keeps when its candidate is tried again
ATTEMPT_KEYS = ("error", "t", "worker", "eval_time_s")
STATE_VERSION = 1


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


def _rank_key(c: Candidate) -> tuple:
    return (-c.score, c.params, c.cid)


class SearchEngine:
    """Bookkeeping shared by all engines; subclasses propose candidates.

    ``batch`` engines propose a whole generation at once (``_propose``) and wait until it is
    evaluated; the others create candidates one at a time (``_create_one``), the i-th created
    candidate belonging to generation ``i // population``.
    """

    algorithm = "base"
    batch = False

    def __init__(self, space: SearchSpace, limit: ParamLimit, *, population: int = 50,
                 generations: int = 20, seed: int = 0, max_attempts: int = 200) -> None:
        if population < 1 or generations < 1:
            raise ConfigError(f"population {population} and generations {generations} must be >= 1")
        limit.check(space)
        self.space, self.limit = space, limit
        self.population, self.generations, self.seed = population, generations, seed
        self.max_attempts = max_attempts
        self.rng = random.Random(seed)
        self.candidates: dict[str, Candidate] = {}
        self._by_key: dict[str, str] = {}
        self._by_gen: dict[int, list[str]] = {}
        self.queue: list[str] = []
        self.running: dict[str, str] = {}          # ticket (Tune trial id) -> cid
        self.generation = 0                         # the oldest generation not yet closed
        self.history: list[GenerationRecord] = []
        self.exhausted = False                      # no new feasible config could be found
        self.started = False
        self._dirty: dict[str, None] = {}           # candidates changed since the last take_delta
        self._delta_history = 0
        self._delta_rng: tuple | None = None

    @classmethod
    def from_config(cls, search: "SearchConfig", space: SearchSpace, limit: ParamLimit) -> "SearchEngine":
        """The engine the ``search`` section describes (each engine takes the keys it knows)."""
        return cls(space, limit, **cls.config_kwargs(search))

    @classmethod
    def config_kwargs(cls, s: "SearchConfig") -> dict[str, Any]:
        """The constructor arguments this engine reads from a ``search`` section."""
        return {"population": s.population, "generations": s.generations, "seed": s.seed}

    # ------------------------------------------------------------------ public
    @property
    def finished(self) -> bool:
        return self.started and not self.queue and not self.running and (
            self.generation >= self.generations or self.exhausted)

    def ask(self, ticket: str) -> Candidate | None:
        """The next candidate to evaluate, or None (wait for results, or ``finished``)."""
        if ticket in self.running:
            raise ValueError(f"ticket {ticket!r} already has a candidate")
        if not self.started:
            self.started = True
            self._open_generation()
        if self.queue:
            cid = self.queue.pop(0)
        elif not self.batch and not self.exhausted and len(self.candidates) < self.generations * self.population:
            c = self._create_one(len(self.candidates) // self.population)
            if c is None:
                self.exhausted = True
                self._advance()
                return None
            cid = self._add(c).cid
        else:
            return None
        c = self.candidates[cid]
        c.status = RUNNING
        self.running[ticket] = cid
        self._dirty[cid] = None
        return c

    def tell(self, ticket: str, score: float | None = None, *, failed: bool = False,
             info: dict[str, Any] | None = None) -> list[GenerationRecord]:
        """Record a result (``failed`` or a score; a non-finite score counts as failed).  Neither
        means the evaluation was cancelled: the candidate goes back to the front of the queue.
        Returns the generations this closed."""
        cid = self.running.pop(ticket, None)
        if cid is None:
            return []
        self._dirty[cid] = None
        c = self.candidates[cid]
        if not failed and score is None:
            c.status = QUEUED
            self.queue.insert(0, cid)
            return []
        c.info.update(info or {})
        c.info.setdefault("t", time.time())
        if failed or not math.isfinite(score):
            c.status, c.score = FAILED, None
        else:
            c.status, c.score = DONE, float(score)
        self._on_result(c)
        return self._advance()

    def scored(self) -> list[Candidate]:
        return [c for c in self.candidates.values() if c.status == DONE]

    def best(self) -> Candidate | None:
        s = self.scored()
        return min(s, key=_rank_key) if s else None

    def members(self, generation: int) -> list[Candidate]:
        return [self.candidates[cid] for cid in self._by_gen.get(generation, ())]

    # ------------------------------------------------------------- generations
    def _open_generation(self) -> None:
        if self.batch and self.generation < self.generations and not self.exhausted \
                and not self._by_gen.get(self.generation):
            new = self._propose(self.generation)
            if not new:
                self.exhausted = True
            for c in new:
                self.queue.append(self._add(c).cid)

    def _generation_complete(self) -> bool:
        if self.generation >= self.generations:
            return False
        ms = self.members(self.generation)
        if not ms or any(c.status in (QUEUED, RUNNING) for c in ms):
            return False
        return self.batch or self.exhausted or len(ms) >= self.population

    def _advance(self) -> list[GenerationRecord]:
        closed = []
        while self._generation_complete():
            closed.append(self._close(self.generation))
            self.generation += 1
            self._open_generation()
        return closed

    def _close(self, g: int) -> GenerationRecord:
        ms = self.members(g)
        best = self.best()
        rec = GenerationRecord(g, sum(c.status == DONE for c in ms), sum(c.status == FAILED for c in ms),
                               best.cid if best else None, best.score if best else None,
                               best.params if best else None)
        self.history.append(rec)
        return rec

    # -------------------------------------------------------------- proposals
    def _new(self, cfg: SubnetConfig, generation: int, origin: str, parents: tuple[str, ...] = (),
             taken: set[str] | None = None) -> Candidate | None:
        """A candidate for ``cfg`` if it is feasible and unseen (also not in ``taken``), else None."""
        key = cfg.key()
        if key in self._by_key or (taken is not None and key in taken):
            return None
        params = self.limit.count(cfg)
        if self.limit.violation(params) > 0:
            return None
        if taken is not None:
            taken.add(key)
        return Candidate("", cfg, params, generation, origin, parents)

    def _add(self, c: Candidate) -> Candidate:
        ids = self._by_gen.setdefault(c.generation, [])
        c.cid = f"g{c.generation:03d}-{len(ids):03d}"
        ids.append(c.cid)
        self.candidates[c.cid] = c
        self._by_key[c.config.key()] = c.cid
        self._dirty[c.cid] = None
        return c

    def _random(self, generation: int, n: int, taken: set[str]) -> list[Candidate]:
        out: list[Candidate] = []
        for _ in range(max(n, 1) * self.max_attempts):
            if len(out) >= n:
                break
            c = self._new(self.space.sample(self.rng), generation, "random", taken=taken)
            if c is not None:
                out.append(c)
        return out

    def _propose(self, generation: int) -> list[Candidate]:
        raise NotImplementedError

    def _create_one(self, generation: int) -> Candidate | None:
        got = self._random(generation, 1, set())
        return got[0] if got else None

    def _on_result(self, c: Candidate) -> None:
        pass

    # ------------------------------------------------------------------ state
    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state; running candidates are stored with their tickets."""
        version, internal, gauss = self.rng.getstate()
        return {"version": STATE_VERSION, "algorithm": self.algorithm,
                "candidates": [c.to_dict() for c in self.candidates.values()],
                "queue": list(self.queue), "running": dict(self.running), "generation": self.generation,
                "history": [vars(r) for r in self.history], "exhausted": self.exhausted,
                "started": self.started, "rng": [version, list(internal), gauss]}

    def take_delta(self) -> dict[str, Any]:
        """What changed since the previous call: the candidates created or changed (in creation
        order), the small fields (queue, running, generation, ...), the generation records added,
        and the random state if it moved.  Its size does not grow with the number of candidates;
        :func:`apply_deltas` replays deltas onto a :meth:`get_state` (idempotent)."""
        rng = self.rng.getstate()
        out = {"candidates": [self.candidates[cid].to_dict() for cid in self._dirty],
               "queue": list(self.queue), "running": dict(self.running), "generation": self.generation,
               "exhausted": self.exhausted, "started": self.started, "history_from": self._delta_history,
               "history": [vars(r) for r in self.history[self._delta_history:]]}
        if rng != self._delta_rng:
            out["rng"] = _pack_rng(rng)
        self._dirty, self._delta_history, self._delta_rng = {}, len(self.history), rng
        return out

    def touch(self, cid: str) -> None:
        """Mark a candidate changed outside ``ask`` / ``tell`` (e.g. its error noted), for ``take_delta``."""
        self._dirty[cid] = None

    def set_state(self, state: dict[str, Any], *, requeue_running: bool = False,
                  requeue_failed: bool = False) -> None:
        """Restore ``get_state``.  ``requeue_running`` puts candidates that were being evaluated
        back in front of the queue (their evaluations are lost, e.g. in a new Tune experiment);
        without it they stay running under their tickets (Tune's experiment restore resumes
        those trials).  ``requeue_failed`` gives failed candidates another attempt (a re-run after
        the cause was fixed): each keeps its earlier attempts in ``info["attempts"]`` and the
        generations it belongs to are reopened.  ``generations`` may have been raised to extend
        a finished search."""
        if state.get("version") != STATE_VERSION or state.get("algorithm") != self.algorithm:
            raise ConfigError(f"search state is for {state.get('algorithm')!r} v{state.get('version')}, "
                              f"this is {self.algorithm!r} v{STATE_VERSION}; resume with the same algorithm")
        self.candidates = {d["cid"]: Candidate.from_dict(d) for d in state["candidates"]}
        self._by_key = {c.config.key(): c.cid for c in self.candidates.values()}
        self._by_gen = {}
        for c in self.candidates.values():
            self._by_gen.setdefault(c.generation, []).append(c.cid)
        self.queue = list(state["queue"])
        self.running = dict(state["running"])
        self.generation = int(state["generation"])
        self.history = [GenerationRecord(**r) for r in state["history"]]
        self._delta_history = 0                     # the next delta carries the whole (short) history
        self.exhausted = bool(state["exhausted"])
        self.started = bool(state["started"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        if requeue_running:
            back = sorted(self.running.values())
            for cid in back:
                self.candidates[cid].status = QUEUED
            self.queue = back + self.queue
            self.running = {}
            self._dirty.update(dict.fromkeys(back))
        if requeue_failed:
            self._requeue_failed()
        self._restored()
        if self.started:
            self._open_generation()
            self._advance()

    def _requeue_failed(self) -> None:
        failed = sorted((c for c in self.candidates.values() if c.status == FAILED), key=lambda c: c.cid)
        for c in failed:
            c.info.setdefault("attempts", []).append({k: c.info.pop(k) for k in ATTEMPT_KEYS if k in c.info})
            c.status, c.score = QUEUED, None
            self._dirty[c.cid] = None
        if failed and failed[0].generation < self.generation:
            reopened = min(c.generation for c in failed)
            self.generation = reopened
            self.history = [r for r in self.history if r.generation < reopened]
        self.queue = [c.cid for c in failed] + self.queue

    def _restored(self) -> None:
        pass


def _pack_rng(state: tuple) -> dict[str, Any]:
    """``random.Random.getstate()`` in 3.4 kB of JSON (the plain list takes twice that)."""
    version, internal, gauss = state
    return {"v": version, "mt": base64.b64encode(struct.pack(f"<{len(internal)}I", *internal)).decode(),
            "gauss": gauss}


def _unpack_rng(packed: dict[str, Any]) -> list:
    raw = base64.b64decode(packed["mt"])
    return [packed["v"], list(struct.unpack(f"<{len(raw) // 4}I", raw)), packed["gauss"]]


def apply_deltas(state: dict[str, Any], deltas: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Replay :meth:`SearchEngine.take_delta` results, oldest first, onto ``state`` (a
    :meth:`SearchEngine.get_state`, changed in place and returned).  Replaying a delta twice
    gives the same state."""
    cands = state["candidates"]
    pos = {d["cid"]: i for i, d in enumerate(cands)}
    for d in deltas:
        for c in d["candidates"]:
            i = pos.setdefault(c["cid"], len(cands))
            if i == len(cands):
                cands.append(c)
            else:
                cands[i] = c
        for k in ("queue", "running", "generation", "exhausted", "started"):
            state[k] = d[k]
        state["history"][d["history_from"]:] = d["history"]
        if "rng" in d:
            state["rng"] = _unpack_rng(d["rng"])
    return state


class RandomEngine(SearchEngine):
    """Random search over feasible, unseen configs (the baseline)."""

    algorithm = "random"


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
    def config_kwargs(cls, s: "SearchConfig") -> dict[str, Any]:
        return {**super().config_kwargs(s), "top_k": s.top_k, "mutations": s.mutations, "crossovers": s.crossovers,
                "mutation_prob": s.mutation_prob, "depth_prob": s.depth_prob}

    def parents(self) -> list[Candidate]:
        return sorted(self.scored(), key=_rank_key)[: self.top_k]

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
        self._live: dict = {}                        # cid -> live optuna Trial
        self._asked = None                           # trial behind the candidate being added
        self._study = self._new_study(seed)

    def _new_study(self, seed: int):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._dists = {}
        for m, s in self.space.modules.items():
            self._dists[f"{m}_depth"] = optuna.distributions.CategoricalDistribution(list(s.depths))
            for i in range(max(s.depths)):
                self._dists[f"{m}_w{i}"] = optuna.distributions.CategoricalDistribution(list(s.widths))
        self._set_constraint = hasattr(optuna.trial.Trial, "set_constraint")
        kwargs = {} if self._set_constraint else {"constraints_func": lambda t: (t.user_attrs["violation"],)}
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

    def _constrain(self, trial, violation: float) -> None:
        if self._set_constraint:
            trial.set_constraint("params", violation)
        else:
            trial.set_user_attr("violation", violation)

    def _ask_fixed(self, cfg: SubnetConfig):
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
                extra = {"constraints": {"params": 0.0}} if self._set_constraint else \
                    {"user_attrs": {"violation": 0.0}}
                self._study.add_trial(optuna.trial.create_trial(
                    state=TrialState.COMPLETE if done else TrialState.FAIL,
                    values=[c.score, c.params / 1e6] if done else None,
                    params=self.encode(c.config), distributions=self._dists, **extra))
            else:
                self._live[c.cid] = self._ask_fixed(c.config)


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
    def config_kwargs(cls, s: "SearchConfig") -> dict[str, Any]:
        return {**super().config_kwargs(s), "tournament": s.tournament}

    def living(self) -> list[Candidate]:
        return [self.candidates[cid] for cid in self.alive]

    def parents(self) -> list[Candidate]:
        return sorted(self.living(), key=_rank_key)[: self.top_k]

    def _pick(self, exclude: Candidate | None = None) -> Candidate:
        pool = [c for c in self.living() if c is not exclude]
        if self.tournament:
            return min(self.rng.sample(pool, min(self.tournament, len(pool))), key=_rank_key)
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


#: the engines by ``search.algorithm`` (``ENGINES[name].from_config(search, space, limit)``)
ENGINES: dict[str, type[SearchEngine]] = {"evolution": EvolutionEngine, "random": RandomEngine,
                                          "optuna": NSGA2Engine, "aging": AgingEvolutionEngine}


@dataclass(frozen=True)
class TargetObjective:
    """A cheap synthetic objective with a known optimum (1.0 at ``target``), for testing and
    benchmarking searchers without a model: one minus the mean per-layer width distance to
    ``target``, each layer's distance scaled by the module's maximum width."""

    space: SearchSpace
    target: SubnetConfig

    @classmethod
    def random(cls, space: SearchSpace, limit: ParamLimit, seed: int) -> "TargetObjective":
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
