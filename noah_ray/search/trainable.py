"""The evaluation trainable of the subnet search: :class:`CandidateEvaluator`, a class trainable
(actors are reused) that loads the supernet and the validation batches once per actor, then scores
one candidate per trial with inherited weights (:func:`noah_ray.nn.models.evaluate`).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable

from ray import tune

from noah_ray.config import JobConfig
from noah_ray.errors import ConfigError
from noah_ray.search.searcher import METRIC
from noah_ray.space import SubnetConfig


def default_val_batches(job: JobConfig, model) -> Iterable:
    """The validation loader of ``job.data`` with the model's normalisation and input size."""
    from noah_ray import data

    mean, std, img_size = data.norm_for(model)
    return data.build_loader(job.data, job.data.val_split, train=False, mean=mean, std=std,
                             img_size=job.data.img_size or img_size, endpoint=job.storage_endpoint)


def default_loader(job: JobConfig):
    """The job's trained supernet (:func:`noah_ray.nn.models.load_supernet`)."""
    from noah_ray.nn.models import load_supernet

    return load_supernet(job)


class CandidateEvaluator(tune.Trainable):
    """Scores one candidate subnet per trial with the supernet's inherited weights.

    The supernet and the validation batches are loaded once per actor (``reuse_actors=True``
    sends later candidates to ``reset_config``).  ``loader(job) -> PromptedViT`` and
    ``val_data(job, model) -> iterable of (images, labels)`` default to the job's trained
    supernet and validation split.
    """

    def setup(self, config: dict, job: dict, loader: Callable | None = None,  # type: ignore[override]
              val_data: Callable | None = None) -> None:                    # (tune.with_parameters passes job, ...)
        self.error = None
        try:
            self._setup(job, loader, val_data)
        except ConfigError as e:               # deterministic: every retry would fail the same way
            self.error = str(e)
        self.reset_config(config)

    def _setup(self, job: dict, loader: Callable | None, val_data: Callable | None) -> None:
        import torch

        from noah_ray.nn.malloc import keep_freed_memory

        t0 = time.perf_counter()
        self.job = JobConfig.from_dict(job)
        s = self.job.search
        torch.set_num_threads(max(1, int(round(s.cpus_per_trial))))
        use_gpu = s.gpus_per_trial > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_gpu else "cpu")
        if not use_gpu:
            keep_freed_memory()   # candidates of other widths change tensor sizes from batch to batch
        model = (loader or default_loader)(self.job)
        model.set_precision(self.job.model.precision)
        model.set_fused_attn(self.job.model.fused_attn)
        self.model = model.to(self.device).eval()
        batches = (val_data or default_val_batches)(self.job, self.model)
        if s.cache_val:
            n = s.eval_batches
            batches = [(x.to(self.device), y) for i, (x, y) in enumerate(batches) if n is None or i < n]
        self.batches = batches
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.setup_time_s = time.perf_counter() - t0
        self._first = True

    def reset_config(self, new_config: dict) -> bool:
        self.hold_s = new_config.get("hold_s")
        self.subnet = None if self.hold_s is not None else SubnetConfig.from_dict(new_config["subnet"])
        return True

    def step(self) -> dict:
        if self.hold_s is not None:                     # placeholder: keeps this actor alive
            time.sleep(self.hold_s)
            return {METRIC: float("nan"), "hold": True, "done": True}
        if self.error is not None:
            return {METRIC: float("nan"), "error": self.error, "fatal": True, "done": True}
        from noah_ray.nn.models import evaluate

        assert self.subnet is not None                  # not a placeholder (hold_s is None)
        t0 = time.perf_counter()
        self.model.set_active(self.subnet)
        acc, n = evaluate(self.model, self.batches, self.device, self.job.search.eval_batches)
        counts = self.subnet.param_count(self.model.shape, self.model.kv_shared)
        out = {METRIC: acc, "val_images": n, "params": counts.modules, "params_head": counts.head,
               "config_key": self.subnet.key(), "eval_time_s": time.perf_counter() - t0,
               "worker": self.worker, "setup_time_s": self.setup_time_s if self._first else 0.0,
               "done": True}
        self._first = False
        return out

