"""The one validation pass of a command: :func:`resolve` checks a job for the stages it runs,
on the driver before Ray starts, and returns a :class:`ResolvedJob` that every stage then takes
instead of checking again.

Everything that can fail deterministically is looked at here, once, so that a bad file ends the
command with one line instead of failing inside Ray workers (and being retried):

* the job's settings: stage names, tracking, the storage URI, the timm model and its checkpoint,
  the search space against the backbone, the parameter limit, batch split over the workers, the
  retraining methods, the prune section, ``retrain.subnet``, the hpo section;
* :func:`check_data` - every split file the stages read (the test split too), labels within the
  class count, and every image (unless ``data.skip_corrupt``): decoded whole when the split is
  small (up to :data:`DECODE_LIMIT` images: a VTAB-1k split is 1,000), else its header only, and
  one line says so;
* the storage is writable (``storage.check_writable``, the one write: a probe, deleted);
* :func:`check_checkpoint` - the backbone checkpoint's format and every tensor's shape against the
  model (built on the meta device: no memory);
* :func:`check_artifacts` - what earlier stages left and this command reads: the trained
  supernet (``supernet/final``), the search state, the search winner for retraining (called by
  :func:`noah_ray.run.pipeline.preflight`, which also works out the stages that still have work).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from noah_ray.config import STAGES, JobConfig
from noah_ray.config.resolved import ResolvedJob, param_limit
from noah_ray.errors import ConfigError
from noah_ray.interop import read_subnet
from noah_ray.space.kinds import BackboneShape
from noah_ray.space.methods import METHODS
from noah_ray.store import storage, tracking
from noah_ray.store.layout import JobPaths

TRAIN_STAGES = ("supernet", "retrain")               # the Ray Train runs
#: splits of at most this many images are decoded whole before Ray starts (a truncated JPEG has a
#: readable header); larger ones (a VTAB test split: up to ~27,000) only have their headers read
DECODE_LIMIT = 5000


def resolve(job: JobConfig, stages: tuple[str, ...] = STAGES, *, generate: bool = False) -> ResolvedJob:
    """Check ``job`` for ``stages`` (one :class:`ConfigError` for the first problem) and return
    what the stages need.  Writes nothing but the storage probe.  ``generate``: the caller writes
    a missing generated task before training (:func:`noah_ray.run.pipeline.prepare_data`), so its
    splits are not read here."""
    from noah_ray.data import num_classes

    _check_settings(job, stages)
    shape = _check_model(job)
    n = num_classes(job.data, endpoint=job.storage_endpoint)
    splits = {s: _splits(job, s) for s in STAGES if s in stages}
    if not (generate and _missing_generated(job)):
        check_data(job, splits, n)
    limit = param_limit(job, shape) if "search" in stages else None
    _check_retrain(job, stages, shape)
    storage.check_writable(storage.resolve(job.storage, job.storage_endpoint))
    check_checkpoint(job, n)
    from noah_ray.nn.models import backbone_uri

    return ResolvedJob(job, tuple(stages), n, shape, limit, backbone_uri(job), splits)


def _check_settings(job: JobConfig, stages: tuple[str, ...]) -> None:
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage {unknown[0]!r}; use {', '.join(STAGES)}")
    tracking.check(job)
    storage.resolve(job.storage, job.storage_endpoint)


def _exists(uri: str, endpoint: str | None) -> bool:
    try:
        return storage.exists(storage.resolve(uri, endpoint))
    except OSError as e:
        raise ConfigError(f"cannot reach {uri!r}: {str(e).splitlines()[0][:200]}; check the endpoint and "
                          f"credentials") from None


def _check_model(job: JobConfig) -> BackboneShape:
    """The timm model, its checkpoint's existence and the space's depth; the backbone's shape."""
    from noah_ray.nn.backbones import is_backbone, shape_of

    if not is_backbone(job.model.name):
        raise ConfigError(f"model.name {job.model.name!r} is not a timm model; use e.g. "
                          f"vit_base_patch16_224.augreg_in21k or vit_noah_tiny_patch4_32")
    if job.model.checkpoint and not _exists(job.model.checkpoint, job.storage_endpoint):
        raise ConfigError(f"model.checkpoint {job.model.checkpoint!r} does not exist; give the path or s3:// URI "
                          f"of the backbone weights (e.g. ViT-B_16.npz)")
    shape = shape_of(job.model.name, job.data.num_classes or 1)
    if job.space.num_layers != shape.depth:
        raise ConfigError(f"space.num_layers {job.space.num_layers} does not match {job.model.name} "
                          f"({shape.depth} blocks); set space.num_layers: {shape.depth}")
    if (job.model.checkpoint_blocks or 0) > shape.depth:
        raise ConfigError(f"model.checkpoint_blocks {job.model.checkpoint_blocks} is more than {job.model.name}'s "
                          f"{shape.depth} blocks; set at most {shape.depth} (or leave it unset: all)")
    _check_img_size(job)
    return shape


