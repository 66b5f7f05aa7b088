"""Asynchronous (aging / regularized) evolution, checked against its definition (Real et al.
2019): no barrier, the living population is the most recent scored candidates, the oldest leaves,
parents come from it (top-k or tournament).  Pure Python: no Ray, no model."""

from __future__ import annotations

import random

import pytest

from noah_ray.config import JobConfig
from noah_ray.errors import ConfigError
from noah_ray.evolution import ENGINES, AgingEvolutionEngine, TargetObjective
from noah_ray.search.driver import make_searcher
from noah_ray.space import ModuleSpace, SearchSpace
from noah_ray.space.budget import ParamLimit
from noah_ray.space.kinds import BackboneShape

SPACE = SearchSpace({m: ModuleSpace((2, 4, 6), (1, 5, 10)) for m in ("vpt", "lora", "adapter")}, num_layers=6)
LIMIT = ParamLimit(0.01, BackboneShape(48, 3, 6, 10))
OBJECTIVE = TargetObjective.random(SPACE, LIMIT, seed=11)


def engine(**kw) -> AgingEvolutionEngine:
    base = {"population": 8, "generations": 10, "top_k": 3, "mutations": 4, "crossovers": 3, "seed": 0}
    return AgingEvolutionEngine(SPACE, LIMIT, **{**base, **kw})


def test_no_worker_waits_while_budget_remains():
    """20 workers, population 8, results arriving in random order: every ask before the budget
    (80 candidates) is spent returns a candidate at once."""
    e, rng = engine(), random.Random(1)
    running, asked, told = {}, 0, 0
    while True:
        while len(running) < 20:
            c = e.ask(f"t{asked}")
            if len(e.candidates) <= 80 and c is None:
                assert len(e.candidates) == 80, f"worker waited at {len(e.candidates)} candidates"
            if c is None:
                break
            running[f"t{asked}"] = c
            asked += 1
        if not running:
            break
        ticket = rng.choice(sorted(running))
        e.tell(ticket, OBJECTIVE(running.pop(ticket).config))
        told += 1
    cands = list(e.candidates.values())
    assert asked == told == len(cands) == 80 and e.finished
    assert len({c.config.key() for c in cands}) == 80 and all(LIMIT.ok(c.config) for c in cands)
    assert [c.generation for c in cands] == [i // 8 for i in range(80)]     # batch index of population
    assert [r.generation for r in e.history] == list(range(10))
    assert all(c.origin == "random" for c in cands[:8])                     # the initial population


def test_the_oldest_member_leaves_and_parents_come_from_the_living_top_k():
    e = engine(population=5, top_k=2, mutations=3, crossovers=2, generations=12)
    scored_order = []                                # our own record of which results were scored
    for i in range(60):
        living = [e.candidates[cid] for cid in scored_order[-5:]]
        top2 = {c.cid for c in sorted(living, key=lambda c: -c.score)[:2]}
        c = e.ask(str(i))
        if len(scored_order) >= 2 and i >= 5 and c.origin != "random":
            assert set(c.parents) <= top2, f"candidate {i}: parents {c.parents} not in the living top-2 {top2}"
        failed = i % 7 == 3
        e.tell(str(i), None if failed else OBJECTIVE(c.config), failed=failed)
        if not failed:
            scored_order.append(c.cid)
        assert list(e.alive) == scored_order[-5:]     # the 5 most recent scored, oldest first
    assert e.finished and len(scored_order) == 60 - len(range(3, 60, 7))
    evolved = [c for c in e.candidates.values() if c.origin in ("mutation", "crossover")]
    assert len(evolved) > 40 and all(len(c.parents) == (1 if c.origin == "mutation" else 2) for c in evolved)


def test_a_tournament_over_the_whole_population_picks_its_best():
    e = engine(population=6, top_k=1, tournament=6, mutations=6, crossovers=0, generations=6)
    for i in range(36):
        best = max((e.candidates[cid] for cid in e.alive), key=lambda c: c.score, default=None)
        full = len(e.alive) == 6
        c = e.ask(str(i))
        if full and c.origin == "mutation":
            assert c.parents == (best.cid,)
        e.tell(str(i), OBJECTIVE(c.config))
    assert sum(c.origin == "mutation" for c in e.candidates.values()) > 20


def test_operator_mix_follows_mutations_and_crossovers():
    e = engine(population=10, top_k=4, mutations=3, crossovers=5, generations=60)
    for i in range(600):
        c = e.ask(str(i))
        e.tell(str(i), OBJECTIVE(c.config))
    later = [c.origin for c in list(e.candidates.values())[10:]]
    share = {o: later.count(o) / len(later) for o in ("mutation", "crossover", "random")}
    # expected 0.3 / 0.5 / 0.2 (plus random fall-backs when an operator finds nothing new)
    assert 0.22 < share["mutation"] < 0.38 and 0.33 < share["crossover"] < 0.58 and share["random"] > 0.12
    assert 0.4 < share["mutation"] / share["crossover"] < 0.9


def test_restored_engine_continues_exactly_like_the_original():
    """State saved mid-run with two candidates in flight: the restored engine, driven by the
    same sequence of results, proposes exactly what the original proposes."""
    a = engine()
    for i in range(23):
        c = a.ask(str(i))
        a.tell(str(i), OBJECTIVE(c.config))
    in_flight = [a.ask("x"), a.ask("y")]
    b = engine()
    b.set_state(a.get_state())
    assert list(b.alive) == list(a.alive) and b.running == a.running
    for e in (a, b):
        e.tell("y", OBJECTIVE(in_flight[1].config))
        for i in range(23, 78):
            c = e.ask(str(i))
            e.tell(str(i), OBJECTIVE(c.config))
        e.tell("x", OBJECTIVE(in_flight[0].config))
    def timeless(e):                                         # info["t"] is the wall-clock time of each result
        return [{**c.to_dict(), "info": {k: v for k, v in c.info.items() if k != "t"}} for c in e.candidates.values()]

    assert len(a.candidates) == 80 and timeless(b) == timeless(a)
    assert b.finished and a.finished


def test_aging_finds_the_optimum_faster_than_random():
    e = ENGINES["aging"](SPACE, LIMIT, generations=60, seed=0)
    rnd = ENGINES["random"](SPACE, LIMIT, generations=60, seed=0)
    hits = {}
    for name, eng in (("aging", e), ("random", rnd)):
        for n in range(1, 3001):
            c = eng.ask(str(n))
            score = OBJECTIVE(c.config)
            eng.tell(str(n), score)
            if score >= 0.99:
                hits[name] = n
                break
    assert "aging" in hits and hits.get("random", 10**9) > 2 * hits["aging"]


def test_chosen_by_name_from_the_search_config():
    job = JobConfig.from_dict({"search": {"algorithm": "aging", "tournament": 5}})
    s = make_searcher(job, shape=BackboneShape())
    assert type(s.engine) is AgingEvolutionEngine and s.engine.tournament == 5 and s.engine.top_k == 10
    assert not s.hold_actors                               # no barrier: no placeholder trials
    with pytest.raises(ConfigError, match=r"search.tournament: 60 must be between 0 .* and population 50"):
        JobConfig.from_dict({"search": {"algorithm": "aging", "tournament": 60}})
