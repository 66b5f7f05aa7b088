"""mini-VTAB benchmark: NOAH (supernet -> search -> retrain) against the single-module baselines.

For every mini-VTAB task (:mod:`noah_ray.data.minivtab`, v2: 2,000 test images per task, digits
797) one job (``noah_ray/configs/minivtab.yaml``) runs through the real pipeline on local Ray: the
supernet of the pretrained tiny ViT, the evolutionary search under a parameter limit, the race of
the finalists when the pipeline has that stage (its winner is the row ``noah+``), and the
retraining of the winner and of the baselines, each with 3 seeds: linear probe, VPT-Deep, LoRA,
Adapter (widths sized to the same parameter budget as NOAH's limit) and full fine-tuning.  A
second, small job per task trains a linear probe on the randomly initialised backbone
(pretrained vs random), and the floor row ``pixels`` is a logistic regression on the raw pixels
(no backbone at all; deterministic, so the same number for every seed).

Printed and written (``--doc``): the VTAB table with both of VTAB's averages (``Mean``: the mean of
the group means, the NOAH paper's; ``Mean_tasks``: the mean over tasks), per-task wins / losses of
every method against every baseline, paired bootstrap 95 % intervals of each NOAH row minus each
baseline over (task, seed) pairs (:mod:`noah_ray.store.stats`), and the cost of each method in
CPU-minutes from the stage wall times the bench records (``<out>/storage/times.json``).

    python bench/mini_vtab.py --probe                 # closed-form probes only: pixels / backbone / random (<= 7 min)
    python bench/mini_vtab.py --quick                 # 3 tasks, short budgets (<= 10 min alone)
    python bench/mini_vtab.py --out /tmp/mv --doc docs/mini_vtab.md   # the full run
    python bench/mini_vtab.py --out /tmp/mv --doc docs/mini_vtab.md --report   # the doc again, no runs

Tasks run ``--parallel`` at a time, each in its own process connected to one local Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

RANDOM_BACKBONE = "vit_noah_tiny_patch4_32"
QUICK_TASKS = ("mv_digits", "mv_ihc_stain", "mv_position")
#: the pretrained job's stages, in order; those the pipeline lacks (``race`` before it exists) are skipped
PRE_STAGES = ("supernet", "search", "race", "retrain")
#: stages whose cost every NOAH row carries; ``race`` every NOAH row but ``noah`` (``noah+``)
SEARCH_STAGES = ("supernet", "search")
FLOOR = "pixels"
#: the full run uses the recipe as it is (noah_ray/configs/minivtab.yaml); --quick shortens it
FULL: dict = {}
QUICK = {"supernet": {"epochs": 3, "warmup_epochs": 0, "eval_random_subnets": 0},
         "search": {"generations": 1, "population": 6, "top_k": 2, "mutations": 2, "crossovers": 2},
         "retrain": {"epochs": 3, "warmup_epochs": 0},
         "race": {"finalists": 2}}                  # + the 3 uniform baselines: 5 racers, not 11


# ------------------------------------------------------------------ running the jobs
def run_task(spec_json: str) -> dict:
    """One task's jobs (in this process; Ray at ``$RAY_ADDRESS``), one stage at a time; returns
    the wall seconds per job and stage."""
    from noah_ray.config import JobConfig
    from noah_ray.run import pipeline

    spec = json.loads(spec_json)
    pipeline.init_ray(spec["address"], quiet=True)
    times: dict[str, dict[str, float]] = {}
    for stages, job in spec["jobs"]:
        cfg = JobConfig.from_dict(job, where=job["name"])
        for stage in stages:
            t0 = time.time()
            pipeline.run_stages(cfg, (stage,))
            times.setdefault(job["name"], {})[stage] = round(time.time() - t0, 1)
    return times


def _launch(task: str, jobs: list, address: str, log_dir: Path) -> dict:
    spec = json.dumps({"address": address, "jobs": jobs})
    log = log_dir / f"{task}.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, __file__, "--_run-task", spec], stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    if proc.returncode:
        tail = log.read_text().strip().splitlines()[-3:]
        return {"task": task, "error": f"exit {proc.returncode}: {' | '.join(tail)[:300]}"}
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("TIMES ")]
    return {"task": task, "times": json.loads(lines[-1][6:]) if lines else {}}


def task_jobs(task: str, out: Path, budget: dict, seeds: list[int], methods: list[str] | None = None) -> list:
    """The task's two jobs as ``[stages, config dict]``: NOAH and the baselines on the pretrained
    backbone; a linear probe on the random backbone."""
    from noah_ray.config import STAGES
    from noah_ray.data import minivtab

    over = {**budget, "retrain": {**budget.get("retrain", {}), "seeds": seeds,
                                  **({"baselines": methods} if methods is not None else {})}}
    pre = minivtab.job_config(task, out / "pretrained", out / "data", over)
    rnd = minivtab.job_config(task, out / "random", out / "data", {
        **over, "model": {"name": RANDOM_BACKBONE, "drop_path_rate": 0.0},
        "retrain": {**over["retrain"], "method": "linear", "baselines": [],
                    "max_concurrent": 1}}, name=f"{task}-random")   # 3 probes on cached features: one group
    return [[[s for s in PRE_STAGES if s in STAGES], pre.to_dict()], [["retrain"], rnd.to_dict()]]


def run(tasks: list[str], out: Path, budget: dict, seeds: list[int], parallel: int,
        methods: list[str] | None = None) -> list[dict]:
    """Every task's jobs, ``parallel`` at a time; the stage wall times go to ``<out>/times.json``."""
    import ray

    from noah_ray.run import pipeline

    owner = not ray.is_initialized()
    pipeline.init_ray(None, quiet=True)
    address = ray.get_runtime_context().gcs_address
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    jobs = {t: task_jobs(t, out, budget, seeds, methods) for t in tasks}
    with ThreadPoolExecutor(parallel) as pool:
        done = list(pool.map(lambda t: _launch(t, jobs[t], address, log_dir), tasks))
    if owner:
        ray.shutdown()
    record_times(out, done, parallel, jobs[tasks[0]][0][1]["model"]["name"] if tasks else None)
    return done


