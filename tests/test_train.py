"""Ray Train supernet training and retraining: schedule and state round trips, learning with two
workers, kill / crash and resume (exact continuation), S3 storage, fail-fast errors."""

import json
import random

import pytest
import torch
from safetensors.torch import load, save

from noah_ray.config import JobConfig
from noah_ray.data import write_generated_vtab
from noah_ray.errors import ConfigError
from noah_ray.nn import optim
from noah_ray.nn.models import BASELINE_WIDTHS, load_supernet, subnet_for
from noah_ray.nn.supernet import PromptedViT
from noah_ray.run.preflight import resolve
from noah_ray.space import SearchSpace, SubnetConfig
from noah_ray.store import storage
from noah_ray.train.runs import retrain, train_supernet
from noah_ray.train.worker import step_subnet, step_subnets

SPACE = {"num_layers": 12, "modules": {"vpt": {"depths": [3, 12], "widths": [1, 5]},
                                       "lora": {"depths": [3, 12], "widths": [1, 5]},
                                       "adapter": {"depths": [3, 12], "widths": [1, 5]}}}
TINY = "vit_noah_tiny_patch4_32"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_generated_vtab(root, "gen_color", num_train=64, num_val=32, num_test=32)
    return root


def make_job(tiny_job, data_root, storage_uri, name, *, epochs=3, workers=1, endpoint=None, **supernet):
    return JobConfig.from_dict(tiny_job(
        data_root, storage_uri, name=name, storage_endpoint=endpoint, data={"batch_size": 16},
        model={"drop_path_rate": 0.1}, space=SPACE, search=None,
        supernet={"epochs": epochs, "lr": 3e-3, "warmup_epochs": 1, "num_workers": workers,
                  "eval_random_subnets": 1, "max_failures": 0, **supernet},
        retrain={"epochs": 2, "lr": 3e-3, "warmup_epochs": 0, "num_workers": 1}))


def _root(job):
    return storage.resolve(job.storage, job.storage_endpoint).join(job.name)


def _metrics(job, stage="supernet"):
    return storage.read_table(_root(job).join(stage), "train_metrics").to_pandas()


# ----------------------------------------------------------------------------- no Ray
def test_step_subnets_are_a_function_of_seed_epoch_step():
    space = SearchSpace.from_dict(SPACE)
    a = [step_subnet(space, 0, 1, s) for s in range(20)]
    assert a == [step_subnet(space, 0, 1, s) for s in range(20)]  # what every worker computes
    assert len({c.key() for c in a}) > 10 and all(space.contains(c) for c in a)
    assert a != [step_subnet(space, 0, 2, s) for s in range(20)] != [step_subnet(space, 1, 1, s) for s in range(20)]


def test_sampling_rules_uniform_and_sandwich():
    """uniform (NOAH): the step's one random subnet; sandwich (BigNAS): largest, smallest and that
    same random subnet, their gradients averaged into one step."""
    space = SearchSpace.from_dict(SPACE)
    rnd = step_subnet(space, 0, 3, 7)
    assert step_subnets(space, "uniform", 0, 3, 7) == [rnd]
    assert step_subnets(space, "sandwich", 0, 3, 7) == [space.largest(), space.smallest(), rnd]
    assert JobConfig.from_dict({"supernet": {"sampling": "sandwich"}}).supernet.sampling == "sandwich"
    with pytest.raises(ConfigError, match=r"supernet.sampling: 'random' unknown; use uniform or sandwich"):
        JobConfig.from_dict({"supernet": {"sampling": "random"}})


def test_warmup_cosine_schedule():
    f = optim.warmup_cosine(total_steps=100, warmup_steps=10, min_ratio=0.01)
    assert [round(f(s), 6) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.505) and f(100) == pytest.approx(0.01)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))




def test_optimizer_state_round_trips_through_safetensors_and_json(one_thread):
    torch.manual_seed(0)
    model = PromptedViT.supernet(TINY, 4, SearchSpace.from_dict(SPACE))
    groups = optim.param_groups(model, 1e-4)
    assert all(p.ndim <= 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])

    def step(m, o):
        o.zero_grad()
        torch.manual_seed(1)  # the same dropout masks (recipe noah: 0.1) for model and copy
        torch.nn.functional.cross_entropy(m(x), y).backward()
        o.step()

    opt = optim.adamw(model, 1e-3, 1e-4)
    step(model, opt)
    tensors, data = optim.optimizer_state(opt)
    torch.manual_seed(0)  # the same frozen backbone
    copy = PromptedViT.supernet(TINY, 4, SearchSpace.from_dict(SPACE))
    copy.load_trainable_state_dict(model.trainable_state_dict())
    opt2 = optim.adamw(copy, 1e-3, 1e-4)
    optim.load_optimizer_state(opt2, load(save(tensors)), json.loads(json.dumps(data)))
    step(model, opt)
    step(copy, opt2)
    for k, v in model.trainable_state_dict().items():
        torch.testing.assert_close(copy.trainable_state_dict()[k], v, rtol=0, atol=0)


