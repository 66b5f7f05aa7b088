"""The ``noah-ray`` command.  Every subcommand has ``--help``; errors are one clear line.

    noah-ray demo                         the whole pipeline on generated data, locally
    noah-ray pipeline --config job.yaml   supernet -> search -> retrain
    noah-ray supernet|search|retrain --config job.yaml
    noah-ray results URI [--table leaderboard|vtab|trials|pareto|runs|curves] [--plots DIR]
    noah-ray import-noah FILE...          original NOAH subnet files -> configs, parameter counts
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from noah_ray.space import ConfigError


def _load_job(args: argparse.Namespace):
    from noah_ray.config import JobConfig

    return JobConfig.load(args.config)


def _stage_command(stages: tuple[str, ...]):
    def run(args: argparse.Namespace) -> int:
        from noah_ray import pipeline

        job = _load_job(args)
        if getattr(args, "subnet", None):
            job.retrain.subnet = args.subnet
        if getattr(args, "method", None):
            job.retrain.method = args.method
        pipeline.validate_job(job, stages)
        pipeline.init_ray(args.address)
        summary = pipeline.run_stages(job, stages)
        _print_summary(summary)
        return 0
    return run


def _print_summary(summary: dict) -> None:
    if "search" in summary and summary["search"]["best"]:
        s = summary["search"]
        print(f"search: best val {s['val_acc']:.2f}% with {s['params'] / 1e6:.4f} M params "
              f"({s['evaluated']} candidates scored) -> {s['uri']}")
    for method, r in summary.get("retrain", {}).items():
        print(f"retrain {method}: test {r['test_acc_mean']:.2f} +- {r['test_acc_std']:.2f} % over {len(r['runs'])} seed(s)")


def _demo(args: argparse.Namespace) -> int:
    from noah_ray import pipeline, results
    from noah_ray.config import JobConfig
    from noah_ray.data import write_generated_vtab

    out = Path(args.out).resolve()
    text = resources.files("noah_ray").joinpath("configs/demo.yaml").read_text()
    import yaml

    data = yaml.safe_load(text)
    data["storage"] = str(out)
    data["data"]["root"] = str(out / "data")
    if args.quick:
        data["supernet"]["epochs"], data["retrain"]["epochs"] = 2, 2
        data["search"]["generations"], data["search"]["population"], data["search"]["top_k"] = 2, 6, 3
        data["search"]["mutations"], data["search"]["crossovers"] = 2, 2
        data["retrain"]["baselines"] = ["linear"]
    job = JobConfig.from_dict(data, where="demo config")
    print(f"noah-ray demo: generated '{job.data.dataset}' data, {job.model.name}, results in {out}", flush=True)
    write_generated_vtab(out / "data", job.data.dataset, seed=0)
    pipeline.validate_job(job)
    pipeline.init_ray(args.address)
    summary = pipeline.run_stages(job)
    _print_summary(summary)
    uri = str(out / job.name)
    print("\nleaderboard (test accuracy, mean +- std over seeds):")
    print(results.leaderboard(uri).to_string(index=False))
    plots = out / "plots"
    paths = [results.plot_pareto(uri, plots / "pareto.png"),
             results.plot_supernet_curves(uri, plots / "supernet_curves.png"),
             results.plot_architecture(pipeline.retrain_subnet(job), plots / "architecture.png",
                                       title=f"searched subnet ({job.data.dataset})")]
    print("\nplots:\n" + "\n".join(f"  {p}" for p in paths))
    print(f"\nquery the tables with pandas: noah_ray.results.load_trials({uri!r}) or "
          f"pandas.read_parquet({uri + '/search/trials'!r})")
    return 0


def _results(args: argparse.Namespace) -> int:
    import pandas as pd

    from noah_ray import results

    fn = {"leaderboard": results.leaderboard, "vtab": results.vtab_table, "trials": results.load_trials,
          "pareto": results.pareto, "runs": results.runs, "curves": results.supernet_curves}[args.table]
    df = fn(args.uri, endpoint=args.endpoint)
    with pd.option_context("display.max_rows", args.max_rows, "display.width", 200, "display.max_columns", 30):
        print(df.to_string(index=False) if not df.empty else f"(no {args.table} rows under {args.uri})")
    if args.plots:
        for p in (results.plot_pareto(args.uri, Path(args.plots) / "pareto.png", endpoint=args.endpoint),
                  results.plot_supernet_curves(args.uri, Path(args.plots) / "supernet_curves.png",
                                               endpoint=args.endpoint)):
            print(p)
    return 0


def _import_noah(args: argparse.Namespace) -> int:
    from noah_ray.interop import import_noah_command

    return import_noah_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="noah-ray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the whole pipeline on generated data with a tiny ViT (local Ray)")
    p.add_argument("--out", default="./noah-results", help="where data, checkpoints and tables go")
    p.add_argument("--quick", action="store_true", help="an even shorter run (smoke test)")
    p.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS or a new local Ray)")
    p.set_defaults(func=_demo)

    for name, stages, doc in (("pipeline", ("supernet", "search", "retrain"), "supernet -> search -> retrain"),
                              ("supernet", ("supernet",), "train the supernet (resumes)"),
                              ("search", ("search",), "evolutionary search on the trained supernet (resumes)"),
                              ("retrain", ("retrain",), "retrain the searched subnet and the baselines")):
        p = sub.add_parser(name, help=doc, description=doc)
        p.add_argument("--config", required=True, help="job config (YAML or JSON)")
        p.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS or a new local Ray)")
        if name == "retrain":
            p.add_argument("--subnet", help="subnet file to retrain (default: the search's best_subnet.yaml)")
            p.add_argument("--method", help="noah or a baseline: linear, full, vpt, adapter, lora, e2vpt")
        p.set_defaults(func=_stage_command(stages))

    p = sub.add_parser("results", help="print result tables (and plots) from a job or storage URI")
    p.add_argument("uri", help="a job (<storage>/<name>) or a storage root; local path or s3://")
    p.add_argument("--table", default="leaderboard",
                   choices=("leaderboard", "vtab", "trials", "pareto", "runs", "curves"))
    p.add_argument("--endpoint", default=None, help="S3 endpoint URL (default: $AWS_ENDPOINT_URL)")
    p.add_argument("--plots", default=None, help="also write PNG plots into this directory")
    p.add_argument("--max-rows", type=int, default=60)
    p.set_defaults(func=_results)

    p = sub.add_parser("import-noah", help="read original NOAH subnet YAML files, print parameter counts")
    p.add_argument("files", nargs="+", help="NOAH subnet files (the RETRAIN block is used)")
    p.add_argument("--out", help="directory to write the converted subnet configs (YAML)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="head size for the count (default: from the dataset name)")
    p.set_defaults(func=_import_noah)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"noah-ray: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
