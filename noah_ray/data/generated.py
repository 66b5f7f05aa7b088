"""Procedurally generated image tasks in the VTAB-1k folder format (for tests and the demo).

Deterministic by seed; written as real PNG files plus ``train800.txt``, ``val200.txt``,
``train800val200.txt`` and ``test.txt``, so the demo and the tests go through the same readers
as real data.  In the spirit of dSprites / Clevr:

- ``gen_shape``: which shape is drawn (circle, square, triangle, cross), 4 classes
- ``gen_count``: how many objects (1-4), 4 classes
- ``gen_texture``: stripe orientation inside the objects (0, 45, 90, 135 degrees), 4 classes
- ``gen_color``: the object's colour (red, green, blue, yellow), 4 classes
- ``gen_position``: which quadrant holds the (random) object, 4 classes (like dSprites location);
  it needs a backbone whose position embeddings mean something (a pretrained one): with the
  randomly initialised tiny test ViT it stayed at chance after 6 epochs in our check
- ``gen_orientation``: orientation of a bar (0, 45, 90, 135 degrees, +-10), 4 classes (like
  dSprites orientation)
- ``gen_distance``: distance between the centres of two objects in 4 bins (0.2-0.35, 0.35-0.5,
  0.5-0.65, 0.65-0.8 of the image side), 4 classes (like Clevr distance)

Shapes, colours, sizes, backgrounds and positions are random wherever they are not the label.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from noah_ray.data.vtab_folder import SPLITS, write_vtab_folder
from noah_ray.errors import ConfigError

TASKS = ("gen_shape", "gen_count", "gen_texture", "gen_color", "gen_position", "gen_orientation", "gen_distance")
NUM_CLASSES = 4
_COLOURS = [(230, 40, 40), (40, 200, 60), (50, 80, 240), (235, 220, 40)]


def _object(draw: ImageDraw.ImageDraw, kind: int, cx: float, cy: float, r: float, colour) -> None:
    if kind == 0:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == 1:
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == 2:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        w = max(1.0, r / 2.5)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)


def _stripes(size: int, angle: float, phase: float, period: float) -> np.ndarray:
    ii, jj = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    proj = math.cos(angle) * ii + math.sin(angle) * jj
    return (np.sin(2 * math.pi * proj / period + phase) > 0).astype(np.float32)


def render(task: str, label: int, rng: np.random.RandomState, size: int = 32) -> Image.Image:
    """One image of ``task`` with class ``label``."""
    bg = rng.randint(0, 60, size=3)
    noise = rng.randint(-12, 13, size=(size, size, 3))
    canvas = np.clip(bg + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    r = size * 0.16
    if task == "gen_count":
        n, cells = label + 1, rng.permutation(4)[: label + 1]
        kind = rng.randint(0, 4)
        colour: Any = _COLOURS[rng.randint(0, 4)]
        for c in cells[:n]:
            cx = (c % 2 + 0.5) * size / 2 + rng.uniform(-size * 0.06, size * 0.06)
            cy = (c // 2 + 0.5) * size / 2 + rng.uniform(-size * 0.06, size * 0.06)
            _object(draw, kind, cx, cy, r, colour)
        return img
    cx, cy = rng.uniform(size * 0.3, size * 0.7, size=2)
    big = size * rng.uniform(0.25, 0.36)
    if task == "gen_shape":
        _object(draw, label, cx, cy, big, _COLOURS[rng.randint(0, 4)])
    elif task == "gen_color":
        _object(draw, rng.randint(0, 4), cx, cy, big, _COLOURS[label])
    elif task == "gen_texture":
        mask = Image.new("L", (size, size), 0)
        _object(ImageDraw.Draw(mask), rng.randint(0, 4), cx, cy, big * 1.2, 255)
        stripes = _stripes(size, label * math.pi / 4, rng.uniform(0, 2 * math.pi), size / 6)
        colour = np.array(_COLOURS[rng.randint(0, 4)], dtype=np.float32)
        arr = np.asarray(img).astype(np.float32)
        m = (np.asarray(mask) > 0)[..., None] * stripes[..., None]
        img = Image.fromarray(np.clip(arr * (1 - m) + colour * m, 0, 255).astype(np.uint8))
    elif task == "gen_position":
        qx, qy = label % 2, label // 2
        small = size * rng.uniform(0.1, 0.16)
        cx = (qx + rng.uniform(0.3, 0.7)) * size / 2
        cy = (qy + rng.uniform(0.3, 0.7)) * size / 2
        _object(draw, rng.randint(0, 4), cx, cy, small, _COLOURS[rng.randint(0, 4)])
    elif task == "gen_orientation":
        angle = math.radians(label * 45 + rng.uniform(-10, 10))
        half_len, half_w = size * rng.uniform(0.3, 0.4), size * rng.uniform(0.05, 0.08)
        cx, cy = rng.uniform(size * 0.4, size * 0.6, size=2)
        ux, uy = math.cos(angle), -math.sin(angle)
        corners = [(cx + a * half_len * ux - b * half_w * uy, cy + a * half_len * uy + b * half_w * ux)
                   for a, b in ((1, 1), (1, -1), (-1, -1), (-1, 1))]
        draw.polygon(corners, fill=_COLOURS[rng.randint(0, 4)])
    elif task == "gen_distance":
        _two_objects(draw, label, rng, size)
    else:
        raise ConfigError(f"unknown generated task {task!r}; use one of {', '.join(TASKS)}")
    return img


def _two_objects(draw: ImageDraw.ImageDraw, label: int, rng: np.random.RandomState, size: int) -> None:
    """Two small objects whose centres lie ``(0.2 + 0.15 * (label + u)) * size`` apart, u ~ U[0, 1)."""
    r = size * rng.uniform(0.06, 0.09)
    dist = size * (0.2 + 0.15 * (label + rng.uniform()))
    angle = rng.uniform(0, 2 * math.pi)
    dx, dy = dist * math.cos(angle) / 2, dist * math.sin(angle) / 2
    lo_x, lo_y = r + abs(dx), r + abs(dy)
    mx, my = rng.uniform(lo_x, size - lo_x), rng.uniform(lo_y, size - lo_y)
    for sign in (-1, 1):
        _object(draw, rng.randint(0, 4), mx + sign * dx, my + sign * dy, r, _COLOURS[rng.randint(0, 4)])


def write_generated_vtab(root: str | Path, task: str = "gen_shape", *, num_train: int = 800,
                         num_val: int = 200, num_test: int = 400, img_size: int = 32,
                         seed: int = 0) -> Path:
    """Write ``task`` under ``<root>/<task>/`` in the VTAB-1k layout; returns that folder.

    Images are PNGs under ``images/<split>/``; ``train800.txt``, ``val200.txt``,
    ``train800val200.txt`` (their concatenation) and ``test.txt`` list ``path label`` lines.
    Classes are balanced within each split.  The folder is built beside the target and moved
    into place, so concurrent writers and crashes never leave a half-written task; a complete
    earlier write with the same arguments is reused, one with other arguments replaced.
    """
    if task not in TASKS:
        raise ConfigError(f"unknown generated task {task!r}; use one of {', '.join(TASKS)}")
    for k, v in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test), ("img_size", img_size)):
        if not isinstance(v, int) or v <= 0:
            raise ConfigError(f"generated data: {k} {v!r} must be a positive integer")
    if img_size < 16:
        raise ConfigError(f"generated data: img_size {img_size} is too small to draw shapes; use >= 16")
    stamp = f"{task} {num_train} {num_val} {num_test} {img_size} {seed}"
    sizes = {"train800": num_train, "val200": num_val, "test": num_test}

    def split_images(split: str):
        rng = np.random.RandomState(seed * 1000 + SPLITS.index(split))
        labels = np.arange(sizes[split]) % NUM_CLASSES
        rng.shuffle(labels)
        for y in labels.tolist():
            yield render(task, y, rng, img_size), y

    return write_vtab_folder(root, task, stamp, split_images)
