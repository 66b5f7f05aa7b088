"""Checkpoint and artefact integrity (issue 28, item 4): every file of a checkpoint folder,
``final/`` and ``best/`` is listed with its sha256 in a manifest and checked on load; a newest
checkpoint that fails it is set aside before a resume and Ray Train forgets it; a damaged
``final/`` is not "done".  Folders written before checksums still load (unverified)."""

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from noah_ray.config import JobConfig
from noah_ray.data import write_generated_vtab
from noah_ray.errors import ConfigError
from noah_ray.nn import optim
from noah_ray.run.preflight import resolve
from noah_ray.store import storage
from noah_ray.train import runs

SPACE = {"num_layers": 12, "modules": {"vpt": {"depths": [3, 12], "widths": [1, 5]},
                                       "lora": {"depths": [3, 12], "widths": [1, 5]}}}


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    if request.param == "local":
        return storage.resolve(str(tmp_path / "store"))
    endpoint, bucket = request.getfixturevalue("s3_bucket")
    return storage.resolve(f"s3://{bucket}/store", endpoint)


def flip(data: bytes, at: int, n: int = 16) -> bytes:
    """``data`` with ``n`` bytes from ``at`` set to 0xFF (NaN as float32): same size."""
    return data[:at] + b"\xff" * n + data[at + n:]


def tensor_offset(data: bytes) -> int:
    """Where a safetensors file's tensor bytes start (8-byte header length + JSON header)."""
    return 8 + int.from_bytes(data[:8], "little")


# ----------------------------------------------------------------------------- the manifest
def test_the_manifest_lists_every_file_with_its_sha256_and_catches_same_size_damage(where):
    files = {"a.bin": bytes(range(256)) * 4, "meta.json": b'{"x": 1}'}
    storage.write_checked(where.join("f"), files)
    manifest = json.loads(storage.read_text(where.join("f", "checksums.json")))
    assert manifest["files"] == {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                                 for n, d in files.items()}
    got = storage.read_checked(where.join("f"), ["a.bin", "meta.json"])
    assert got.verified and got.files == files
    storage.write_bytes(where.join("f", "a.bin"), flip(files["a.bin"], 100))
    with pytest.raises(ConfigError, match=r"f/a.bin is truncated or corrupt \(fails its checksum in "
                                          r"checksums.json\); retrain it"):
        storage.read_checked(where.join("f"), ["a.bin"], recover="retrain it")
    with pytest.raises(ConfigError, match=r"f/other.bin is missing \(an incomplete write\); write it again"):
        storage.read_checked(where.join("f"), ["other.bin"])
    storage.write_bytes(where.join("f", "other.bin"), b"x")
    with pytest.raises(ConfigError, match=r"other.bin is truncated or corrupt \(not listed in checksums.json\)"):
        storage.read_checked(where.join("f"), ["other.bin"])


def test_save_state_damage_is_one_line_and_an_old_folder_without_manifest_loads(where):
    storage.save_state(where.join("final"), {"w": torch.arange(64, dtype=torch.float32)}, {"epochs_done": 3})
    weights = where.join("final", "model.safetensors")
    good = storage.read_bytes(weights)
    storage.write_bytes(weights, flip(good, tensor_offset(good) + 8))       # same size, tensor bytes
    with pytest.raises(ConfigError, match=r"final/model.safetensors is truncated or corrupt .*; export it again"):
        storage.load_state(where.join("final"), "export it again")
    # a folder written before checksums (model + meta only): accepted unverified
    old = where.join("old")
    storage.write_bytes(old.join("model.safetensors"), save({"w": torch.ones(4)}))
    storage.write_text(old.join("meta.json"), json.dumps({"epochs_done": 1}))
    tensors, meta = storage.load_state(old)
    assert meta == {"epochs_done": 1} and torch.equal(tensors["w"], torch.ones(4))
    storage.write_bytes(old.join("model.safetensors"), save({"w": torch.ones(4)})[:-3])   # still caught by parsing
    with pytest.raises(ConfigError, match="old/model.safetensors is truncated or corrupt"):
        storage.load_state(old)


