"""How much could any selection among the race's finalists gain over a hand-sized module?

``bench/mini_vtab.py`` reports ``noah+`` (the race's survivor, retrained) against LoRA r8.  This
bench retrains **every** racer of a finished mini-VTAB run, each through the pipeline's own
retraining (train800val200, ``retrain.seeds``, test once), so that the gap between ``noah+`` and
the hand-sized baseline splits into the two stages issue 25 asks about:

- **the pool**: the best racer's test accuracy (the mean over seeds) minus LoRA r8's.  This is
  the ceiling of *any* selection rule over these finalists, read off the test split itself, so it
  is biased upwards (the maximum of noisy means);
- **the selection**: the survivor's test accuracy minus the best racer's.

``held_out`` removes most of the upward bias: for each seed, the racer with the best mean over the
*other* seeds is chosen, and its accuracy at the left-out seed is compared with LoRA r8's at that
seed (leave one seed out; a selection that saw the test split, but not the run it is scored on).

    python bench/mini_vtab.py --out /tmp/mv ...            # first: a finished run (its races)
    python bench/racers.py --run /tmp/mv --tasks mv_digits mv_textures --json /tmp/mv/racers.json
    python bench/racers.py --run /tmp/mv --report          # print again from the stored runs

Each racer is a job of its own (``<task>-racer<k>``, storage ``<run>/storage/racers``), so its
rows are ordinary ``runs`` rows; a re-run skips what finished.  The LoRA r8 baseline row's config
(``retrain.baseline_widths``) is added to the pool when the race did not hold it.  Tasks run
``--parallel`` at a time, each in its own process connected to one local Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

#: the label of the reference racer (the hand-sized baseline ``noah+`` is compared with)
REFERENCE = "lora"


@dataclass(frozen=True)
class Racer:
    """One distinct config of a task's race (``source``: ``search`` or ``baseline:<kind>``;
    ``reference``: LoRA r8's config, added when the race did not hold it)."""

    task: str
    index: int
    source: str
    params: int
    config_json: str
    chosen: bool = False
    reference: bool = False

    @property
    def job(self) -> str:
        return f"{self.task}-racer{self.index}"


@dataclass(frozen=True)
class Ceiling:
    """One task's split of ``survivor - reference`` (test %, means over seeds): ``pool`` = best
    racer - reference (in-sample), ``held_out`` = the leave-one-seed-out selection - reference,
    ``selection`` = survivor - best racer; ``above`` racers beat the reference by >= 1 point."""

    task: str
    reference: float
    survivor: float
    best: float
    best_racer: int
    pool: float
    held_out: float
    selection: float
    racers: int
    above: int


def pool_of(task: str, finalists, reference_json: str, reference_params: int) -> list[Racer]:
    """The distinct configs of a task's race (``results.finalists`` rows; a config raced at
    several learning rates counts once, the chosen trial's), plus the reference config (its
    ``reference_params`` module parameters) when absent."""
    racers: dict[str, Racer] = {}
    for row in finalists.sort_values("chosen", ascending=False).itertuples():
        key = json.dumps(json.loads(row.config_json), sort_keys=True)
        if key not in racers:
            racers[key] = Racer(task, int(row.finalist), str(row.source), int(row.params), key, bool(row.chosen))
    ref = json.dumps(json.loads(reference_json), sort_keys=True)
    if ref in racers:
        racers[ref] = Racer(**{**asdict(racers[ref]), "reference": True})
    else:
        racers[ref] = Racer(task, 1 + max((r.index for r in racers.values()), default=-1), f"baseline:{REFERENCE}",
                            reference_params, ref, reference=True)
    return sorted(racers.values(), key=lambda r: r.index)


def held_out_gain(acc: dict[int, list[float]], reference: int) -> float:
    """Leave one seed out: for each seed position ``s``, the racer with the best mean over the other
    seeds is picked, and its accuracy at ``s`` minus the reference's at ``s``; the mean over ``s``.
    ``acc``: racer index -> test accuracy per seed (same seeds, same order, at least 2)."""
    n = len(acc[reference])
    if n < 2 or any(len(v) != n for v in acc.values()):
        raise ValueError(f"every racer needs the same {n} >= 2 seeds; got {[len(v) for v in acc.values()]}")
    gains = []
    for s in range(n):
        pick = max(acc, key=lambda k: (statistics.fmean(v for i, v in enumerate(acc[k]) if i != s), -k))
        gains.append(acc[pick][s] - acc[reference][s])
    return statistics.fmean(gains)


