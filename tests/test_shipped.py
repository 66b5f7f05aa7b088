"""Shipped pretraining sources (wallpaper photographs, font glyphs), the source mix of the
pretraining script, and the ``.shipped`` backbone tag loading from the packaged file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from noah_ray.data import shipped
from noah_ray.errors import ConfigError
from noah_ray.nn import pretrain
from noah_ray.nn.backbones import create_backbone

DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")


def test_detail_is_zero_on_a_gradient_and_4x255_on_a_checkerboard():
    ramp = np.broadcast_to(np.arange(64, dtype=np.uint8)[None, :, None], (32, 64, 3))
    assert shipped.detail(ramp) == pytest.approx(0.0)        # linear: the Laplacian vanishes
    yy, xx = np.mgrid[:32, :32]
    board = np.repeat((((yy + xx) % 2) * 255).astype(np.uint8)[..., None], 3, -1)
    assert shipped.detail(board) == pytest.approx(4 * 255)    # every pixel differs by 255 from its 4 neighbours


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_photo_cache_keeps_textured_images_once_and_is_reused(tmp_path):
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (300, 450, 3), dtype=np.uint8)
    _png(tmp_path / "share" / "a" / "tex.png", texture)
    _png(tmp_path / "share" / "b" / "tex_small.png",                     # the same image, smaller
         np.asarray(Image.fromarray(texture).resize((300, 200), Image.Resampling.LANCZOS)))
    flat = np.broadcast_to(np.linspace(0, 255, 450).astype(np.uint8)[None, :, None], (300, 450, 3)).copy()
    _png(tmp_path / "share" / "flat.png", flat)
    _png(tmp_path / "share" / "grub" / "logo.png", texture[::-1].copy())    # a skipped folder
    dirs = (str(tmp_path / "share"),)
    photos = shipped.photo_cache(tmp_path / "cache", dirs)
    assert photos.names == [str(tmp_path / "share" / "a" / "tex.png")]      # the larger duplicate wins
    assert photos.images.shape == (1, shipped.CACHE_H, shipped.CACHE_W, 3) and photos.images.dtype == np.uint8
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) == 2 and cached[0].endswith(".json") and cached[1].endswith(".npy")
    (tmp_path / "share" / "a" / "tex.png").touch()                          # same size: the cache is reused
    again = shipped.photo_cache(tmp_path / "cache", dirs)
    assert again.names == photos.names and np.array_equal(again.images, photos.images)


def test_no_installed_images_is_one_config_error_naming_the_apt_command(tmp_path):
    with pytest.raises(ConfigError, match="apt-get install .*mate-backgrounds"):
        shipped.photo_cache(tmp_path / "cache", (str(tmp_path / "nothing"),))
    with pytest.raises(ConfigError, match="apt-get install .*fonts-dejavu-core"):
        shipped.font_files((str(tmp_path / "nothing"),))


@pytest.mark.skipif(not DEJAVU.is_file(), reason="fonts-dejavu-core not installed")
def test_glyphs_skip_characters_the_font_lacks_and_the_stream_labels_characters():
    masks, names = shipped.render_glyphs([DEJAVU], "AB\u6f22")          # DejaVu has no CJK ideograph
    assert names == ["DejaVuSans:A", "DejaVuSans:B"] and masks.shape == (2, shipped.GLYPH_PX, shipped.GLYPH_PX)
    stream = shipped.GlyphStream(masks, names, seed=0)
    x, y = stream.take(64)
    assert stream.num_classes == 2 and set(y.tolist()) == {0, 1}
    assert x.shape == (64, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    x2, y2 = shipped.GlyphStream(masks, names, seed=0).take(64)
    assert torch.equal(x, x2) and torch.equal(y, y2)                        # seeded


def test_photo_stream_classes_are_image_regions_and_seeded():
    rng = np.random.default_rng(1)
    photos = shipped.PhotoSet(rng.integers(0, 256, (2, shipped.CACHE_H, shipped.CACHE_W, 3), dtype=np.uint8),
                              ["a", "b"])
    stream = shipped.PhotoStream(photos, seed=3, size=32, rows=3, cols=4)
    x, y = stream.take(200)
    assert stream.num_classes == 2 * 3 * 4 and int(y.min()) >= 0 and int(y.max()) < 24
    assert x.shape == (200, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    x2, _ = shipped.PhotoStream(photos, seed=3, size=32, rows=3, cols=4).take(200)
    assert torch.equal(x, x2)


class _Const:
    def __init__(self, k: int, value: float) -> None:
        self.num_classes, self.value = k, value

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full((n, 1), self.value), torch.arange(n) % self.num_classes


def test_mix_offsets_labels_and_splits_the_batch_by_share():
    mix = pretrain.MixStream([(_Const(3, 0.0), 0.75), (_Const(5, 1.0), 0.25)])
    x, y = mix.take(8)
    assert mix.num_classes == 8
    assert x.flatten().tolist() == [0.0] * 6 + [1.0] * 2                     # 8 * 0.75 = 6 from the first
    assert y.tolist() == [0, 1, 2, 0, 1, 2, 3, 4]                             # second's labels start at 3


def test_parse_source_normalises_shares_and_rejects_unknown_names():
    assert pretrain.parse_source("photos:3,glyphs:1") == [("photos", 0.75), ("glyphs", 0.25)]
    assert pretrain.parse_source("fractals") == [("fractals", 1.0)]
    with pytest.raises(ConfigError, match="unknown pretraining source 'imagenet'"):
        pretrain.parse_source("imagenet:1")
    with pytest.raises(ConfigError, match="bad share"):
        pretrain.parse_source("photos:x")


def test_shipped_tag_loads_the_packaged_file():
    from safetensors import safe_open

    model = create_backbone("vit_noah_tiny_patch4_32.shipped", 3)
    path = model.pretrained_cfg["file"]
    assert model.pretrained_cfg["tag"] == "shipped" and Path(path).parent.name == "weights"
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["noah_ray.pretrain"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    assert "photos" in meta["recipe"]["source"] and not any(k.startswith("head.") for k in state)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items())
    assert create_backbone("vit_noah_tiny_patch4_32.fractal", 3).pretrained_cfg["tag"] == "fractal"   # still there
