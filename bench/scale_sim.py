"""Scale-out simulation of the search: prints numbers (no model, no cluster).

1. Discrete-event simulation: the real searchers (``EvolutionEngine``: NOAH's generational
   search with its barrier; ``AgingEvolutionEngine``: asynchronous aging evolution) on the synthetic
   ``TargetObjective``, with W simulated workers (1, 8, 32, 64, 256).  A free worker asks the
   searcher at once (``suggest``); an evaluation takes a log-normal time (median 1, sigma 0.25)
   and 5 % of them straggle (x4).  Per W: worker utilisation (busy worker-time / (W x wall
   clock) over the whole search), simulated wall clock and evaluations until the first result
   reaches 99 % of the optimum; medians over seeds.  Paper defaults: population 50, top-k 10,
   25 mutations + 25 crossovers.
2. The real Ray Tune path with a sleep trainable on local Ray (the sizes that fit on this
   machine): utilisation = evaluation (sleep) time / (W x wall clock from the first trial's
   start to the last one's end).
3. Searcher state written per result at 1,000 and 10,000 candidates: before (the whole state
   rewritten after every result, one write each) and after (``noah_ray.store.statelog``: one record
   appended per result, snapshots when the log has grown as large as the last one), measured
   on local storage (and on a local moto S3 server at 1,000 if moto is installed).

Usage: ``nice python bench/scale_sim.py [--seeds 10] [--generations 40] [--skip-tune] [--skip-state]``
The last line is ``utilisation at 64 workers: generational X, asynchronous Y``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")               # no Tune experiment banners

from noah_ray.evolution import AgingEvolutionEngine, EvolutionEngine, TargetObjective
from noah_ray.search.searcher import NoahSearcher
from noah_ray.search.store import SearchStore
from noah_ray.space import ModuleSpace, SearchSpace, SubnetConfig
from noah_ray.space.budget import ParamLimit
from noah_ray.space.kinds import BackboneShape
from noah_ray.store import storage

SPACE = SearchSpace({m: ModuleSpace((2, 4, 6), (1, 5, 10)) for m in ("vpt", "lora", "adapter")}, 6)
LIMIT = ParamLimit(0.01, BackboneShape(48, 3, 6, 10))
MODES = {"generational": (EvolutionEngine, {}), "asynchronous": (AgingEvolutionEngine, {}),
         "async-t25": (AgingEvolutionEngine, {"tournament": 25})}
NOAH = {"population": 50, "top_k": 10, "mutations": 25, "crossovers": 25}


def eval_time(rng: random.Random, sigma: float = 0.25, straggle_p: float = 0.05, straggle_x: float = 4.0) -> float:
    t = rng.lognormvariate(0.0, sigma)
    return t * straggle_x if rng.random() < straggle_p else t


@dataclass
class SimResult:
    utilisation: float            # busy / (W x wall clock of the whole search)
    steady: float                 # the same until the last candidate was handed out (no end-of-budget drain)
    wall: float
    time_to_99: float | None
    evals_to_99: int | None


def simulate(cls, workers: int, seed: int, generations: int, **extra) -> SimResult:
    """One search to its full budget on ``workers`` simulated workers (discrete events)."""
    objective = TargetObjective.random(SPACE, LIMIT, seed=100 + seed)
    searcher = NoahSearcher(cls(SPACE, LIMIT, generations=generations, seed=seed, **{**NOAH, **extra}))
    rng = random.Random(10_000 + seed)
    events: list = []                                # (finish time, ticket, config)
    spans: list[tuple[float, float]] = []            # (start, end) of every evaluation
    idle, told, hit, n = workers, 0, None, 0
    now = 0.0

    def dispatch() -> None:
        nonlocal idle, n
        while idle:
            cfg = searcher.suggest(f"t{n}")
            if not isinstance(cfg, dict):            # None: wait for results; "FINISHED"
                return
            d = eval_time(rng)
            heapq.heappush(events, (now + d, f"t{n}", cfg))
            spans.append((now, now + d))
            idle, n = idle - 1, n + 1

    dispatch()
    while events:
        now, ticket, cfg = heapq.heappop(events)
        score = objective(SubnetConfig.from_dict(cfg["subnet"]))
        searcher.on_trial_complete(ticket, {"val_acc": score})
        told, idle = told + 1, idle + 1
        if hit is None and score >= 0.99 * objective.optimum:
            hit = (now, told)
        dispatch()
    assert searcher.finished and told == generations * NOAH["population"]
    last = spans[-1][0]                              # when the budget's last candidate was handed out
    busy = sum(e - s for s, e in spans)
    early = sum(min(e, last) - s for s, e in spans if s < last)
    return SimResult(busy / (workers * now), early / (workers * last) if last else 1.0, now,
                     hit[0] if hit else None, hit[1] if hit else None)


def _median(xs):
    got = [x for x in xs if x is not None]
    return statistics.median(got) if len(got) == len(xs) else None


def bench_simulation(args) -> dict[str, float]:
    print(f"simulation: synthetic objective over {SPACE.size():.2e} subnets, budget {args.generations} x 50 "
          f"evaluations, eval time log-normal(median 1, sigma 0.25) with a 5 % x4 straggler tail, "
          f"{args.seeds} seeds (medians)")
    print("  utilisation: busy / (workers x wall clock) over the whole search; 'steady': until the last candidate "
          "of the budget is handed out (without the end-of-budget drain); async-t25: asynchronous with "
          "tournament 25")
    print(f"{'workers':>7} {'mode':>13} {'utilisation':>11} {'steady':>7} {'wall':>8} {'time to 99%':>11} "
          f"{'evals to 99%':>12}")
    util64 = {}
    for workers in (1, 8, 32, 64, 256):
        for mode, (cls, extra) in MODES.items():
            t0 = time.perf_counter()
            res = [simulate(cls, workers, seed, args.generations, **extra) for seed in range(args.seeds)]
            util = statistics.median(r.utilisation for r in res)
            t99, e99 = _median([r.time_to_99 for r in res]), _median([r.evals_to_99 for r in res])
            reached = sum(r.evals_to_99 is not None for r in res)
            print(f"{workers:>7} {mode:>13} {100 * util:>10.1f}% "
                  f"{100 * statistics.median(r.steady for r in res):>6.1f}% "
                  f"{statistics.median(r.wall for r in res):>8.1f} "
                  f"{'-' if t99 is None else f'{t99:.1f}':>11} {'-' if e99 is None else f'{e99:.0f}':>12}"
                  f"   ({reached}/{len(res)} reached; per seed {[r.evals_to_99 for r in res]}; "
                  f"{time.perf_counter() - t0:.1f} s)", flush=True)
            if workers == 64:
                util64[mode] = util
    return util64


# ------------------------------------------------------------------------------ Tune path
def _sleep_trainable(config, objective):
    import time as _t

    from ray import tune

    start = _t.time()
    _t.sleep(config["sleep"])
    tune.report({"val_acc": objective(SubnetConfig.from_dict(config["subnet"])), "start": start, "end": _t.time(),
                 "slept": _t.time() - start})


def _timed(cls, scale: float, rng: random.Random):
    """``cls`` whose suggestions carry a simulated evaluation time (``sleep``, seconds)."""

    class Timed(cls):
        def suggest(self, trial_id: str):
            cfg = super().suggest(trial_id)
            return {**cfg, "sleep": scale * eval_time(rng)} if isinstance(cfg, dict) else cfg

    return Timed


def bench_tune(args) -> None:
    import ray
    from ray import tune

    ray.init(num_cpus=max(args.tune_workers), include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    objective = TargetObjective.random(SPACE, LIMIT, seed=100)
    small = {"population": 8, "top_k": 3, "mutations": 3, "crossovers": 3, "generations": 3}
    print(f"\nTune path (local Ray, sleep trainable, eval time {args.tune_sleep:.2f} s x the simulated "
          f"distribution, population 8 x 3 generations = 24 trials):")
    for workers in args.tune_workers:
        for mode in ("generational", "asynchronous"):
            cls = MODES[mode][0]
            searcher = _timed(cls, args.tune_sleep, random.Random(0))(SPACE, LIMIT, seed=0, **small)
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                results = tune.Tuner(
                    tune.with_parameters(_sleep_trainable, objective=objective),
                    tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, max_concurrent_trials=workers,
                                                reuse_actors=True),
                    run_config=tune.RunConfig(name="sim", storage_path=tmp, verbose=0)).fit()
                wall = time.perf_counter() - t0
            m = [r.metrics for r in results if r.metrics and "end" in r.metrics]
            span = max(x["end"] for x in m) - min(x["start"] for x in m)
            slept = sum(x["slept"] for x in m)
            print(f"  workers={workers} {mode:>13}: {len(m)} trials, utilisation {100 * slept / (workers * span):.1f}% "
                  f"(first start to last end {span:.1f} s; fit() {wall:.1f} s incl. Tune start)", flush=True)
    ray.shutdown()


# ------------------------------------------------------------------------------ state writes
def bench_state(args) -> None:
    print("\nsearcher state written per result (aging searcher, population 50, 64 in flight):")
    with tempfile.TemporaryDirectory() as tmp:
        _state_run(f"{tmp}/local", None, (1_000, 10_000), "local")
    try:
        import moto  # noqa: F401
    except ImportError:
        print("  (moto not installed: S3 skipped)")
        return
    from local_cluster import start_s3  # bench/local_cluster.py

    requests = RequestCount()                     # moto's request log: one record per HTTP request
    server, endpoint = start_s3(requests)
    try:
        _state_run("s3://bench/search", endpoint, (1_000,), "S3 (moto)", requests)
    finally:
        server.stop()


class RequestCount(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.n = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.n += 1


def _state_run(uri: str, endpoint: str | None, marks: tuple[int, ...], where: str,
               requests: RequestCount | None = None) -> None:
    objective = TargetObjective.random(SPACE, LIMIT, seed=100)
    store = SearchStore(uri, endpoint, "bench", "bench", "synthetic", "aging")
    # the budget runs past the last mark, so every window is in the steady state (asks and results)
    searcher = NoahSearcher(AgingEvolutionEngine(SPACE, LIMIT, generations=max(marks) // 50 + 4, seed=0, **NOAH),
                            store=store)
    store.save_state(searcher.get_state())
    stats = store.state_log.stats
    running, i, told, window = [], 0, 0, 100
    t0 = time.perf_counter()
    while told < max(marks):
        while len(running) < 64 and isinstance(cfg := searcher.suggest(f"t{i}"), dict):
            running.append((f"t{i}", cfg))
            i += 1
        if told + 1 in [m - window for m in marks]:
            mark = (stats.bytes, stats.calls, requests.n if requests else 0)
        tid, cfg = running.pop(0)
        searcher.on_trial_complete(tid, {"val_acc": objective(SubnetConfig.from_dict(cfg["subnet"]))})
        told += 1
        if told in marks:
            full = len(json.dumps(searcher.get_state()))
            b, c = (stats.bytes - mark[0]) / window, (stats.calls - mark[1]) / window
            print(f"  {where}, {told:>6,} candidates: before (full rewrite) {full:>10,} B and 1 write per result; "
                  f"after (incremental) {b:>7,.0f} B and {c:.2f} calls per result (last {window} results, "
                  f"snapshots included), {stats.bytes / told:,.0f} B and {stats.calls / told:.2f} calls per result "
                  f"since the start -> {full / b:,.0f}x fewer bytes", flush=True)
            if requests is not None:
                after = (requests.n - mark[2]) / window
                n0 = requests.n
                storage.write_text(store.base.join("old-format-probe.json"), json.dumps(searcher.get_state()))
                print(f"  {where}, {told:>6,} candidates: HTTP requests per result (moto's log): before "
                      f"{requests.n - n0} (one whole-state object written), after {after:.2f}", flush=True)
    load_t0 = time.perf_counter()
    exact = SearchStore(uri, endpoint, "bench", "bench", "synthetic", "aging").load_state() == \
        json.loads(json.dumps(searcher.get_state()))
    print(f"  {where}: {told:,} results in {time.perf_counter() - t0:.1f} s; resume read "
          f"{time.perf_counter() - load_t0:.2f} s, replayed state equals the live state: {exact}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--generations", type=int, default=40)
    p.add_argument("--tune-workers", type=int, nargs="+", default=[1, 4])
    p.add_argument("--tune-sleep", type=float, default=0.5, help="median sleep per trial (s)")
    p.add_argument("--skip-tune", action="store_true")
    p.add_argument("--skip-state", action="store_true")
    p.add_argument("--skip-sim", action="store_true", help="(no last line then)")
    args = p.parse_args()
    if args.skip_sim:
        bench_state(args)
        return
    util64 = bench_simulation(args)
    if not args.skip_tune:
        bench_tune(args)
    if not args.skip_state:
        bench_state(args)
    print(f"utilisation at 64 workers: generational {100 * util64['generational']:.1f} %, "
          f"asynchronous {100 * util64['asynchronous']:.1f} %")


if __name__ == "__main__":
    main()
