"""Datasets and DataLoaders built from a :class:`~noah_ray.config.DataConfig`."""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from noah_ray.config import DataConfig
from noah_ray.data import registry
from noah_ray.data.readers import Sample, dataset_dir, read_folder_tree, read_split
from noah_ray.data.transforms import build_transform
from noah_ray.space import ConfigError

log = logging.getLogger(__name__)


class ImageListDataset(Dataset):
    """Images from ``(path, label)`` samples; optional decoded-image cache and corrupt-image skip."""

    def __init__(self, samples: list[Sample], num_classes: int, transform: Callable, *,
                 cache_decoded: bool = False, skip_corrupt: bool = False, source: str = "") -> None:
        self.transform = transform
        self.num_classes = num_classes
        self.skipped: list[str] = []
        if skip_corrupt:
            kept = []
            for path, y in samples:
                try:
                    with Image.open(path) as im:
                        im.verify()
                    kept.append((path, y))
                except (OSError, UnidentifiedImageError):
                    self.skipped.append(path)
            if self.skipped:
                log.warning("%s: skipped %d corrupt image(s), e.g. %s", source, len(self.skipped), self.skipped[0])
            samples = kept
        if not samples:
            raise ConfigError(f"{source}: no usable images left; check the split")
        self.samples = samples
        self.targets = [y for _, y in samples]
        self._cache: dict[int, Image.Image] | None = {} if cache_decoded else None

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, index: int) -> Image.Image:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        path = self.samples[index][0]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise ConfigError(f"image {path!r} cannot be decoded ({type(e).__name__}); "
                              f"replace it or set data.skip_corrupt: true") from None
        if self._cache is not None:
            self._cache[index] = img
        return img

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self._decode(index)), self.samples[index][1]


def num_classes(cfg: DataConfig) -> int:
    """Class count: ``cfg.num_classes``, else the registry, else the largest label + 1 of the
    train split (or the class folders)."""
    info = registry.lookup(cfg.dataset)
    if cfg.num_classes is not None:
        if info is not None and info.benchmark != "generated" and info.num_classes != cfg.num_classes:
            raise ConfigError(f"data.num_classes {cfg.num_classes} contradicts the registry: {info.name} "
                              f"has {info.num_classes} classes; remove data.num_classes or fix it")
        return cfg.num_classes
    if info is not None and info.benchmark != "generated":
        return info.num_classes
    if cfg.format == "folder":
        return len(read_folder_tree(dataset_dir(cfg) / cfg.train_split)[1])
    labels = [y for _, y in read_split(cfg, cfg.final_train_split if cfg.format == "vtab" else cfg.train_split)]
    return max(labels) + 1


def norm_for(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...], int]:
    """``(mean, std, img_size)`` from a timm model's (or PromptedViT's) pretrained config."""
    vit = getattr(model, "vit", model)
    cfg = getattr(vit, "pretrained_cfg", None) or {}
    mean = tuple(cfg.get("mean", (0.5, 0.5, 0.5)))
    std = tuple(cfg.get("std", (0.5, 0.5, 0.5)))
    return mean, std, int(vit.patch_embed.img_size[0])


def build_dataset(cfg: DataConfig, split: str, *, train: bool, mean: Sequence[float] = (0.5, 0.5, 0.5),
                  std: Sequence[float] = (0.5, 0.5, 0.5), img_size: int | None = None) -> ImageListDataset:
    n = num_classes(cfg)
    samples = read_split(cfg, split, num_classes=n)
    size = img_size or cfg.img_size or 224
    transform = build_transform(cfg.format, train=train, img_size=size, mean=mean, std=std)
    return ImageListDataset(samples, n, transform, cache_decoded=cfg.cache_decoded,
                            skip_corrupt=cfg.skip_corrupt, source=f"{cfg.dataset}/{split}")


def build_loader(cfg: DataConfig, split: str, *, train: bool, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), img_size: int | None = None,
                 shuffle: bool | None = None, batch_size: int | None = None) -> DataLoader:
    ds = build_dataset(cfg, split, train=train, mean=mean, std=std, img_size=img_size)
    workers = cfg.num_workers
    return DataLoader(ds, batch_size=batch_size or (cfg.batch_size if train else cfg.eval_batch_size),
                      shuffle=train if shuffle is None else shuffle, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(), drop_last=False)
