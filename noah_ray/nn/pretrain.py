"""Formula-driven supervised pretraining of the tiny ViT on IFS fractal categories (FractalDB-style).

    python -m noah_ray.nn.pretrain                        # writes noah_ray/weights/<model>.fractal.safetensors
    python -m noah_ray.nn.pretrain --steps 50 --out /tmp/w.safetensors   # a short try

Seeded end to end: the categories, every rendered instance and the initial weights follow from
``--seed``; every training step sees freshly rendered instances (:mod:`noah_ray.data.fractal`),
so the source set is never repeated.  The backbone (without the classifier head) is written as
safetensors with the recipe in its metadata; ``vit_noah_tiny_patch4_32.fractal`` loads it
(:mod:`noah_ray.nn.backbones`).  These weights have never seen a natural image: they are not
ImageNet weights and stand in for them only in tests, the demo and the mini-VTAB benchmark.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
import torch.nn.functional as F

from noah_ray.data import fractal, shipped
from noah_ray.errors import ConfigError
from noah_ray.nn import optim

DEFAULT_MODEL = "vit_noah_tiny_patch4_32"


@dataclass(frozen=True)
class PretrainConfig:
    model: str = DEFAULT_MODEL
    num_classes: int = 128          # IFS categories (FractalDB-1k has 1000; >= 100 here)
    steps: int = 1200
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    label_smoothing: float = 0.1
    chunk: int = 4096               # images rendered at once (fresh ones every chunk)
    n_points: int = 1200            # chaos-game points per image
    eval_images: int = 2048         # held-out instances scored at the end (source accuracy)
    seed: int = 0
    threads: int = 1
    #: what the classes are, ``name:share`` parts of :data:`SOURCES` (``fractals`` alone is the
    #: original FractalDB-style recipe; e.g. ``photos:0.6,glyphs:0.2,fractals:0.2`` mixes them)
    source: str = "fractals"
    tag: str = "fractal"            # pretrained tag of the written file (<model>.<tag>.safetensors)
    photo_grid: int = 3             # photos: regions per image are photo_grid x (photo_grid + 1)
    cache_dir: str = ""             # photos: decoded-image cache (default ~/.cache/noah_ray/shipped)


def default_out(model: str = DEFAULT_MODEL, tag: str = "fractal") -> Path:
    return Path(__file__).parents[1] / "weights" / f"{model}.{tag}.safetensors"


class FractalStream:
    """Batches of fresh fractal instances: ``(images float (B,3,H,W) in [-1, 1], labels)``."""

    def __init__(self, categories: list[fractal.IFS], cfg: PretrainConfig, seed: int, size: int) -> None:
        self.categories, self.cfg, self.size = categories, cfg, size
        self.rng = np.random.default_rng(seed)
        self.x: torch.Tensor | None
        self.y: torch.Tensor | None
        self.x, self.y, self.pos = None, None, 0
        self.num_classes = len(categories)

    def _refill(self, n: int) -> None:
        labels = self.rng.integers(0, len(self.categories), size=n)
        imgs = fractal.render_instances(self.categories, labels, self.rng, size=self.size,
                                        n_points=self.cfg.n_points)
        self.x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        self.y = torch.from_numpy(labels).long()
        self.pos = 0

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.x is None or self.pos + n > len(cast(torch.Tensor, self.y)):   # y is set with x
            self._refill(max(self.cfg.chunk, n))
        assert self.x is not None and self.y is not None                     # refilled
        sl = slice(self.pos, self.pos + n)
        self.pos += n
        return self.x[sl], self.y[sl]


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(x[i:i + 256]).argmax(-1) for i in range(0, len(x), 256)])
    model.train()
    return 100.0 * float((pred == y).float().mean())


class Stream(Protocol):
    num_classes: int

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class MixStream:
    """Batches drawn from several streams at fixed shares, their labels offset into one class space."""

    def __init__(self, parts: list[tuple[Stream, float]]) -> None:
        self.parts = parts
        self.offsets = np.cumsum([0] + [s.num_classes for s, _ in parts])[:-1].tolist()
        self.num_classes = sum(s.num_classes for s, _ in parts)

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        counts = [round(n * share) for _, share in self.parts[:-1]]
        counts.append(n - sum(counts))
        xs, ys = zip(*[(x, y + off) for (s, _), off, k in zip(self.parts, self.offsets, counts) if k > 0
                       for x, y in [s.take(k)]])
        return torch.cat(xs), torch.cat(ys)


def _fractals(cfg: PretrainConfig, rng: np.random.Generator, size: int) -> Callable[[int], Stream]:
    categories = [fractal.sample_category(rng) for _ in range(cfg.num_classes)]

    def make(seed: int) -> Stream:
        return FractalStream(categories, cfg, seed, size)
    return make


def _photos(cfg: PretrainConfig, rng: np.random.Generator, size: int) -> Callable[[int], Stream]:
    photos = shipped.photo_cache(Path(cfg.cache_dir) if cfg.cache_dir else None)
    return lambda seed: shipped.PhotoStream(photos, seed, size, cfg.photo_grid, cfg.photo_grid + 1)


def _glyphs(cfg: PretrainConfig, rng: np.random.Generator, size: int) -> Callable[[int], Stream]:
    masks, names = shipped.render_glyphs(shipped.font_files())
    return lambda seed: shipped.GlyphStream(masks, names, seed, size)


#: pretraining sources: name -> (config, rng, image size) -> (seed -> stream of labelled batches)
SOURCES: dict[str, Callable[[PretrainConfig, np.random.Generator, int], Callable[[int], Stream]]] = {
    "fractals": _fractals, "photos": _photos, "glyphs": _glyphs}


def parse_source(spec: str) -> list[tuple[str, float]]:
    """``"photos:0.6,glyphs:0.4"`` -> ``[("photos", 0.6), ("glyphs", 0.4)]`` (a bare name has share 1)."""
    parts = []
    for item in spec.split(","):
        name, _, share = item.strip().partition(":")
        if name not in SOURCES:
            raise ConfigError(f"unknown pretraining source {name!r} in --source {spec!r}; use {', '.join(SOURCES)}")
        try:
            parts.append((name, float(share or 1.0)))
        except ValueError:
            raise ConfigError(f"bad share {share!r} in --source {spec!r}; write name:share, e.g. photos:0.6") from None
    total = sum(w for _, w in parts)
    if total <= 0 or any(w < 0 for _, w in parts):
        raise ConfigError(f"--source {spec!r}: shares must be >= 0 with a positive sum")
    return [(n, w / total) for n, w in parts]


def build_streams(cfg: PretrainConfig, rng: np.random.Generator, size: int) -> tuple[Stream, Stream]:
    """The held-out stream (seed + 1) and the training stream (seed + 2) of ``cfg.source``."""
    parts = parse_source(cfg.source)
    makers = [(SOURCES[name](cfg, rng, size), share) for name, share in parts]
    if len(makers) == 1:
        return makers[0][0](cfg.seed + 1), makers[0][0](cfg.seed + 2)
    return (MixStream([(m(cfg.seed + 1 + 10 * i), w) for i, (m, w) in enumerate(makers)]),
            MixStream([(m(cfg.seed + 2 + 10 * i), w) for i, (m, w) in enumerate(makers)]))


def _train(model: torch.nn.Module, stream: Stream, cfg: PretrainConfig, t0: float, log) -> None:
    opt = optim.adamw(model, cfg.lr, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, optim.warmup_cosine(cfg.steps, cfg.warmup_steps, 0.01))
    model.train()
    running = 0.0
    for step in range(cfg.steps):
        x, y = stream.take(cfg.batch_size)
        loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            el = time.time() - t0
            log(f"step {step + 1}/{cfg.steps} loss {running:.3f} lr {sched.get_last_lr()[0]:.2e} "
                f"{(step + 1) * cfg.batch_size / el:.0f} img/s elapsed {el / 60:.1f} min "
                f"eta {el / (step + 1) * (cfg.steps - step - 1) / 60:.1f} min")


def describe(cfg: PretrainConfig) -> str:
    if cfg.source == "fractals":
        return "IFS fractal categories (FractalDB-style), noah_ray.data.fractal"
    return f"{cfg.source} (noah_ray.data.shipped photographs/glyphs, noah_ray.data.fractal)"


def pretrain(cfg: PretrainConfig, out: Path, log=print) -> dict:
    """Train and write the backbone; returns the recipe and the measured numbers."""
    import timm

    from noah_ray.nn.backbones import register_tiny_models

    register_tiny_models()

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.time()
    size: int = cast(Any, timm.create_model(cfg.model, pretrained=False, num_classes=0).patch_embed).img_size[0]
    held_stream, stream = build_streams(cfg, rng, size)
    torch.manual_seed(cfg.seed)
    model = timm.create_model(cfg.model, pretrained=False, num_classes=held_stream.num_classes)
    log(f"source {cfg.source}: {held_stream.num_classes} classes; {sum(p.numel() for p in model.parameters())} "
        f"parameters; setup {time.time() - t0:.1f} s")
    held_out = held_stream.take(cfg.eval_images)
    _train(model, stream, cfg, t0, log)
    acc = _accuracy(model, *held_out)
    report = {"recipe": asdict(cfg), "source": describe(cfg), "classes": held_stream.num_classes,
              "held_out_top1": round(acc, 2), "wall_time_s": round(time.time() - t0, 1),
              "images_seen": cfg.steps * cfg.batch_size}
    save_backbone(model, out, report)
    log(f"held-out source accuracy {acc:.2f}% over {held_stream.num_classes} classes; wrote {out}")
    return report


def save_backbone(model: torch.nn.Module, out: Path, report: dict) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"noah_ray.pretrain": json.dumps(report, sort_keys=True)})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m noah_ray.nn.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = PretrainConfig()
    for k, v in asdict(defaults).items():
        p.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    p.add_argument("--out", type=Path, default=None, help="default: the packaged weights file")
    args = vars(p.parse_args(argv))
    out = args.pop("out") or default_out(args["model"], args["tag"])
    report = pretrain(PretrainConfig(**args), out, log=lambda s: print(s, flush=True))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
