"""Search: engines on a synthetic objective with a known optimum, the Tune searchers, and
``run_search`` on a tiny supernet (parameter limit, tables, winner file, resume, S3)."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import pytest
import ray.cloudpickle
import ray.tune

from noah_ray.config import JobConfig
from noah_ray.errors import ConfigError
from noah_ray.evolution import (
    DONE,
    ENGINES,
    FAILED,
    AgingEvolutionEngine,
    EvolutionEngine,
    NSGA2Engine,
    RandomEngine,
    TargetObjective,
    pareto_front,
)
from noah_ray.nn.models import load_supernet
from noah_ray.search.driver import load_best_subnet, make_searcher, run_search
from noah_ray.search.searcher import NoahSearcher
from noah_ray.search.store import SearchStore
from noah_ray.space import ModuleSpace, SearchSpace, SubnetConfig
from noah_ray.space.budget import ParamLimit, uniform_at_limit
from noah_ray.space.kinds import BackboneShape
from noah_ray.store import storage

MODS = ("vpt", "lora", "adapter")
SPACE = SearchSpace({m: ModuleSpace((2, 4, 6), (1, 5, 10)) for m in MODS}, num_layers=6)   # 5.5e8 subnets
LIMIT = ParamLimit(0.01, BackboneShape(48, 3, 6, 10))          # binds: the largest subnet has 20508
ENGINE_CLASSES = (EvolutionEngine, RandomEngine, NSGA2Engine, AgingEvolutionEngine)
# Ray workers cannot import this test module: ship its functions (trainables, data) by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def small_kwargs(cls, **kw):
    base = {"population": 8, "generations": 3, "seed": 0}
    if issubclass(cls, EvolutionEngine):            # AgingEvolutionEngine too
        base.update(top_k=3, mutations=3, crossovers=3)
    return {**base, **kw}


def drive(searcher, objective, *, concurrency=1, until=None, fail=lambda n: False, start=0):
    """Run a searcher through its Tune API without Ray; returns the number of results told."""
    running, n, i = [], 0, start
    while until is None or n < until:
        while len(running) < concurrency:
            cfg = searcher.suggest(f"t{i}")
            if cfg is None or cfg == "FINISHED":
                break
            running.append((f"t{i}", cfg))
            i += 1
        if not running:
            break
        tid, cfg = running.pop(0)
        n += 1
        if fail(n):
            searcher.on_trial_complete(tid, error=True)
        else:
            searcher.on_trial_complete(tid, {"val_acc": objective(SubnetConfig.from_dict(cfg["subnet"]))})
    return n


def evals_to_optimum(engine, objective, budget, tol=0.01):
    for n in range(1, budget + 1):
        c = engine.ask(str(n))
        if c is None:
            return None
        score = objective(c.config)
        engine.tell(str(n), score)
        if score >= objective.optimum * (1 - tol):
            return n
    return None


# --------------------------------------------------------------------- synthetic objective
def test_evolution_reaches_optimum_in_fewer_evaluations_than_random():
    margin = 3
    for seed in range(3):
        objective = TargetObjective.random(SPACE, LIMIT, seed=100 + seed)
        evo = evals_to_optimum(EvolutionEngine(SPACE, LIMIT, generations=100, seed=seed), objective, 5000)
        assert evo is not None, f"seed {seed}: evolution did not reach 99% of the optimum in 5000 evaluations"
        rnd_engine = ENGINES["random"](SPACE, LIMIT, generations=100, seed=seed)
        rnd = evals_to_optimum(rnd_engine, objective, margin * evo)
        assert rnd is None, f"seed {seed}: random reached the optimum in {rnd}, evolution needed {evo}"
        best_random = max(c.score for c in rnd_engine.scored())
        assert best_random < 0.99 <= objective(objective.target)


def test_defaults_are_the_papers():
    job = JobConfig()
    s = make_searcher(job, shape=BackboneShape())
    e = s.engine
    assert type(s.engine) is EvolutionEngine and job.search.algorithm == "evolution"
    assert (e.population, e.top_k, e.mutations, e.crossovers) == (50, 10, 25, 25)
    assert (e.mutation_prob, e.depth_prob, e.limit.max_m, e.generations) == (0.2, 0.4, 0.64, 20)
    assert type(make_searcher(JobConfig.from_dict({"search": {"algorithm": "optuna"}}),
                              shape=BackboneShape()).engine) is NSGA2Engine



def test_every_engine_builds_itself_from_the_search_config():
    for name, cls in ENGINES.items():
        s = JobConfig.from_dict({"search": {"algorithm": name, "population": 6, "top_k": 2, "mutations": 2,
                                            "crossovers": 1, "generations": 2, "seed": 3, "tournament": 4}}).search
        e = cls.from_config(s, SPACE, LIMIT)
        assert type(e) is cls and e.algorithm == name and (e.population, e.generations, e.seed) == (6, 2, 3)
        if issubclass(cls, EvolutionEngine):
            assert (e.top_k, e.mutations, e.crossovers) == (2, 2, 1)
        assert getattr(e, "tournament", None) == (4 if name == "aging" else None)
        assert NoahSearcher.from_config(s, SPACE, LIMIT).engine.algorithm == name

def test_generation_composition_parents_and_limit():
    engine = EvolutionEngine(SearchSpace(), ParamLimit(0.64, BackboneShape()), seed=1)
    objective = TargetObjective.random(SearchSpace(), engine.limit, seed=5)
    for i in range(100):                                    # generations 0 and 1
        c = engine.ask(str(i))
        engine.tell(str(i), objective(c.config))
    gen0, gen1 = engine.members(0), engine.members(1)
    assert len(gen0) == len(gen1) == 50 and all(c.origin == "random" for c in gen0)
    origins = [c.origin for c in gen1]
    assert origins.count("mutation") == 25 and origins.count("crossover") == 25
    top10 = {c.cid for c in sorted(gen0, key=lambda c: -c.score)[:10]}
    assert all(set(c.parents) <= top10 for c in gen1)
    assert all(len(c.parents) == 2 for c in gen1 if c.origin == "crossover")
    cands = list(engine.candidates.values())
    assert len({c.config.key() for c in cands}) == len(cands)
    assert all(c.params <= 640_000 and c.params == c.config.param_count(BackboneShape()).modules for c in cands)
    assert [r.evaluated for r in engine.history] == [50, 50]
    # mutation changes per-layer widths of kept layers, not only depths
    changed = [c for c in gen1 if c.origin == "mutation" and any(
        c.config.depth(m) == engine.candidates[c.parents[0]].config.depth(m) and
        c.config.layer_widths(m) != engine.candidates[c.parents[0]].config.layer_widths(m) for m in MODS)]
    assert changed


@pytest.mark.parametrize("cls", ENGINE_CLASSES)
def test_searchers_never_suggest_outside_the_limit_or_twice(cls):
    limit = ParamLimit(0.006, LIMIT.shape, min_m=0.004)
    searcher = NoahSearcher(cls(SPACE, limit, **small_kwargs(cls, generations=4)))
    objective = TargetObjective.random(SPACE, limit, seed=3)
    n = drive(searcher, objective, concurrency=3)
    cands = list(searcher.engine.candidates.values())
    assert n == len(cands) == 32 and searcher.finished and searcher.suggest("late") == "FINISHED"
    assert all(4000 <= c.params <= 6000 for c in cands)
    assert len({c.config.key() for c in cands}) == 32


@pytest.mark.parametrize("max_m, min_m, match", [
    (0.0005, 0.0, r"param_limit 0.0005 M is below the smallest subnet of the space \(0.0008 M\)"),
    (0.05, 0.03, r"param_min 0.03 M is above the largest subnet"),
])
def test_impossible_limit_is_a_clear_error(max_m, min_m, match):
    with pytest.raises(ConfigError, match=match):
        NoahSearcher(EvolutionEngine(SPACE, ParamLimit(max_m, LIMIT.shape, min_m=min_m)))


@pytest.mark.parametrize("search, match", [
    ({"mutations": 30, "crossovers": 30}, r"mutations 30 \+ crossovers 30 must be >= 0 and at most population 50"),
    ({"depth_prob": 1.5}, r"search.depth_prob: 1.5 must be in \[0, 1\]"),
    ({"algorithm": "bayes"}, r"search.algorithm: 'bayes' unknown; use evolution, aging, random or optuna"),
    ({"trial_retries": -1}, r"trial_retries and param_min must be >= 0"),
])
def test_search_config_errors_name_the_key(search, match):
    with pytest.raises(ConfigError, match=match):
        JobConfig.from_dict({"search": search})


def test_failed_trials_are_counted_not_retried_and_written(tmp_path):
    store = SearchStore(str(tmp_path), None, "r1", "job", "synthetic", "evolution")
    searcher = NoahSearcher(EvolutionEngine(SPACE, LIMIT, **small_kwargs(EvolutionEngine)), store=store)
    objective = TargetObjective.random(SPACE, LIMIT, seed=0)
    drive(searcher, objective, concurrency=2, fail=lambda n: n % 5 == 0)
    assert searcher.finished
    hist = searcher.engine.history
    assert [r.evaluated + r.failed for r in hist] == [8, 8, 8] and sum(r.failed for r in hist) == 4
    trials = storage.read_table(storage.resolve(str(tmp_path)), "trials").to_pandas()
    assert len(trials) == 24 and trials.config_key.is_unique
    assert (trials.status == FAILED).sum() == 4 and trials[trials.status == FAILED].val_acc.isna().all()
    gens = storage.read_table(storage.resolve(str(tmp_path)), "generations").to_pandas()
    assert gens.sort_values("generation").failed.tolist() == [r.failed for r in hist]


def test_the_log_line_names_generations_as_the_tables_do(tmp_path):
    import io
    import re

    from noah_ray import progress

    store = SearchStore(str(tmp_path), None, "r1", "job", "synthetic", "evolution")
    searcher = NoahSearcher(EvolutionEngine(SPACE, LIMIT, **small_kwargs(EvolutionEngine)), store=store)
    out = io.StringIO()
    with progress.session(stream=out):
        drive(searcher, TargetObjective.random(SPACE, LIMIT, seed=0), concurrency=2)
    logged = [tuple(map(int, m)) for m in re.findall(r"\[search r1\] generation (\d+) \((\d+)/3\)", out.getvalue())]
    assert logged == [(0, 1), (1, 2), (2, 3)]                   # the table's number, then how many are done
    tables = storage.resolve(str(tmp_path))
    gens = storage.read_table(tables, "generations").to_pandas()
    assert sorted(gens.generation) == [g for g, _ in logged]
    assert sorted(set(storage.read_table(tables, "trials").to_pandas().generation)) == [g for g, _ in logged]


def test_a_trial_stopped_before_scoring_is_suggested_again():
    searcher = NoahSearcher(RandomEngine(SPACE, LIMIT, **small_kwargs(RandomEngine)))
    first = searcher.suggest("a")
    searcher.on_trial_complete("a", None)                   # Tune stopped it: no result, no error
    again = searcher.suggest("b")
    assert again["candidate_id"] == first["candidate_id"] and again["subnet"] == first["subnet"]
    searcher.on_trial_complete("b", {"val_acc": 0.5})
    assert searcher.engine.candidates[first["candidate_id"]].status == DONE


@pytest.mark.parametrize("cls", ENGINE_CLASSES)
def test_save_restore_resumes_without_rescoring(tmp_path, cls):
    objective = TargetObjective.random(SPACE, LIMIT, seed=7)
    full = NoahSearcher(cls(SPACE, LIMIT, **small_kwargs(cls)))
    drive(full, objective, concurrency=2)
    part = NoahSearcher(cls(SPACE, LIMIT, **small_kwargs(cls)))
    told = drive(part, objective, concurrency=2, until=11)  # mid generation 1, one trial in flight
    assert part.engine.running
    in_flight = dict(part.engine.running)
    part.save(str(tmp_path / "searcher.json"))
    resumed = NoahSearcher(cls(SPACE, LIMIT, **small_kwargs(cls)))
    resumed.restore(str(tmp_path / "searcher.json"))
    for tid, cid in in_flight.items():                      # Tune resumes the in-flight trial
        cfg = resumed.engine.candidates[cid].config
        resumed.on_trial_complete(tid, {"val_acc": objective(cfg)})
    told += len(in_flight) + drive(resumed, objective, concurrency=2, start=100)
    cands = list(resumed.engine.candidates.values())
    assert resumed.finished and told == len(cands) == 24 and len({c.config.key() for c in cands}) == 24
    if cls in (EvolutionEngine, RandomEngine):          # deterministic: same as uninterrupted
        # (aging's children depend on the order results arrive in, which the resume changes;
        # tests/test_async_search.py checks its exact continuation)
        assert [c.config for c in cands] == [c.config for c in full.engine.candidates.values()]


def test_raising_generations_extends_a_finished_search():
    objective = TargetObjective.random(SPACE, LIMIT, seed=2)
    s = NoahSearcher(EvolutionEngine(SPACE, LIMIT, **small_kwargs(EvolutionEngine, generations=2)))
    drive(s, objective)
    longer = NoahSearcher(EvolutionEngine(SPACE, LIMIT, **small_kwargs(EvolutionEngine, generations=3)))
    longer.set_state(s.get_state())
    assert not longer.finished
    assert drive(longer, objective, start=50) == 8 and len(longer.engine.history) == 3


def test_pareto_front_is_non_dominated():
    engine = ENGINES["random"](SPACE, LIMIT, population=40, generations=1, seed=0)
    objective = TargetObjective.random(SPACE, LIMIT, seed=1)
    while (c := engine.ask(str(len(engine.candidates)))) is not None:
        engine.tell(str(len(engine.candidates) - 1), objective(c.config))
    front = pareto_front(list(engine.candidates.values()))
    assert front[-1].score == max(c.score for c in engine.scored())
    for c in engine.scored():
        assert any(f.params <= c.params and f.score >= c.score for f in front)
        for f in front:
            assert not (c.params <= f.params and c.score > f.score)
    assert all(a.params < b.params and a.score < b.score for a, b in zip(front, front[1:]))


# --------------------------------------------------------------------- through Ray Tune
def _synthetic_trainable(config, objective):
    from ray import tune

    tune.report({"val_acc": objective(SubnetConfig.from_dict(config["subnet"]))})


@pytest.mark.slow
def test_evolution_searcher_through_tune(ray_session, tmp_path):
    from ray import tune

    objective = TargetObjective.random(SPACE, LIMIT, seed=4)
    searcher = NoahSearcher(EvolutionEngine(SPACE, LIMIT, **small_kwargs(EvolutionEngine, population=6, top_k=2,
                                                                         mutations=2, crossovers=2)))
    tuner = tune.Tuner(tune.with_parameters(_synthetic_trainable, objective=objective),
                       tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, max_concurrent_trials=2,
                                                   reuse_actors=True),
                       run_config=tune.RunConfig(name="synthetic", storage_path=str(tmp_path), verbose=0))
    results = tuner.fit()
    keys = [json.dumps(r.config["subnet"], sort_keys=True) for r in results]
    assert len(results) == 18 and len(set(keys)) == 18 and not results.errors
    assert searcher.finished and [r.evaluated for r in searcher.engine.history] == [6, 6, 6]
    best = max(r.metrics["val_acc"] for r in results)
    assert searcher.engine.best().score == pytest.approx(best)


# --------------------------------------------------------------------- tiny supernet
TINY_SPACE = {"num_layers": 12, "modules": {m: {"depths": [3, 6], "widths": [1, 4]} for m in MODS}}


def val_data(job, model):
    """~32 generated validation images (stand-in for the data API in these tests)."""
    import torch

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 4, (32,), generator=g)
    return [(x[i:i + 16], y[i:i + 16]) for i in (0, 16)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_job):
    """A randomised tiny supernet (backbone file + trainable state written with storage.save_state)
    and a generated 4-class task in the VTAB-1k layout with 32 validation images."""
    import torch
    from safetensors.torch import save_file

    from noah_ray.data import write_generated_vtab
    from noah_ray.nn.backbones import create_backbone
    from noah_ray.nn.supernet import PromptedViT

    root = tmp_path_factory.mktemp("tiny")
    write_generated_vtab(root / "data", "gen_shape", num_train=32, num_val=32, num_test=8, img_size=32)
    torch.manual_seed(0)
    save_file(create_backbone("vit_noah_tiny_patch4_32", 4).state_dict(), str(root / "backbone.safetensors"))
    job = search_job(tiny_job, root, str(root / "unused"))
    model = PromptedViT.supernet(job.model.name, 4, job.space, job.model.checkpoint)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.2)
    return root, model.trainable_state_dict()


def search_job(tiny_job, root: Path, store: str, endpoint: str | None = None, checkpoint: bool = True,
               **search) -> JobConfig:
    return JobConfig.from_dict(tiny_job(
        root / "data", store, storage_endpoint=endpoint,
        data={"dataset": "gen_shape", "batch_size": 16, "eval_batch_size": 16},
        model={"checkpoint": str(root / "backbone.safetensors") if checkpoint else None},
        space=TINY_SPACE, retrain=None,
        supernet={"epochs": 2, "lr": 3e-3, "warmup_epochs": 0, "num_workers": 1, "eval_random_subnets": 0,
                  "max_failures": 0},
        search={"generations": 3, "population": 4, "top_k": 2, "mutations": 1, "crossovers": 1,
                "param_limit": 0.004, "max_concurrent": 2, "cpus_per_trial": 1, **search}))


def save_supernet(job: JobConfig, state) -> str:
    loc = storage.resolve(job.storage, job.storage_endpoint).join("supernet-under-test")
    storage.save_state(loc, state, {"num_classes": 4})
    return loc.uri


@pytest.mark.slow
def test_supernet_then_search_on_s3(ray_session, s3_bucket, tiny, s3_markers, tiny_job):
    """The product flow on S3: train a tiny supernet (2 epochs), then search it (the trainable
    loads the supernet with noah_ray.nn.models.load_supernet, the val split with noah_ray.data)."""
    from noah_ray.run.preflight import resolve
    from noah_ray.train.runs import train_supernet

    root, _ = tiny
    endpoint, bucket = s3_bucket
    job = search_job(tiny_job, root, f"s3://{bucket}/runs", endpoint, checkpoint=False)
    train_supernet(resolve(job, ("supernet",)))
    result = run_search(job)
    assert result.finished and result.generations == 3 and result.evaluated + result.failed == 12
    base = storage.resolve(job.storage, endpoint).join("tiny", "search")
    trials = storage.read_table(base, "trials").to_pandas()
    assert len(trials) == 12 and trials.config_key.is_unique and (trials.status == "done").all()
    # the default recipe (noah) counts as NOAH's search did: (VPT[0] + max VPT 4) * 48 more when VPT[0] > 0
    limit = ParamLimit(0.004, BackboneShape(48, 3, 12, 4), convention="noah", max_vpt=4)
    for row in trials.itertuples():
        cfg = SubnetConfig.from_json(row.config_json)
        assert row.params == limit.count(cfg) <= 4000 and row.params_head == 48 * 4 + 4
        assert 0 <= row.val_acc <= 100 and row.val_acc * 32 / 100 == round(row.val_acc * 32 / 100)
        assert row.worker and row.wall_time_s > 0
    assert sorted(trials.generation.value_counts().tolist()) == [4, 4, 4]
    pareto = storage.read_table(base, "pareto").to_pandas().sort_values("params")
    assert len(pareto) == len(result.pareto) >= 1 and pareto.val_acc.is_monotonic_increasing
    for row in trials.itertuples():                        # the front weakly dominates every trial
        assert ((pareto.params <= row.params) & (pareto.val_acc >= row.val_acc)).any()
    winner = SubnetConfig.from_yaml(storage.read_text(base.join("best_subnet.yaml")))
    assert winner == result.best == load_best_subnet(job) == load_best_subnet(job, result.run_id)
    # the winner: the most parameters among the candidates within 1 s.e. of the top (search.ties default)
    sel, top = result.selection, trials.val_acc.max()
    assert sel["top_val_acc"] == top and sel["val_images"] == 32 and sel["ties"] == "more_params"
    q = (top / 100 * 32 + 2) / 36                        # Agresti-Coull: two hits and two misses added
    assert sel["val_se"] == pytest.approx(100 * (q * (1 - q) / 36) ** 0.5)
    tied = trials[trials.val_acc >= top - sel["val_se"] - 1e-9]
    assert sel["tied"] == len(tied) - 1 and result.best_params == tied.params.max()
    assert (trials.origin == "warm").sum() == len(uniform_at_limit(job.space, limit))     # warm start
    job.space.validate(winner)
    assert len(storage.read_table(base, "generations")) == 3
    again = run_search(job)                                        # finished: nothing re-run
    assert again.finished and again.best == result.best and len(storage.read_table(base, "trials")) == 12
    assert s3_markers(endpoint, bucket) == []          # no zero-byte directory markers left by Ray / pyarrow


class StopAfter(ray.tune.Stopper):
    """A Tune stopper ending the whole experiment after ``n`` results (a mid-search kill)."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, 0

    def __call__(self, trial_id, result) -> bool:
        self.seen += not result.get("hold")                # placeholder trials score nothing
        return False

    def stop_all(self) -> bool:
        return self.seen >= self.n


