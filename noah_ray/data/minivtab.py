"""mini-VTAB: nine 32x32 target tasks in VTAB's three groups, written in the VTAB-1k layout.

Natural (real images nobody in this project made; they ship inside the scikit-learn and
scikit-image wheels, nothing is fetched):

- ``mv_digits``: the UCI handwritten digits (``sklearn.datasets.load_digits``, 1,797 8x8
  images), 10 classes; train800 / val200 / every other image (797) as test (stratified, seeded):
  the one task whose source caps its test split below 2,000
- ``mv_photos``: which of 5 photographs (astronaut, cat, coffee cup, rocket, cameraman) a
  random crop comes from
- ``mv_textures``: which of 5 textures (brick, grass, gravel, moon surface, printed page)

Specialized (real scientific images from scikit-image):

- ``mv_ihc_stain``: immunohistochemistry crops by their DAB stain content (colour deconvolution,
  ``skimage.color.rgb2hed``), 3 classes = tertiles of the training crops (cf. PatchCamelyon)
- ``mv_scientific``: which scientific image a crop comes from (IHC slide, cell microscopy,
  retina fundus, Hubble deep field), 4 classes

Structured (the generator, :mod:`noah_ray.data.generated`): ``mv_count`` (1-4 objects),
``mv_position`` (quadrant), ``mv_orientation`` (bar angle), ``mv_distance`` (two objects'
distance), 4 classes each.

Crops for train800 / val200 come from the left 65 % of every source image, test crops from the
right 35 %, so no test crop overlaps a training one.  Test crops are random (position, size 15-35 %
of the short side, flip, rotation), so the test region yields as many as asked; test crops of the
same image may overlap each other (correlated, so the effective test size is below the count).
In the which-image tasks (photos, textures, scientific) every crop is turned grey with a random
mean and contrast: otherwise its average colour alone names the image, and a linear probe of a
random backbone reads that off.  Everything is deterministic by seed.

Versions (:data:`VERSION`): v1 had 500 test images per task; v2 (this) has :data:`NUM_TEST` = 2,000
(digits: 797), so the test standard error of one task's accuracy is about 1 point instead of 2.2.
train800 / val200 are the same images in both.  :func:`job_config` puts the tasks under
``<data_root>/minivtab-v<VERSION>/`` (:func:`versioned_root`), so a folder written by another
version is never reused.
Install the data packages with ``pip install 'noah_ray[bench]'``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from noah_ray.data import generated
from noah_ray.data.vtab_folder import write_vtab_folder
from noah_ray.errors import ConfigError

#: the task set's version: folders are written under ``minivtab-v<VERSION>`` (:func:`versioned_root`)
VERSION = 2
SIZE = 32
NUM_TEST = 2000             # per task whose source allows it (mv_digits: the 797 images outside train/val)
TRAIN_SHARE = 0.65          # of each source image's width: train / val crops left of it, test right


@dataclass(frozen=True)
class Task:
    name: str
    group: str               # Natural | Specialized | Structured
    num_classes: int
    split_images: Callable[[str, int], Iterator[tuple[Image.Image, int]]]   # (split, seed) -> images


def _sizes(split: str) -> int:
    return {"train800": 800, "val200": 200, "test": NUM_TEST}[split]


def _split_seed(split: str, seed: int) -> int:
    return seed * 1000 + ("train800", "val200", "test").index(split)


# ------------------------------------------------------------------ real data
def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"the mini-VTAB real-data tasks need {module.split('.')[0]}; "
                          f"pip install 'noah_ray[bench]'") from None


@functools.lru_cache(maxsize=1)
def _load_digits():
    return _need("sklearn.datasets").load_digits()


def _digits(split: str, seed: int) -> Iterator[tuple[Image.Image, int]]:
    d = _load_digits()
    rng = np.random.RandomState(seed)
    ranks = np.empty(len(d.target), dtype=np.int64)   # classes interleaved: every split stratified
    for c in range(10):
        members = rng.permutation(np.flatnonzero(d.target == c))
        ranks[members] = np.arange(len(members)) * 10 + c
    order = np.argsort(ranks, kind="stable")
    parts = {"train800": order[:800], "val200": order[800:1000], "test": order[1000:]}
    for i in parts[split]:
        grey = (d.images[i] * (255.0 / 16.0)).astype(np.uint8)
        yield Image.fromarray(grey).resize((SIZE, SIZE), Image.BICUBIC).convert("RGB"), int(d.target[i])  # type: ignore[attr-defined]


def _rgb(img: np.ndarray) -> np.ndarray:
    return np.stack([img] * 3, axis=-1) if img.ndim == 2 else img[..., :3]


@functools.lru_cache(maxsize=4)
def _sources(names: tuple[str, ...]) -> list[np.ndarray]:
    data = _need("skimage.data")
    return [_rgb(getattr(data, n)()) for n in names]


def _crop(img: np.ndarray, split: str, rng: np.random.RandomState, rotate: bool) -> np.ndarray:
    """A random square crop (15-35 % of the short side) from the split's region of ``img``."""
    h, w = img.shape[:2]
    cut = int(w * TRAIN_SHARE)
    lo, hi = (0, cut) if split != "test" else (cut, w)
    side = int(min(h, w) * rng.uniform(0.15, 0.35))
    side = max(8, min(side, hi - lo, h))
    x, y = rng.randint(lo, hi - side + 1), rng.randint(0, h - side + 1)
    patch = img[y:y + side, x:x + side]
    if rng.rand() < 0.5:
        patch = patch[:, ::-1]
    if rotate:
        patch = np.rot90(patch, rng.randint(4))
    return np.ascontiguousarray(patch)


