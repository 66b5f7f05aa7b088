"""Noise-aware choice of the search's winner (search.ties / tie_se, binomial s.e. of the val split),
warm starts of generation 0 (search.warm_start: the uniform one-module configs at the limit, the
sweep's finished winners) and supernet.epochs_multiple.  Pure Python: no Ray."""

from __future__ import annotations

import math

import pytest

from noah_ray.config import JobConfig
from noah_ray.errors import ConfigError
from noah_ray.evolution import DONE, AgingEvolutionEngine, Candidate, EvolutionEngine
from noah_ray.evolution.ties import select, standard_error
from noah_ray.run.sweep import SweepConfig
from noah_ray.search.warm import warm_configs
from noah_ray.space import SearchSpace, SubnetConfig
from noah_ray.space.budget import ParamLimit, uniform_at_limit
from noah_ray.space.kinds import BackboneShape
from noah_ray.store import storage
from noah_ray.store.layout import JobPaths

SHAPE = BackboneShape(48, 3, 12, 4)          # tiny ViT: d=48, 12 layers


# ----------------------------------------------------------------------------- standard error, ties
def test_standard_error_is_the_plus_four_binomial_one_in_points():
    """Agresti-Coull: q = (k + 2) / (n + 4), s.e. = 100 sqrt(q (1 - q) / (n + 4))."""
    assert standard_error(75.0, 200) == pytest.approx(100 * math.sqrt(152 / 204 * 52 / 204 / 204))   # k = 150
    assert standard_error(75.0, 200) == pytest.approx(3.0513, abs=1e-4)
    assert standard_error(80.0, 200) == pytest.approx(2.8310, abs=1e-4)         # q = 162 / 204
    assert standard_error(50.0, 1000) == pytest.approx(1.5780, abs=1e-4)        # q = 1/2: sqrt(0.25 / 1004)
    assert standard_error(100.0, 200) == pytest.approx(100 * math.sqrt(202 * 2 / 204 ** 3))   # 0.69, not 0
    assert standard_error(0.0, 200) == pytest.approx(standard_error(100.0, 200))


def _cand(cid: str, score: float, params: int, n: int | None = 200) -> Candidate:
    c = Candidate(cid, SubnetConfig.uniform(12, vpt=1), params, 0, "random", status=DONE, score=score)
    if n is not None:
        c.info["val_images"] = n
    return c


CANDS = [_cand("a", 80.0, 100), _cand("b", 78.0, 500), _cand("c", 76.5, 900), _cand("d", 70.0, 1000)]


def test_candidates_within_one_standard_error_of_the_top_are_tied_and_the_rule_picks_among_them():
    se = 100 * math.sqrt(162 / 204 * 42 / 204 / 204)     # 2.83 points: 77.17 and above are tied with 80.0
    more = select(CANDS, "more_params", 1.0)
    assert more.se == pytest.approx(se) and more.n == 200 and more.top.cid == "a"
    assert [c.cid for c in more.tied] == ["a", "b"] and more.others_tied == 1
    assert more.winner.cid == "b"                        # 78.0 with 500 params beats 80.0 with 100
    assert select(CANDS, "fewer_params", 1.0).winner.cid == "a"
    assert select(CANDS, "best", 1.0).winner.cid == "a"
    wide = select(CANDS, "more_params", 1.5)             # 4.24 points: 75.76 and above
    assert [c.cid for c in wide.tied] == ["a", "b", "c"] and wide.winner.cid == "c"
    assert select(CANDS, "more_params", 0.0).winner.cid == "a"   # exact ties only
    summary = more.summary()
    assert summary["tied"] == 1 and summary["val_se"] == pytest.approx(se) and summary["winner_cid"] == "b"
    assert "1 other candidate(s) within 1 s.e." in more.line()


def test_equal_scores_are_tied_without_a_standard_error_and_unknown_n_means_the_top_wins():
    cands = [_cand("a", 80.0, 100, None), _cand("b", 80.0, 300, None), _cand("c", 79.0, 900, None)]
    sel = select(cands, "more_params", 1.0)
    assert sel.se is None and sel.n is None and sel.winner.cid == "b" and sel.others_tied == 1
    assert select(cands, "best", 1.0).winner.cid == "a"  # NOAH's rank: fewer params on equal scores
    assert select([], "best") is None


def test_search_tie_settings_are_checked_with_one_line_errors():
    s = JobConfig.from_dict({}).search
    assert (s.ties, s.tie_se, s.warm_start) == ("more_params", 1.0, ("uniform",))
    with pytest.raises(ConfigError, match=r"search.ties: 'largest' unknown; use more_params, fewer_params, best"):
        JobConfig.from_dict({"search": {"ties": "largest"}})
    with pytest.raises(ConfigError, match="search.tie_se: -1"):
        JobConfig.from_dict({"search": {"tie_se": -1}})
    with pytest.raises(ConfigError, match="search.warm_start"):
        JobConfig.from_dict({"search": {"warm_start": ["uniform", "best_guess"]}})
    assert JobConfig.from_dict({"search": {"warm_start": []}}).search.warm_start == ()


# ----------------------------------------------------------------------------- warm starts
SPACE = SearchSpace.from_dict({"num_layers": 12, "modules": {m: {"depths": [3, 6, 9, 12], "widths": [1, 5, 10]}
                                                             for m in ("vpt", "lora", "adapter")}})
# exact counts on d=48 per layer: vpt w*48, lora 192*w (q and v, A and B), adapter 97*w + 48
LIMIT = ParamLimit(0.0184, SHAPE)            # 18,400 params