def scored_keys(tune_dir: Path) -> list[str]:
    """Every candidate evaluated by any Tune experiment of the run (from Tune's result files)."""
    keys = []
    for f in sorted(tune_dir.glob("*/*/result.json")):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        keys += [r["config_key"] for r in rows if not r.get("hold")]     # placeholders score nothing
    return keys


@pytest.mark.slow
def test_killed_search_resumes_without_scoring_twice(ray_session, tmp_path, tiny, tiny_job):
    root, state = tiny
    job = search_job(tiny_job, root, str(tmp_path / "store"))
    loader = functools.partial(load_supernet, uri=save_supernet(job, state))
    first = run_search(job, loader=loader, val_data=val_data, stop=StopAfter(6))
    assert not first.finished and 6 <= first.evaluated < 12 and first.best_subnet_uri is None
    tune_dir = tmp_path / "store" / "tiny" / "search" / "tune"
    assert len(scored_keys(tune_dir)) == first.evaluated
    with pytest.raises(ConfigError, match="already exists.*resume=True"):
        run_search(job, loader=loader, val_data=val_data, resume=False)
    changed = search_job(tiny_job, root, str(tmp_path / "store"), param_limit=0.005)
    with pytest.raises(ConfigError, match=r"param_limit=0.004, now 0.005"):
        run_search(changed, loader=loader, val_data=val_data)
    second = run_search(job, loader=loader, val_data=val_data)
    assert second.finished and second.evaluated == 12 and second.generations == 3
    keys = scored_keys(tune_dir)
    assert len(keys) == len(set(keys)) == 12                # across both attempts: nothing scored twice
    trials = storage.read_table(storage.resolve(job.storage).join("tiny", "search"), "trials").to_pandas()
    assert sorted(trials.config_key) == sorted(keys)
    assert (tmp_path / "store" / "tiny" / "search" / "best_subnet.yaml").is_file()