# ----------------------------------------------------------------------------- checkpoints
class Tiny(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x)

    def trainable_state_dict(self):
        return dict(self.state_dict())


def stepped(seed: int) -> tuple[Tiny, torch.optim.AdamW]:
    model = Tiny(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(2, 8)).sum().backward()
    opt.step()
    return model, opt


def write_checkpoints(run: storage.Location, tmp_path: Path, epochs: int, world: int = 2) -> None:
    """``checkpoint_e00000`` .. of a tiny model, each rank's part written like Ray merges them."""
    for epoch in range(epochs):
        model, opt = stepped(epoch)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        for rank in range(world):
            d = tmp_path / f"e{epoch}-r{rank}"
            d.mkdir()
            optim.save_checkpoint(str(d), model, opt, sched, scaler, {"epoch": epoch}, rank, world,
                                  torch.device("cpu"))
            for f in d.iterdir():
                storage.write_bytes(run.join(f"checkpoint_e{epoch:05d}", f.name), f.read_bytes())


def test_a_bad_newest_checkpoint_is_set_aside_and_the_previous_good_one_resumes(where, tmp_path):
    run = where.join("supernet")
    write_checkpoints(run, tmp_path, 4)
    e3 = run.join("checkpoint_e00003", "trainable.safetensors")
    data = storage.read_bytes(e3)
    storage.write_bytes(e3, flip(data, tensor_offset(data)))                      # corrupt in place
    e2 = run.join("checkpoint_e00002", "state.json")
    storage.write_bytes(e2, storage.read_bytes(e2)[:-20])                          # truncated
    e1 = run.join("checkpoint_e00001", "rng_rank1.safetensors")                    # rank 1's part damaged
    data = storage.read_bytes(e1)
    storage.write_bytes(e1, flip(data, len(data) - 20, 4))
    with pytest.raises(ConfigError, match=r"checkpoint_e00003/trainable.safetensors is truncated or corrupt "
                                          r"\(fails its checksum"):
        optim.read_checkpoint(run.join("checkpoint_e00003"))
    assert optim.latest_checkpoint(run)["name"] == "checkpoint_e00000"            # workers skip the bad ones
    bad, good = optim.set_aside_bad(run)
    assert (bad, good) == (["checkpoint_e00003", "checkpoint_e00002", "checkpoint_e00001"], "checkpoint_e00000")
    assert optim.checkpoint_names(run) == ["checkpoint_e00000"]
    kept = {f.path.split("/")[-2] for f in storage.list_files(run, "state.json")}
    assert kept == {"checkpoint_e00000", "corrupt_checkpoint_e00003", "corrupt_checkpoint_e00002",
                    "corrupt_checkpoint_e00001"}                                 # kept for inspection, not deleted
    ckpt = optim.latest_checkpoint(run)
    assert ckpt["state"]["epoch"] == 0 and len(ckpt["rng"]) == 2
    torch.testing.assert_close(ckpt["trainable"]["lin.weight"], stepped(0)[0].lin.weight.detach(), rtol=0, atol=0)
    # the same name bad again later is set aside beside the first, which stays as it was
    first = storage.read_bytes(run.join("corrupt_checkpoint_e00003", "trainable.safetensors"))
    for f in storage.list_files(run.join("checkpoint_e00000")):
        storage.write_bytes(run.join("checkpoint_e00003", f.path.split("/")[-1]), storage.read_bytes(f))
    storage.write_bytes(run.join("checkpoint_e00003", "state.json"), b"{")
    assert optim.set_aside_bad(run) == (["checkpoint_e00003"], "checkpoint_e00000")
    assert storage.exists(run.join("corrupt_checkpoint_e00003.1", "state.json"))
    assert storage.read_bytes(run.join("corrupt_checkpoint_e00003", "trainable.safetensors")) == first


