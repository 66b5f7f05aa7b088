"""Training the head on cached features (noah_ray.nn.features): when it applies, and that it
trains what training on the images trains."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from noah_ray.config import JobConfig
from noah_ray.data import build_dataset, build_loader
from noah_ray.data.generated import write_generated_vtab
from noah_ray.data.loader import ImageListDataset
from noah_ray.data.transforms import build_transform
from noah_ray.nn.epoch import make_optimizer, train_epoch
from noah_ray.nn.features import HeadOnly, frozen_below_head, pre_logit_dataset
from noah_ray.nn.models import build_model, evaluate, subnet_for
from noah_ray.space.methods import trains_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    write_generated_vtab(root, "gen_shape", num_train=48, num_val=16, num_test=16)
    return root


def _job(tiny_job, data_root, **model) -> JobConfig:
    job = tiny_job(data_root, "/tmp/unused", data={"dataset": "gen_shape", "batch_size": 8, "eval_batch_size": 12},
                   retrain={"epochs": 3, "warmup_epochs": 1}, model=model or None)
    return JobConfig.from_dict(job)


def _model(job: JobConfig, method: str, num_classes: int = 4):
    torch.manual_seed(0)
    return build_model(job, subnet_for(method, job, None), None, num_classes,
                       train_backbone=trains_backbone(method), method=method)


def test_only_a_head_on_a_deterministic_network_counts_as_frozen_below_the_head(tiny_job, data_root):
    job = _job(tiny_job, data_root, name="vit_noah_tiny_patch4_32", drop_path_rate=0.0)
    assert frozen_below_head(_model(job, "linear"))
    assert not frozen_below_head(_model(job, "lora"))          # modules train (and are active)
    assert not frozen_below_head(_model(job, "full"))          # the backbone trains
    dropped = _job(tiny_job, data_root, name="vit_noah_tiny_patch4_32", drop_path_rate=0.1)
    assert not frozen_below_head(_model(dropped, "linear"))    # drop-path draws random numbers


def test_only_an_augmenting_transform_is_random():
    norm = {"img_size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    assert not build_transform("vtab", train=True, **norm).random
    assert not build_transform("fewshot", train=False, **norm).random
    assert build_transform("fewshot", train=True, **norm).random
    assert build_transform("dg", train=True, **norm).random
    assert ImageListDataset([("x.png", 0)], 1, lambda img: img).transform.random   # unknown: assume random


def test_the_head_trains_on_cached_features_as_on_the_images(tiny_job, data_root):
    """Same seeds, same loaders: the head's weights, each epoch's loss and the val accuracy match
    to float rounding, and computing the features drew no random number."""
    job = _job(tiny_job, data_root, name="vit_noah_tiny_patch4_32", drop_path_rate=0.0)
    train_ds = build_dataset(job.data, "train800val200", train=True, img_size=32)
    val_ds = build_dataset(job.data, "val200", train=False, img_size=32)
    device = torch.device("cpu")
    results = []
    for cached in (False, True):
        model = _model(job, "linear")
        net, tr, va = model, train_ds, val_ds
        if cached:
            rng = torch.random.get_rng_state()
            tr, va = (pre_logit_dataset(model, d, 12, device) for d in (train_ds, val_ds))
            assert torch.equal(torch.random.get_rng_state(), rng)
            assert len(tr) == len(train_ds) and tr.tensors[0].shape[1] == model.vit.num_features
            net = HeadOnly(model)
        torch.manual_seed(7)
        loader = DataLoader(tr, batch_size=8, shuffle=True, drop_last=True)
        opt, sched, scaler = make_optimizer(model, job.retrain, 0.01, len(loader), device, "fp32")
        losses = [train_epoch(net, loader, opt, sched, scaler, device) for _ in range(job.retrain.epochs)]
        acc = evaluate(net, build_loader(job.data, "val200", train=False, dataset=va))[0]
        results.append((model.vit.head.weight.detach().clone(), torch.stack(losses), acc))
    (w0, l0, a0), (w1, l1, a1) = results
    assert not torch.equal(w0, _model(job, "linear").vit.head.weight)       # the head did train
    torch.testing.assert_close(w1, w0, rtol=0, atol=1e-5)
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-5)
    assert a1 == a0


def test_the_split_forward_is_the_forward(tiny_job, data_root):
    """``head_logits(pre_logits(x))`` is ``forward(x)``: timm's ``forward_head`` split at the head."""
    job = _job(tiny_job, data_root, name="vit_noah_tiny_patch4_32", drop_path_rate=0.0)
    model = _model(job, "linear").eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.head_logits(model.pre_logits(x)), model(x), rtol=0, atol=0)
