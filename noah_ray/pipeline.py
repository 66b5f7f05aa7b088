"""The chained stages (supernet -> search -> retrain), shared by the CLI and the Ray jobs.

Everything about a job is validated before anything is written; each stage resumes from what
earlier runs of the same job left in storage.
"""

from __future__ import annotations

import os
import time

import timm

from noah_ray import storage
from noah_ray.config import JobConfig
from noah_ray.space import ConfigError, SubnetConfig

STAGES = ("supernet", "search", "retrain")


def validate_job(job: JobConfig, stages: tuple[str, ...] = STAGES) -> None:
    """Raise one ConfigError for anything wrong with ``job``; writes nothing."""
    from noah_ray.data import num_classes
    from noah_ray.search import param_limit
    from noah_ray.train import METHODS

    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage {unknown[0]!r}; use {', '.join(STAGES)}")
    storage.resolve(job.storage, job.storage_endpoint)
    if not timm.is_model(job.model.name):
        raise ConfigError(f"model.name {job.model.name!r} is not a timm model; use e.g. "
                          f"vit_base_patch16_224.augreg_in21k or vit_noah_tiny_patch4_32")
    from noah_ray.search import backbone_shape_of

    depth = backbone_shape_of(job).depth
    if job.space.num_layers != depth:
        raise ConfigError(f"space.num_layers {job.space.num_layers} does not match {job.model.name} "
                          f"({depth} blocks); set space.num_layers: {depth}")
    num_classes(job.data)
    if "search" in stages:
        param_limit(job)
    for m in (job.retrain.method, *job.retrain.baselines):
        if m not in METHODS:
            raise ConfigError(f"retrain method {m!r} unknown; use one of {', '.join(METHODS)}")
    if job.retrain.subnet:
        job.space.validate(SubnetConfig.load(job.retrain.subnet))


def init_ray(address: str | None = None) -> None:
    """Connect to ``address`` / ``$RAY_ADDRESS`` (set inside ``ray job submit``), else start a
    local Ray on this machine."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, log_to_driver=True,
             **({"include_dashboard": False} if address == "local" else {}))


def retrain_subnet(job: JobConfig) -> SubnetConfig:
    """The subnet retraining uses: ``retrain.subnet`` if set, else the search's winner."""
    from noah_ray.search import load_best_subnet

    if job.retrain.subnet:
        return SubnetConfig.load(job.retrain.subnet)
    return load_best_subnet(job)


def run_stages(job: JobConfig, stages: tuple[str, ...] = STAGES) -> dict:
    """Run the requested stages in order; returns a summary per stage."""
    from noah_ray.search import run_search
    from noah_ray.train import retrain_seeds, train_supernet

    validate_job(job, stages)
    storage.check_writable(storage.resolve(job.storage, job.storage_endpoint))
    summary: dict = {}
    t0 = time.time()
    if "supernet" in stages:
        print(f"== supernet: {job.supernet.epochs} epochs, {job.supernet.num_workers} worker(s)", flush=True)
        res = train_supernet(job)
        summary["supernet"] = {"epochs": res.epochs_done, "uri": res.final_uri,
                               **{k: v for k, v in res.metrics.items() if k.startswith("val_acc")}}
    if "search" in stages:
        print(f"== search: {job.search.algorithm}, {job.search.generations} generations, "
              f"limit {job.search.param_limit} M", flush=True)
        res = run_search(job)
        summary["search"] = {"best": res.best.to_dict() if res.best else None, "val_acc": res.best_val_acc,
                             "params": res.best_params, "evaluated": res.evaluated, "uri": res.uri}
    if "retrain" in stages:
        methods = (job.retrain.method, *job.retrain.baselines)
        print(f"== retrain: {', '.join(methods)} x seeds {list(job.retrain.seeds)}", flush=True)
        subnet = retrain_subnet(job) if job.retrain.method == "noah" else None
        summary["retrain"] = {m: retrain_seeds(job, subnet if m == "noah" else None, m) for m in methods}
    summary["wall_time_s"] = time.time() - t0
    return summary