def test_limit_below_smallest_subnet_fails_before_writing(tmp_path, tiny, tiny_job):
    root, _ = tiny
    job = search_job(tiny_job, root, str(tmp_path / "store"), param_limit=0.0005)
    with pytest.raises(ConfigError, match=r"param_limit 0.0005 M is below the smallest subnet"):
        run_search(job, val_data=val_data)
    assert not (tmp_path / "store").exists()
    with pytest.raises(ConfigError, match="no search winner at .*; run the search stage first"):
        load_best_subnet(job)


def broken_loader(job):
    raise ConfigError("supernet file is broken")


@pytest.mark.slow
def test_search_stops_with_the_cause_and_a_rerun_retries_the_failed(ray_session, tmp_path, tiny, tiny_job):
    """A ConfigError while loading the supernet cannot succeed on retry: the search stops after one
    attempt per running candidate, is not finished and writes no winner; once the cause is fixed,
    running it again retries the failed candidates (the trials table keeps the failed attempts)."""
    from noah_ray.errors import RunError

    root, state = tiny
    job = search_job(tiny_job, root, str(tmp_path / "store"), generations=1)
    with pytest.raises(RunError, match=r"no retry can fix \(first error: supernet file is broken\); fix the cause"):
        run_search(job, loader=broken_loader, val_data=val_data)
    base = tmp_path / "store" / "tiny" / "search"
    saved = saved_state(base)
    failed = [c for c in saved["engine"]["candidates"] if c["status"] == FAILED]
    assert saved["aborted"] and 1 <= len(failed) <= 2 and failed[0]["info"]["error"] == "supernet file is broken"
    assert not (base / "best_subnet.yaml").exists()
    loader = functools.partial(load_supernet, uri=save_supernet(job, state))
    again = run_search(job, loader=loader, val_data=val_data)
    assert again.finished and again.evaluated == 4 and again.failed == 0 and (base / "best_subnet.yaml").is_file()
    trials = storage.read_table(storage.resolve(job.storage).join("tiny", "search"), "trials").to_pandas()
    assert (trials.status == DONE).sum() == 4
    old = trials[trials.status == FAILED]
    assert len(old) == len(failed) and (old.error == "supernet file is broken").all() and (old.attempt == 0).all()
    assert set(old.trial_id) <= set(trials[trials.status == DONE].trial_id)