def test_a_checkpoint_written_before_checksums_still_loads_and_a_new_one_without_manifest_does_not(tmp_path):
    run = storage.resolve(str(tmp_path / "run"))
    write_checkpoints(run, tmp_path, 2, world=1)
    old = Path(run.join("checkpoint_e00000").path)
    (old / "checksums.json").unlink()
    state = json.loads((old / "state.json").read_text())
    (old / "state.json").write_text(json.dumps({**state, "format": 1}))           # as written before checksums
    assert optim.read_checkpoint(run.join("checkpoint_e00000"))["state"]["epoch"] == 0
    (Path(run.join("checkpoint_e00001").path) / "checksums.json").unlink()      # format 2: an incomplete upload
    with pytest.raises(ConfigError, match=r"checkpoint_e00001/checksums.json is missing"):
        optim.read_checkpoint(run.join("checkpoint_e00001"))
    assert optim.latest_checkpoint(run)["name"] == "checkpoint_e00000"


def test_ray_forgets_checkpoints_set_aside(tmp_path):
    """The snapshot Ray Train's checkpoint manager keeps in the run folder drops the names set
    aside and still parses as Ray's own state model."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState

    run = storage.resolve(str(tmp_path / "run"))

    def result(n):
        return {"version": 0, "checkpoint_dir_name": f"checkpoint_e{n:05d}", "metrics": {"epoch": n + 1}}

    snap = {"checkpoint_results": [result(0), result(1), result(2)], "checkpoint_report_indices": [0, 1, 2],
            "latest_checkpoint_result": result(2), "pending_training_results": [], "pending_validation_specs": [],
            "current_report_index": 3, "validated_checkpoint_dir_names": ["checkpoint_e00002"],
            "timed_out_validation_checkpoint_dir_names": [], "failed_validation_checkpoint_dir_names": []}
    storage.write_text(run.join(runs.RAY_SNAPSHOT), json.dumps(snap))
    runs._forget_checkpoints(run, ["checkpoint_e00002", "checkpoint_e00001"])
    got = _CheckpointManagerState.model_validate(json.loads(storage.read_text(run.join(runs.RAY_SNAPSHOT))))
    assert [r.checkpoint_dir_name for r in got.checkpoint_results] == ["checkpoint_e00000"]
    assert got.checkpoint_report_indices == [0] and got.current_report_index == 3
    assert got.latest_checkpoint_result.checkpoint_dir_name == "checkpoint_e00000"
    assert got.validated_checkpoint_dir_names == []
    storage.write_text(run.join(runs.RAY_SNAPSHOT), "{\"checkpoint_res")              # unreadable: removed
    runs._forget_checkpoints(run, ["checkpoint_e00000"])
    assert not storage.exists(run.join(runs.RAY_SNAPSHOT))


# ----------------------------------------------------------------------------- Ray Train
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_generated_vtab(root, "gen_color", num_train=64, num_val=32, num_test=32)
    return root


def make_job(tiny_job, data_root, where, name, *, epochs, keep=2):
    return JobConfig.from_dict(tiny_job(
        data_root, str(where), name=name, data={"batch_size": 16}, space=SPACE, search=None,
        supernet={"epochs": epochs, "lr": 3e-3, "warmup_epochs": 1, "num_workers": 1, "eval_random_subnets": 1,
                  "max_failures": 0, "keep_checkpoints": keep},
        retrain={"epochs": 2, "lr": 3e-3, "warmup_epochs": 0, "num_workers": 1}))


def _supernet(job):
    return storage.resolve(job.storage).join(job.name, "supernet")


def _nan_fill(loc: storage.Location) -> None:
    """Overwrite every tensor byte of a safetensors file with 0xFF (NaN): same size, header intact."""
    data = storage.read_bytes(loc)
    at = tensor_offset(data)
    storage.write_bytes(loc, data[:at] + b"\xff" * (len(data) - at))


@pytest.mark.slow
def test_damaged_newest_checkpoints_fall_back_with_one_line_and_the_run_finishes_finite(ray_session, data_root,
                                                                                         tmp_path, tiny_job, capsys):
    """The run stops after epoch 2 with three checkpoints kept; the newest one's weights are NaN
    (same size, header intact) and the next one's state.json is cut in half: the rerun names both
    once, sets them aside, resumes from the oldest and finishes with finite weights and losses."""
    from noah_ray.train.runs import supernet_done, train_supernet

    job = make_job(tiny_job, data_root, tmp_path, "cut", epochs=5, keep=3)
    with pytest.raises(Exception, match="injected failure after epoch 2"):
        train_supernet(resolve(job, ("supernet",)), _faults=[(2, "raise")])
    run = _supernet(job)
    _nan_fill(run.join("checkpoint_e00002", "trainable.safetensors"))       # corrupted in place, same size
    p = Path(run.join("checkpoint_e00001", "state.json").path)
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])               # truncated
    capsys.readouterr()
    assert train_supernet(resolve(job, ("supernet",))).epochs_done == 5     # no "Path not found" from Ray
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if "checkpoint_e00002" in ln]
    assert len(lines) == 1 and "corrupt" in lines[0], out
    assert "checkpoint_e00002, checkpoint_e00001" in out and "resuming from checkpoint_e00000" in out
    assert storage.exists(run.join("corrupt_checkpoint_e00002", "trainable.safetensors"))   # kept, set aside
    metrics = storage.read_table(run, "train_metrics").to_pandas()
    assert all(math.isfinite(v) for v in metrics["train_loss"])
    tensors, meta = storage.load_state(run.join("final"))
    assert meta["start_epochs"] == [0, 1] and all(torch.isfinite(t).all() for t in tensors.values())
    assert optim.checkpoint_names(run)[:3] == ["checkpoint_e00004", "checkpoint_e00003", "checkpoint_e00002"]
    for name in optim.checkpoint_names(run)[:3]:
        optim.read_checkpoint(run.join(name))                               # every kept checkpoint intact
    # a damaged final/ is not "done"
    n = resolve(job, ("supernet",)).num_classes
    assert supernet_done(job, n)
    _nan_fill(run.join("final", "model.safetensors"))
    assert not supernet_done(job, n)


@pytest.mark.slow
def test_a_damaged_retrain_final_is_not_done_and_a_rerun_writes_it_again(ray_session, data_root, tmp_path, tiny_job,
                                                                       capsys):
    from noah_ray.train.runs import retrain, retrain_done

    job = make_job(tiny_job, data_root, tmp_path, "rt", epochs=1)
    rj = resolve(job, ("retrain",))
    res = retrain(rj, None, method="lora", seed=0)
    published = storage.resolve(job.storage).join(job.name, "retrain", "lora-seed0")
    attempt = published.join(res.metrics["fingerprint"])
    assert retrain_done(job, None, "lora", 0, rj.num_classes)
    _nan_fill(published.join("final", "model.safetensors"))                 # what export reads
    assert not retrain_done(job, None, "lora", 0, rj.num_classes)
    retrain(rj, None, method="lora", seed=0)                                 # publishes the intact run again
    assert retrain_done(job, None, "lora", 0, rj.num_classes)
    storage.load_state(published.join("final"))
    # the run's own final/ damaged: rebuilt from its last checkpoint (no epoch trained again)
    p = Path(attempt.join("final", "model.safetensors").path)
    p.write_bytes(p.read_bytes()[:-64])
    assert not retrain_done(job, None, "lora", 0, rj.num_classes)
    capsys.readouterr()
    again = retrain(rj, None, method="lora", seed=0)
    assert "final is truncated or corrupt: writing it again" in capsys.readouterr().out
    tensors, meta = storage.load_state(attempt.join("final"))
    assert meta["epochs_done"] == 2 and meta["start_epochs"] == [0, 2]
    assert again.metrics["test_acc"] == res.metrics["test_acc"]
    assert retrain_done(job, None, "lora", 0, rj.num_classes)
