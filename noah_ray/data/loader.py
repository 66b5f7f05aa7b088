"""Datasets and DataLoaders built from a :class:`~noah_ray.config.DataConfig`."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from noah_ray.config import DataConfig
from noah_ray.config import datasets as registry
from noah_ray.data.readers import Sample, folder_classes, read_split
from noah_ray.data.transforms import ImageTransform, build_transform
from noah_ray.errors import ConfigError

log = logging.getLogger(__name__)

_DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)


def _threads() -> int:
    return min(8, (os.cpu_count() or 1) + 1)


def _open_rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _is_decodable(path: str) -> bool:
    """Fully decode ``path`` (JPEGs at reduced DCT scale, which still reads the whole stream)."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))
            im.load()
        return True
    except _DECODE_ERRORS:
        return False


class ImageListDataset(Dataset):
    """Images from ``(path, label)`` samples.

    ``skip_corrupt``: every image is decoded once up front and unreadable ones are dropped with a
    warning (``.skipped`` lists them); otherwise an unreadable image raises :class:`ConfigError`
    when it is loaded.  ``cache_decoded``: all images are decoded up front (in threads) and kept
    as uint8 arrays after the transform's deterministic part (e.g. the VTAB resize), so workers
    forked later share them and each epoch only pays for the tensor conversion and augmentation.
    """

    def __init__(self, samples: list[Sample], num_classes: int, transform: ImageTransform | Callable, *,
                 cache_decoded: bool = False, skip_corrupt: bool = False, source: str = "") -> None:
        if not isinstance(transform, ImageTransform):     # a callable of unknown kind: may be random
            transform = ImageTransform(None, transform, random=True)
        self.transform = transform
        self.num_classes = num_classes
        self.source = source
        self.skipped: list[str] = []
        if skip_corrupt:
            with ThreadPoolExecutor(_threads()) as pool:
                ok = list(pool.map(_is_decodable, [p for p, _ in samples]))
            self.skipped = [p for (p, _), good in zip(samples, ok) if not good]
            samples = [s for s, good in zip(samples, ok) if good]
            if self.skipped:
                log.warning("%s: skipped %d corrupt image(s) of %d, e.g. %s", source, len(self.skipped),
                            len(self.skipped) + len(samples), self.skipped[0])
        if not samples:
            raise ConfigError(f"{source}: no usable images left; check the split")
        self.samples = samples
        self.targets = [y for _, y in samples]
        self._cache: list[np.ndarray] | None = None
        if cache_decoded:
            with ThreadPoolExecutor(_threads()) as pool:
                self._cache = list(pool.map(self._decode_pre, range(len(samples))))

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def cache_bytes(self) -> int:
        """Memory held by the decoded-image cache (0 without one)."""
        return sum(a.nbytes for a in self._cache) if self._cache is not None else 0

    def _decode(self, index: int) -> Image.Image:
        path = self.samples[index][0]
        try:
            return _open_rgb(path)
        except _DECODE_ERRORS as e:
            raise ConfigError(f"image {path!r} cannot be decoded ({type(e).__name__}); "
                              f"replace it or set data.skip_corrupt: true") from None

    def _decode_pre(self, index: int) -> np.ndarray:
        img = self._decode(index)
        return np.asarray(self.transform.pre(img) if self.transform.pre is not None else img)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        y = self.samples[index][1]
        if self._cache is not None:
            return self.transform.post(Image.fromarray(self._cache[index])), y
        return self.transform(self._decode(index)), y


# ------------------------------------------------------------------ class counts and norms
def registry_entry(cfg: DataConfig) -> registry.DatasetInfo | None:
    """The registry entry that applies to ``cfg`` (None for folder trees and unknown names)."""
    if cfg.format == "folder":
        return None
    info = registry.lookup(cfg.dataset, cfg.format)
    if info is None:
        return None
    fits = info.benchmark == cfg.format or (cfg.format == "vtab" and info.benchmark in registry.WRITTEN)
    return info if fits else None


