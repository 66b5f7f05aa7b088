"""The ``noah-ray`` command.  Every subcommand has ``--help``; errors are one clear line.

    noah-ray demo                         the whole pipeline on generated data, locally
    noah-ray pipeline --config job.yaml   supernet -> search -> retrain
    noah-ray sweep --config sweep.yaml    many datasets' pipelines at once (Ray tasks), one storage root
    noah-ray supernet|search|retrain --config job.yaml [--set key=value ...]
    noah-ray hpo --config job.yaml [--method M]   hyper-parameter search alone (the hpo: section)
    noah-ray results URI [--table leaderboard|vtab|trials|generations|pareto|runs|curves|hpo|hpo_curves] [--plots DIR]
    noah-ray import-noah FILE...          original NOAH subnet files -> configs, parameter counts
    noah-ray export JOB.yaml --out URI    a retrained subnet -> inference artifact (--merge-lora, --peft DIR)
    noah-ray import-peft DIR --out URI    a peft LoRA adapter (timm ViT, fused qkv) -> subnet + weights

The same stages run as Ray jobs: ``ray job submit --working-dir . -- python -m jobs.pipeline
--config jobs/configs/demo.yaml``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata, resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from noah_ray.cli import commands as cli_commands
from noah_ray.config.job import STAGES
from noah_ray.errors import ConfigError, Interrupted, RunError
from noah_ray.space.methods import method_help

if TYPE_CHECKING:
    from noah_ray.run.sweep import SweepConfig, SweepOutcome

#: the stages each stage command runs: ``pipeline`` all of them in order, each stage its own
STAGE_COMMANDS: dict[str, tuple[str, ...]] = {"pipeline": STAGES, **{s: (s,) for s in STAGES}}
_STAGE_DOCS = {"pipeline": "supernet -> search -> [race ->] [hpo ->] retrain (each stage resumes)",
               "supernet": "train the supernet (resumes from its last checkpoint)",
               "search": "evolutionary search on the trained supernet (resumes; nothing is scored twice)",
               "race": "race the search's finalists and the hand-sized baselines (ASHA on Ray Tune); the survivor "
                       "is retrained (race.enabled: false: the search's winner); resumes",
               "retrain": "retrain the searched subnet and the baselines; test accuracy over seeds",
               "hpo": "hyper-parameter search (Optuna TPE + ASHA on Ray Tune) of each retraining method; resumes"}


# ------------------------------------------------------------------------------ job configs
def apply_overrides(data: dict, items: Sequence[str]) -> dict:
    """Apply ``--set section.key=value`` items (values parsed as YAML) to a config dict."""
    import yaml

    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or any(not p for p in key.split(".")):
            raise ConfigError(f"--set {item!r}: use KEY=VALUE, e.g. --set search.generations=5")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML; quote it") from None
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is not a section")
        node[parts[-1]] = value
    return data


def load_job(path: str, overrides: Sequence[str] = ()):
    """A job config from ``path`` with ``--set`` overrides applied (validated as one)."""
    from noah_ray.config import JobConfig

    job = JobConfig.load(path)
    if overrides:
        job = JobConfig.from_dict(apply_overrides(job.to_dict(), overrides), where=f"{path} (with --set)")
    return job


def demo_config(out: str | Path, quick: bool = False) -> Any:
    """The embedded demo job (``noah_ray/configs/demo.yaml``) writing everything under ``out``."""
    import yaml

    from noah_ray.config import JobConfig

    data = yaml.safe_load(resources.files("noah_ray").joinpath("configs/demo.yaml").read_text())
    out = Path(out).expanduser().resolve()
    data["storage"] = str(out)
    data["data"]["root"] = str(out / "data")
    if quick:
        data["supernet"].update(epochs=1, warmup_epochs=0, eval_random_subnets=0)
        data["search"].update(generations=1, population=4, top_k=2, mutations=1, crossovers=1)
        data["retrain"].update(epochs=1, warmup_epochs=0, baselines=["linear"])
        data["race"] = {"finalists": 2}
    return JobConfig.from_dict(data, where="demo config")


# ------------------------------------------------------------------------------ commands
@contextlib.contextmanager
def _ray_command(args: argparse.Namespace, saved: str | None = None) -> Iterator[Callable[[], None]]:
    """What a command that may start Ray runs in (a stage command, a sweep): a console that shows
    our lines (Ray's own with --verbose); the ``start_ray`` it yields starts or attaches to Ray and
    puts our SIGINT / SIGTERM handler back after ``ray.init`` (:func:`noah_ray.run.pipeline.interrupts`),
    so a signal raises :class:`Interrupted` (naming ``saved``, the storage root, when given); a Ray
    this command started is shut down on every way out, one it attached to is left running."""
    from noah_ray import progress
    from noah_ray.run import pipeline

    quiet = not args.verbose
    started: list[bool] = []
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")      # Tune's graceful stop would look like success
    with pipeline.interrupts() as trap:
        def start_ray() -> None:
            started.append(pipeline.init_ray(args.address, quiet=quiet))
            trap.install()                                         # again: ray.init put its own SIGTERM handler

        try:
            with progress.session(quiet=quiet):
                yield start_ray
        except (Interrupted, KeyboardInterrupt) as e:
            stopped = trap.interrupted(e)
            raise (stopped if saved is None else Interrupted(stopped.signum, saved=saved)) from None
        finally:
            if any(started):                                        # after the session: it uses Ray
                import ray

                ray.shutdown()


def _run_stages(job, stages: tuple[str, ...], args: argparse.Namespace) -> dict:
    """The stages in :func:`_ray_command`; Ray starts only when a stage has work left."""
    from noah_ray.run import pipeline

    with _ray_command(args) as start_ray:
        return pipeline.run_stages(job, stages, start_ray=start_ray)


def _stage_command(args: argparse.Namespace) -> int:
    from noah_ray.run import pipeline

    job = load_job(args.config, args.set)
    if getattr(args, "subnet", None):
        job.retrain.subnet = args.subnet
    if getattr(args, "method", None):
        job.retrain.method = args.method
        if args.stage_command == "hpo":       # only that method
            job.retrain.baselines = ()
    stages = STAGE_COMMANDS[args.stage_command]
    print(pipeline.format_summary(_run_stages(job, stages, args)))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from noah_ray.run.sweep import SweepConfig, format_outcomes
    from noah_ray.store import storage

    sweep = SweepConfig.load(args.config, lambda d: apply_overrides(d, args.set))
    jobs = sweep.jobs()
    root = storage.resolve(jobs[0].storage, jobs[0].storage_endpoint)
    storage.check_writable(root)                                                   # before Ray starts
    outcomes = _run_sweep(sweep, len(jobs), root.uri, args)
    print(format_outcomes(outcomes, root.uri))
    failed = [o for o in outcomes if not o.ok]
    if failed:
        print(f"{args.prog}: error: {len(failed)} of {len(outcomes)} pipeline(s) failed ("
              f"{'; '.join(f'{o.job}: {o.error}' for o in failed)[:600]}); fix them and run the sweep again "
              f"(finished stages are not re-run)", file=sys.stderr)
        return 1
    return 0


def _run_sweep(sweep: SweepConfig, count: int, root: str, args: argparse.Namespace) -> list[SweepOutcome]:
    """The sweep's pipelines in :func:`_ray_command`, as the stage commands run theirs; on SIGINT /
    SIGTERM the pipelines still running are cancelled and what finished stays under ``root``."""
    from noah_ray import progress
    from noah_ray.run.sweep import run_sweep

    with _ray_command(args, saved=root) as start_ray:
        start_ray()
        progress.echo(f"== sweep: {count} pipeline(s), {args.max_concurrent or sweep.sweep.max_concurrent} "
                      f"at a time, stages {', '.join(sweep.sweep.stages)} -> {root}")
        return run_sweep(sweep, args.max_concurrent)


def add_sweep_arguments(p: argparse.ArgumentParser, prog: str) -> None:
    """The options of ``noah-ray sweep`` and ``python -m jobs.sweep``."""
    p.add_argument("--config", required=True, help="sweep file: a job config plus a sweep section (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value, e.g. --set storage=s3://bucket/noah --set sweep.max_concurrent=8")
    p.add_argument("--max-concurrent", type=int, default=None, help="pipelines at once (default: sweep.max_concurrent)")
    p.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS or a new local Ray)")
    p.add_argument("--verbose", action="store_true", help=_VERBOSE_HELP)
    p.set_defaults(func=_sweep, prog=prog)


def sweep_main(argv: Sequence[str] | None = None, prog: str = "python -m jobs.sweep") -> int:
    """``python -m jobs.sweep``: the ``noah-ray sweep`` command on its own (for ``ray job submit``)."""
    parser = argparse.ArgumentParser(prog=prog, description="run a sweep's pipelines concurrently on the cluster")
    add_sweep_arguments(parser, prog)
    return _run(parser, argv)


def write_plots(uri: str, out_dir: str | Path, *, endpoint: str | None = None) -> list[Path]:
    """Every plot the tables under ``uri`` allow: Pareto front, supernet curves, and the
    architecture heat-map of each retrained NOAH subnet (else the search's best candidate)."""
    from noah_ray.store import results

    out_dir, paths = Path(out_dir), []
    trials = results.load_trials(uri, endpoint=endpoint)
    if not trials.empty:
        paths.append(results.plot_pareto(uri, out_dir / "pareto.png", endpoint=endpoint))
    if not results.supernet_curves(uri, endpoint=endpoint).empty:
        paths.append(results.plot_supernet_curves(uri, out_dir / "supernet_curves.png", endpoint=endpoint))
    if not results.finalists(uri, endpoint=endpoint).empty:
        paths.append(results.plot_finalists(uri, out_dir / "finalists.png", endpoint=endpoint))
    if not results.hpo(uri, endpoint=endpoint).empty:
        paths.append(results.plot_hpo(uri, out_dir / "hpo_values.png", endpoint=endpoint))
        paths.append(results.plot_asha_curves(uri, out_dir / "hpo_curves.png", endpoint=endpoint))
    for name, subnet in results.searched_subnets(uri, endpoint=endpoint).items():
        if any(any(subnet.layer_widths(m)) for m in subnet.widths):
            paths.append(results.plot_architecture(subnet, out_dir / f"architecture_{name}.png",
                                                   title=f"searched subnet: {name}"))
    return paths


def _demo(args: argparse.Namespace) -> int:
    from noah_ray.run import pipeline
    from noah_ray.store import results

    job = demo_config(args.out, args.quick)
    out = Path(job.storage)
    uri = str(out / job.name)
    print(f"noah-ray demo: generated task {job.data.dataset!r}, {job.model.name}, "
          f"results in {out}", flush=True)
    summary = _run_stages(job, STAGE_COMMANDS["pipeline"], args)
    print("\n" + pipeline.format_summary(summary))
    print("\nleaderboard (test accuracy %, mean +- std over seeds; params in M, head excluded):")
    print(results.leaderboard(uri).to_string(index=False))
    paths = write_plots(uri, out / "plots")
    print("\nplots:\n" + "\n".join(f"  {p}" for p in paths))
    print(f"\nmore: noah-ray results {uri} --table trials|pareto|runs|curves\n"
          f"      pandas.read_parquet({uri + '/search/trials'!r})")
    return 0


_VERBOSE_HELP = "also show Ray's own output (workers, Ray Train, Tune); by default it goes to Ray's log files"

_TABLES = ("leaderboard", "vtab", "trials", "generations", "pareto", "finalists", "runs", "curves", "hpo",
           "hpo_curves")


def _results(args: argparse.Namespace) -> int:
    import pandas as pd

    from noah_ray.store import results

    fn = {"leaderboard": results.leaderboard, "vtab": results.vtab_table, "trials": results.load_trials,
          "generations": results.generations, "pareto": results.pareto, "finalists": results.finalists,
          "runs": results.runs,
          "curves": results.supernet_curves, "hpo": results.hpo, "hpo_curves": results.hpo_curves}[args.table]
    df = fn(args.uri, endpoint=args.endpoint)
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.csv, index=False)
    if not args.wide:      # the per-layer widths and JSON configs stay in --csv / pandas
        df = df.drop(columns=[c for c in df.columns if c.endswith(("_widths", "_json", "config_key"))
                              or c in ("parent_ids", "worker", "checkpoint_uri")])
    with pd.option_context("display.max_rows", args.max_rows, "display.width", 200,
                           "display.max_columns", 40, "display.max_colwidth", 60):
        print(df.to_string(index=False) if not df.empty else f"(no {args.table} rows under {args.uri} yet)")
    if args.plots:
        for p in write_plots(args.uri, args.plots, endpoint=args.endpoint):
            print(p)
    return 0


def add_stage_arguments(p: argparse.ArgumentParser, command: str) -> None:
    """The options of a stage command (``noah-ray <command>`` and ``python -m jobs.<command>``)."""
    p.add_argument("--config", required=True, help="job config (YAML or JSON)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set storage=s3://bucket/noah --set search.generations=5 "
                        "(repeatable; values are YAML)")
    p.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS or a new local Ray)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the traceback of an error (also: NOAH_RAY_DEBUG=1)")
    p.add_argument("--verbose", action="store_true", help=_VERBOSE_HELP)
    if command in ("retrain", "hpo"):
        p.add_argument("--subnet", help="subnet file to retrain (default: the race's survivor, or with "
                                        "race.enabled: false the search's best_subnet.yaml)")
        p.add_argument("--method", help=method_help()
                       + (" (default: retrain.method and every baseline)" if command == "hpo" else ""))
    p.set_defaults(func=_stage_command, stage_command=command)