# ------------------------------------------------------------------ stage times and cost
@dataclass
class Times:
    """``<out>/times.json``: wall seconds per job and stage, the cores each task had (the
    machine's cores over the tasks run at once) and the pretrained jobs' backbone."""

    cores_per_task: float = 1.0
    jobs: dict[str, dict[str, float]] = field(default_factory=dict)
    backbone: str | None = None

    @classmethod
    def read(cls, out: Path) -> Times:
        path = out / "times.json"
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        return cls(float(data.get("cores_per_task", 1.0)), data.get("jobs", {}), data.get("backbone"))


def record_times(out: Path, done: list[dict], parallel: int, backbone: str | None = None) -> Times:
    t = Times.read(out)
    t.cores_per_task = max(1.0, (os.cpu_count() or 1) / parallel)
    t.backbone = backbone or t.backbone
    for d in done:
        t.jobs.update(d.get("times", {}))
    (out / "times.json").write_text(json.dumps({"cores_per_task": t.cores_per_task, "jobs": t.jobs,
                                                "backbone": t.backbone}, indent=1))
    return t


@dataclass(frozen=True)
class Cost:
    method: str
    wall_s: float            # summed over tasks
    cpu_min: float           # wall minutes x the cores a task had
    jobs: int                # tasks whose stage times were recorded


def method_costs(runs, times: Times) -> list[Cost]:
    """Per method, summed over the jobs: its share of the retrain stage (its runs' recorded
    training time, plus the rest of the stage's wall time split evenly over the stage's runs),
    and for the NOAH rows (``noah*``) the supernet and search stages, and for those but ``noah``
    (``noah+``) the race."""
    wall: dict[str, float] = {}
    jobs: dict[str, int] = {}
    for job, rows in runs.groupby("job"):
        stages = times.jobs.get(str(job))
        if not stages or "retrain" not in stages:
            continue
        train = rows.groupby("method")["wall_time_s"].sum()
        count = rows.groupby("method").size()
        rest = max(0.0, stages["retrain"] - float(train.sum())) / max(1, len(rows))
        for method in count.index:
            w = float(train[method]) + rest * int(count[method])
            if str(method).startswith("noah"):
                w += sum(stages.get(s, 0.0) for s in SEARCH_STAGES)
                w += 0.0 if method == "noah" else stages.get("race", 0.0)
            wall[method] = wall.get(method, 0.0) + w
            jobs[method] = jobs.get(method, 0) + 1
    return [Cost(m, w, w / 60 * times.cores_per_task, jobs[m]) for m, w in sorted(wall.items())]


