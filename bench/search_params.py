"""What the evolutionary search of a mini-VTAB run looked at: per task, how many distinct subnets
it scored, their mean parameter count against the limit, that of the four best-scored ones (the
finalists' pool), and how parameter count and inherited-weight val accuracy rank together
(Spearman's rho over the scored subnets).  Reads a finished run's storage; trains nothing.

    python bench/search_params.py --out /tmp/mv10      # the --out of bench/mini_vtab.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def search_table(storage: Path, top: int = 4):
    import pandas as pd
    from scipy.stats import spearmanr

    from noah_ray.store import results

    rows = []
    for trials in sorted(storage.glob("pretrained/*/search/trials")):
        d = results.load_trials(str(trials.parents[1]))         # the task's job: <storage>/pretrained/<task>
        d = d[d["status"] == "done"].drop_duplicates("config_key")
        best = d.sort_values("val_acc", ascending=False).head(top)
        rows.append({"task": str(d["dataset"].iloc[0]), "scored": len(d),
                     "params_mean_k": d["params"].mean() / 1e3, f"top{top}_params_k": best["params"].mean() / 1e3,
                     f"top{top}_lora_layers": best["lora_depth"].mean(),
                     "rho_params_val": spearmanr(d["params"], d["val_acc"]).statistic})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the --out folder of bench/mini_vtab.py")
    args = p.parse_args(argv)
    df = search_table(args.out.expanduser().resolve() / "storage")
    if df.empty:
        p.error(f"no search trials under {args.out}/storage/pretrained; run bench/mini_vtab.py first")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"mean over {len(df)} tasks: {df['scored'].mean():.0f} subnets scored, {df['params_mean_k'].mean():.1f} k "
          f"parameters on average, rho(params, val) {df['rho_params_val'].mean():+.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