def test_uniform_configs_at_the_limit_are_each_module_alone_at_the_widest_width_that_fits():
    got = {cfg.active_modules()[0]: cfg for cfg in uniform_at_limit(SPACE, LIMIT)}
    assert set(got) == {"vpt", "lora", "adapter"}
    # by hand, 12 layers: vpt 10 -> 5,760; lora 10 -> 23,040 > 18,400, lora 5 -> 11,520;
    # adapter 10 -> 12 * 1,018 = 12,216
    assert got["vpt"] == SubnetConfig({"vpt": (10,) * 12, "lora": (0,) * 12, "adapter": (0,) * 12})
    assert got["lora"].layer_widths("lora") == (5,) * 12
    assert got["adapter"].layer_widths("adapter") == (10,) * 12
    assert [LIMIT.count(got[m]) for m in ("vpt", "lora", "adapter")] == [5760, 11520, 12216]
    assert all(LIMIT.ok(c) and SPACE.contains(c, absent_ok=True) and not SPACE.contains(c) for c in got.values())
    tight = ParamLimit(0.0005, SHAPE)          # 500: the narrowest, vpt 1, holds 12 * 48 = 576
    assert uniform_at_limit(SPACE, tight) == []


@pytest.mark.parametrize("engine", [EvolutionEngine, AgingEvolutionEngine])
def test_the_first_generation_holds_the_warm_configs_within_the_limit(engine):
    job = JobConfig.from_dict({"search": {"population": 8, "generations": 2, "top_k": 2, "mutations": 2,
                                          "crossovers": 2, "param_limit": 0.0184}})
    warm = uniform_at_limit(SPACE, LIMIT)
    eng = engine.from_config(job.search, SPACE, LIMIT, warm)
    tickets = [f"t{i}" for i in range(8)]
    first = [eng.ask(t) for t in tickets]
    assert all(c is not None and c.generation == 0 for c in first)
    assert [c.config for c in first[:3]] == warm and [c.origin for c in first[:3]] == ["warm"] * 3
    assert all(c.origin == "random" for c in first[3:]) and all(LIMIT.ok(c.config) for c in first)
    for i, t in enumerate(tickets):
        eng.tell(t, 50.0 + i, info={"val_images": 200})
    later = [eng.ask(f"u{i}") for i in range(8)]
    assert all(c is not None and c.generation == 1 and c.origin != "warm" for c in later)
    assert len({c.config.key() for c in first + later}) == 16          # never proposed twice
    cold = engine.from_config(job.search, SPACE, LIMIT)                 # no warm start: all random
    assert all(cold.ask(t).origin == "random" for t in tickets)


def test_the_sweep_source_reads_the_finished_tasks_winners(tmp_path):
    s = SweepConfig.from_dict({"name": "sw", "storage": str(tmp_path), "space": SPACE.to_dict(),
                               "search": {"warm_start": ["uniform", "sweep"], "param_limit": 0.0184},
                               "sweep": {"datasets": ["gen_a", "gen_b", "gen_c"]}})
    jobs = s.jobs()
    assert [j.search.warm_jobs for j in jobs] == [("sw-gen_b", "sw-gen_c"), ("sw-gen_a", "sw-gen_c"),
                                                 ("sw-gen_a", "sw-gen_b")]
    winner = SubnetConfig({"vpt": (5,) * 6 + (0,) * 6, "lora": (1,) * 3 + (0,) * 9, "adapter": (1,) * 12})
    loc = JobPaths.of(jobs[1]).best_subnet()           # gen_b finished its search; gen_c did not
    storage.write_text(loc, winner.to_yaml())
    got = warm_configs(jobs[0], LIMIT)
    assert got == [*uniform_at_limit(SPACE, LIMIT), winner]
    plain = SweepConfig.from_dict({"name": "sw", "sweep": {"datasets": ["gen_a", "gen_b"]}}).jobs()
    assert all(j.search.warm_jobs == () for j in plain)


# ----------------------------------------------------------------------------- supernet.epochs_multiple
def test_supernet_epochs_as_a_multiple_of_the_retraining_epochs():
    job = JobConfig.from_dict({"supernet": {"epochs_multiple": 2}, "retrain": {"epochs": 12}})
    assert job.supernet.epochs == 24 and job.supernet.epochs_multiple is None      # 2 x 12
    assert JobConfig.from_dict({"supernet": {"epochs_multiple": 0.5}, "retrain": {"epochs": 7}}).supernet.epochs == 4
    assert JobConfig.from_dict({"supernet": {"epochs_multiple": 0.01}, "retrain": {"epochs": 7}}).supernet.epochs == 1
    assert JobConfig.from_dict({"supernet": {"epochs": 30}}).supernet.epochs == 30            # plain epochs as before
    assert JobConfig.from_dict({}).supernet.epochs == 500
    again = JobConfig.from_dict(job.to_dict())                     # a saved job holds the resulting epochs
    assert again.supernet.epochs == 24 and again.to_dict() == job.to_dict()
    with pytest.raises(ConfigError, match=r"give supernet.epochs \(30\) or supernet.epochs_multiple \(2 x "
                                          r"retrain.epochs\), not both"):
        JobConfig.from_dict({"supernet": {"epochs": 30, "epochs_multiple": 2}})
    for bad in (0, -1, "two", 1000):
        with pytest.raises(ConfigError, match="supernet.epochs_multiple"):
            JobConfig.from_dict({"supernet": {"epochs_multiple": bad}})


def test_the_config_names_and_the_registries_agree():
    from noah_ray.config.schema import SEARCH_TIES, WARM_STARTS
    from noah_ray.evolution.ties import TIE_BREAKS
    from noah_ray.search.warm import WARM_SOURCES

    assert list(TIE_BREAKS) == list(SEARCH_TIES) and list(WARM_SOURCES) == list(WARM_STARTS)
