"""mini-VTAB benchmark: NOAH (supernet -> search -> retrain) against the single-module baselines.

For every mini-VTAB task (:mod:`noah_ray.data.minivtab`) one job (``noah_ray/configs/minivtab.yaml``)
runs through the real pipeline on local Ray: the supernet of the fractal-pretrained tiny ViT, the evolutionary
search under a
parameter limit, and the retraining of the winner and of the baselines, each with 3 seeds:
linear probe, VPT-Deep, LoRA, Adapter (widths sized to the same parameter budget as NOAH's
limit) and full fine-tuning.  A second, small job per task trains a linear probe on the randomly
initialised backbone (pretrained vs random).  Prints and writes the VTAB-style table
(``results.vtab_table``: per task, group means, overall mean, parameters).

    python bench/mini_vtab.py --quick                 # 3 tasks, short budgets (<= 10 min alone)
    python bench/mini_vtab.py --out /tmp/mv --doc docs/mini_vtab.md   # the full run

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
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

RANDOM_BACKBONE = "vit_noah_tiny_patch4_32"
QUICK_TASKS = ("mv_digits", "mv_ihc_stain", "mv_position")
#: the full run uses the recipe as it is (noah_ray/configs/minivtab.yaml); --quick shortens it
FULL: dict = {}
QUICK = {"supernet": {"epochs": 3, "warmup_epochs": 0, "eval_random_subnets": 0},
         "search": {"generations": 1, "population": 6, "top_k": 2, "mutations": 2, "crossovers": 2},
         "retrain": {"epochs": 3, "warmup_epochs": 0}}


def run_task(spec_json: str) -> dict:
    """One task's jobs (in this process; Ray at ``$RAY_ADDRESS``); returns wall times."""
    from noah_ray.config import JobConfig
    from noah_ray.run import pipeline

    spec = json.loads(spec_json)
    pipeline.init_ray(spec["address"], quiet=True)
    times = {}
    for stages, job in spec["jobs"]:
        t0 = time.time()
        pipeline.run_stages(JobConfig.from_dict(job, where=job["name"]), tuple(stages))
        times[job["name"]] = round(time.time() - t0, 1)
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
    from noah_ray.data import minivtab

    over = {**budget, "retrain": {**budget.get("retrain", {}), "seeds": seeds,
                                  **({"baselines": methods} if methods is not None else {})}}
    pre = minivtab.job_config(task, out / "pretrained", out / "data", over)
    rnd = minivtab.job_config(task, out / "random", out / "data", {
        **over, "model": {"name": RANDOM_BACKBONE, "drop_path_rate": 0.0},
        "retrain": {**over["retrain"], "method": "linear", "baselines": []}}, name=f"{task}-random")
    return [[["supernet", "search", "retrain"], pre.to_dict()], [["retrain"], rnd.to_dict()]]


def run(tasks: list[str], out: Path, budget: dict, seeds: list[int], parallel: int,
        methods: list[str] | None = None) -> list[dict]:
    import ray

    from noah_ray.run import pipeline

    owner = not ray.is_initialized()
    pipeline.init_ray(None, quiet=True)
    address = ray.get_runtime_context().gcs_address
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(parallel) as pool:
        done = list(pool.map(lambda t: _launch(t, task_jobs(t, out, budget, seeds, methods), address, log_dir), tasks))
    if owner:
        ray.shutdown()
    return done