def plain_text(doc: str) -> str:
    """A reStructuredText docstring as terminal text: inline literals lose their backticks."""
    return re.sub(r"``([^`]+)``", r"\1", doc)


def build_parser(prog: str = "noah-ray") -> argparse.ArgumentParser:
    __version__ = metadata.version("noah_ray")
    parser = argparse.ArgumentParser(prog=prog, description=plain_text(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also: NOAH_RAY_DEBUG=1)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_stages(sub)
    _add_sweep(sub, prog)
    _add_results(sub)
    _add_import_noah(sub)
    _add_export(sub)
    _add_import_peft(sub)
    return parser


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on generated data with a tiny ViT (local Ray)",
                       description="The whole pipeline (supernet -> search -> retrain NOAH and baselines) on a "
                                   "generated task with a tiny ViT; a few minutes on 2 CPU cores.")
    p.add_argument("--out", default="./noah-results", help="where data, checkpoints, tables and plots go")
    p.add_argument("--quick", action="store_true", help="an even shorter run (smoke test)")
    p.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS or a new local Ray)")
    p.add_argument("--verbose", action="store_true", help=_VERBOSE_HELP)
    p.set_defaults(func=_demo)


def _add_stages(sub: argparse._SubParsersAction) -> None:
    for name, doc in _STAGE_DOCS.items():
        add_stage_arguments(sub.add_parser(name, help=doc, description=doc), name)


