"""Transforms as in the paper and its code.

- VTAB-1k (and folder / generated data): resize straight to the input size (bicubic), no
  augmentation, for training and evaluation alike.
- Few-shot and domain generalisation, training: random resized crop, flip, RandAugment
  ``rand-m9-mstd0.5`` and colour jitter 0.4 (bicubic; no random erasing).  NOTE: timm silently
  drops the colour jitter when RandAugment is on, which the original code inherited; here it is
  applied as the paper states.
- Few-shot and domain generalisation, evaluation: resize to a ``size * 256 / 224`` square and
  centre crop (as the original code).

Normalisation comes from the backbone (:func:`noah_ray.data.norm_for`; 0.5/0.5 for ImageNet-21k
ViTs).  Every transform is split into a deterministic ``pre`` part (PIL -> PIL, cacheable) and
the rest, so the decoded-image cache can keep resized images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image
from torchvision import transforms as T

RAND_AUGMENT = "rand-m9-mstd0.5"
COLOR_JITTER = 0.4
EVAL_CROP_PCT = 224 / 256


@dataclass
class ImageTransform:
    """``post(pre(img))``; ``pre`` is deterministic (None: identity) so its output may be cached.
    ``random``: ``post`` draws random numbers (augmentation), so an image's tensor differs between
    epochs; False: the whole transform is a function of the image, so what a frozen network
    computes from it may be cached too (:mod:`noah_ray.nn.features`)."""

    pre: Callable[[Image.Image], Image.Image] | None
    post: Callable[[Image.Image], Any]
    random: bool = False

    def __call__(self, img: Image.Image) -> Any:
        return self.post(self.pre(img) if self.pre is not None else img)


def build_transform(fmt: str, *, train: bool, img_size: int, mean: Sequence[float],
                    std: Sequence[float]) -> ImageTransform:
    """The paper's transform for data format ``fmt`` (``vtab``, ``fewshot``, ``dg``, ``folder``)."""
    normalize = T.Compose([T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])
    bicubic = T.InterpolationMode.BICUBIC
    if fmt in ("fewshot", "dg"):
        if train:
            from timm.data.transforms_factory import transforms_imagenet_train

            return ImageTransform(None, transforms_imagenet_train(
                img_size, color_jitter=COLOR_JITTER, force_color_jitter=True, auto_augment=RAND_AUGMENT,
                interpolation="bicubic", re_prob=0.0, mean=tuple(mean), std=tuple(std)), random=True)
        resize = int(round(img_size / EVAL_CROP_PCT))
        return ImageTransform(T.Compose([T.Resize((resize, resize), interpolation=bicubic), T.CenterCrop(img_size)]),
                              normalize)
    return ImageTransform(T.Resize((img_size, img_size), interpolation=bicubic), normalize)