def probe_table(tasks: list[str], data_root: Path, backbone: str | None = None, checkpoint: str | None = None):
    """Closed-form linear probes (in-process, no Ray): standardised pre-logit features of the
    frozen backbone, multinomial logistic regression fit on train800val200, scored on test.
    ``backbone`` (a timm name or pretrained tag; default: the benchmark's) with ``checkpoint``
    (a weights file, optional) is the "pretrained" column."""
    import numpy as np
    import pandas as pd
    import torch
    from sklearn.linear_model import LogisticRegression

    from noah_ray.config import DataConfig
    from noah_ray.data import build_loader, minivtab
    from noah_ray.nn.backbones import create_backbone

    rows = []
    name = backbone or minivtab.job_config(tasks[0], ".", ".").model.name
    torch.manual_seed(0)                    # the random backbone is the same one in every run
    models = {"pretrained": create_backbone(name, 1, checkpoint).eval(),
              "random": create_backbone(RANDOM_BACKBONE, 1).eval()}
    for task in tasks:
        minivtab.write_task(data_root, task)
        cfg = DataConfig(root=str(data_root), dataset=task, num_workers=0, eval_batch_size=250)
        row = {"dataset": task, "group": minivtab.TASKS[task].group}
        for name, model in models.items():
            feats = {}
            for split in ("train800val200", "test"):
                xs, ys = [], []
                with torch.no_grad():
                    for x, y in build_loader(cfg, split, train=False, img_size=32):
                        xs.append(model.forward_head(model.forward_features(x), pre_logits=True).numpy())
                        ys.append(y.numpy())
                feats[split] = np.concatenate(xs), np.concatenate(ys)
            (xtr, ytr), (xte, yte) = feats["train800val200"], feats["test"]
            mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
            clf = LogisticRegression(max_iter=3000).fit((xtr - mu) / sd, ytr)
            row[name] = 100.0 * clf.score((xte - mu) / sd, yte)
        rows.append(row)
    df = pd.DataFrame(rows)
    df["difference"] = df["pretrained"] - df["random"]
    return df


def tables(out: Path):
    import pandas as pd

    from noah_ray.errors import ConfigError
    from noah_ray.store import results

    def table(uri: Path):
        try:
            return results.vtab_table(str(uri))
        except ConfigError:                  # nothing written there (every run of that kind failed)
            return pd.DataFrame(columns=["method"])
    return table(out / "pretrained"), table(out / "random")


def summary(pre, rnd) -> list[str]:
    """The issue's comparisons: pretrained vs random linear probe; NOAH vs the best single module."""
    lines = []
    if not rnd.empty and not pre.empty and "Mean" in pre:
        tasks = [c for c in rnd.columns if c.startswith("mv_")]
        lin_pre = pre.set_index("method").loc["linear", tasks].mean()
        lin_rnd = rnd.set_index("method").loc["linear", tasks].mean()
        lines.append(f"linear probe, mean over {len(tasks)} tasks: pretrained {lin_pre:.2f} %, random "
                     f"{lin_rnd:.2f} %, difference {lin_pre - lin_rnd:+.2f} points (goal >= +15)")
    if not pre.empty and "Mean" in pre:
        t = pre.set_index("method")
        if "noah" in t.index:
            single = [m for m in ("vpt", "lora", "adapter")
                      if m in t.index and t.loc[m, "params_m"] >= t.loc["noah", "params_m"]]
            if single:
                best = max(single, key=lambda m: t.loc[m, "Mean"])
                noah, other = t.loc["noah"], t.loc[best]
                lines.append(f"NOAH mean {noah['Mean']:.2f} % ({noah['params_m']:.4f} M) vs best single "
                             f"module at >= its params: {best} {other['Mean']:.2f} % ({other['params_m']:.4f} M)"
                             f": {t.loc['noah', 'Mean'] - t.loc[best, 'Mean']:+.2f} points")
    return lines


