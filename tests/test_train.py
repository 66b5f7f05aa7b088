"""Ray Train supernet training and retraining: learning, resume after a crash, S3 storage,
fail-fast storage errors."""

import pytest
import torch

from noah_ray import storage
from noah_ray.config import JobConfig
from noah_ray.data import write_generated_vtab
from noah_ray.space import ConfigError
from noah_ray.train import load_supernet, retrain, train_supernet

SPACE = {"num_layers": 12, "modules": {"vpt": {"depths": [3, 12], "widths": [1, 5]},
                                       "lora": {"depths": [3, 12], "widths": [1, 5]},
                                       "adapter": {"depths": [3, 12], "widths": [1, 5]}}}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_generated_vtab(root, "gen_color", num_train=64, num_val=32, num_test=32)
    return root


def make_job(data_root, storage_uri, name, *, epochs=3, workers=1, endpoint=None, **supernet):
    return JobConfig.from_dict({
        "name": name, "storage": storage_uri, "storage_endpoint": endpoint,
        "data": {"root": str(data_root), "dataset": "gen_color", "batch_size": 16, "num_workers": 0},
        "model": {"name": "vit_noah_tiny_patch4_32", "drop_path_rate": 0.0},
        "space": SPACE,
        "supernet": {"epochs": epochs, "lr": 3e-3, "warmup_epochs": 0, "num_workers": workers,
                     "eval_random_subnets": 1, "max_failures": 0, **supernet},
        "retrain": {"epochs": 2, "lr": 3e-3, "warmup_epochs": 0, "num_workers": 1},
    })


def _metrics(job):
    root = storage.resolve(job.storage, job.storage_endpoint).join(job.name, "supernet")
    return storage.read_table(root, "train_metrics").to_pandas()


def test_two_workers_learn(ray_session, data_root, tmp_path):
    job = make_job(data_root, str(tmp_path), "learn", epochs=4, workers=2)
    result = train_supernet(job)
    assert result.epochs_done == 4
    m = _metrics(job).drop_duplicates("epoch").sort_values("epoch")
    assert list(m["epoch"]) == [0, 1, 2, 3]
    assert m["train_loss"].iloc[-1] < m["train_loss"].iloc[0]
    subnets = set(_metrics(job)["subnet"])
    assert {"smallest", "largest", "random_0"} <= subnets
    model = load_supernet(job)
    assert model.capacity == job.space.largest()


def _final_weights(job):
    tensors, meta = storage.load_state(storage.resolve(job.storage).join(job.name, "supernet", "final"))
    return tensors, meta


@pytest.mark.slow
def test_crash_then_rerun_resumes_from_checkpoint(ray_session, data_root, tmp_path):
    reference = make_job(data_root, str(tmp_path / "ref"), "resume", epochs=3)
    train_supernet(reference)
    crashed = make_job(data_root, str(tmp_path / "crash"), "resume", epochs=3)
    with pytest.raises(Exception, match="injected failure after epoch 1"):
        train_supernet(crashed, _fail_once_at_epoch=1)
    assert sorted(_metrics(crashed)["epoch"].unique()) == [0, 1]
    train_supernet(crashed)  # the same job again: continues at epoch 2, not from scratch
    m = _metrics(crashed)
    assert sorted(m["epoch"].unique()) == [0, 1, 2]
    assert len(m) == len(_metrics(reference))  # no epoch trained (and written) twice
    # weights, optimiser, schedule and RNG state were restored: identical to the run that never crashed
    ref_w, _ = _final_weights(reference)
    got_w, meta = _final_weights(crashed)
    assert meta["epochs"] == 3 and ref_w.keys() == got_w.keys()
    for k in ref_w:
        assert torch.allclose(ref_w[k], got_w[k], atol=1e-5), k


@pytest.mark.slow
def test_worker_failure_is_restarted_by_ray(ray_session, data_root, tmp_path):
    job = make_job(data_root, str(tmp_path), "restart", epochs=3, max_failures=1)
    result = train_supernet(job, _fail_once_at_epoch=0)
    assert result.epochs_done == 3
    assert sorted(_metrics(job)["epoch"].unique()) == [0, 1, 2]


def test_s3_storage_holds_checkpoints_and_tables(ray_session, data_root, s3_bucket):
    endpoint, bucket = s3_bucket
    job = make_job(data_root, f"s3://{bucket}/runs", "s3job", epochs=2, endpoint=endpoint)
    train_supernet(job)
    root = storage.resolve(job.storage, endpoint).join(job.name)
    names = [f.path for f in storage.list_files(root)]
    assert any(n.endswith("supernet/final/model.safetensors") for n in names)
    assert any("/supernet/ray/" in n and n.endswith("trainable.safetensors") for n in names)
    assert any("/supernet/train_metrics/" in n for n in names)
    assert any(n.endswith("backbone.safetensors") for n in names)
    assert load_supernet(job).shape.embed_dim == 48
    res = retrain(job, None, method="lora", seed=0)
    runs = storage.read_table(root.join("retrain"), "runs").to_pandas()
    assert list(runs["method"]) == ["lora"] and runs["test_acc"].between(0, 100).all()
    assert runs["params"].iloc[0] == 12 * 4 * 48 * 8 and res.metrics["best_epoch"] in (0, 1)


def test_bad_storage_fails_before_training(ray_session, data_root, tmp_path):
    with pytest.raises(ConfigError, match="scheme 'ftp' unsupported"):
        train_supernet(make_job(data_root, "ftp://host/x", "bad"))
    with pytest.raises(ConfigError, match=r"storage 's3://nowhere/x' \(endpoint http://127.0.0.1:9\) is not writable"):
        train_supernet(make_job(data_root, "s3://nowhere/x", "bad", endpoint="http://127.0.0.1:9"))
    with pytest.raises(ConfigError, match="retraining NOAH needs a subnet"):
        retrain(make_job(data_root, str(tmp_path), "bad"), None, method="noah")