# ------------------------------------------------------------------ closed-form probes and the floor
def _pixels(cfg, split: str):
    import numpy as np
    from PIL import Image

    from noah_ray.data import read_split

    samples = read_split(cfg, split)
    x = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32).ravel() for p, _ in samples])
    return x, np.array([y for _, y in samples])


def _logistic(xtr, ytr, xte, yte) -> float:
    """Multinomial logistic regression on standardised features (fit on train800val200): test %."""
    from sklearn.linear_model import LogisticRegression

    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    clf = LogisticRegression(max_iter=3000).fit((xtr - mu) / sd, ytr)
    return 100.0 * clf.score((xte - mu) / sd, yte)


def pixel_floor(task: str, data_root: Path) -> float:
    """The floor: logistic regression on the raw pixels (32x32x3, no backbone), test %."""
    from noah_ray.config import DataConfig
    from noah_ray.data import minivtab

    root = minivtab.versioned_root(data_root)
    minivtab.write_task(root, task)
    cfg = DataConfig(root=str(root), dataset=task)
    return _logistic(*_pixels(cfg, "train800val200"), *_pixels(cfg, "test"))


def _features(model, cfg, split: str):
    import numpy as np
    import torch

    from noah_ray.data import build_loader

    xs, ys = [], []
    with torch.no_grad():
        for x, y in build_loader(cfg, split, train=False, img_size=32):
            xs.append(model.forward_head(model.forward_features(x), pre_logits=True).numpy())
            ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def probe_table(tasks: list[str], data_root: Path, backbone: str | None = None, checkpoint: str | None = None):
    """Per task: the pixel floor and closed-form linear probes (in-process, no Ray) on the frozen
    ``backbone`` (default: the mini-VTAB recipe's) and on the random backbone: standardised
    pre-logit features, logistic regression fit on train800val200, scored on test.  Also the
    seconds the backbone's forward took over the test split (``test_s``).  ``checkpoint`` (a
    weights file, optional) loads the probed backbone's weights from it."""
    import pandas as pd
    import torch

    from noah_ray.config import DataConfig
    from noah_ray.data import minivtab
    from noah_ray.nn.backbones import create_backbone

    backbone = backbone or minivtab.job_config(tasks[0], ".", ".").model.name
    models = {backbone: create_backbone(backbone, 1, checkpoint).eval()}
    torch.manual_seed(0)                    # the random backbone is the same one in every run
    models["random"] = create_backbone(RANDOM_BACKBONE, 1).eval()
    root, rows = minivtab.versioned_root(data_root), []
    for task in tasks:
        minivtab.write_task(root, task)
        cfg = DataConfig(root=str(root), dataset=task, num_workers=0, eval_batch_size=250)
        row = {"dataset": task, "group": minivtab.TASKS[task].group, "test_n": 0, FLOOR: pixel_floor(task, data_root)}
        for name, model in models.items():
            t0 = time.time()
            test = _features(model, cfg, "test")
            if name == backbone:
                row["test_n"], row["test_s"] = len(test[1]), time.time() - t0
            row[name] = _logistic(*_features(model, cfg, "train800val200"), *test)
        rows.append(row)
    df = pd.DataFrame(rows)
    df["difference"] = df[backbone] - df["random"]
    return df


def probe_lines(df, backbone: str) -> list[str]:
    n = len(df)
    return [f"mean over {n} tasks: {FLOOR} {df[FLOOR].mean():.2f} %, {backbone} {df[backbone].mean():.2f} %, "
            f"random {df['random'].mean():.2f} %, difference {df['difference'].mean():+.2f} points (goal >= +15)",
            f"test split: {int(df['test_n'].sum())} images, backbone forward {df['test_s'].sum():.1f} s "
            f"({1000 * df['test_s'].sum() / max(1, df['test_n'].sum()):.2f} ms per image)"]


