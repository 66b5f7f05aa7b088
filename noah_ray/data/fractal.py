"""Formula-driven source images: IFS fractal categories in the manner of FractalDB.

FractalDB (Kataoka et al., ACCV 2020; Nakashima et al., AAAI 2022 for ViTs) pretrains on images
of iterated function systems: a *category* is an IFS of ``N`` affine maps ``x -> A_i x + t_i``
(``N`` in 2..8, the six parameters of each map drawn from U[-1, 1], map ``i`` chosen with
probability proportional to ``|det A_i|``), kept only when its attractor fills enough of the
image ("filling rate").  *Instances* of a category perturb one parameter by a factor in
[0.8, 1.2] and are drawn with the chaos game.

Differences from FractalDB, for 32x32 images on CPUs: every map must be a contraction (largest
singular value below ``MAX_SIGMA``; rejected maps are redrawn), so every orbit stays bounded;
the attractor is rendered as a point-density image with a random colour on a random dark
background, randomly flipped, zoomed and shifted.  Nothing here resembles the target tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_SIGMA = 0.95
MIN_FILL = 0.12           # filling rate (share of lit pixels) a category's canonical render needs
_BURN_IN = 20


@dataclass(frozen=True)
class IFS:
    """One category: ``maps`` (N, 2, 3) holding ``[A | t]`` per map, ``probs`` (N,)."""

    maps: np.ndarray
    probs: np.ndarray


def _random_map(rng: np.random.Generator) -> np.ndarray:
    while True:
        m = rng.uniform(-1.0, 1.0, size=(2, 3))
        if np.linalg.svd(m[:, :2], compute_uv=False)[0] < MAX_SIGMA and abs(np.linalg.det(m[:, :2])) > 1e-3:
            return m


def _probs(maps: np.ndarray) -> np.ndarray:
    det = np.abs(np.linalg.det(maps[:, :, :2]))
    return det / det.sum()


def sample_category(rng: np.random.Generator, size: int = 32, max_tries: int = 500) -> IFS:
    """A random IFS whose canonical rendering fills at least ``MIN_FILL`` of the image."""
    for _ in range(max_tries):
        n = int(rng.integers(2, 9))
        maps = np.stack([_random_map(rng) for _ in range(n)])
        ifs = IFS(maps, _probs(maps))
        pts = orbit(ifs.maps[None], ifs.probs[None], 1500, rng)[0]
        if fill_rate(pts, size) >= MIN_FILL:
            return ifs
    raise RuntimeError("no IFS category met the filling rate; lower MIN_FILL")


def orbit(maps: np.ndarray, probs: np.ndarray, n_points: int, rng: np.random.Generator) -> np.ndarray:
    """Chaos-game points ``(B, n_points, 2)`` for ``B`` IFSs at once (``maps`` (B, K, 2, 3),
    ``probs`` (B, K), zero-padded to a common K)."""
    b: int = maps.shape[0]
    cum = np.cumsum(probs, axis=1)
    cum[:, -1] = 1.0
    x = np.zeros((b, 2))
    out = np.empty((b, n_points, 2))
    rows = np.arange(b)
    for it in range(n_points + _BURN_IN):
        k = (rng.random(b)[:, None] > cum).sum(axis=1)
        m = maps[rows, k]                                  # (B, 2, 3)
        x = np.einsum("bij,bj->bi", m[:, :, :2], x) + m[:, :, 2]
        if it >= _BURN_IN:
            out[:, it - _BURN_IN] = x
    return out


def _to_pixels(pts: np.ndarray, size: int, zoom: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Integer pixel coordinates ``(B, P, 2)``: each orbit's bounding box fit into the image,
    scaled by ``zoom`` (B,) and moved by ``shift`` (B, 2) (in units of the image size)."""
    lo, hi = pts.min(axis=1, keepdims=True), pts.max(axis=1, keepdims=True)
    span = np.maximum((hi - lo).max(axis=2, keepdims=True), 1e-9)
    unit = (pts - (lo + hi) / 2) / span                    # centred, longest side 1
    pix = (unit * zoom[:, None, None] + 0.5 + shift[:, None, :]) * size
    return np.clip(pix.astype(np.int64), 0, size - 1)


def fill_rate(pts: np.ndarray, size: int = 32) -> float:
    """Share of pixels lit by one orbit ``(P, 2)`` fit into a ``size`` square."""
    pix = _to_pixels(pts[None], size, np.array([0.9]), np.zeros((1, 2)))[0]
    return len(np.unique(pix[:, 0] * size + pix[:, 1])) / size ** 2


def perturb(ifs: IFS, rng: np.random.Generator) -> np.ndarray:
    """FractalDB's instance variation: one parameter of one map scaled by a factor in [0.8, 1.2]
    (kept only while that map stays a contraction)."""
    maps = ifs.maps.copy()
    i, r, c = rng.integers(len(maps)), rng.integers(2), rng.integers(3)
    maps[i, r, c] *= rng.uniform(0.8, 1.2)
    if np.linalg.svd(maps[i, :, :2], compute_uv=False)[0] >= 1.0:
        maps[i] = ifs.maps[i]
    return maps


def render_instances(categories: list[IFS], labels: np.ndarray, rng: np.random.Generator, *,
                     size: int = 32, n_points: int = 1200) -> np.ndarray:
    """uint8 images ``(len(labels), size, size, 3)``: one perturbed, randomly placed and coloured
    instance of ``categories[label]`` each."""
    b, kmax = len(labels), max(len(c.maps) for c in categories)
    maps, probs = np.zeros((b, kmax, 2, 3)), np.zeros((b, kmax))
    for j, y in enumerate(labels):
        m = perturb(categories[y], rng)
        maps[j, : len(m)], probs[j, : len(m)] = m, _probs(m)
    pts = orbit(maps, probs, n_points, rng)
    flip = rng.random((b, 2)) < 0.5
    pts = np.where(flip[:, None, :], -pts, pts)
    zoom = rng.uniform(0.6, 1.0, size=b)
    shift = rng.uniform(-0.5, 0.5, size=(b, 2)) * (1.0 - zoom)[:, None]
    pix = _to_pixels(pts, size, zoom, shift)
    flat = (np.arange(b)[:, None] * size * size + pix[..., 0] * size + pix[..., 1]).ravel()
    density = np.bincount(flat, minlength=b * size * size).reshape(b, size, size).astype(np.float32)
    alpha = np.clip(density * rng.uniform(0.3, 0.8, size=(b, 1, 1)), 0.0, 1.0)[..., None]
    fg = rng.uniform(90, 255, size=(b, 1, 1, 3))
    bg = rng.uniform(0, 70, size=(b, 1, 1, 3))
    img = bg * (1 - alpha) + fg * alpha
    return np.clip(img, 0, 255).astype(np.uint8)
