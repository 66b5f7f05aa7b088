"""The run records (noah_ray.store.records): spec.json and meta.json round trip, older files read
with the fallbacks of before, newer versions are refused in one line, and run fingerprints are the
hashes the code computed before the records existed."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from noah_ray.config import JobConfig
from noah_ray.errors import ConfigError
from noah_ray.space import SubnetConfig
from noah_ray.space.recipes import RECIPES
from noah_ray.store.records import VERSION_KEY, BestRecord, MetaRecord, SpecRecord
from noah_ray.train.runs import spec_for

TINY = "vit_noah_tiny_patch4_32"
SUBNET = SubnetConfig.uniform(12, lora=2)

# a retraining's spec.json as noah_ray wrote it before schema versions (keys and values by hand)
OLD_SPEC = """{
 "checkpoint": null, "data": {"batch_size": 64, "dataset": "shapes_count", "format": "vtab", "img_size": null,
  "seed": 0, "shots": null, "train_split": "train800"},
 "drop_path_rate": 0.1, "kv_shared": true, "lora_scale": 1.0, "lr": 0.05, "method": "lora", "min_lr": 1e-05,
 "model": "vit_noah_tiny_patch4_32", "num_classes": 5,
 "recipe": {"name": "noah", "adapter_act": "quick_gelu", "lora_dropout": 0.1, "prompt_dropout": 0.1,
  "adapter_dropout": 0.1, "drop_path": "before_adapter", "vpt_init": "xavier_tensor", "adapter_init": "xavier",
  "lora_init": "kaiming", "kv_init": "kaiming", "kv_shared": true, "prune_pieces": "strided",
  "prune_shared": true, "prune_modules": ["vpt"], "param_count": "noah"},
 "seed": 1, "space": null, "stage": "retrain", "subnet": {"lora": [2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]},
 "warmup_epochs": 10, "weight_decay": 0.0001, "hpo": {"lr": 0.05, "trial": "t1"}
}"""

# a supernet's spec.json from before recipes and sampling rules
OLDEST_SUPERNET_SPEC = """{
 "checkpoint": null, "data": {"batch_size": 8, "dataset": "gen_color", "train_split": "train"},
 "drop_path_rate": 0.0, "kv_shared": false, "lora_scale": 1.0, "lr": 0.003, "method": "noah", "min_lr": 0.0,
 "model": "vit_noah_tiny_patch4_32", "num_classes": 4, "seed": 0, "stage": "supernet",
 "space": {"num_layers": 12, "modules": {"lora": {"depths": [3, 6], "widths": [1, 2]}}}, "subnet": null,
 "warmup_epochs": 0, "weight_decay": 0.0
}"""

# a retraining's final/meta.json from before backbone_trained, recipes and the subnet mapping
OLD_META = """{
 "stage": "retrain", "run_id": "full-seed0", "epochs_done": 3, "epochs": 3, "num_classes": 5,
 "model": "vit_noah_tiny_patch4_32", "backbone": "/b/backbone.safetensors", "seed": 0, "method": "full",
 "subnet": "{\\"lora\\": [2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]}", "train_time_s": 12.5, "fingerprint": "0123456789",
 "val_acc": {"model": 50.0}, "params": 100, "params_head": 10, "test_acc": 40.0, "best_val": 55.0,
 "best_epoch": 1, "best_uri": "/r/best"
}"""


def _old_hash(spec: dict) -> str:
    """The fingerprint formula of before the records: sha1 of the sorted-key JSON, 10 hex digits."""
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


def _job(**retrain) -> JobConfig:
    return JobConfig.from_dict({"name": "j", "storage": "/tmp/records-unused", "model": {"name": TINY},
                                "retrain": retrain})


# ------------------------------------------------------------------ spec.json
def test_spec_round_trips_and_records_its_version():
    spec = dataclasses.replace(spec_for(_job(), "retrain", "lora", SUBNET, 0.05, 1, 5), hpo={"lr": 0.05})
    data = json.loads(json.dumps(spec.to_dict()))
    assert data[VERSION_KEY] == 1
    assert SpecRecord.from_dict(data) == spec
    assert {k: v for k, v in data.items() if k != VERSION_KEY} == spec.content()
    assert "sampling" not in data and "init" not in data and "prune_plan" not in data  # only when set


def test_fingerprints_are_those_of_before():
    # the values the code printed before the records existed, for the same jobs (and the formula)
    job = _job(init="/tmp/art")
    tuned = dataclasses.replace(spec_for(job, "retrain", "lora", SUBNET, 0.05, 1, 5),
                                hpo={"lr": 0.05, "trial": "t1"})
    init = spec_for(job, "retrain", "noah", SUBNET, 0.05, 1, 5)
    supernet = spec_for(job, "supernet", "noah", None, 0.05, 1, 5)
    assert (tuned.fingerprint(), init.fingerprint(), supernet.fingerprint()) == \
        ("ea79325620", "9516e8c2e6", "c56f73b43f")
    assert init.content()["init"] == "/tmp/art" and supernet.content()["sampling"] == "uniform"
    for spec in (tuned, init, supernet):
        written = {k: v for k, v in spec.to_dict().items() if k != VERSION_KEY}
        assert spec.fingerprint() == _old_hash(written)
    # a file written before versions: its fingerprint is the hash of exactly its content
    old = json.loads(OLD_SPEC)
    assert SpecRecord.from_dict(old).fingerprint() == _old_hash(old) == tuned.fingerprint()


def test_an_old_spec_reads_with_the_fallbacks_of_before():
    old = SpecRecord.from_dict(json.loads(OLDEST_SUPERNET_SPEC))
    assert old.recipe == RECIPES["modern"].to_dict()      # before recipes existed
    assert old.sampling == "uniform"                       # before sampling rules
    assert old.data == {"batch_size": 8, "dataset": "gen_color", "train_split": "train"}  # kept as recorded
    retrain = SpecRecord.from_dict(json.loads(OLD_SPEC))
    assert retrain.sampling is None and retrain.hpo == {"lr": 0.05, "trial": "t1"}


def test_a_spec_of_a_newer_version_or_without_a_key_is_refused_in_one_line():
    data = {**json.loads(OLD_SPEC), VERSION_KEY: 7}
    with pytest.raises(ConfigError, match="spec.json has schema_version 7, this noah_ray reads up to 1") as e:
        SpecRecord.from_dict(data)
    assert "\n" not in str(e.value)
    data = json.loads(OLD_SPEC)
    del data["lr"]
    with pytest.raises(ConfigError, match="spec.json has no 'lr'"):
        SpecRecord.from_dict(data)


# ------------------------------------------------------------------ meta.json
def _retrain_meta() -> MetaRecord:
    spec = spec_for(_job(), "retrain", "e2vpt", SUBNET, 0.05, 1, 5)
    plan = {"base": SUBNET.to_dict(), "num_segments": 1, "kept": {}, "segment_masks": {}}
    return MetaRecord(stage="retrain", run_id="e2vpt-pruned-seed1", epochs_done=3, num_classes=5, model=TINY,
                      backbone="/b/bb.safetensors", spec=spec.content(), seed=1, subnet=SUBNET, method="e2vpt",
                      backbone_trained=False, train_time_s=1.5, fingerprint=spec.fingerprint(),
                      start_epochs=[0, 2], val_acc={"model": 60.0}, params_head=10, recipe=RECIPES["e2vpt"],
                      params=90, hpo={"lr": 0.05}, prune_plan=plan, params_materialised=120, test_acc=50.0,
                      best_val=61.0, best_epoch=1, best_uri="/r/best")


def test_meta_round_trips_with_the_keys_written_before():
    meta = _retrain_meta()
    data = json.loads(json.dumps(meta.to_dict()))
    assert MetaRecord.from_dict(data) == meta
    # the keys the worker wrote before the records, plus the version
    assert set(data) == {"stage", "run_id", "epochs_done", "epochs", "num_classes", "model", "backbone", "spec",
                         "seed", "subnet", "method", "backbone_trained", "train_time_s", "fingerprint",
                         "start_epochs", "val_acc", "params_head", "recipe", "params", "hpo", "prune_plan",
                         "params_materialised", "test_acc", "best_val", "best_epoch", "best_uri", VERSION_KEY}
    assert data["epochs"] == data["epochs_done"] == 3 and data["subnet"] == SUBNET.to_dict()
    assert data["recipe"] == RECIPES["e2vpt"].to_dict() and data[VERSION_KEY] == 1
    supernet = MetaRecord(stage="supernet", run_id="supernet", epochs_done=2, num_classes=5,
                          space={"num_layers": 12, "modules": {}}, val_acc={"largest": 40.0})
    written = supernet.to_dict()
    assert "test_acc" not in written and "hpo" not in written and "prune_plan" not in written
    assert written["subnet"] is None and written["space"] == {"num_layers": 12, "modules": {}}
    assert MetaRecord.from_dict(json.loads(json.dumps(written))) == supernet


def test_an_old_meta_reads_with_the_fallbacks_of_before():
    old = MetaRecord.from_dict(json.loads(OLD_META))
    assert old.subnet == SUBNET                            # JSON text, before the encodings were unified
    assert old.backbone_trained is True and old.trains_backbone("x")  # from its method
    assert old.recipe == RECIPES["modern"]                 # before recipes were recorded
    assert (old.best_epoch, old.test_acc, old.epochs_done) == (1, 40.0, 3)
    # the oldest: no method either (the run name tells); the least a finished supernet records
    bare = MetaRecord.from_dict({"epochs_done": 1, "num_classes": 4, "val_acc": {"largest": 50.0}})
    assert bare.backbone_trained is None and bare.trains_backbone("full-seed1") and not bare.trains_backbone("a")
    assert MetaRecord.from_dict({}).epochs_done == 0 and MetaRecord.from_dict({}).val_acc == {}
    assert MetaRecord.from_dict({"recipe": "e2vpt"}).recipe == RECIPES["e2vpt"]   # a recipe name


def test_a_meta_of_a_newer_version_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="meta.json has schema_version 2, this noah_ray reads up to 1") as e:
        MetaRecord.from_dict({**json.loads(OLD_META), VERSION_KEY: 2})
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="schema_version 'x'"):
        BestRecord.from_dict({"epoch": 0, "val_acc": 1.0, VERSION_KEY: "x"})


def test_best_meta_round_trips_and_reads_older_files():
    best = BestRecord(4, 71.5, RECIPES["noah"])
    data = json.loads(json.dumps(best.to_dict()))
    assert set(data) == {"epoch", "val_acc", "recipe", VERSION_KEY}
    assert BestRecord.from_dict(data) == best
    assert BestRecord.from_dict({"epoch": 0, "val_acc": 1.0}) == BestRecord(0, 1.0, RECIPES["modern"])
    with pytest.raises(ConfigError, match="best/meta.json is malformed"):
        BestRecord.from_dict({"val_acc": 1.0})


# ------------------------------------------------------------------ what travels to the workers
def test_run_spec_travels_as_json_with_its_records():
    from noah_ray.nn.prune import PrunePlan
    from noah_ray.store.tracking import RunRef
    from noah_ray.train.worker import RunSpec

    job = _job()
    spec = spec_for(job, "retrain", "e2vpt", SUBNET, 0.05, 1, 5)
    plan = PrunePlan(SUBNET, {}, 1, {})
    run = RunSpec(job, "retrain", "e2vpt-pruned-seed1", "retrain/x/fp", method="e2vpt", seed=1, lr=0.05,
                  num_classes=5, backbone=None, spec=spec, metrics_part="x-fp", subnet=SUBNET.to_json(),
                  fingerprint=spec.fingerprint(), prune_plan=plan, tracking=RunRef("file:/m", "abc"))
    back = RunSpec.from_dict(json.loads(json.dumps(run.to_dict())))
    assert back == run
    assert "faults" not in run.to_dict() and "fault_dir" not in run.to_dict()   # test hooks travel beside it
    bare = dataclasses.replace(run, prune_plan=None, tracking=None)
    assert RunSpec.from_dict(json.loads(json.dumps(bare.to_dict()))) == bare


def test_fault_plans_travel_beside_the_run():
    from noah_ray.train.faults import FaultPlan

    assert FaultPlan.of(None) is None and FaultPlan.of([]) is None
    plan = FaultPlan.of([(0, "kill"), (1, "raise")])
    assert plan.faults == ((0, "kill"), (1, "raise"))
    assert FaultPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    plan.maybe_fail(0, rank=1)                             # other ranks never fail
    with pytest.raises(RuntimeError, match="injected failure after epoch 1"):
        plan.maybe_fail(1, rank=0)
    plan.maybe_fail(1, rank=0)                             # once only
    with pytest.raises(ConfigError, match="fault mode 'explode'"):
        FaultPlan.of([(0, "explode")])