# ------------------------------------------------------------------ tables and statistics
def floor_runs(tasks: list[str], out: Path, seeds: list[int]):
    """Run rows of the floor (``pixels``), one per (task, seed), cached in ``<out>/pixels.json``."""
    import pandas as pd

    from noah_ray.data import minivtab

    path = out / "pixels.json"
    cache = json.loads(path.read_text()) if path.is_file() else {}
    key = f"v{minivtab.VERSION}"
    acc = cache.get(key, {})
    for task in tasks:
        if task not in acc:
            acc[task] = pixel_floor(task, out / "data")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**cache, key: acc}, indent=1))
    return pd.DataFrame([{"job": f"{t}-{FLOOR}", "dataset": t, "method": FLOOR, "seed": s, "test_acc": acc[t],
                          "val_acc": float("nan"), "params": 0, "wall_time_s": 0.0} for t in tasks for s in seeds])


def load_runs(out: Path):
    """The run rows of the pretrained jobs plus the floor, and those of the random-backbone jobs."""
    import pandas as pd

    from noah_ray.errors import ConfigError
    from noah_ray.store import results

    def rows(uri: Path):
        try:
            return results.runs(str(uri))
        except ConfigError:                  # nothing written there (every run of that kind failed)
            return pd.DataFrame(columns=["dataset", "job", "method", "seed", "test_acc", "val_acc", "params"])
    pre, rnd = rows(out / "pretrained"), rows(out / "random")
    if not pre.empty:
        seeds = sorted(int(s) for s in pre["seed"].unique())
        pre = pd.concat([pre, floor_runs(sorted(pre["dataset"].unique()), out, seeds)], ignore_index=True)
    return pre, rnd


def tables(out: Path):
    """The VTAB tables (``results.vtab_table_of``) of the pretrained jobs (with the floor row) and
    of the random-backbone jobs."""
    from noah_ray.store import results

    pre, rnd = load_runs(out)
    return results.vtab_table_of(pre), results.vtab_table_of(rnd)


def noah_methods(methods) -> list[str]:
    """The NOAH rows present (``noah``, then ``noah+`` and any other ``noah*`` row)."""
    return sorted((str(m) for m in methods if str(m).startswith("noah")), key=lambda m: (len(m), m))


def summary(pre, rnd) -> list[str]:
    """The issue's comparisons: pretrained vs random linear probe; NOAH vs the best single module;
    every adapted method against the floor."""
    lines = []
    if not rnd.empty and not pre.empty and "Mean" in pre and "linear" in set(pre["method"]):   # --methods may lack it
        tasks = [c for c in rnd.columns if c.startswith("mv_")]
        lin_pre = pre.set_index("method").loc["linear", tasks].mean()
        lin_rnd = rnd.set_index("method").loc["linear", tasks].mean()
        lines.append(f"linear probe, mean over {len(tasks)} tasks: pretrained {lin_pre:.2f} %, random "
                     f"{lin_rnd:.2f} %, difference {lin_pre - lin_rnd:+.2f} points (goal >= +15)")
    if pre.empty or "Mean" not in pre:
        return lines
    t = pre.set_index("method")
    for noah in noah_methods(t.index):
        single = [m for m in ("vpt", "lora", "adapter")
                  if m in t.index and t.loc[m, "params_m"] >= t.loc[noah, "params_m"]]
        if single:
            best = max(single, key=lambda m: t.loc[m, "Mean"])
            lines.append(f"{noah} mean {t.loc[noah, 'Mean']:.2f} % ({t.loc[noah, 'params_m']:.4f} M) vs best single "
                         f"module at >= its params: {best} {t.loc[best, 'Mean']:.2f} % "
                         f"({t.loc[best, 'params_m']:.4f} M): {t.loc[noah, 'Mean'] - t.loc[best, 'Mean']:+.2f} points")
    if FLOOR in t.index:
        adapted = [m for m in t.index if m != FLOOR]
        below = [m for m in adapted if t.loc[m, "Mean_tasks"] <= t.loc[FLOOR, "Mean_tasks"]]
        lines.append(f"floor ({FLOOR}, mean over tasks {t.loc[FLOOR, 'Mean_tasks']:.2f} %): "
                     + (f"below or at it: {', '.join(below)}" if below else f"all {len(adapted)} methods clear it"))
    if {"full"} <= set(t.index):
        peft = [m for m in t.index if m not in ("full", "linear", FLOOR)]
        if peft:
            best = max(peft, key=lambda m: t.loc[m, "Mean"])
            lines.append(f"paper's regime: best PEFT {best} {t.loc[best, 'Mean']:.2f} % vs full fine-tuning "
                         f"{t.loc['full', 'Mean']:.2f} %: {t.loc[best, 'Mean'] - t.loc['full', 'Mean']:+.2f} points "
                         f"(goal >= 0)")
    return lines