def source_commit() -> str:
    """``HEAD`` of the checkout this script runs from, marked when tracked files differ from it."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    return git("rev-parse", "HEAD") + (" (with uncommitted changes)" if git("status", "--porcelain",
                                                                          "--untracked-files=no") else "")


def write_doc(path: Path, pre, rnd, lines: list[str], argv: list[str], wall: float, done: list[dict],
              commit: str) -> None:

    def block(df) -> str:
        return "```\n" + df.to_string(index=False, float_format=lambda v: f"{v:.2f}") + "\n```" \
            if not df.empty else "(no runs)"

    text = ["# mini-VTAB results\n", f"Command: `python bench/mini_vtab.py {' '.join(argv)}`  ",
            f"Commit: `{commit}`  ",
            f"Wall time: {wall / 60:.1f} min on this machine (2 CPU cores, shared)\n",
            "Test accuracy (%) per task, mean over seeds; group means; `Mean` = mean of the group means; "
            "`params_m` = trainable module parameters (M, head excluded).\n",
            "## Fractal-pretrained backbone (`vit_noah_tiny_patch4_32.fractal`)\n",
            block(pre), "",
            "## Random backbone, linear probe\n",
            block(rnd), "",
            "## Summary\n", *[f"- {ln}" for ln in lines], "",
            "## Runs\n", *[f"- {d['task']}: {d.get('error') or d.get('times')}" for d in done], ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK_TASKS)} with short budgets")
    p.add_argument("--tasks", nargs="+", default=None, help="mini-VTAB task names (default: all nine)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=None,
                   help="baselines beside NOAH (default: linear vpt lora adapter full)")
    p.add_argument("--supernet-epochs", type=int, default=None, help="override the budget's supernet epochs")
    p.add_argument("--retrain-epochs", type=int, default=None, help="override the budget's retraining epochs")
    p.add_argument("--parallel", type=int, default=2, help="tasks run at once (one process each)")
    p.add_argument("--out", type=Path, default=Path("./mini-vtab-results"))
    p.add_argument("--doc", type=Path, default=None, help="also write the tables as Markdown here")
    p.add_argument("--probe", action="store_true",
                   help="only the closed-form linear probes, pretrained vs random backbone (no Ray, ~1 min)")
    p.add_argument("--backbone", default=None,
                   help="--probe: the backbone to probe against the random one (a timm name or tag, "
                        "e.g. vit_noah_tiny_patch4_32.fractal; default: the benchmark's)")
    p.add_argument("--checkpoint", default=None, help="--probe: load the backbone's weights from this file")
    p.add_argument("--_run-task", dest="run_task", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_task:
        print("TIMES " + json.dumps(run_task(args.run_task)), flush=True)
        return 0
    from noah_ray.data import minivtab

    tasks = args.tasks or (list(QUICK_TASKS) if args.quick else list(minivtab.TASKS))
    bad = [t for t in tasks if t not in minivtab.TASKS]
    if bad:
        p.error(f"unknown task {bad[0]!r}; use {', '.join(minivtab.TASKS)}")
    out = args.out.expanduser().resolve() / "storage"
    if args.probe:
        import torch

        torch.set_num_threads(1)
        df = probe_table(tasks, out / "data", args.backbone, args.checkpoint)
        print(df.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        print(f"mean over {len(df)} tasks: pretrained {df['pretrained'].mean():.2f} %, random "
              f"{df['random'].mean():.2f} %, difference {df['difference'].mean():+.2f} points (goal >= +15)")
        return 0
    t0, commit = time.time(), source_commit()
    budget = json.loads(json.dumps(QUICK if args.quick else FULL))
    for section, value in (("supernet", args.supernet_epochs), ("retrain", args.retrain_epochs)):
        if value is not None:
            budget[section] = {**budget.get(section, {}), "epochs": value}
    done = run(tasks, out, budget, args.seeds, args.parallel, args.methods)
    wall = time.time() - t0
    pre, rnd = tables(out)
    import pandas as pd

    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.precision", 2):
        print("\nfractal-pretrained backbone:\n" + pre.to_string(index=False))
        print("\nrandom backbone (linear probe):\n" + rnd.to_string(index=False))
    lines = summary(pre, rnd)
    print("\n" + "\n".join(lines + [f"wall time {wall / 60:.1f} min"]))
    for d in done:
        if "error" in d:
            print(f"FAILED {d['task']}: {d['error']}", file=sys.stderr)
    if args.doc:
        write_doc(args.doc, pre, rnd, lines, argv, wall, done, commit)
    return 1 if any("error" in d for d in done) else 0


if __name__ == "__main__":
    sys.exit(main())