def _check_img_size(job: JobConfig) -> None:
    """``data.img_size`` (the size images are resized to) against the model's input size."""
    import torch

    from noah_ray.nn.backbones import create_backbone

    size = job.data.img_size
    if size is None:
        return
    with torch.device("meta"):
        embed = create_backbone(job.model.name, 1).patch_embed
    want, patch = int(embed.img_size[0]), int(embed.patch_size[0])
    if size != want and (getattr(embed, "strict_img_size", True) or size % patch):
        raise ConfigError(f"data.img_size {size} does not match {job.model.name}, which takes {want} x {want} "
                          f"images; set data.img_size: {want} or remove it (the model's size is the default)")


def _check_retrain(job: JobConfig, stages: tuple[str, ...], shape: BackboneShape) -> None:
    """Batch split over each training stage's workers, the methods, prune, subnet and hpo sections."""
    for stage in TRAIN_STAGES:
        n = getattr(job, stage).num_workers
        if stage in stages and job.data.batch_size % n:
            raise ConfigError(f"data.batch_size {job.data.batch_size} does not split evenly over {stage}.num_workers "
                              f"{n}; use a multiple of {n}")
    methods = (job.retrain.method, *job.retrain.baselines)
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"retrain method {m!r} unknown; use one of {', '.join(METHODS)}")
    if job.prune is not None:
        if "e2vpt" not in methods:
            raise ConfigError("the prune section applies to the e2vpt retraining only; add e2vpt to "
                              "retrain.baselines, or remove prune")
        if shape.embed_dim % job.prune.num_segments:
            raise ConfigError(f"prune.num_segments {job.prune.num_segments} must divide {job.model.name}'s "
                              f"embed dim {shape.embed_dim}; pick a divisor of {shape.embed_dim}")
    if ("retrain" in stages or "hpo" in stages) and job.retrain.subnet:
        job.space.validate(read_subnet(job.retrain.subnet), absent_ok=True)
    if stages == ("hpo",) and job.hpo is None:
        raise ConfigError("the job has no hpo section; add one (e.g. hpo: {trials: 16}) to tune hyper-parameters")
    for m in job.hpo.method_space if job.hpo is not None else ():
        if m not in METHODS:
            raise ConfigError(f"hpo.method_space: {m!r} is not a retraining method; use one of {', '.join(METHODS)}")
    if job.hpo is not None and job.race.enabled and job.race.retrain_plain:
        raise ConfigError("race.retrain_plain: true with an hpo section: the plain noah row would need a tuning of "
                          "its own; set race.retrain_plain: false, or remove hpo")


def is_generated(job: JobConfig) -> bool:
    """Whether the job's dataset is a task this package writes (``gen_*``, ``mv_*``)."""
    from noah_ray.config import datasets as registry

    info = registry.lookup(job.data.dataset, job.data.format)
    return job.data.format == "vtab" and info is not None and info.benchmark in registry.WRITTEN


def _missing_generated(job: JobConfig) -> bool:
    return is_generated(job) and not str(job.data.root).startswith("s3://") and \
        not (Path(job.data.root).expanduser() / job.data.dataset).is_dir()


def _splits(job: JobConfig, stage: str) -> tuple[str, ...]:
    """The splits ``stage`` reads."""
    d, h = job.data, job.hpo
    reads = {"supernet": (d.train_split, d.val_split), "search": (d.val_split,),
             "race": (d.train_split, d.val_split) if job.race.enabled else (),
             "hpo": (d.train_split, d.val_split) if h is not None else (),
             "retrain": (d.train_split, d.val_split, d.test_split)
             + ((d.final_train_split,) if h is not None else ())}      # the tuned final runs: train800val200
    return reads[stage]