def saved_state(base: Path) -> dict:
    """The searcher state of the tiny job's default run, as a resume reads it (snapshot + log)."""
    return SearchStore(str(base), None, "evolution-seed0", "tiny", "gen_shape", "evolution").load_state()


def unreachable_loader(job):
    raise RuntimeError("data endpoint unreachable")


@pytest.mark.slow
def test_crashed_evaluations_keep_their_error_and_abort_the_search(ray_session, tmp_path, tiny, tiny_job):
    """Evaluations that crash (a retryable error, passed through Tune's error path) are counted,
    keep their error text, and three in a row stop the search as aborted (no winner)."""
    from noah_ray.errors import RunError

    root, _ = tiny
    job = search_job(tiny_job, root, str(tmp_path / "store"), generations=1, trial_retries=0)
    with pytest.raises(RunError, match=r"first 3 candidate evaluations failed \(first error: .*data endpoint unreachable"):
        run_search(job, loader=unreachable_loader, val_data=val_data)
    base = tmp_path / "store" / "tiny" / "search"
    saved = saved_state(base)
    errors = [c["info"].get("error") for c in saved["engine"]["candidates"] if c["status"] == FAILED]
    assert saved["aborted"] and len(errors) >= 3 and all("data endpoint unreachable" in e for e in errors), errors
    assert not (base / "best_subnet.yaml").exists()