def num_classes(cfg: DataConfig, *, endpoint: str | None = None) -> int:
    """Class count: ``cfg.num_classes`` (checked against the registry), else the registry, else the
    class folders (folder format) or the largest label + 1 of the training split."""
    info = registry_entry(cfg)
    if cfg.num_classes is not None:
        if info is not None and info.num_classes != cfg.num_classes:
            raise ConfigError(f"data.num_classes {cfg.num_classes} contradicts the registry: {info.name} "
                              f"has {info.num_classes} classes; remove data.num_classes or fix it")
        return cfg.num_classes
    if info is not None:
        return info.num_classes
    if cfg.format == "folder":
        return len(folder_classes(cfg, endpoint=endpoint))
    split = cfg.final_train_split if cfg.format == "vtab" else cfg.train_split
    return max(y for _, y in read_split(cfg, split, endpoint=endpoint)) + 1


def norm_for(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...], int]:
    """``(mean, std, img_size)`` from a timm model's (or a PromptedViT's) pretrained config;
    0.5 / 0.5 when the model has none (the ImageNet-21k ViTs' normalisation)."""
    vit = getattr(model, "vit", model)
    cfg = getattr(vit, "pretrained_cfg", None) or {}
    mean = tuple(float(x) for x in cfg.get("mean", (0.5, 0.5, 0.5)))
    std = tuple(float(x) for x in cfg.get("std", (0.5, 0.5, 0.5)))
    size = getattr(getattr(vit, "patch_embed", None), "img_size", None)
    if size is None:
        size = cfg.get("input_size", (3, 224, 224))[1:]
    return mean, std, int(size[0])


# ------------------------------------------------------------------ datasets and loaders
def build_dataset(cfg: DataConfig, split: str, *, train: bool, mean: Sequence[float] = (0.5, 0.5, 0.5),
                  std: Sequence[float] = (0.5, 0.5, 0.5), img_size: int | None = None,
                  endpoint: str | None = None) -> ImageListDataset:
    """The dataset of ``split`` (a split name as in ``cfg``: train800 / val200 / train800val200 /
    test for VTAB; few-shot and DG map them to their list files) with the paper's transform.
    ``endpoint``: S3 endpoint for an ``s3://`` data root (default: the environment's)."""
    n = num_classes(cfg, endpoint=endpoint)
    samples = read_split(cfg, split, num_classes=n, endpoint=endpoint)
    size = img_size or cfg.img_size or 224
    transform = build_transform(cfg.format, train=train, img_size=size, mean=mean, std=std)
    ds = ImageListDataset(samples, n, transform, cache_decoded=cfg.cache_decoded,
                          skip_corrupt=cfg.skip_corrupt, source=f"{cfg.dataset}/{split}")
    if train and len(set(ds.targets)) < n:
        log.info("%s/%s: labels cover %d of %d classes", cfg.dataset, split, len(set(ds.targets)), n)
    return ds


def build_loader(cfg: DataConfig, split: str, *, train: bool, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), img_size: int | None = None,
                 shuffle: bool | None = None, batch_size: int | None = None,
                 endpoint: str | None = None, dataset: Dataset | None = None) -> DataLoader:
    """A DataLoader over :func:`build_dataset` (or ``dataset``, one built before) with
    ``cfg.num_workers`` worker processes (persistent), shuffled when ``train`` (unless ``shuffle``
    says otherwise), last partial batch kept."""
    ds = dataset if dataset is not None else build_dataset(cfg, split, train=train, mean=mean, std=std,
                                                           img_size=img_size, endpoint=endpoint)
    workers = cfg.num_workers
    return DataLoader(ds, batch_size=batch_size or (cfg.batch_size if train else cfg.eval_batch_size),
                      shuffle=train if shuffle is None else shuffle, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(), drop_last=False)
