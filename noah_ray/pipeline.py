"""The chained stages (supernet -> search -> retrain), shared by the CLI and the Ray jobs.

Everything about a job is validated before anything is written (:func:`validate_job`); each
stage resumes from what earlier runs of the same job left in storage, so running a finished
job again only re-reads its results.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from noah_ray import progress, storage, tracking
from noah_ray.config import JobConfig
from noah_ray.errors import ConfigError
from noah_ray.space import SubnetConfig

STAGES = ("supernet", "search", "hpo", "retrain")   # hpo runs only with an hpo section


def _is_generated(job: JobConfig) -> bool:
    from noah_ray.data import registry

    info = registry.lookup(job.data.dataset, job.data.format)
    return job.data.format == "vtab" and info is not None and info.benchmark in registry.WRITTEN


def _check_data(job: JobConfig, stages: tuple[str, ...], num_classes: int) -> None:
    """The splits the stages read, their labels and image headers (:func:`noah_ray.preflight.check_data`).
    Generated tasks that are missing are written by :func:`prepare_data`."""
    from noah_ray.preflight import check_data

    if _is_generated(job) and not str(job.data.root).startswith("s3://") and \
            not (Path(job.data.root).expanduser() / job.data.dataset).is_dir():
        return
    check_data(job, stages, num_classes)


def _exists(uri: str, endpoint: str | None) -> bool:
    loc = storage.resolve(uri, endpoint)
    try:
        return storage.exists(loc)
    except OSError as e:
        raise ConfigError(f"cannot reach {uri!r}: {str(e).splitlines()[0][:200]}; check the endpoint and "
                          f"credentials") from None


def validate_job(job: JobConfig, stages: tuple[str, ...] = STAGES) -> None:
    """Raise one :class:`ConfigError` for anything wrong with ``job``; writes nothing.

    Checks the storage URI, the model name and checkpoint, the search space against the
    backbone, the dataset and its splits, the parameter limit against the space, the retraining
    methods and subnet file."""
    from noah_ray.backbones import is_backbone
    from noah_ray.data import num_classes
    from noah_ray.search import backbone_shape_of, param_limit
    from noah_ray.train import METHODS

    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage {unknown[0]!r}; use {', '.join(STAGES)}")
    tracking.check(job)
    storage.resolve(job.storage, job.storage_endpoint)
    if not is_backbone(job.model.name):
        raise ConfigError(f"model.name {job.model.name!r} is not a timm model; use e.g. "
                          f"vit_base_patch16_224.augreg_in21k or vit_noah_tiny_patch4_32")
    if job.model.checkpoint and not _exists(job.model.checkpoint, job.storage_endpoint):
        raise ConfigError(f"model.checkpoint {job.model.checkpoint!r} does not exist; give the path or s3:// URI "
                          f"of the backbone weights (e.g. ViT-B_16.npz)")
    depth = backbone_shape_of(job).depth
    if job.space.num_layers != depth:
        raise ConfigError(f"space.num_layers {job.space.num_layers} does not match {job.model.name} "
                          f"({depth} blocks); set space.num_layers: {depth}")
    _check_data(job, stages, num_classes(job.data, endpoint=job.storage_endpoint))
    if "search" in stages:
        param_limit(job)
    for stage in ("supernet", "retrain"):
        n = getattr(job, stage).num_workers
        if stage in stages and job.data.batch_size % n:
            raise ConfigError(f"data.batch_size {job.data.batch_size} does not split evenly over {stage}.num_workers "
                              f"{n}; use a multiple of {n}")
    for m in (job.retrain.method, *job.retrain.baselines):
        if m not in METHODS:
            raise ConfigError(f"retrain method {m!r} unknown; use one of {', '.join(METHODS)}")
    if job.prune is not None:
        if "e2vpt" not in (job.retrain.method, *job.retrain.baselines):
            raise ConfigError("the prune section applies to the e2vpt retraining only; add e2vpt to "
                              "retrain.baselines, or remove prune")
        dim = backbone_shape_of(job).embed_dim
        if dim % job.prune.num_segments:
            raise ConfigError(f"prune.num_segments {job.prune.num_segments} must divide {job.model.name}'s "
                              f"embed dim {dim}; pick a divisor of {dim}")
    if ("retrain" in stages or "hpo" in stages) and job.retrain.subnet:
        job.space.validate(SubnetConfig.load(job.retrain.subnet))
    _check_hpo(job, stages, METHODS)


def _check_hpo(job: JobConfig, stages: tuple[str, ...], methods: tuple[str, ...]) -> None:
    if stages == ("hpo",) and job.hpo is None:
        raise ConfigError("the job has no hpo section; add one (e.g. hpo: {trials: 16}) to tune hyper-parameters")
    if job.hpo is None:
        return
    for m in job.hpo.method_space:
        if m not in methods:
            raise ConfigError(f"hpo.method_space: {m!r} is not a retraining method; use one of {', '.join(methods)}")


def preflight(job: JobConfig, stages: tuple[str, ...] = STAGES):
    """Everything checked before Ray starts, once per command: :func:`validate_job`, the backbone
    checkpoint against the model, earlier stages' artifacts, the storage writable; returns a
    :class:`~noah_ray.preflight.PreflightReport` (which stages still need Ray)."""
    from noah_ray import preflight as checks
    from noah_ray.data import num_classes

    validate_job(job, stages)
    storage.check_writable(storage.resolve(job.storage, job.storage_endpoint))
    n = num_classes(job.data, endpoint=job.storage_endpoint)
    checks.check_checkpoint(job, n)
    checks.check_artifacts(job, stages)
    return checks.PreflightReport(n, checks.pending_stages(job, stages, n))


def prepare_data(job: JobConfig) -> None:
    """Write a generated (``gen_*``) or mini-VTAB (``mv_*``) task under ``data.root`` if it is not
    there yet."""
    if _is_generated(job) and not str(job.data.root).startswith("s3://"):
        from noah_ray.data import minivtab, write_generated_vtab

        root = Path(job.data.root).expanduser()
        folder = root / job.data.dataset
        if not folder.is_dir():
            progress.echo(f"== data: writing task {job.data.dataset!r} to {folder}")
            if job.data.dataset in minivtab.TASKS:
                minivtab.write_task(root, job.data.dataset, seed=job.data.seed)
            else:
                write_generated_vtab(root, job.data.dataset, seed=job.data.seed)


def init_ray(address: str | None = None, *, quiet: bool = False) -> None:
    """Connect to ``address`` / ``$RAY_ADDRESS`` (set inside ``ray job submit``), else start a
    local Ray on this machine.  ``quiet`` keeps Ray's own output in Ray's log files
    (:func:`noah_ray.progress.quiet_ray`); run the stages inside :func:`noah_ray.progress.session`
    so that the workers' progress lines still reach the console."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict = {"include_dashboard": False} if address == "local" else {}
    kwargs.update(progress.quiet_ray() if quiet else {"log_to_driver": True})
    ray.init(address=address, **kwargs)