TUNE_RESTORE_SCRIPT = '''
import json, os, sys
import ray
from ray import tune
from noah_ray.evolution import EvolutionEngine, ParamLimit, TargetObjective
from noah_ray.search.searcher import NoahSearcher
from noah_ray.space import BackboneShape, ModuleSpace, SearchSpace, SubnetConfig
from noah_ray.run.preflight import resolve

space = SearchSpace({m: ModuleSpace((2, 4, 6), (1, 5, 10)) for m in ("vpt", "lora", "adapter")}, 6)
limit = ParamLimit(0.01, BackboneShape(48, 3, 6, 10))
objective = TargetObjective.random(space, limit, 1)

def trainable(config, objective):
    import time
    time.sleep(0.2)
    cfg = SubnetConfig.from_dict(config["subnet"])
    tune.report({"val_acc": objective(cfg), "key": cfg.key()})

class Kill(tune.Callback):
    def __init__(self):
        self.n = 0
    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.n += 1
        if self.n == 6 and os.environ.get("KILL_DRIVER") == "1":
            os._exit(3)                    # the driver dies mid generation 1 (the callback is restored too)

ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
root, phase = sys.argv[1], sys.argv[2]
fn = tune.with_parameters(trainable, objective=objective)
if phase == "first":
    engine = EvolutionEngine(space, limit, population=4, top_k=2, mutations=1, crossovers=1, generations=3)
    searcher = NoahSearcher(engine)
    tune.Tuner(fn, tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, max_concurrent_trials=2,
                                                   reuse_actors=True),
               run_config=tune.RunConfig(name="exp", storage_path=root, verbose=0, callbacks=[Kill()])).fit()
else:
    results = tune.Tuner.restore(os.path.join(root, "exp"), trainable=fn).fit()
    print("RESULT", json.dumps([r.metrics.get("key") for r in results]))
'''


@pytest.mark.slow
def test_tune_experiment_restore_after_driver_kill(tmp_path):
    """Tune's own experiment-level restore (Tuner.restore) continues the searcher: no candidate is
    scored twice across the killed and the restored driver."""
    import os
    import subprocess

    script = tmp_path / "search_restore.py"
    script.write_text(TUNE_RESTORE_SCRIPT)
    env = {**os.environ, "RAY_ADDRESS": ""}
    first = subprocess.run([sys.executable, str(script), str(tmp_path / "tune"), "first"],
                           env={**env, "KILL_DRIVER": "1"},
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 3, first.stderr[-2000:]
    second = subprocess.run([sys.executable, str(script), str(tmp_path / "tune"), "second"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    keys = json.loads(second.stdout.split("RESULT", 1)[1])
    assert len(keys) == 12 and None not in keys and len(set(keys)) == 12
    scored = []
    for f in (tmp_path / "tune" / "exp").glob("*/result.json"):
        scored += [json.loads(line)["key"] for line in f.read_text().splitlines() if line.strip()]
    assert len(scored) == len(set(scored)) == 12