def statistics_blocks(runs) -> dict[str, list[str]]:
    """Markdown lines of the averages, the wins / losses and the bootstrap intervals of ``runs``."""
    from noah_ray.store import stats

    if runs.empty:
        return {}
    avg = stats.averages(runs)
    averages = ["| method | Mean (groups) | Mean (tasks) | mean of runs | tasks | runs |", "|---|---|---|---|---|---|",
                *[f"| {a.method} | {a.group_mean:.2f} | {a.task_mean:.2f} | {a.run_mean:.2f} | {a.tasks} | {a.runs} |"
                  for a in sorted(avg, key=lambda a: -a.group_mean)]]
    methods = [a.method for a in sorted(avg, key=lambda a: -a.group_mean)]
    baselines = [m for m in methods if not m.startswith("noah")]
    wl = {(w.method, w.other): w for w in stats.wins_losses(runs, methods, baselines)}
    wins = ["| method | " + " | ".join(f"vs {b}" for b in baselines) + " |", "|---" * (len(baselines) + 1) + "|",
            *[f"| {m} | " + " | ".join(f"{wl[m, b].wins}-{wl[m, b].losses}" + (f" ({wl[m, b].ties} tied)"
                                                                               if wl[m, b].ties else "")
                                       if (m, b) in wl else "" for b in baselines) + " |" for m in methods]]
    intervals = ["| difference | mean (points) | 95 % interval | pairs |", "|---|---|---|---|"]
    for noah in noah_methods(methods):
        for b in baselines:
            if not stats.paired_differences(runs, noah, b).empty:
                iv = stats.paired_bootstrap(runs, noah, b)
                intervals.append(f"| {noah} - {b} | {iv.mean:+.2f} | [{iv.low:+.2f}, {iv.high:+.2f}] | {iv.pairs} |")
    rows = noah_methods(methods)
    for a, b in zip(rows[1:], rows[:1] * len(rows)):          # racing vs the plain procedure
        if not stats.paired_differences(runs, a, b).empty:
            iv = stats.paired_bootstrap(runs, a, b)
            intervals.append(f"| {a} - {b} | {iv.mean:+.2f} | [{iv.low:+.2f}, {iv.high:+.2f}] | {iv.pairs} |")
    return {"averages": averages, "wins": wins, "intervals": intervals}


def training_seconds(out: Path) -> dict[str, float]:
    """Seconds spent in training epochs, summed over every job under ``out`` (pretrained and
    random): the supernet runs' recorded training time, the race trials' and every distinct
    retraining run's (a run two rows share counts once).  Not in it: start-up, data decoding,
    the search's scoring, per-epoch validation of the supernet and test evaluation."""
    import pyarrow.dataset as ds

    from noah_ray.store import results

    total = {"supernet": 0.0, "race": 0.0, "retrain": 0.0}
    for meta in out.glob("*/*/supernet/final/meta.json"):
        total["supernet"] += float(json.loads(meta.read_text()).get("train_time_s") or 0.0)
    for trials in out.glob("*/*/race/hpo_trials"):
        total["race"] += float(ds.dataset(trials, format="parquet").to_table(columns=["wall_time_s"])
                               .column("wall_time_s").to_pandas().sum())
    for kind in ("pretrained", "random"):
        if (out / kind).is_dir():
            rows = results.runs(str(out / kind))
            run = rows["checkpoint_uri"].fillna(rows["job"].astype(str) + "/" + rows["run_id"].astype(str))
            total["retrain"] += float(rows.loc[~run.duplicated(), "wall_time_s"].sum())
    return total


def compute_lines(out: Path, cores: int) -> list[str]:
    """The training time of the whole run and the wall time it needs at least on ``cores`` cores."""
    t = training_seconds(out)
    cpu_min = sum(t.values()) / 60
    return [f"training epochs alone: {cpu_min:.1f} CPU-minutes (supernet {t['supernet'] / 60:.1f}, race "
            f"{t['race'] / 60:.1f}, retraining {t['retrain'] / 60:.1f}), so at least {cpu_min / cores:.1f} min of wall "
            f"time on {cores} cores with no start-up cost and no idle core"]