def ceiling(task: str, racers: list[Racer], acc: dict[int, list[float]]) -> Ceiling:
    """The task's :class:`Ceiling` from each racer's per-seed test accuracies."""
    ref = next(r.index for r in racers if r.reference)
    surv = next((r.index for r in racers if r.chosen), ref)
    mean = {k: statistics.fmean(v) for k, v in acc.items()}
    best = max(mean, key=lambda k: (mean[k], -k))
    return Ceiling(task, mean[ref], mean[surv], mean[best], best, mean[best] - mean[ref], held_out_gain(acc, ref),
                   mean[surv] - mean[best], len(acc), sum(m >= mean[ref] + 1.0 for m in mean.values()))


def of_sources(racers: list[Racer], sources: tuple[str, ...]) -> list[Racer]:
    """The racers whose source kind (``search``, ``baseline``) is in ``sources`` (empty: all),
    with the reference and the survivor always kept."""
    return [r for r in racers if not sources or r.reference or r.chosen or r.source.split(":")[0] in sources]


# ------------------------------------------------------------------ running the racers
def task_racers(run: Path, task: str, sources: tuple[str, ...] = ()) -> list[Racer]:
    """The pool of ``task``'s race in the finished mini-VTAB run under ``run`` (``sources``:
    :func:`of_sources`)."""
    from noah_ray.data import minivtab
    from noah_ray.nn.backbones import shape_of
    from noah_ray.nn.models import subnet_for
    from noah_ray.store import results

    job = minivtab.job_config(task, run / "storage" / "pretrained", run / "storage" / "data")
    fin = results.finalists(str(run / "storage" / "pretrained" / task))
    ref = subnet_for(REFERENCE, job, None)
    return of_sources(pool_of(task, fin, ref.to_json(), ref.param_count(shape_of(job.model.name)).modules), sources)


def racer_job(run: Path, racer: Racer, seeds: list[int]):
    """The job that retrains ``racer`` as method ``noah`` (its own name, the recipe's retraining; one
    worker group, since ``--parallel`` tasks already run at once)."""
    from noah_ray.data import minivtab

    return minivtab.job_config(racer.task, run / "storage" / "racers", run / "storage" / "data",
                               {"retrain": {"seeds": seeds, "baselines": [], "max_concurrent": 1}}, name=racer.job)


def run_task(spec_json: str) -> None:
    """Retrain every racer of one task (in this process; Ray at ``$RAY_ADDRESS``)."""
    from noah_ray.run import pipeline
    from noah_ray.run.preflight import resolve
    from noah_ray.space.subnet import SubnetConfig
    from noah_ray.train.runs import retrain_methods

    spec = json.loads(spec_json)
    pipeline.init_ray(spec["address"], quiet=True)
    run = Path(spec["run"])
    for racer in task_racers(run, spec["task"], tuple(spec["sources"])):
        job = racer_job(run, racer, spec["seeds"])
        pipeline.prepare_data(job)
        t0 = time.time()
        retrain_methods(resolve(job, ("retrain",)), SubnetConfig.from_json(racer.config_json), ("noah",))
        print(f"RACER {racer.job} {time.time() - t0:.0f} s", flush=True)


def _launch(run: Path, task: str, seeds: list[int], sources: tuple[str, ...], address: str) -> str | None:
    log = run / "racers-logs" / f"{task}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    spec = json.dumps({"address": address, "run": str(run), "task": task, "seeds": seeds, "sources": sources})
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, __file__, "--_run-task", spec], stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return None if proc.returncode == 0 else f"{task}: exit {proc.returncode} (log {log})"


def run_all(run: Path, tasks: list[str], seeds: list[int], parallel: int, sources: tuple[str, ...] = ()) -> list[str]:
    import ray

    from noah_ray.run import pipeline

    pipeline.init_ray(None, quiet=True)
    address = ray.get_runtime_context().gcs_address
    with ThreadPoolExecutor(parallel) as pool:
        errors = [e for e in pool.map(lambda t: _launch(run, t, seeds, sources, address), tasks) if e]
    ray.shutdown()
    return errors