def test_baselines_are_fixed_configs(tmp_path, tiny_job):
    job = make_job(tiny_job, tmp_path, str(tmp_path), "b")
    assert subnet_for("lora", job, None) == SubnetConfig.uniform(12, lora=8)
    assert subnet_for("e2vpt", job, None) == SubnetConfig.uniform(12, **BASELINE_WIDTHS["e2vpt"])
    assert not subnet_for("linear", job, None).active_modules()
    job.retrain.baseline_widths = {"vpt": {"vpt": 50}}
    assert subnet_for("vpt", job, None) == SubnetConfig.uniform(12, vpt=50)
    cfg = SearchSpace.from_dict(SPACE).sample(random.Random(0))
    assert subnet_for("noah", job, cfg) is cfg
    with pytest.raises(ConfigError, match="retraining NOAH needs a subnet"):
        subnet_for("noah", job, None)
    with pytest.raises(ConfigError, match="method 'prefix' unknown"):
        subnet_for("prefix", job, None)


# ----------------------------------------------------------------------------- Ray Train
@pytest.fixture(scope="module")
def trained(ray_session, data_root, tmp_path_factory, tiny_job):
    """A supernet trained by 2 workers for 3 epochs, without interruption."""
    job = make_job(tiny_job, data_root, str(tmp_path_factory.mktemp("learn")), "learn", epochs=3, workers=2)
    return job, train_supernet(resolve(job, ("supernet",)))


@pytest.mark.slow
def test_two_workers_learn(trained):
    job, result = trained
    assert result.epochs_done == 3
    assert set(result.metrics) == {"val_acc_smallest", "val_acc_largest", "val_acc_random_0"}
    m = _metrics(job)
    assert len(m) == 3 * 3 and set(m["subnet"]) == {"smallest", "largest", "random_0"}  # one row per (epoch, subnet)
    per_epoch = m.drop_duplicates("epoch").sort_values("epoch")
    assert list(per_epoch["epoch"]) == [1, 2, 3] and (per_epoch["images_per_s"] > 0).all()
    assert per_epoch["train_loss"].iloc[-1] < per_epoch["train_loss"].iloc[0]
    model = load_supernet(job)
    final, meta = storage.load_state(_root(job).join("supernet", "final"))
    assert model.capacity == job.space.largest() and meta["epochs_done"] == 3 and not model.training
    for k, v in model.trainable_state_dict().items():
        torch.testing.assert_close(v, final[k], rtol=0, atol=0)
    # a finished run returns at once: nothing is trained or written again
    files = {f.path for f in storage.list_files(_root(job))}
    assert train_supernet(resolve(job, ("supernet",))).epochs_done == 3
    assert {f.path for f in storage.list_files(_root(job))} == files
    # the same job with other settings is refused before anything runs
    changed = JobConfig.from_dict({**job.to_dict(), "supernet": {**job.to_dict()["supernet"], "lr": 1e-3}})
    with pytest.raises(ConfigError, match="was trained with lr = 0.003, this job has 0.001"):
        train_supernet(resolve(changed, ("supernet",)))


@pytest.mark.slow
def test_killed_worker_restarts_and_rerun_resumes_exactly_on_s3(trained, data_root, s3_bucket, tiny_job):
    reference, _ = trained
    endpoint, bucket = s3_bucket
    job = make_job(tiny_job, data_root, f"s3://{bucket}/runs", "learn", epochs=3, workers=2, endpoint=endpoint,
                   max_failures=1)
    # epoch 0: rank 0's process is killed -> Ray restarts the workers from checkpoint 0 (max_failures=1);
    # epoch 1: an error with no retries left -> the run fails
    with pytest.raises(Exception, match="injected failure after epoch 1"):
        train_supernet(resolve(job, ("supernet",)), _faults=[(0, "kill"), (1, "raise")])
    names = [f.path for f in storage.list_files(_root(job))]
    for part in ("trainable.safetensors", "optimizer.safetensors", "state.json", "rng_rank0.safetensors",
                 "rng_rank1.safetensors"):
        assert any(n.endswith(f"supernet/checkpoint_e00001/{part}") for n in names), part
    assert any(n.endswith("/learn/backbone.safetensors") for n in names)
    assert sorted(_metrics(job)["epoch"].unique()) == [1, 2]             # epochs count from 1 in tables
    written = _metrics(job).set_index(["epoch", "subnet"])["timestamp"]
    assert train_supernet(resolve(job, ("supernet",))).epochs_done == 3  # the same job again: continues at epoch 2
    _, meta = storage.load_state(_root(job).join("supernet", "final"))
    assert meta["start_epochs"] == [0, 1, 2]  # fresh start, Ray's restart, the re-run
    after = _metrics(job).set_index(["epoch", "subnet"])["timestamp"]
    assert sorted(after.index.get_level_values(0).unique()) == [1, 2, 3]
    assert (after.loc[written.index] == written).all()  # epochs 1 and 2 were not trained again
    # weights, optimiser, schedule and both ranks' RNG were restored: identical to the run that never failed
    ref, _ = storage.load_state(_root(reference).join("supernet", "final"))
    got = load_supernet(job).trainable_state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow
