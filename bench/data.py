"""Data-loading benchmark; prints numbers.

Does the loader keep up with training?  Measures, in one run on this machine:

1. images/s of the training DataLoader (the real reader on a generated VTAB-1k-format task,
   the paper's VTAB transform) for several worker counts, with and without the decoded-image cache;
2. images/s of the supernet's training step (forward + backward + AdamW, largest subnet, a
   random subnet per step as in supernet training) on in-memory batches of the same shape;
3. the ratio loader / training step for each loader setting (> 1: training is not starved).

Usage: ``python bench/data.py [--model vit_noah_tiny_patch4_32] [--img-size 32] [--images 800]
[--gen-size PX] [--workers 0 2] [--steps 20] [--batch 64] [--root DIR --dataset NAME]``
(``--img-size 224 --model vit_base_patch16_224`` for the paper's setting; slow on CPU).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path


def loader_rate(root: str, dataset: str, img_size: int, workers: int, cache: bool, batch: int,
                epochs: int = 2) -> float:
    """Images/s of the train loader, timed over the epochs after the first (workers warm)."""
    from noah_ray.config import DataConfig
    from noah_ray.data import build_loader

    cfg = DataConfig(root=root, dataset=dataset, num_workers=workers, batch_size=batch, cache_decoded=cache)
    t0 = time.perf_counter()
    loader = build_loader(cfg, cfg.train_split, train=True, img_size=img_size)
    build_s = time.perf_counter() - t0
    for _ in loader:  # warm-up epoch: starts the workers
        pass
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for x, _ in loader:
            n += x.shape[0]
    rate = n / (time.perf_counter() - t0)
    print(f"  loader workers={workers} cache={'on ' if cache else 'off'} build {build_s:6.2f} s   "
          f"{rate:9.1f} images/s")
    return rate


def train_rate(model: str, img_size: int, batch: int, steps: int, num_classes: int = 4) -> float:
    import torch
    import torch.nn.functional as F

    from noah_ray.nn.supernet import PromptedViT
    from noah_ray.space import SearchSpace

    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    space = SearchSpace()
    net = PromptedViT.supernet(model, num_classes, space, img_size=img_size).to(dev)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=5e-4)
    x = torch.randn(batch, 3, img_size, img_size, device=dev)
    y = torch.randint(0, num_classes, (batch,), device=dev)
    rng = random.Random(0)
    net.train()

    def step() -> None:
        net.set_active(space.sample(rng))
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    rate = steps * batch / (time.perf_counter() - t0)
    print(f"  training step ({model}, {img_size}px, batch {batch}, {dev.type}): {rate:9.1f} images/s")
    return rate


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_noah_tiny_patch4_32")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--images", type=int, default=800, help="generated training images")
    p.add_argument("--gen-size", type=int, help="side of the generated images (default: --img-size); "
                                                "larger ones make decoding cost like real photos")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--root", help="existing data root (default: a generated task in a temporary folder)")
    p.add_argument("--dataset", default="gen_shape")
    args = p.parse_args()

    from noah_ray.data import write_generated_vtab
    from noah_ray.nn.backbones import register_tiny_models

    register_tiny_models()  # the tiny test ViT
    print(f"torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or tmp
        if not args.root:
            t0 = time.perf_counter()
            gen = args.gen_size or args.img_size
            write_generated_vtab(Path(tmp), args.dataset, num_train=args.images, num_val=8, num_test=8, img_size=gen)
            print(f"generated {args.images} {gen}px images of {args.dataset} in {time.perf_counter() - t0:.1f} s")
        train = train_rate(args.model, args.img_size, args.batch, args.steps)
        rows = []
        for w in args.workers:
            for cache in (False, True):
                rows.append((w, cache, loader_rate(root, args.dataset, args.img_size, w, cache, args.batch)))
    print("\nloader images/s / training images/s (> 1: the loader keeps up)")
    for w, cache, rate in rows:
        print(f"  workers={w} cache={'on ' if cache else 'off'}  ratio {rate / train:7.2f}")


if __name__ == "__main__":
    main()