def _resized(patch: np.ndarray) -> Image.Image:
    return Image.fromarray(patch).resize((SIZE, SIZE), Image.BICUBIC)  # type: ignore[attr-defined]


def _grey_normalised(patch: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """The crop in grey with its mean and contrast replaced by random ones, so that no global
    colour or brightness statistic tells which image it came from (structure and texture do)."""
    g = patch.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    g = (g - g.mean()) / (g.std() + 1e-3) * rng.uniform(30, 60) + rng.uniform(100, 155)
    return _rgb(np.clip(g, 0, 255).astype(np.uint8))


def _which_source(names: tuple[str, ...], rotate: bool):
    def split_images(split: str, seed: int) -> Iterator[tuple[Image.Image, int]]:
        images = _sources(names)
        rng = np.random.RandomState(_split_seed(split, seed))
        labels = np.arange(_sizes(split)) % len(names)
        rng.shuffle(labels)
        for y in labels.tolist():
            yield _resized(_grey_normalised(_crop(images[y], split, rng, rotate), rng)), y
    return split_images


@functools.lru_cache(maxsize=1)
def _dab() -> np.ndarray:
    """The DAB (brown) stain channel of the IHC slide by colour deconvolution."""
    return _need("skimage.color").rgb2hed(_sources(("immunohistochemistry",))[0])[..., 2]


@functools.lru_cache(maxsize=4)
def _ihc_crops(split: str, seed: int, n: int) -> tuple[list[np.ndarray], np.ndarray]:
    img, dab = _sources(("immunohistochemistry",))[0], _dab()
    rng = np.random.RandomState(_split_seed(split, seed))
    patches, scores = [], []
    for _ in range(n):
        state = rng.get_state()
        patch = _crop(img, split, rng, rotate=True)
        rng.set_state(state)
        scores.append(float(_crop(dab, split, rng, rotate=True).mean()))
        patches.append(patch)
    return patches, np.asarray(scores)


def _ihc_stain(split: str, seed: int) -> Iterator[tuple[Image.Image, int]]:
    _, train_scores = _ihc_crops("train800", seed, 800)
    edges = np.quantile(train_scores, [1 / 3, 2 / 3])     # tertiles of the training crops
    patches, scores = _ihc_crops(split, seed, _sizes(split))
    for patch, s in zip(patches, scores):
        yield _resized(patch), int(np.searchsorted(edges, s))


# ------------------------------------------------------------------ generated (structured)
def _generator(task: str):
    def split_images(split: str, seed: int) -> Iterator[tuple[Image.Image, int]]:
        rng = np.random.RandomState(_split_seed(split, seed) + 7)
        labels = np.arange(_sizes(split)) % generated.NUM_CLASSES
        rng.shuffle(labels)
        for y in labels.tolist():
            yield generated.render(task, y, rng, SIZE), y
    return split_images


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("mv_digits", "Natural", 10, _digits),
    Task("mv_photos", "Natural", 5, _which_source(("astronaut", "chelsea", "coffee", "rocket", "camera"), False)),
    Task("mv_textures", "Natural", 5, _which_source(("brick", "grass", "gravel", "moon", "page"), True)),
    Task("mv_ihc_stain", "Specialized", 3, _ihc_stain),
    Task("mv_scientific", "Specialized", 4,
         _which_source(("immunohistochemistry", "cell", "retina", "hubble_deep_field"), True)),
    Task("mv_count", "Structured", 4, _generator("gen_count")),
    Task("mv_position", "Structured", 4, _generator("gen_position")),
    Task("mv_orientation", "Structured", 4, _generator("gen_orientation")),
    Task("mv_distance", "Structured", 4, _generator("gen_distance")),
)}


def job_config(task: str, storage: str | Path, data_root: str | Path, overrides: Mapping[str, Any] | None = None,
               *, name: str | None = None):
    """The mini-VTAB job of ``task`` (``noah_ray/configs/minivtab.yaml``) with results under
    ``storage`` and data under ``versioned_root(data_root)``; ``overrides`` maps sections to keys replaced."""
    from importlib import resources

    import yaml

    from noah_ray.config import JobConfig

    if task not in TASKS:
        raise ConfigError(f"unknown mini-VTAB task {task!r}; use one of {', '.join(TASKS)}")
    data = yaml.safe_load(resources.files("noah_ray").joinpath("configs/minivtab.yaml").read_text())
    data.update(name=name or task, storage=str(storage))
    data["data"].update(root=str(versioned_root(data_root)), dataset=task)
    for section, values in (overrides or {}).items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, Mapping) else values
    return JobConfig.from_dict(data, where=f"mini-VTAB job {task}")


def versioned_root(data_root: str | Path) -> Path:
    """Where this version's tasks live below ``data_root``: ``<data_root>/minivtab-v<VERSION>``."""
    return Path(data_root).expanduser() / f"minivtab-v{VERSION}"


def write_task(root: str | Path, name: str, seed: int = 0) -> Path:
    """Write mini-VTAB task ``name`` under ``<root>/<name>/`` (VTAB-1k layout); returns the folder.
    A complete earlier write of this version with the same seed is reused, any other rewritten
    (pass ``versioned_root(data_root)`` as ``root`` to keep versions apart, as :func:`job_config` does)."""
    task = TASKS.get(name)
    if task is None:
        raise ConfigError(f"unknown mini-VTAB task {name!r}; use one of {', '.join(TASKS)}")
    stamp = f"minivtab-v{VERSION} {name} {SIZE} {NUM_TEST} {seed}"
    return write_vtab_folder(root, name, stamp, lambda split: task.split_images(split, seed))