def _add_sweep(sub: argparse._SubParsersAction, prog: str) -> None:
    p = sub.add_parser("sweep", help="many datasets (shots, seeds) from one file: their pipelines at once",
                       description="Run the pipeline of every dataset (x shots x seeds) a sweep file names, "
                                   "concurrently as Ray tasks, into one storage root; failures are reported at "
                                   "the end (exit 1), finished stages are not re-run.")
    add_sweep_arguments(p, f"{prog} sweep")


def _add_results(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("results", help="print result tables (and plots) from a job or storage URI",
                       description="Print a result table read from the Parquet files under URI (one job "
                                   "<storage>/<name>, or a storage root holding many jobs).")
    p.add_argument("uri", help="a job (<storage>/<name>) or a storage root; local path, file:// or s3://")
    p.add_argument("--table", default="leaderboard", choices=_TABLES)
    p.add_argument("--endpoint", default=None, help="S3 endpoint URL (default: $AWS_ENDPOINT_URL)")
    p.add_argument("--plots", default=None, help="also write PNG plots into this directory")
    p.add_argument("--csv", default=None, help="also write the table (all columns) to this CSV file")
    p.add_argument("--wide", action="store_true", help="print every column (per-layer widths, JSON configs)")
    p.add_argument("--max-rows", type=int, default=60)
    p.set_defaults(func=_results)


def _add_import_noah(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-noah", help="read original NOAH subnet YAML files, print parameter counts")
    p.add_argument("files", nargs="+", help="NOAH subnet files (the RETRAIN block is used)")
    p.add_argument("--out", help="directory to write the converted subnet configs (YAML)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="head size for the count (default: from the dataset name)")
    p.add_argument("--model", default="vit_base_patch16_224", help="timm ViT to count on (default: ViT-B/16)")
    p.add_argument("--markdown", action="store_true", help="print one Markdown table instead of per-file blocks")
    p.add_argument("--endpoint", default=None, help="S3 endpoint URL for an s3:// --out")
    p.set_defaults(func=cli_commands.import_noah_command)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a retrained subnet for inference (artifact, merged LoRA, peft)")
    p.add_argument("source", help="a job config (YAML, with --run) or a subnet artifact directory / s3:// URI")
    p.add_argument("--run", default=None, help="retrain run id of the job (default: NOAH's seed 0: noahplus-seed0 "
                                                "when the job raced its finalists, else noah-seed0)")
    p.add_argument("--out", help="write a subnet artifact (safetensors + meta.json); load with noah_ray.load_subnet")
    p.add_argument("--merge-lora", action="store_true", help="fold LoRA into the qkv weights (no LoRA at inference)")
    p.add_argument("--include-backbone", action="store_true", help="also store the whole backbone in the artifact")
    p.add_argument("--peft", help="write the LoRA part and the head as a peft LoRA adapter into this directory")
    p.add_argument("--endpoint", default=None, help="S3 endpoint URL (default: the job's / $AWS_ENDPOINT_URL)")
    p.set_defaults(func=cli_commands.export_command)


def _add_import_peft(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-peft", help="read a peft LoRA adapter (timm ViT, fused qkv) as a subnet + weights",
                       description="Read a peft LoRA adapter on the fused qkv of a timm ViT (rank and alpha per "
                                   "layer: rank_pattern / alpha_pattern) as a NOAH subnet and its weights; "
                                   "refuses in one line what a subnet cannot hold (DoRA, rsLoRA, other targets, "
                                   "trained biases).")
    p.add_argument("folder", help="the adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", help="write a subnet artifact + subnet.yaml here (path or s3://): noah_ray.load_subnet "
                                 "evaluates it, retrain.subnet / retrain.init retrain from it")
    p.add_argument("--model", default=None, help="timm name of the base model (default: the adapter's "
                                                 "base_model_name_or_path)")
    p.add_argument("--backbone-checkpoint", default=None,
                   help="the backbone weights the adapter was trained on (path or s3://), recorded in the artifact")
    p.add_argument("--num-classes", type=int, default=None, help="head size when the adapter has no head")
    p.add_argument("--endpoint", default=None, help="S3 endpoint URL (default: $AWS_ENDPOINT_URL)")
    p.set_defaults(func=cli_commands.import_peft_command)


def error_line(err: BaseException, command: str) -> str:
    """One line for ``err``: a config / run error's own message (with the exact command that resumes
    a stopped stage), else the exception's type and last line; URI credentials redacted."""
    from noah_ray.security import redact

    if isinstance(err, ConfigError):
        text = str(err)
    elif isinstance(err, RunError):
        text = f"{err}: {command}"
    else:
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        text = f"{type(err).__name__}: {lines[-1] if lines else 'no message'} (--debug shows the traceback)"
    return redact(" ".join(text.split()))


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("NOAH_RAY_DEBUG") == "1"
    try:
        from noah_ray.nn.backbones import register_tiny_models

        register_tiny_models()  # our timm models (vit_noah_tiny_patch4_32.fractal) for every command
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as e:
        if debug:
            raise
        if isinstance(e, KeyboardInterrupt):        # before the stages' own handling (:func:`_run_stages`)
            e = Interrupted(signal.SIGINT)
        command = f"{parser.prog} {shlex.join(sys.argv[1:] if argv is None else list(argv))}"
        kind = "stopped" if isinstance(e, Interrupted) else "error"
        print(f"{parser.prog}: {kind}: {error_line(e, command)}", file=sys.stderr, flush=True)
        return e.exit_code if isinstance(e, Interrupted) else 1


def main(argv: Sequence[str] | None = None) -> int:
    return _run(build_parser(), argv)


def stage_main(command: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """One stage command on its own (the ``jobs/`` entrypoints): ``stage_main("pipeline")``."""
    parser = argparse.ArgumentParser(prog=prog or f"python -m jobs.{command}", description=_STAGE_DOCS[command])
    add_stage_arguments(parser, command)
    return _run(parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
