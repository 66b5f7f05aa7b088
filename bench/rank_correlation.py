"""Is the supernet's ranking of subnets trustworthy?  Inherited weights vs standalone training.

Per task and supernet sampling rule (``supernet.sampling``: ``uniform`` = NOAH, one random
subnet per step; ``sandwich`` = largest + smallest + one random per step): train the supernet
through the pipeline (``train_supernet``, a named run per rule), then for ``--subnets`` subnets
spread evenly over the parameter range of the search space compare

- the val200 accuracy with weights inherited from the supernet (what the search ranks by), and
- the val200 accuracy of the same subnet trained alone from scratch (in-process, same recipe);

and report Kendall tau and Spearman rho with 95 % bootstrap intervals (resampling subnets).
The standalone accuracies are shared by both rules.  Same budget: the sandwich rule trains
three subnets per step, so it gets a third of the uniform rule's epochs (equal subnet passes).

    python bench/rank_correlation.py --tasks mv_digits mv_position --subnets 20

``--supernet-epochs 6 12 24`` trains one supernet per length and rule (the paper's answer to a
noisy ranking is a longer supernet); the results are then labelled ``<rule>_e<epochs>``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

#: the mini-VTAB recipe (noah_ray/configs/minivtab.yaml) with these changes
BUDGET = {"supernet": {"epochs": 12, "warmup_epochs": 1, "eval_random_subnets": 0},
          "retrain": {"epochs": 8, "warmup_epochs": 1}}


def spread_subnets(space, shape, count: int, seed: int = 0) -> list:
    """``count`` distinct subnets at evenly spaced quantiles of the parameter count of 4,000
    random samples of ``space``."""
    rng = random.Random(seed)
    pool = {c.key(): c for c in (space.sample(rng) for _ in range(4000))}
    ranked = sorted(pool.values(), key=lambda c: c.param_count(shape).modules)
    idx = sorted({round(i * (len(ranked) - 1) / (count - 1)) for i in range(count)})
    return [ranked[i] for i in idx]


def inherited_accuracy(job, run_name: str, subnets: list) -> list[float]:
    import torch

    from noah_ray.data import build_loader, norm_for
    from noah_ray.nn.models import evaluate, load_supernet

    model = load_supernet(job, run_name)
    mean, std, size = norm_for(model)
    val = list(build_loader(job.data, job.data.val_split, train=False, mean=mean, std=std, img_size=size))
    out = []
    for cfg in subnets:
        model.set_active(cfg)
        out.append(evaluate(model, val, torch.device("cpu"))[0])
    return out


def standalone_accuracy(job, cfg, seed: int = 0) -> float:
    """Train ``cfg`` alone (modules + head, the retraining recipe), val accuracy after the last epoch."""
    import torch
    import torch.nn.functional as F

    from noah_ray.data import build_loader, norm_for, num_classes
    from noah_ray.nn import optim
    from noah_ray.nn.models import build_model, ensure_backbone, evaluate

    torch.manual_seed(seed)
    tc = job.retrain
    model = build_model(job, cfg, ensure_backbone(job), num_classes(job.data))
    mean, std, size = norm_for(model)
    train = build_loader(job.data, job.data.train_split, train=True, mean=mean, std=std, img_size=size)
    val = build_loader(job.data, job.data.val_split, train=False, mean=mean, std=std, img_size=size)
    opt = optim.adamw(model, tc.lr, tc.weight_decay)
    steps = tc.epochs * len(train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, optim.warmup_cosine(steps, tc.warmup_epochs * len(train),
                                                                       tc.min_lr / tc.lr))
    for _ in range(tc.epochs):
        model.train()
        for x, y in train:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return evaluate(model, val, torch.device("cpu"))[0]


def correlations(a: list[float], b: list[float], boots: int = 2000, seed: int = 0) -> dict:
    """Kendall tau-b and Spearman rho of ``a`` vs ``b`` with 95 % percentile bootstrap intervals."""
    import numpy as np
    from scipy.stats import kendalltau, spearmanr

    a, b = np.asarray(a), np.asarray(b)
    rng = np.random.default_rng(seed)
    out = {}
    for name, fn in (("kendall_tau", kendalltau), ("spearman_rho", spearmanr)):
        samples = []
        for _ in range(boots):
            i = rng.integers(0, len(a), len(a))
            if np.ptp(a[i]) > 0 and np.ptp(b[i]) > 0:
                samples.append(fn(a[i], b[i])[0])
        lo, hi = np.nanpercentile(samples, [2.5, 97.5])
        out[name] = {"value": float(fn(a, b)[0]), "ci95": [float(lo), float(hi)]}
    return out


def labels(rules: list[str], lengths: list[int]) -> list[tuple[str, str, int]]:
    """(label, rule, uniform-rule epochs) per supernet: the rule alone when there is one length."""
    return [(rule if len(lengths) == 1 else f"{rule}_e{e}", rule, e) for e in lengths for rule in rules]


def run_task(task: str, out: Path, count: int, rules: list[str], budget: dict = BUDGET,
             lengths: list[int] | None = None) -> dict:
    from noah_ray.config import JobConfig
    from noah_ray.data import minivtab
    from noah_ray.nn.backbones import shape_of
    from noah_ray.run import pipeline
    from noah_ray.run.preflight import resolve
    from noah_ray.train.runs import train_supernet

    job = minivtab.job_config(task, out, out / "data", budget, name=f"rank-{task}")
    pipeline.prepare_data(job)
    subnets = spread_subnets(job.space, shape_of(job.model.name), count)
    res = {"task": task, "backbone": job.model.name,
           "params": [c.param_count(shape_of(job.model.name)).modules for c in subnets]}
    runs = labels(rules, lengths or [job.supernet.epochs])
    for label, rule, epochs in runs:
        rjob = JobConfig.from_dict(job.to_dict())
        rjob.supernet.sampling = rule
        rjob.supernet.epochs = epochs if rule == "uniform" else max(1, epochs // 3)
        t0 = time.time()
        train_supernet(resolve(rjob, ("supernet",)), run_name=label)
        res[f"inherited_{label}"] = inherited_accuracy(rjob, label, subnets)
        res[f"supernet_s_{label}"] = round(time.time() - t0, 1)
    t0 = time.time()
    res["standalone"] = [standalone_accuracy(job, c) for c in subnets]
    res["standalone_s"] = round(time.time() - t0, 1)
    for label, _, _ in runs:
        res[f"corr_{label}"] = correlations(res[f"inherited_{label}"], res["standalone"])
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["mv_digits", "mv_position"])
    p.add_argument("--subnets", type=int, default=20)
    p.add_argument("--rules", nargs="+", default=["uniform", "sandwich"])
    p.add_argument("--out", type=Path, default=Path("./rank-results"))
    p.add_argument("--supernet-epochs", type=int, nargs="+", default=[BUDGET["supernet"]["epochs"]],
                   help="uniform rule's epochs (sandwich: a third of them); several: one supernet each")
    p.add_argument("--standalone-epochs", type=int, default=BUDGET["retrain"]["epochs"])
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    import torch

    from noah_ray.run import pipeline

    torch.set_num_threads(1)
    pipeline.init_ray(None, quiet=True)
    out = args.out.expanduser().resolve() / "storage"
    budget = {"supernet": {**BUDGET["supernet"], "epochs": args.supernet_epochs[0]},
              "retrain": {**BUDGET["retrain"], "epochs": args.standalone_epochs}}
    results = []
    for task in args.tasks:
        r = run_task(task, out, args.subnets, args.rules, budget, args.supernet_epochs)
        results.append(r)
        for rule, _, _ in labels(args.rules, args.supernet_epochs):
            c = r[f"corr_{rule}"]
            print(f"{task} {rule:8s}: Kendall tau {c['kendall_tau']['value']:+.3f} "
                  f"[{c['kendall_tau']['ci95'][0]:+.2f}, {c['kendall_tau']['ci95'][1]:+.2f}]  Spearman rho "
                  f"{c['spearman_rho']['value']:+.3f} [{c['spearman_rho']['ci95'][0]:+.2f}, "
                  f"{c['spearman_rho']['ci95'][1]:+.2f}]  (supernet {r[f'supernet_s_{rule}']:.0f} s)", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"budget": budget, "supernet_epochs": args.supernet_epochs,
                                         "argv": sys.argv[1:], "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
