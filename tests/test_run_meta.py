"""A retrain run's final/meta.json says how to rebuild it: the method, whether the backbone trained
(``backbone_trained``) and the subnet (SubnetConfig.to_dict()); older files (no such keys, the
subnet as a JSON string) are still rebuilt, judged by the run name as before."""

from __future__ import annotations

import pytest
import torch
import yaml

from noah_ray.nn.backbones import create_backbone
from noah_ray.nn.supernet import PromptedViT
from noah_ray.space import SubnetConfig
from noah_ray.store import storage

TINY = "vit_noah_tiny_patch4_32"
SUBNET = SubnetConfig.uniform(12, lora=2)


def _write_run(tmp_path, backbone_file, run: str, meta: dict, *, train_backbone: bool) -> str:
    torch.manual_seed(0)
    model = PromptedViT(create_backbone(TINY, 5, backbone_file), SUBNET, train_backbone=train_backbone)
    job = {"name": "j", "storage": str(tmp_path / "res"), "model": {"name": TINY, "checkpoint": backbone_file}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    base = storage.resolve(str(tmp_path / "res")).join("j", "retrain", run)
    state = model.trainable_state_dict()
    storage.save_state(base.join("best"), state, {"epoch": 0, "val_acc": 1.0})
    storage.save_state(base.join("final"), state, {"num_classes": 5, "model": TINY, "backbone": backbone_file,
                                                   "recipe": model.recipe.to_dict(), **meta})
    return str(tmp_path / "job.yaml")


@pytest.mark.parametrize("run,meta,trained", [
    ("full-seed0", {"method": "full", "backbone_trained": True, "subnet": SUBNET.to_dict()}, True),
    ("lora-seed0", {"method": "lora", "backbone_trained": False, "subnet": SUBNET.to_dict()}, False),
    ("full-seed1", {"subnet": SUBNET.to_json()}, True),          # a meta.json from before: the run name tells
    ("noah-seed0", {"subnet": SUBNET.to_json()}, False),
])
def test_model_from_run_reads_method_and_subnet_from_meta(tmp_path, backbone_file, one_thread, run, meta, trained):
    from noah_ray.interop import model_from_run

    path = _write_run(tmp_path, backbone_file, run, meta, train_backbone=trained)
    model, backbone, name, _ = model_from_run(path, run)
    assert model.train_backbone is trained and model.capacity == SUBNET
    assert backbone == backbone_file and name == TINY
    assert ("vit.patch_embed.proj.weight" in model.trainable_state_dict()) is trained
