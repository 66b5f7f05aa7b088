"""Supernet training throughput through Ray Train; prints numbers.

1. CPU: images/s of ``train_supernet`` on the tiny ViT (``vit_noah_tiny_patch4_32``, generated
   32x32 images, the paper's VTAB search space) with 1 and 2 workers, and their ratio.  Each
   worker gets ``--cpus-per-worker`` CPUs; with 2 workers the global batch is split in two.
2. GPU (``--gpu``, when CUDA is there): ViT-B/16 supernet images/s in bf16 (and fp32 for
   comparison) with 1 worker, generated 224x224 images.

Images/s is measured by the training loop (training steps only, eval and checkpoints
excluded), read back from the ``train_metrics`` table; the first epoch (warm-up) is dropped and
the median of the rest reported.

Usage: ``python bench/train_scaling.py [--epochs 4] [--images 1024] [--batch 64] [--gpu]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def make_job(data_root: Path, store: str, name: str, *, model: str, workers: int, epochs: int, batch: int,
             cpus: float, gpu: bool = False, precision: str = "fp32", loader_workers: int = 0):
    from noah_ray.config import JobConfig

    return JobConfig.from_dict({
        "name": name, "storage": store,
        "data": {"root": str(data_root), "dataset": "gen_shape", "batch_size": batch, "eval_batch_size": 128,
                 "num_workers": loader_workers, "cache_decoded": True},
        "model": {"name": model, "drop_path_rate": 0.1, "precision": precision},
        "supernet": {"epochs": epochs, "lr": 5e-4, "warmup_epochs": 1, "num_workers": workers, "use_gpu": gpu,
                     "cpus_per_worker": cpus, "eval_random_subnets": 0, "max_failures": 0,
                     "eval_every": epochs, "checkpoint_every": epochs},
    })


def images_per_s(job) -> tuple[float, float]:
    """(median images/s over epochs after the first, wall seconds of the whole run)."""
    from noah_ray.run.preflight import resolve
    from noah_ray.store import storage
    from noah_ray.train.runs import train_supernet

    t0 = time.time()
    train_supernet(resolve(job, ("supernet",)))
    wall = time.time() - t0
    root = storage.resolve(job.storage).join(job.name, "supernet")
    m = storage.read_table(root, "train_metrics").to_pandas().drop_duplicates("epoch").sort_values("epoch")
    rates = list(m["images_per_s"])[1:] or list(m["images_per_s"])
    return statistics.median(rates), wall


def cpu_scaling(args, tmp: Path) -> None:
    from noah_ray.data import write_generated_vtab

    write_generated_vtab(tmp / "data", "gen_shape", num_train=args.images, num_val=64, num_test=64, img_size=32)
    print(f"tiny ViT supernet, {args.images} images/epoch, global batch {args.batch}, {args.epochs} epochs, "
          f"{args.cpus_per_worker} CPU(s) per worker, load average {os.getloadavg()[0]:.1f}")
    rates = {}
    for w in (1, 2):
        job = make_job(tmp / "data", str(tmp / "res"), f"cpu-w{w}", model="vit_noah_tiny_patch4_32", workers=w,
                       epochs=args.epochs, batch=args.batch, cpus=args.cpus_per_worker)
        rates[w], wall = images_per_s(job)
        print(f"  {w} worker(s): {rates[w]:8.1f} images/s  (run wall time {wall:.0f} s incl. Ray start-up)")
    print(f"  ratio 2 workers / 1 worker: {rates[2] / rates[1]:.2f}x")


def gpu_throughput(args, tmp: Path) -> None:
    import torch

    from noah_ray.data import write_generated_vtab

    if not torch.cuda.is_available():
        print("GPU: no CUDA device here; skipped")
        return
    write_generated_vtab(tmp / "data224", "gen_shape", num_train=args.gpu_images, num_val=64, num_test=64,
                         img_size=224)
    print(f"ViT-B/16 supernet on {torch.cuda.get_device_name(0)}, {args.gpu_images} images/epoch, "
          f"batch {args.gpu_batch}, {args.epochs} epochs")
    for precision in ("bf16", "fp32"):
        job = make_job(tmp / "data224", str(tmp / "res"), f"gpu-{precision}", model="vit_base_patch16_224",
                       workers=1, epochs=args.epochs, batch=args.gpu_batch, cpus=args.gpu_loader_workers + 1,
                       gpu=True, precision=precision, loader_workers=args.gpu_loader_workers)
        rate, wall = images_per_s(job)
        print(f"  {precision}: {rate:8.1f} images/s  (run wall time {wall:.0f} s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpu", action="store_true", help="also ViT-B/16 on a GPU (bf16 and fp32)")
    p.add_argument("--gpu-only", action="store_true")
    p.add_argument("--gpu-images", type=int, default=1024)
    p.add_argument("--gpu-batch", type=int, default=64)
    p.add_argument("--gpu-loader-workers", type=int, default=6)
    args = p.parse_args()

    import ray

    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="noah-bench-train-") as d:
        if not args.gpu_only:
            cpu_scaling(args, Path(d))
        if args.gpu or args.gpu_only:
            gpu_throughput(args, Path(d))
    ray.shutdown()


if __name__ == "__main__":
    main()
