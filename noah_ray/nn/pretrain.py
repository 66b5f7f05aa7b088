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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from noah_ray.data import fractal
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


def default_out(model: str = DEFAULT_MODEL) -> Path:
    return Path(__file__).parents[1] / "weights" / f"{model}.fractal.safetensors"


class FractalStream:
    """Batches of fresh fractal instances: ``(images float (B,3,H,W) in [-1, 1], labels)``."""

    def __init__(self, categories: list[fractal.IFS], cfg: PretrainConfig, seed: int, size: int) -> None:
        self.categories, self.cfg, self.size = categories, cfg, size
        self.rng = np.random.default_rng(seed)
        self.x: torch.Tensor | None
        self.y: torch.Tensor | None
        self.x, self.y, self.pos = None, None, 0

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


def pretrain(cfg: PretrainConfig, out: Path, log=print) -> dict:
    """Train and write the backbone; returns the recipe and the measured numbers."""
    import timm

    from noah_ray.nn.backbones import register_tiny_models

    register_tiny_models()

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.time()
    categories = [fractal.sample_category(rng) for _ in range(cfg.num_classes)]
    model = timm.create_model(cfg.model, pretrained=False, num_classes=cfg.num_classes)
    size: int = cast(Any, model.patch_embed).img_size[0]
    held_out = FractalStream(categories, cfg, cfg.seed + 1, size).take(cfg.eval_images)
    stream = FractalStream(categories, cfg, cfg.seed + 2, size)
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
    acc = _accuracy(model, *held_out)
    report = {"recipe": asdict(cfg), "source": "IFS fractal categories (FractalDB-style), noah_ray.data.fractal",
              "held_out_top1": round(acc, 2), "wall_time_s": round(time.time() - t0, 1),
              "images_seen": cfg.steps * cfg.batch_size}
    save_backbone(model, out, report)
    log(f"held-out source accuracy {acc:.2f}% over {cfg.num_classes} categories; wrote {out}")
    return report


def save_backbone(model: torch.nn.Module, out: Path, report: dict) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"noah_ray.pretrain": json.dumps(report, sort_keys=True)})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m noah_ray.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = PretrainConfig()
    for k, v in asdict(defaults).items():
        p.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    p.add_argument("--out", type=Path, default=None, help="default: the packaged weights file")
    args = vars(p.parse_args(argv))
    out = args.pop("out") or default_out(args["model"])
    report = pretrain(PretrainConfig(**args), out, log=lambda s: print(s, flush=True))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