def _bad_image(path: str, decode: bool = False) -> str | None:
    """Why the image at ``path`` cannot be used (None: it can); ``decode``: all its pixels, not only
    its header (a truncated JPEG has a readable header)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            if decode:
                im.load()
        return None if w > 0 and h > 0 else "has no pixels"
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        detail = str(e).splitlines()[0][:80] if decode and str(e) else ""
        return f"{type(e).__name__}: {detail}" if detail else type(e).__name__


def check_images(paths: list[str], split: str, decode: bool | None = None) -> None:
    """Every image can be read, else one :class:`ConfigError`: decoded whole when ``decode`` (default:
    when the split has at most :data:`DECODE_LIMIT` images), else its header (format and size) only,
    and a line saying why."""
    from noah_ray import progress

    decode = len(paths) <= DECODE_LIMIT if decode is None else decode
    if not decode:
        progress.echo(f"split {split!r}: {len(paths)} images, more than {DECODE_LIMIT}: only their headers are "
                      f"checked before Ray starts (decoding all takes long); a corrupt one stops the stage there "
                      f"unless data.skip_corrupt: true")
    with ThreadPoolExecutor(8) as pool:
        for path, bad in zip(paths, pool.map(lambda p: _bad_image(p, decode), paths)):
            if bad:
                raise ConfigError(f"image {path!r} of split {split!r} cannot be read ({bad}); replace it, remove it "
                                  f"from the split, or set data.skip_corrupt: true")


def check_data(job: JobConfig, splits: dict[str, tuple[str, ...]], num_classes: int) -> None:
    """The split files the stages read (``splits``: stage -> its splits), their labels against
    ``num_classes`` and their images' headers.  An ``s3://`` root: the split files of the Ray
    Train stages, staged into the local cache (their images are checked as they are read)."""
    from noah_ray.data.readers import read_split

    s3 = str(job.data.root).startswith("s3://")
    names = dict.fromkeys(x for stage, xs in splits.items() if not s3 or stage in TRAIN_STAGES for x in xs)
    checked: set[str] = set()             # train800val200 repeats train800 and val200: each image once
    for split in names:
        samples = read_split(job.data, split, num_classes=num_classes, endpoint=job.storage_endpoint)
        paths = [p for p, _ in samples]
        small = len(paths) <= DECODE_LIMIT
        if not (s3 or job.data.skip_corrupt):
            check_images([p for p in dict.fromkeys(paths) if p not in checked] if small else paths, split, small)
            checked.update(paths if small else ())


def check_checkpoint(job: JobConfig, num_classes: int) -> None:
    """The backbone checkpoint (``model.checkpoint``, else the job's ``backbone.safetensors`` if
    written) is readable and every tensor fits ``model.name``."""
    import torch

    from noah_ray.nn.backbones import create_backbone, fit_to_model, read_checkpoint

    uri = job.model.checkpoint
    if not uri:
        loc = JobPaths.of(job).backbone
        if not storage.exists(loc):
            return
        uri = loc.uri
    state, source, _ = read_checkpoint(uri, endpoint=job.storage_endpoint)
    with torch.device("meta"):
        model = create_backbone(job.model.name, num_classes)
    fit_to_model(model, state, source, uri)


def check_artifacts(job: JobConfig, stages: tuple[str, ...]) -> None:
    """What this command reads from earlier stages exists and is intact."""
    from noah_ray.hpo.race import race_applies, raced_subnet, top_scored
    from noah_ray.nn.models import supernet_recovery
    from noah_ray.search.driver import load_best_subnet, search_run_name
    from noah_ray.search.store import SearchStore

    final = JobPaths.of(job).supernet_final()
    if "search" in stages:
        if storage.exists(final.join("meta.json")):
            storage.load_state(final, supernet_recovery(final))
        elif "supernet" not in stages:
            raise ConfigError(f"no trained supernet at {final.uri!r}; run the supernet stage first")
        run = search_run_name(job, None)
        SearchStore(JobPaths.of(job).search.uri, job.storage_endpoint, run, job.name, job.data.dataset,
                    job.search.algorithm).load_state()
    methods = (job.retrain.method, *job.retrain.baselines)
    raced = race_applies(job)
    if ("race" in stages or (("retrain" in stages or "hpo" in stages) and not raced)) and "search" not in stages \
            and "noah" in methods and not job.retrain.subnet:
        job.space.validate(load_best_subnet(job), absent_ok=True)   # warm starts: modules alone
    if ("retrain" in stages or "hpo" in stages) and raced and "race" not in stages and "search" not in stages:
        raced_subnet(job)          # the race's survivor: a baseline may be wider than the space allows
    if "retrain" in stages and raced and job.race.retrain_plain and "search" not in stages:
        top_scored(job)            # the plain row's subnet: the search must have scored candidates