def cost_block(runs, times: Times) -> list[str]:
    costs = method_costs(runs, times)
    if not costs:
        return ["(no stage times recorded: run the bench to write times.json)"]
    return ["| method | CPU-minutes | wall minutes | tasks |", "|---|---|---|---|",
            *[f"| {c.method} | {c.cpu_min:.1f} | {c.wall_s / 60:.1f} | {c.jobs} |"
              for c in sorted(costs, key=lambda c: -c.cpu_min)]]


def source_commit() -> str:
    """``HEAD`` of the checkout this script runs from, marked when tracked files differ from it."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    return git("rev-parse", "HEAD") + (" (with uncommitted changes)" if git("status", "--porcelain",
                                                                          "--untracked-files=no") else "")


def write_doc(path: Path, out: Path, argv: list[str], wall: float | None, done: list[dict], commit: str) -> None:
    """The whole mini-VTAB section from the results under ``out``: the tables with both averages,
    the summary, wins / losses, bootstrap intervals, cost per method, the command and the commit."""
    from noah_ray.data import minivtab
    from noah_ray.store import results

    pre_runs, rnd_runs = load_runs(out)
    pre, rnd = results.vtab_table_of(pre_runs), results.vtab_table_of(rnd_runs)
    blocks = statistics_blocks(pre_runs)
    backbone = Times.read(out).backbone or minivtab.job_config(next(iter(minivtab.TASKS)), ".", ".").model.name

    def block(df) -> str:
        return "```\n" + df.to_string(index=False, float_format=lambda v: f"{v:.2f}") + "\n```" \
            if not df.empty else "(no runs)"

    text = ["# mini-VTAB results\n", f"Command: `python bench/mini_vtab.py {' '.join(argv)}`  ",
            f"Commit: `{commit}`  ", f"Task set: mini-VTAB v{minivtab.VERSION} (train800 / val200; test "
            f"{minivtab.NUM_TEST} images per task, mv_digits 797)  ",
            (f"Wall time: {wall / 60:.1f} min on this machine ({os.cpu_count()} CPU cores)\n" if wall is not None
             else "Wall time: not measured (tables rebuilt from stored results with --report)\n"),
            "Test accuracy (%) per task, mean over seeds; group means; `Mean` = mean of the group means (the NOAH "
            "paper's average); `Mean_tasks` = mean over all tasks; `params_m` = trainable module parameters "
            f"(M, head excluded).  `{FLOOR}`: logistic regression on the raw pixels, no backbone (the floor).\n",
            f"## Pretrained backbone (`{backbone}`)\n", block(pre), "",
            "## Random backbone, linear probe\n", block(rnd), "",
            "## Summary\n", *[f"- {ln}" for ln in summary(pre, rnd)], ""]
    if blocks:
        text += ["## Averages (VTAB's two)\n", *blocks["averages"], "",
                 "## Wins - losses per task (mean over seeds) against every baseline\n", *blocks["wins"], "",
                 "## NOAH minus each baseline: paired bootstrap 95 % interval over (task, seed) pairs "
                 "(10,000 resamples, seed 0)\n", *blocks["intervals"], ""]
    text += ["## Cost per method\n",
             "Summed over tasks: its share of the retrain stage (its runs' recorded training time plus the "
             "stage's other wall time split evenly over its runs); NOAH rows add the supernet and search stages, "
             "`noah+` also the race.  CPU-minutes = wall minutes x the cores a task had.\n",
             *cost_block(pre_runs, Times.read(out)), "",
             *[f"- {ln}" for ln in compute_lines(out, os.cpu_count() or 1)], "",
             "## Runs (wall seconds per job and stage)\n",
             *([f"- {d['task']}: {d.get('error') or d.get('times')}" for d in done] or ["(none in this call)"]), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))


def _probe(args, tasks: list[str], out: Path) -> int:
    import torch

    from noah_ray.data import minivtab

    torch.set_num_threads(1)
    backbone = args.backbone or minivtab.job_config(tasks[0], ".", ".").model.name
    df = probe_table(tasks, out / "data", backbone, args.checkpoint)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print("\n".join(probe_lines(df, backbone)))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK_TASKS)} with short budgets")
    p.add_argument("--tasks", nargs="+", default=None, help="mini-VTAB task names (default: all nine)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=None,
                   help="baselines beside NOAH (default: linear vpt lora adapter full)")
    p.add_argument("--supernet-epochs", type=int, default=None, help="override the budget's supernet epochs")
    p.add_argument("--retrain-epochs", type=int, default=None, help="override the budget's retraining epochs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the recipe (noah_ray/configs/minivtab.yaml; the random-backbone job keeps "
                   "its backbone and method), e.g. --set search.param_min=0.0157; values are YAML")
    p.add_argument("--parallel", type=int, default=2, help="tasks run at once (one process each)")
    p.add_argument("--out", type=Path, default=Path("./mini-vtab-results"))
    p.add_argument("--doc", type=Path, default=None, help="also write the whole section as Markdown here")
    p.add_argument("--report", action="store_true", help="run nothing: print (and --doc) from the stored results")
    p.add_argument("--probe", action="store_true",
                   help="only the closed-form probes: pixels floor, --backbone, random backbone (no Ray, minutes)")
    p.add_argument("--backbone", default=None,
                   help="the pretrained job's backbone tag, and with --probe the one probed against the random "
                        "backbone (default: the recipe's)")
    p.add_argument("--checkpoint", default=None, help="--probe: load the backbone's weights from this file")
    p.add_argument("--_run-task", dest="run_task", default=None, help=argparse.SUPPRESS)
    return p


def budget_of(args: argparse.Namespace) -> dict:
    """The overrides of the recipe that the options ask for: ``--quick``'s budgets, the epochs,
    ``--backbone``, then each ``--set`` (:class:`~noah_ray.errors.ConfigError` on a bad one)."""
    from noah_ray.cli.main import apply_overrides

    budget = json.loads(json.dumps(QUICK if args.quick else FULL))
    for section, value in (("supernet", args.supernet_epochs), ("retrain", args.retrain_epochs)):
        if value is not None:
            budget[section] = {**budget.get(section, {}), "epochs": value}
    if args.backbone:                        # the pretrained job's backbone (the random job keeps its own)
        budget["model"] = {**budget.get("model", {}), "name": args.backbone}
    return apply_overrides(budget, args.set)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = _parser()
    args = p.parse_args(argv)
    if args.run_task:
        print("TIMES " + json.dumps(run_task(args.run_task)), flush=True)
        return 0
    from noah_ray.data import minivtab
    from noah_ray.errors import ConfigError

    tasks = args.tasks or (list(QUICK_TASKS) if args.quick else list(minivtab.TASKS))
    bad = [t for t in tasks if t not in minivtab.TASKS]
    if bad:
        p.error(f"unknown task {bad[0]!r}; use {', '.join(minivtab.TASKS)}")
    out = args.out.expanduser().resolve() / "storage"
    if args.probe:
        return _probe(args, tasks, out)
    t0, commit, done, wall = time.time(), source_commit(), [], None
    if not args.report:
        try:
            budget = budget_of(args)
        except ConfigError as e:
            p.error(str(e))
        done = run(tasks, out, budget, args.seeds, args.parallel, args.methods)
        wall = time.time() - t0
    import pandas as pd

    from noah_ray.store import results

    pre_runs, rnd_runs = load_runs(out)
    pre, rnd = results.vtab_table_of(pre_runs), results.vtab_table_of(rnd_runs)

    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.precision", 2):
        for title, df in (("pretrained backbone", pre), ("random backbone (linear probe)", rnd)):
            print(f"\n{title}:\n" + (df.to_string(index=False) if not df.empty else "(no runs)"))
    blocks = statistics_blocks(pre_runs)
    print("\n" + "\n".join(summary(pre, rnd) + blocks.get("wins", []) + blocks.get("intervals", [])
                           + cost_block(pre_runs, Times.read(out)) + compute_lines(out, os.cpu_count() or 1)
                           + ([f"wall time {wall / 60:.1f} min"] if wall is not None else [])))
    for d in done:
        if "error" in d:
            print(f"FAILED {d['task']}: {d['error']}", file=sys.stderr)
    if args.doc:
        write_doc(args.doc, out, argv, wall, done, commit)
    return 1 if any("error" in d for d in done) else 0


if __name__ == "__main__":
    sys.exit(main())