def test_retrain_baseline_writes_runs_row_on_s3(ray_session, data_root, s3_bucket, s3_markers, tiny_job):
    endpoint, bucket = s3_bucket
    job = make_job(tiny_job, data_root, f"s3://{bucket}/runs", "s3job", endpoint=endpoint)
    res = retrain(resolve(job, ("retrain",)), None, method="lora", seed=0)
    root = _root(job)
    runs = storage.read_table(root.join("retrain"), "runs").to_pandas()
    assert list(runs["method"]) == ["lora"] and runs["test_acc"].between(0, 100).all()
    assert runs["params"].iloc[0] == 12 * 4 * 48 * 8 and runs["params_head"].iloc[0] == 48 * 4 + 4
    assert runs["best_epoch"].iloc[0] in (1, 2) and runs["checkpoint_uri"].iloc[0].startswith("s3://")
    best, best_meta = storage.load_state(root.join("retrain", "lora-seed0", "best"))  # the run's stable name
    assert best_meta["epoch"] + 1 == res.metrics["best_epoch"]       # meta.json keeps the 0-based index
    assert all(k.startswith("vit.head.") or ".lora." in k for k in best) and any(".lora." in k for k in best)
    m = _metrics(job, "retrain")
    assert set(m["subnet"]) == {"model"} and sorted(m["epoch"]) == [1, 2]
    again = retrain(resolve(job, ("retrain",)), None, method="lora", seed=0)  # finished: the same result, no second run
    assert again.metrics["test_acc"] == res.metrics["test_acc"]
    assert again.metrics["fingerprint"] == res.metrics["fingerprint"]
    assert len(storage.read_table(root.join("retrain"), "runs")) == 1
    assert s3_markers(endpoint, bucket) == []          # no zero-byte directory markers left by Ray / pyarrow


def test_bad_storage_or_job_fails_before_training(ray_session, data_root, tmp_path, tiny_job):
    with pytest.raises(ConfigError, match="scheme 'ftp' unsupported"):
        train_supernet(resolve(make_job(tiny_job, data_root, "ftp://host/x", "bad"), ("supernet",)))
    with pytest.raises(ConfigError, match=r"storage 's3://nowhere/x' \(endpoint http://127.0.0.1:9\) is not writable"):
        train_supernet(resolve(make_job(tiny_job, data_root, "s3://nowhere/x", "bad", endpoint="http://127.0.0.1:9"), ("supernet",)))
    with pytest.raises(ConfigError, match="batch_size 16 does not split evenly over supernet.num_workers 3"):
        train_supernet(resolve(make_job(tiny_job, data_root, str(tmp_path), "bad", workers=3), ("supernet",)))
    with pytest.raises(ConfigError, match="retraining NOAH needs a subnet"):
        retrain(resolve(make_job(tiny_job, data_root, str(tmp_path), "bad"), ("retrain",)), None, method="noah")
    with pytest.raises(ConfigError, match="data root '/nonexistent' does not exist"):
        train_supernet(resolve(make_job(tiny_job, "/nonexistent", str(tmp_path), "bad"), ("supernet",)))
    with pytest.raises(ConfigError, match="no trained supernet"):
        load_supernet(make_job(tiny_job, data_root, str(tmp_path), "bad"))
    with pytest.raises(ConfigError, match="no trained supernet at .*/bad/supernet/named/other/final"):
        load_supernet(make_job(tiny_job, data_root, str(tmp_path), "bad"), run_name="other")
    with pytest.raises(ConfigError, match="run name: 'a/b' must be"):
        train_supernet(resolve(make_job(tiny_job, data_root, str(tmp_path), "bad"), ("supernet",)), run_name="a/b")
    assert not (tmp_path / "bad").exists()  # nothing was written


@pytest.mark.slow
def test_sandwich_supernet_trains_and_its_run_refuses_another_rule(ray_session, data_root, tmp_path, tiny_job):
    job = make_job(tiny_job, data_root, str(tmp_path), "sandwich", epochs=1, sampling="sandwich")
    res = train_supernet(resolve(job, ("supernet",)))
    assert res.epochs_done == 1 and set(_metrics(job)["subnet"].dropna()) >= {"smallest", "largest"}
    spec = json.loads(storage.read_text(_root(job).join("supernet", "spec.json")))
    assert spec["sampling"] == "sandwich"
    with pytest.raises(ConfigError, match="was trained with sampling"):
        train_supernet(resolve(make_job(tiny_job, data_root, str(tmp_path), "sandwich", epochs=2), ("supernet",)))     # uniform now