def retrain_subnet(job: JobConfig) -> SubnetConfig:
    """The subnet retraining uses: ``retrain.subnet`` if set, else the search's winner."""
    from noah_ray.search import load_best_subnet

    if job.retrain.subnet:
        return SubnetConfig.load(job.retrain.subnet)
    return load_best_subnet(job)


def run_stages(job: JobConfig, stages: tuple[str, ...] = STAGES, *,
               start_ray: Callable[[], None] | None = None) -> dict:
    """Run the requested stages in order; returns a summary per stage.

    :func:`preflight` runs first; the job's lease (:mod:`noah_ray.lease`) is held throughout, so a
    second run of the same job fails at once.  ``start_ray`` is called only when a stage has work
    left (finished stages answer from storage); without it Ray must be initialised (or starts on
    first use)."""
    from noah_ray import lease

    report = preflight(job, stages)
    with lease.hold(job.storage, job.storage_endpoint, job.name):
        if report.pending and start_ray is not None:
            start_ray()
        return _run(job, stages)


def _run(job: JobConfig, stages: tuple[str, ...]) -> dict:
    from noah_ray.search import run_search
    from noah_ray.train import retrain_seeds, train_supernet

    prepare_data(job)
    summary: dict = {"job": job.name, "uri": storage.resolve(job.storage, job.storage_endpoint).join(job.name).uri}
    t0 = time.time()
    if "supernet" in stages:
        progress.echo(f"== supernet: {job.supernet.epochs} epoch(s), {job.supernet.num_workers} worker(s)")
        res = train_supernet(job)
        summary["supernet"] = {"epochs": res.epochs_done, "uri": res.final_uri,
                               **{k: v for k, v in res.metrics.items() if k.startswith("val_acc")}}
    if "search" in stages:
        progress.echo(f"== search: {job.search.algorithm}, {job.search.generations} generation(s) x "
                      f"{job.search.population}, limit {job.search.param_limit} M")
        res = run_search(job)
        summary["search"] = {"best": res.best.to_dict() if res.best else None, "val_acc": res.best_val_acc,
                             "params": res.best_params, "evaluated": res.evaluated, "uri": res.uri,
                             "best_subnet_uri": res.best_subnet_uri, "finished": res.finished}
    methods = tuple(dict.fromkeys((job.retrain.method, *job.retrain.baselines)))
    if "hpo" in stages and job.hpo is not None:
        from noah_ray.hpo import run_hpo

        progress.echo(f"== hpo: {', '.join(methods)}, {job.hpo.searcher} + {job.hpo.scheduler}")
        subnet = retrain_subnet(job) if "noah" in methods else None
        summary["hpo"] = {m: run_hpo(job, m, subnet if m == "noah" else None).record() for m in methods}
    if "retrain" in stages:
        from noah_ray.hpo import tuned_retrain

        progress.echo(f"== retrain: {', '.join(methods)} x seeds {list(job.retrain.seeds)}"
                      + (" with tuned hyper-parameters" if job.hpo else ""))
        subnet = retrain_subnet(job) if "noah" in methods else None
        run = retrain_seeds if job.hpo is None else tuned_retrain
        summary["retrain"] = {m: run(job, subnet if m == "noah" else None, m) for m in methods}
    summary["wall_time_s"] = time.time() - t0
    return summary


