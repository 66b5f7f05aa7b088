"""Real images that Debian packages ship, as pretraining sources: photographs and glyphs.

Nothing is downloaded at run time.  Two kinds of source, each installed with ``apt-get``
(:data:`APT_COMMAND`):

* **photographs** -- the raster desktop wallpapers under :data:`PHOTO_DIRS` (``mate-backgrounds``,
  ``gnome-backgrounds``, ``plasma-workspace-wallpapers``, ``ukui-wallpapers``, ``lomiri-wallpapers*``,
  ``desktop-base``).  Vector art (``.svg``) is skipped, and so are near-duplicates (the same
  wallpaper at several resolutions) and flat images (gradients, stripes: too little texture,
  :data:`MIN_DETAIL`).  Each kept image is decoded once, resized to cover ``(CACHE_H, CACHE_W)``
  and centre-cropped, into one uint8 ``.npy`` in a cache folder (:func:`photo_cache`).
* **glyphs** -- letters and digits rendered with PIL from the TrueType fonts under
  :data:`FONT_DIRS` (``fonts-dejavu-core``, ``fonts-liberation``, ``fonts-noto-core``); a font
  that lacks a character (it renders as the font's missing-glyph box) is skipped.

:mod:`noah_ray.data.minivtab` cuts its tasks from scikit-learn's digits and scikit-image's
``skimage.data``; neither is read here, and no labelled classification benchmark is.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from noah_ray.errors import ConfigError

APT_COMMAND = ("apt-get install -y --no-install-recommends mate-backgrounds gnome-backgrounds "
               "plasma-workspace-wallpapers ukui-wallpapers lomiri-wallpapers lomiri-wallpapers-16.04 "
               "lomiri-wallpapers-20.04 desktop-base fonts-dejavu-core fonts-liberation fonts-noto-core")
PHOTO_DIRS = ("/usr/share/backgrounds", "/usr/share/wallpapers", "/usr/share/desktop-base")
FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype/liberation",
             "/usr/share/fonts/truetype/noto")
#: sub-folders holding flat artwork or logos, not photographs or textures
SKIP_PARTS = ("sway", "plymouth", "debian-logos", "screenshot", "grub")
RASTER = (".jpg", ".jpeg", ".png", ".webp")
CACHE_H, CACHE_W = 128, 192
MIN_DETAIL = 4.0          # mean |Laplacian| (0..255 grey levels) at cache size; flatter images are dropped
DUP_DISTANCE = 6.0        # mean |difference| of 16x16 grey thumbnails below which two images are one
GLYPHS = string.ascii_letters + string.digits
GLYPH_PX = 40


def _candidates(dirs: tuple[str, ...]) -> list[Path]:
    files = [f for d in dirs if Path(d).is_dir() for f in sorted(Path(d).rglob("*"))
             if f.suffix.lower() in RASTER and f.is_file() and not any(s in str(f).lower() for s in SKIP_PARTS)]
    return sorted(set(files))


def _decode(path: Path) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (CACHE_W * 2, CACHE_H * 2))      # JPEG: decode at a reduced size
            img = im.convert("RGB")
    except (OSError, ValueError):
        return None
    w, h = img.size
    if min(w, h) < CACHE_H:
        return None
    scale = max(CACHE_H / h, CACHE_W / w)
    nw, nh = max(CACHE_W, round(w * scale)), max(CACHE_H, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - CACHE_W) // 2, (nh - CACHE_H) // 2
    return np.asarray(img.crop((left, top, left + CACHE_W, top + CACHE_H)), dtype=np.uint8)


def detail(img: np.ndarray) -> float:
    """Mean absolute 4-neighbour Laplacian of the grey image (texture; ~0 for gradients)."""
    g = img.astype(np.float32).mean(-1)
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    return float(np.abs(lap).mean())


def _thumb(img: np.ndarray) -> np.ndarray:
    g = img.astype(np.float32).mean(-1)
    return g.reshape(16, CACHE_H // 16, 16, CACHE_W // 16).mean((1, 3))


@dataclass(frozen=True)
class PhotoSet:
    """The decoded photographs ``images`` (N, CACHE_H, CACHE_W, 3) uint8 and their file ``names``."""

    images: np.ndarray
    names: list[str]


def _select(files: list[Path]) -> PhotoSet:
    kept: list[np.ndarray] = []
    names: list[str] = []
    thumbs: list[np.ndarray] = []
    for f in sorted(files, key=lambda p: -p.stat().st_size):          # the largest version of a duplicate wins
        img = _decode(f)
        if img is None or detail(img) < MIN_DETAIL:
            continue
        t = _thumb(img)
        if any(float(np.abs(t - o).mean()) < DUP_DISTANCE for o in thumbs):
            continue
        kept.append(img)
        names.append(str(f))
        thumbs.append(t)
    order = np.argsort(names)
    return PhotoSet(np.stack([kept[i] for i in order]) if kept else np.zeros((0, CACHE_H, CACHE_W, 3), np.uint8),
                    [names[i] for i in order])


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "noah_ray" / "shipped"


def photo_cache(cache_dir: Path | None = None, dirs: tuple[str, ...] = PHOTO_DIRS) -> PhotoSet:
    """The installed photographs, decoded once into ``<cache_dir>/photos-<key>.npy`` (the key
    hashes the file list, sizes and the selection constants, so a changed install re-decodes)."""
    files = _candidates(dirs)
    if not files:
        raise ConfigError(f"no shipped wallpaper images under {', '.join(dirs)}; install them: {APT_COMMAND}")
    stamp = [f"{f}:{f.stat().st_size}" for f in files] + [str((CACHE_H, CACHE_W, MIN_DETAIL, DUP_DISTANCE))]
    key = hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:16]
    root = cache_dir or default_cache_dir()
    npy, meta = root / f"photos-{key}.npy", root / f"photos-{key}.json"
    if npy.is_file() and meta.is_file():
        return PhotoSet(np.load(npy), json.loads(meta.read_text()))
    photos = _select(files)
    if not len(photos.names):
        raise ConfigError(f"no usable photograph under {', '.join(dirs)}; install them: {APT_COMMAND}")
    root.mkdir(parents=True, exist_ok=True)
    np.save(npy, photos.images)
    meta.write_text(json.dumps(photos.names, indent=0))
    return photos


def font_files(dirs: tuple[str, ...] = FONT_DIRS) -> list[Path]:
    files = sorted(f for d in dirs if Path(d).is_dir() for f in Path(d).rglob("*.ttf"))
    if not files:
        raise ConfigError(f"no TrueType fonts under {', '.join(dirs)}; install them: {APT_COMMAND}")
    return files


def _render(font, ch: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.new("L", (GLYPH_PX, GLYPH_PX), 0)
    ImageDraw.Draw(img).text((GLYPH_PX // 2, GLYPH_PX // 2), ch, fill=255, font=font, anchor="mm")
    return np.asarray(img, dtype=np.uint8)


def render_glyphs(fonts: list[Path], chars: str = GLYPHS) -> tuple[np.ndarray, list[str]]:
    """Grey masks (K, GLYPH_PX, GLYPH_PX) uint8 of every (font, character) the font really has,
    and their ``font:char`` names.  A character rendering like the font's missing-glyph box (or
    blank) is skipped; a font having fewer than half of ``chars`` is skipped whole."""
    from PIL import ImageFont

    masks: list[np.ndarray] = []
    names: list[str] = []
    for f in fonts:
        try:
            font = ImageFont.truetype(str(f), size=int(GLYPH_PX * 0.7))
        except OSError:
            continue
        missing = _render(font, "\ue000")
        got = [(c, m) for c in chars for m in [_render(font, c)]
               if m.max() > 0 and not np.array_equal(m, missing)]
        if len(got) * 2 < len(chars):
            continue
        masks += [m for _, m in got]
        names += [f"{f.stem}:{c}" for c, _ in got]
    return np.stack(masks), names


# ------------------------------------------------------------------ augmented batches (torch)
def _crop_resize(src: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, hw: torch.Tensor, hh: torch.Tensor,
                 angle: torch.Tensor, size: int) -> torch.Tensor:
    """``size`` x ``size`` bilinear crops of ``src`` (B, C, H, W): centre ``(cx, cy)`` and half
    sizes ``(hw, hh)`` in grid_sample's [-1, 1] coordinates (negative ``hw`` mirrors), rotated
    by ``angle`` radians; outside the image reads zeros."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([hw * cos, -hh * sin, cx], -1),
                         torch.stack([hw * sin, hh * cos, cy], -1)], 1)
    grid = F.affine_grid(theta, [len(src), src.shape[1], size, size], align_corners=False)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def colour_jitter(x: torch.Tensor, g: torch.Generator, strength: float = 0.4, p_grey: float = 0.2) -> torch.Tensor:
    """Random brightness, contrast and saturation factors in ``1 +- strength`` and a ``p_grey``
    chance of grey, per image of ``x`` (B, 3, H, W) in [0, 1]; returns [0, 1]."""
    b = len(x)

    def factor() -> torch.Tensor:
        return (1 + strength * (2 * torch.rand(b, 1, 1, 1, generator=g) - 1))

    x = x * factor()
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * factor() + mean
    grey = x.mean(1, keepdim=True)
    sat = factor() * (torch.rand(b, 1, 1, 1, generator=g) >= p_grey)
    return (grey + (x - grey) * sat).clamp_(0, 1)


