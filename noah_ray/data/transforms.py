"""Transforms as in the paper: VTAB-1k resize to the input size (bicubic), no augmentation;
few-shot / domain generalisation train with RandAugment m9 mstd0.5 and colour jitter 0.4.
Normalisation comes from the backbone (0.5/0.5 for ImageNet-21k ViTs)."""

from __future__ import annotations

from typing import Callable, Sequence

from torchvision import transforms as T

Norm = tuple[float, float, float]


def build_transform(fmt: str, *, train: bool, img_size: int, mean: Sequence[float],
                    std: Sequence[float]) -> Callable:
    if train and fmt in ("fewshot", "dg"):
        from timm.data import create_transform

        return create_transform(img_size, is_training=True, auto_augment="rand-m9-mstd0.5",
                                color_jitter=0.4, interpolation="bicubic", re_prob=0.0,
                                mean=tuple(mean), std=tuple(std))
    return T.Compose([
        T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
