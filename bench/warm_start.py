"""Do the search's warm starts help?  The same search without them, on a finished mini-VTAB run.

For every task of a finished ``bench/mini_vtab.py`` run, the evolutionary search runs again on
the run's own supernet with ``search.warm_start: []`` (the search run ``evolution-seed0-nowarm``,
in a copy of the run's storage, so the run itself is untouched), and is compared with the run's
search (``warm_start: [uniform]``: each module alone at the limit in generation 0).  Per task:
the top inherited val accuracy (what the search ranks by), the winner's module parameters and how
many candidates were scored; whether a warm-start config was the top candidate.  From the run's
race (``results.finalists``): which finalist survived (a search candidate or a hand-sized
baseline) and its val accuracy at the top rung.

What this measures is the search's own objective on the same supernet (and the race's choice),
not test accuracy after retraining.  The recipe's ``search.param_min`` (0.0157 M since
docs/mini_vtab.md section 15) is above every uniform config of the space, so no warm start is
feasible there: measure warm starts on a run made with ``--set search.param_min=0``.

    python bench/warm_start.py --run /tmp/mv2 --copy /tmp/mv2-nowarm
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

NO_WARM = "evolution-seed0-nowarm"


@dataclass
class TaskResult:
    task: str
    warm_top: float            # the run's search (warm start [uniform]): top val accuracy
    cold_top: float            # warm_start: []
    warm_params: int           # the top-scored candidate's module parameters
    cold_params: int
    warm_scored: int
    cold_scored: int
    top_origin: str            # the origin of the warm search's top candidate
    survivor: str              # the race's survivor: search / baseline:<kind>
    survivor_val: float

    def line(self) -> str:
        return (f"{self.task:15s} top val: warm {self.warm_top:6.2f} cold {self.cold_top:6.2f} "
                f"({self.warm_top - self.cold_top:+.2f})  top's params {self.warm_params} / {self.cold_params}  "
                f"scored {self.warm_scored} / {self.cold_scored}  warm top from {self.top_origin}  "
                f"race survivor {self.survivor} ({self.survivor_val:.2f})")


def _trials(uri: str, run_id: str):
    from noah_ray.store import results

    t = results.load_trials(uri)
    return t[(t["run_id"] == run_id) & (t["status"] == "done") & t["val_acc"].notna()]


def compare(task: str, run: Path, copy: Path) -> TaskResult:
    """The task's warm search (from ``run``) against a cold one run now in ``copy``."""
    from noah_ray.data import minivtab
    from noah_ray.search.driver import run_search, search_run_name
    from noah_ray.store import results

    job = minivtab.job_config(task, copy / "pretrained", run / "data", {"search": {"warm_start": []}})
    run_search(job, run_name=NO_WARM)
    uri = str(copy / "pretrained" / task)
    warm_rows = _trials(uri, search_run_name(job, None))
    cold_rows = _trials(uri, NO_WARM)
    top = warm_rows.sort_values(["val_acc", "params"], ascending=[False, True]).iloc[0]
    cold_top = cold_rows.sort_values(["val_acc", "params"], ascending=[False, True]).iloc[0]
    fin = results.finalists(uri)
    chosen = fin[fin["chosen"]].iloc[0]
    return TaskResult(task, float(warm_rows["val_acc"].max()), float(cold_rows["val_acc"].max()),
                      int(top["params"]), int(cold_top["params"]), len(warm_rows), len(cold_rows),
                      str(top["origin"]), str(chosen["source"]), float(chosen["last_val_acc"]))


def main(argv: list[str] | None = None) -> int:
    import ray

    from noah_ray.data import minivtab

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a finished bench/mini_vtab.py --out folder")
    p.add_argument("--copy", type=Path, required=True, help="where the run's pretrained storage is copied")
    p.add_argument("--tasks", nargs="+", default=list(minivtab.TASKS))
    args = p.parse_args(argv)
    run = args.run / "storage" if (args.run / "storage").is_dir() else args.run
    for task in args.tasks:                       # only the tasks compared (another may still be running)
        if not (args.copy / "pretrained" / task).is_dir():
            shutil.copytree(run / "pretrained" / task, args.copy / "pretrained" / task)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        out = [compare(t, run, args.copy) for t in args.tasks]
    finally:
        ray.shutdown()
    for r in out:
        print(r.line())
    diff = [r.warm_top - r.cold_top for r in out]
    print(f"mean top val: warm {statistics.fmean(r.warm_top for r in out):.2f}, cold "
          f"{statistics.fmean(r.cold_top for r in out):.2f} ({statistics.fmean(diff):+.2f}; warm higher on "
          f"{sum(d > 0 for d in diff)}, lower on {sum(d < 0 for d in diff)} of {len(out)} tasks); warm top from "
          f"a warm-start config on {sum(r.top_origin.startswith('warm') for r in out)}; race survivor a baseline "
          f"on {sum(r.survivor.startswith('baseline') for r in out)} of {len(out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