# ------------------------------------------------------------------ report
def task_ceiling(run: Path, task: str, seeds: list[int],
                 sources: tuple[str, ...] = ()) -> tuple[Ceiling, list[Racer], dict] | None:
    """The task's ceiling from the stored racer runs (None while a racer lacks a seed)."""
    from noah_ray.errors import ConfigError
    from noah_ray.store import results

    racers = task_racers(run, task, sources)
    try:
        rows = results.runs(str(run / "storage" / "racers"))
    except ConfigError:
        return None
    acc: dict[int, list[float]] = {}
    for r in racers:
        mine = rows[(rows["job"] == r.job) & (rows["method"] == "noah")].set_index("seed")["test_acc"]
        if not set(seeds) <= set(mine.index):
            return None
        acc[r.index] = [float(mine[s]) for s in seeds]
    return ceiling(task, racers, acc), racers, acc


def report(run: Path, tasks: list[str], seeds: list[int], sources: tuple[str, ...] = ()) -> dict:
    rows, detail = [], {}
    for task in tasks:
        got = task_ceiling(run, task, seeds, sources)
        if got is None:
            print(f"{task}: not every racer has seeds {seeds} yet")
            continue
        c, racers, acc = got
        rows.append(c)
        detail[task] = [{**asdict(r), "test_acc": acc[r.index]} for r in racers]
        print(f"\n{task}: racer  source            params  test % per seed       mean")
        for r in racers:
            tag = " <- survivor" if r.chosen else (" <- reference" if r.reference else "")
            print(f"  {r.index:3d}  {r.source:16s} {r.params:7d}  {' '.join(f'{a:6.2f}' for a in acc[r.index])}  "
                  f"{statistics.fmean(acc[r.index]):6.2f}{tag}")
    if rows:
        print("\n| task | LoRA r8 | survivor | best racer | pool (best - LoRA) | held out - LoRA | "
              "survivor - best | racers | >= LoRA + 1 |\n|---|---|---|---|---|---|---|---|---|")
        for c in rows:
            print(f"| {c.task} | {c.reference:.2f} | {c.survivor:.2f} | {c.best:.2f} (#{c.best_racer}) | "
                  f"{c.pool:+.2f} | {c.held_out:+.2f} | {c.selection:+.2f} | {c.racers} | {c.above} |")
        mean = {k: statistics.fmean(getattr(c, k) for c in rows) for k in ("pool", "held_out", "selection")}
        print(f"| mean of {len(rows)} | | | | {mean['pool']:+.2f} | {mean['held_out']:+.2f} | "
              f"{mean['selection']:+.2f} | | |")
    return {"seeds": seeds, "ceilings": [asdict(c) for c in rows], "racers": detail}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="the --out of a finished bench/mini_vtab.py run")
    p.add_argument("--tasks", nargs="+", default=None, help="mini-VTAB tasks (default: all nine)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--parallel", type=int, default=2, help="tasks run at once (one process each)")
    p.add_argument("--report", action="store_true", help="run nothing: print from the stored runs")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--sources", nargs="+", choices=("search", "baseline"), default=[],
                   help="only these racers (the reference and the survivor always; default: all)")
    p.add_argument("--_run-task", dest="run_task", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_task:
        run_task(args.run_task)
        return 0
    if args.run is None:
        p.error("--run is required: the --out of a finished bench/mini_vtab.py run")
    from noah_ray.data import minivtab

    run, tasks = args.run.expanduser().resolve(), args.tasks or list(minivtab.TASKS)
    bad = [t for t in tasks if t not in minivtab.TASKS]
    if bad:
        p.error(f"unknown task {bad[0]!r}; use {', '.join(minivtab.TASKS)}")
    t0, errors = time.time(), []
    if not args.report:
        errors = run_all(run, tasks, args.seeds, args.parallel, tuple(args.sources))
    out = report(run, tasks, args.seeds, tuple(args.sources))
    if not args.report:
        print(f"wall time {(time.time() - t0) / 60:.1f} min")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"argv": sys.argv[1:], **out}, indent=1))
    for e in errors:
        print(f"FAILED {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