def format_summary(summary: dict) -> str:
    """Human-readable lines for a :func:`run_stages` summary."""
    lines = []
    if "supernet" in summary:
        s = summary["supernet"]
        accs = ", ".join(f"{k[len('val_acc_'):]} {v:.1f}%" for k, v in s.items() if k.startswith("val_acc_"))
        lines.append(f"supernet: {s['epochs']} epoch(s)" + (f", val {accs}" if accs else "") + f" -> {s['uri']}")
    if "search" in summary:
        s = summary["search"]
        if s["best"]:
            lines.append(f"search: best val {s['val_acc']:.2f}% with {s['params'] / 1e6:.4f} M params "
                         f"({s['evaluated']} candidates scored) -> {s['best_subnet_uri'] or s['uri']}")
        else:
            lines.append(f"search: no finished result yet ({s['evaluated']} candidates scored); run it again to resume")
    for method, r in summary.get("hpo", {}).items():
        values = ", ".join(f"{k.partition('.')[2]} {v:.4g}" for k, v in r["values"].items())
        lines.append(f"hpo {method}: best {r['metric']} {r['best_val']:.4g} of {r['trials']} trials with {values}")
    for method, r in summary.get("retrain", {}).items():
        lines.append(f"retrain {method}: test {r['test_acc_mean']:.2f} +- {r['test_acc_std']:.2f} % "
                     f"over {len(r['runs'])} seed(s)")
    if "wall_time_s" in summary:
        lines.append(f"done in {summary['wall_time_s']:.0f} s; results under {summary['uri']}")
    return "\n".join(lines)