class PhotoStream:
    """Region discrimination on the photographs: image ``i`` is cut into a ``rows`` x ``cols``
    grid and region ``(i, r)`` is one class; a sample is a random square-ish crop (side 16..80
    cache pixels, aspect 3/4..4/3, centred anywhere in its region, mirrored half the time) resized
    to ``size``, colour-jittered, in [-1, 1]."""

    def __init__(self, photos: PhotoSet, seed: int, size: int = 32, rows: int = 3, cols: int = 4) -> None:
        self.src = torch.from_numpy(photos.images).permute(0, 3, 1, 2).contiguous()
        self.rows, self.cols, self.size = rows, cols, size
        self.num_classes = len(photos.names) * rows * cols
        self.g = torch.Generator().manual_seed(seed)

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g, r = self.g, self.rows * self.cols
        y = torch.randint(0, self.num_classes, (n,), generator=g)
        ry, rx = (y % r) // self.cols, (y % r) % self.cols
        side = 16 + 64 * torch.rand(n, generator=g)
        aspect = torch.exp((torch.rand(n, generator=g) - 0.5) * 0.575)     # 3/4 .. 4/3
        hh, hw = side / CACHE_H / aspect.sqrt(), side / CACHE_W * aspect.sqrt()
        cy = -1 + (2 * (ry + torch.rand(n, generator=g))) / self.rows
        cx = -1 + (2 * (rx + torch.rand(n, generator=g))) / self.cols
        cy, cx = cy.clamp(-1 + hh, 1 - hh), cx.clamp(-1 + hw, 1 - hw)
        flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        src = self.src[y // r].float().div_(255)
        x = _crop_resize(src, cx, cy, hw * flip, hh, torch.zeros(n), self.size)
        return colour_jitter(x, g).mul_(2).sub_(1), y


class GlyphStream:
    """Character identity: class ``c`` is one of the characters; a sample is its glyph in a
    random font that has it, zoomed (0.6..1.2), rotated (+-15 degrees), shifted and drawn in a
    random colour on a random background colour with pixel noise, in [-1, 1]."""

    def __init__(self, masks: np.ndarray, names: list[str], seed: int, size: int = 32) -> None:
        chars = sorted({nm.rsplit(":", 1)[1] for nm in names})
        self.char_of = torch.tensor([chars.index(nm.rsplit(":", 1)[1]) for nm in names])
        self.masks = torch.from_numpy(masks)[:, None]
        self.by_char = [torch.nonzero(self.char_of == c).flatten() for c in range(len(chars))]
        self.num_classes, self.size = len(chars), size
        self.g = torch.Generator().manual_seed(seed)

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.g
        y = torch.randint(0, self.num_classes, (n,), generator=g)
        pick = torch.stack([self.by_char[int(c)][torch.randint(0, len(self.by_char[int(c)]), (1,), generator=g)]
                            for c in y]).flatten()
        zoom = 1 / (0.6 + 0.6 * torch.rand(n, generator=g))
        shift = (torch.rand(2, n, generator=g) - 0.5) * 0.4
        angle = (torch.rand(n, generator=g) - 0.5) * (np.pi / 6)
        m = _crop_resize(self.masks[pick].float().div_(255), shift[0], shift[1], zoom, zoom, angle, self.size)
        fg, bg = torch.rand(n, 3, 1, 1, generator=g), torch.rand(n, 3, 1, 1, generator=g)
        low = (fg.mean(1, keepdim=True) - bg.mean(1, keepdim=True)).abs() < 0.3
        bg = torch.where(low, 1 - fg, bg)
        x = bg + (fg - bg) * m + 0.05 * torch.randn(n, 3, self.size, self.size, generator=g)
        return x.clamp_(0, 1).mul_(2).sub_(1), y
