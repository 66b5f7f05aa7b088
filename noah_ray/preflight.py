"""Checks that run on the driver before Ray starts (called by :func:`noah_ray.pipeline.preflight`).

Everything that can fail deterministically is looked at here, once, so that a bad file ends the
command with one line instead of failing inside Ray workers (and being retried):

* :func:`check_data` - every split file the stages read (the test split too), labels within the
  class count, and every image's header (unless ``data.skip_corrupt``);
* :func:`check_checkpoint` - the backbone checkpoint's format and every tensor's shape against the
  model (built on the meta device: no memory);
* :func:`check_artifacts` - what earlier stages left and this command reads: the trained
  supernet (``supernet/final``), the search state, the search winner for retraining;
* :func:`pending_stages` - which stages still have work; finished ones answer from storage, and a
  command whose stages are all finished never starts Ray.

Nothing here writes.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

from noah_ray import storage
from noah_ray.config import JobConfig
from noah_ray.errors import ConfigError

STAGE_ORDER = ("supernet", "search", "hpo", "retrain")


def _splits(job: JobConfig, stages: tuple[str, ...]) -> list[str]:
    d, out = job.data, []
    if "supernet" in stages:
        out += [d.train_split, d.val_split]
    if "search" in stages:
        out.append(d.val_split)
    if "hpo" in stages and job.hpo is not None:
        out += [d.train_split, d.val_split]
    if "retrain" in stages:
        out += [d.train_split, d.val_split, d.test_split]
        if job.hpo is not None:                  # the tuned final runs train on train800val200
            out.append(d.final_train_split)
    return list(dict.fromkeys(out))


def _bad_image(path: str) -> str | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
        return None if w > 0 and h > 0 else "has no pixels"
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        return type(e).__name__


def check_images(paths: list[str], split: str) -> None:
    """Every image's header can be read (format and size), else one :class:`ConfigError`."""
    with ThreadPoolExecutor(8) as pool:
        for path, bad in zip(paths, pool.map(_bad_image, paths)):
            if bad:
                raise ConfigError(f"image {path!r} of split {split!r} cannot be read ({bad}); replace it, remove it "
                                  f"from the split, or set data.skip_corrupt: true")


def check_data(job: JobConfig, stages: tuple[str, ...], num_classes: int) -> None:
    """The split files the stages read (local data roots; an ``s3://`` root is checked where it is
    staged), their labels against ``num_classes`` and their images' headers."""
    from noah_ray.data.readers import read_split

    if str(job.data.root).startswith("s3://"):
        return
    for split in _splits(job, stages):
        samples = read_split(job.data, split, num_classes=num_classes)
        if not job.data.skip_corrupt:
            check_images([p for p, _ in samples], split)


def check_checkpoint(job: JobConfig, num_classes: int) -> None:
    """The backbone checkpoint (``model.checkpoint``, else the job's ``backbone.safetensors`` if
    written) is readable and every tensor fits ``model.name``."""
    import torch

    from noah_ray.backbones import _fit_to_model, create_backbone, read_checkpoint

    uri = job.model.checkpoint
    if not uri:
        loc = storage.resolve(job.storage, job.storage_endpoint).join(job.name, "backbone.safetensors")
        if not storage.exists(loc):
            return
        uri = loc.uri
    state, source, _ = read_checkpoint(uri, endpoint=job.storage_endpoint)
    with torch.device("meta"):
        model = create_backbone(job.model.name, num_classes)
    _fit_to_model(model, state, source, uri)


def check_artifacts(job: JobConfig, stages: tuple[str, ...]) -> None:
    """What this command reads from earlier stages exists and is intact."""
    from noah_ray.search import SearchStore, _run_name, load_best_subnet, search_location
    from noah_ray.train import job_root, supernet_recovery

    final = job_root(job).join("supernet", "final")
    if "search" in stages:
        if storage.exists(final.join("meta.json")):
            storage.load_state(final, supernet_recovery(final))
        elif "supernet" not in stages:
            raise ConfigError(f"no trained supernet at {final.uri!r}; run the supernet stage first")
        run = _run_name(job, None)
        SearchStore(search_location(job).uri, job.storage_endpoint, run, job.name, job.data.dataset,
                    job.search.algorithm).load_state()
    methods = (job.retrain.method, *job.retrain.baselines)
    if ("retrain" in stages or "hpo" in stages) and "search" not in stages and "noah" in methods \
            and not job.retrain.subnet:
        job.space.validate(load_best_subnet(job))


def _stage_done(stage: str, job: JobConfig, num_classes: int) -> bool:
    from noah_ray import search, train

    if stage == "supernet":
        return train.supernet_done(job, num_classes)
    if stage == "search":
        return search.search_done(job)
    from noah_ray import hpo
    from noah_ray.pipeline import retrain_subnet

    if stage == "hpo" and job.hpo is None:
        return True
    methods = tuple(dict.fromkeys((job.retrain.method, *job.retrain.baselines)))
    try:
        subnet = retrain_subnet(job) if "noah" in methods else None
    except ConfigError:                  # e.g. the winner file is not written yet: the search stage writes it
        return False
    if stage == "hpo":
        return all(hpo.hpo_done(job, m) for m in methods)
    if job.hpo is not None:
        return all(hpo.tuned_retrain_done(job, subnet if m == "noah" else None, m, seed, num_classes)
                   for m in methods for seed in job.retrain.seeds)
    return all(train.retrain_done(job, subnet if m == "noah" else None, m, seed, num_classes)
               for m in methods for seed in job.retrain.seeds)


def pending_stages(job: JobConfig, stages: tuple[str, ...], num_classes: int) -> tuple[str, ...]:
    """The requested stages that still have work (every stage after a pending one is pending)."""
    out: list[str] = []
    for stage in (s for s in STAGE_ORDER if s in stages):
        if out or not _stage_done(stage, job, num_classes):
            out.append(stage)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class PreflightReport:
    num_classes: int
    pending: tuple[str, ...]          # stages that need Ray; the others answer from storage
