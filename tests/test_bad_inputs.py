"""The bad-input table: one CLI command per case on a job broken in one way.

Each case asserts exit code 1, exactly one stderr line (no traceback) naming the bad value, no
secret echoed, Ray never started, and every file that existed before (config, data, earlier
results) unchanged by checksum.  Everything fails before Ray, so the table stays fast."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from noah_ray.cli import main as cli
from noah_ray.run import pipeline
from noah_ray.store import storage

SECRET = "SECRETXX0wQ"
#: a real-shaped AWS secret key: 40 characters of the base64 alphabet, with '/' and '+'
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCY/EXAMPLEKY"
assert len(AWS_SECRET) == 40


@dataclass
class World:
    root: Path
    data: Path
    store: Path
    cfg: dict
    config: Path
    backbone: bytes = b""
    env: dict[str, str] = field(default_factory=dict)     # environment variables the command runs with

    @property
    def job(self) -> storage.Location:
        return storage.resolve(str(self.store)).join("tiny")

    def ds(self, name: str) -> Path:
        return self.data / "gen_color" / name


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    from noah_ray.data import write_generated_vtab

    root = tmp_path_factory.mktemp("bad-inputs-data")
    write_generated_vtab(root, "gen_color", num_train=8, num_val=4, num_test=4)
    return root


@pytest.fixture(scope="module")
def backbone_bytes() -> bytes:
    import torch
    from safetensors.torch import save

    from noah_ray.nn.backbones import create_backbone

    torch.manual_seed(0)
    return save(create_backbone("vit_noah_tiny_patch4_32", 4).state_dict())


# ------------------------------------------------------------------ case helpers
def edit_line(path: Path, index: int, fn: Callable[[str], str]) -> None:
    lines = path.read_text().splitlines()
    lines[index] = fn(lines[index])
    path.write_text("\n".join(lines) + "\n")


def first_image(world: World, split: str) -> Path:
    return world.ds("") / world.ds(f"{split}.txt").read_text().split()[0]


def supernet_final(world: World, truncate: bool = False) -> None:
    import torch

    final = world.job.join("supernet", "final")
    storage.save_state(final, {"w": torch.zeros(64)}, {"epochs_done": 1, "num_classes": 4})
    if truncate:
        p = Path(final.join("model.safetensors").path)
        p.write_bytes(p.read_bytes()[:-100])


def checkpoint(world: World, name: str, data: bytes) -> None:
    path = world.root / name
    path.write_bytes(data)
    world.cfg["model"]["checkpoint"] = str(path)


def wrong_shape_checkpoint(world: World) -> None:
    from safetensors.torch import save

    from noah_ray.nn.backbones import create_backbone

    small = create_backbone("vit_noah_tiny_patch4_32", 4, embed_dim=24)
    checkpoint(world, "small.safetensors", save(small.state_dict()))


def pickled_checkpoint(world: World) -> None:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(torch.nn.Linear(2, 2), buf)
    checkpoint(world, "model.pth", buf.getvalue())


def legacy_pickled_checkpoint(world: World) -> None:
    """The pre-1.6 torch format with pickle protocol 4: torch warns about the protocol when reading it."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(torch.nn.Linear(2, 2), buf, _use_new_zipfile_serialization=False, pickle_protocol=4)
    checkpoint(world, "legacy.pth", buf.getvalue())


def npz_checkpoint(world: World) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, weights=np.zeros(3, dtype=np.float32))
    checkpoint(world, "ViT-B_16.npz", buf.getvalue())


def live_lease(world: World) -> None:
    now = time.time()
    storage.write_text(world.job.join("lease.json"), json.dumps(
        {"token": "x", "host": "other-host", "pid": 4242, "since": now - 60, "renewed": now}))


def section(key: str, value) -> Callable[[World], None]:
    """Set ``a.b.c`` in the config to ``value``."""
    def mutate(world: World) -> None:
        *parents, last = key.split(".")
        node = world.cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return mutate


def raw(text: str) -> Callable[[World], None]:
    def mutate(world: World) -> None:
        world.cfg = None
        world.config.write_text(text)
    return mutate


def noah_subnet(world: World) -> None:
    bad = world.root / "ViT-B_prompt_cifar.yaml"
    bad.write_text("RETRAIN:\n  VISUAL_PROMPT_DIM: [10, 10\n  LORA_DIM: ]\n")
    world.cfg["retrain"]["subnet"] = str(bad)


def foreign_subnet(world: World) -> None:
    path = world.root / "s.yaml"
    path.write_text("widths: {vpt: [10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]}\n")
    world.cfg["retrain"]["subnet"] = str(path)


def state_json(world: World) -> None:
    supernet_final(world)
    storage.write_text(world.job.join("search", "state", "evolution-seed0.json"), '{"engine": {"candidates": [')


def yaml_edit(fn: Callable[[str], str]) -> Callable[[World], None]:
    """Write the config as YAML, then edit its text (values ``safe_dump`` never writes)."""
    def mutate(world: World) -> None:
        text = fn(yaml.safe_dump(world.cfg))
        world.cfg = None
        world.config.write_text(text)
    return mutate


def json_text(text: str) -> Callable[[World], None]:
    def mutate(world: World) -> None:
        world.cfg = None
        world.config = world.root / "job.json"
        world.config.write_text(text)
    return mutate


def env(name: str, value: str) -> Callable[[World], None]:
    def mutate(world: World) -> None:
        world.env[name] = value
    return mutate


def outside_split(world: World) -> None:
    """A split file outside the dataset folder: ``data.test_split: ../../outside``."""
    (world.root / "outside.txt").write_text("outside-the-dataset-line.png 0\n")
    world.cfg["data"]["test_split"] = "../../outside"


def truncated_jpeg(world: World, split: str) -> None:
    import io

    from PIL import Image

    path = first_image(world, split)
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "JPEG", quality=95)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])      # the header whole, half the scan


# name: (mutate, command and extra args, text the one line must contain)
CASES: dict[str, tuple[Callable[[World], None], tuple[str, ...], str]] = {
    # ---------------------------------------------------------------- malformed configs
    "num_layers is a word": (section("space.num_layers", "twelve"), ("pipeline",), "space.num_layers: 'twelve'"),
    "widths is a number": (section("space.modules", {"lora": {"widths": 5}}), ("pipeline",),
                           "space.modules.lora.widths: 5"),
    "widths is a string": (section("space.modules", {"lora": {"widths": "abc"}}), ("pipeline",),
                           "space.modules.lora.widths: 'abc'"),
    "modules is a list": (section("space.modules", ["vpt"]), ("pipeline",), "space.modules"),
    "module spec is a number": (section("space.modules", {"vpt": 5}), ("pipeline",), "space.modules.vpt: 5"),
    "top level is a list": (raw("- name: x\n- storage: y\n"), ("pipeline",), "top level must be a mapping"),
    "top level is a string": (raw("just words\n"), ("pipeline",), "got a str"),
    "YAML does not parse": (raw("name: [x\n"), ("pipeline",), "cannot parse"),
    "unknown section": (section("trainer", {"epochs": 1}), ("pipeline",), "unknown section 'trainer'"),
    "unknown key": (section("search.generation", 3), ("pipeline",), "unknown key 'generation'"),
    "generations is a word": (section("search.generations", "abc"), ("pipeline",), "search.generations: 'abc'"),
    "population zero": (section("search.population", 0), ("pipeline",), "population: 0"),
    "unknown algorithm": (section("search.algorithm", "bayes"), ("search",), "'bayes'"),
    "unknown data format": (section("data.format", "tfrecord"), ("pipeline",), "'tfrecord'"),
    "negative batch": (section("data.batch_size", -8), ("pipeline",), "batch_size: -8"),
    "unknown precision": (section("model.precision", "fp8"), ("pipeline",), "'fp8'"),
    "drop path out of range": (section("model.drop_path_rate", 1.5), ("pipeline",), "drop_path_rate: 1.5"),
    "checkpoint_blocks negative": (section("model.checkpoint_blocks", -1), ("pipeline",), "checkpoint_blocks: -1"),
    "checkpoint_blocks without checkpointing": (section("model.checkpoint_blocks", 4), ("pipeline",),
                                                "checkpoint_blocks: 4 needs grad_checkpointing: true"),
    "checkpoint_blocks above the depth": (lambda w: (section("model.grad_checkpointing", True)(w),
                                                     section("model.checkpoint_blocks", 99)(w)),
                                          ("pipeline",), "model.checkpoint_blocks 99 is more than"),
    "retrain is a list": (section("retrain", [1]), ("pipeline",), "retrain: expected a mapping"),
    "unknown timm model": (section("model.name", "vit_nope"), ("pipeline",), "'vit_nope'"),
    "unknown dataset": (section("data.dataset", "cifar1000"), ("pipeline",), "'cifar1000'"),
    "batch does not split": (section("supernet.num_workers", 3), ("supernet",), "supernet.num_workers 3"),
    "limit below the space": (section("search.param_limit", 1e-6), ("search",), "param_limit 1e-06"),
    "unknown baseline": (section("retrain.baselines", ["prefix"]), ("pipeline",), "'prefix'"),
    # ---------------------------------------------------------------- names and URIs
    "name ..": (section("name", ".."), ("pipeline",), "name: '..'"),
    "name .": (section("name", "."), ("pipeline",), "name: '.'"),
    "name ...": (section("name", "..."), ("pipeline",), "name: '...'"),
    "name with a slash": (section("name", "a/../b"), ("pipeline",), "name: 'a/../b'"),
    "credentials in the storage URI": (section("storage", f"s3://AKIAXX:{SECRET}@bucket/noah"), ("pipeline",),
                                       "s3://***@bucket/noah"),
    "credentials in the endpoint": (lambda w: w.cfg.update(storage="s3://bucket/noah",
                                                           storage_endpoint=f"http://AK:{SECRET}@127.0.0.1:9"),
                                    ("pipeline",), "http://***@127.0.0.1:9"),
    "credentials in the checkpoint URI": (section("model.checkpoint", f"s3://AK:{SECRET}@bucket/ViT-B_16.npz"),
                                          ("pipeline",), "s3://***@bucket/ViT-B_16.npz"),
    "unsupported scheme": (section("storage", "ftp://host/noah"), ("pipeline",), "'ftp'"),
    "unknown method": (lambda w: None, ("retrain", "--method", "../x"), "retrain method '../x' unknown"),
    # ---------------------------------------------------------------- --set
    "--set without =": (lambda w: None, ("search", "--set", "search.generations"), "search.generations"),
    "--set bad YAML": (lambda w: None, ("search", "--set", "search.generations=[1"), "search.generations=[1"),
    "--set into a value": (lambda w: None, ("search", "--set", "name.x=1"), "'name' is not a section"),
    # ---------------------------------------------------------------- subnet files
    "NOAH subnet does not parse": (noah_subnet, ("retrain",), "ViT-B_prompt_cifar.yaml"),
    "subnet file missing": (lambda w: None, ("retrain", "--subnet", "/nonexistent/subnet.yaml"),
                            "/nonexistent/subnet.yaml"),
    "subnet outside the space": (foreign_subnet, ("retrain",), "'vpt'"),
    # ---------------------------------------------------------------- data
    "test label out of range": (lambda w: edit_line(w.ds("test.txt"), 0, lambda ln: ln.rsplit(" ", 1)[0] + " 9"),
                                ("retrain", "--method", "linear"), "label 9 is out of range 0..3"),
    "train label not a number": (lambda w: edit_line(w.ds("train800.txt"), 1, lambda ln: ln.rsplit(" ", 1)[0] + " x"),
                                 ("supernet",), "label 'x'"),
    "val line without label": (lambda w: edit_line(w.ds("val200.txt"), 0, lambda ln: "lonely.png"),
                               ("search",), "'lonely.png'"),
    "corrupt train image": (lambda w: first_image(w, "train800").write_bytes(b"not an image"), ("supernet",),
                            "images/train"),
    "corrupt test image": (lambda w: first_image(w, "test").write_bytes(b"\x89PNG broken"),
                           ("retrain", "--method", "linear"), "images/test"),
    "missing val image": (lambda w: first_image(w, "val200").unlink(), ("search",), "does not exist"),
    "missing test split": (lambda w: w.ds("test.txt").unlink(), ("retrain", "--method", "linear"), "test.txt"),
    # ---------------------------------------------------------------- checkpoints
    "checkpoint of another size": (wrong_shape_checkpoint, ("supernet",), "pos_embed of shape (1, 65, 24)"),
    "truncated checkpoint": (lambda w: checkpoint(w, "cut.safetensors", w.backbone[: len(w.backbone) // 2]),
                             ("supernet",), "cut.safetensors"),
    "pickled checkpoint": (pickled_checkpoint, ("supernet",), "refused for safety"),
    "checkpoint of random bytes": (lambda w: checkpoint(w, "noise.pth", bytes(range(256)) * 4), ("supernet",),
                                   "noise.pth"),
    "npz that is not a ViT": (npz_checkpoint, ("supernet",), "has no 'embedding/kernel'"),
    # ---------------------------------------------------------------- earlier stages
    "search before the supernet": (lambda w: None, ("search",), "no trained supernet"),
    "truncated supernet weights": (lambda w: supernet_final(w, truncate=True), ("search",),
                                   "supernet/final/model.safetensors is truncated"),
    "truncated search state": (state_json, ("search",), "evolution-seed0.json is truncated"),
    "retrain before any search": (lambda w: None, ("retrain",), "no search winner"),
    # ---------------------------------------------------------------- one run per job
    "job already running": (live_lease, ("supernet",), "already running: host other-host, pid 4242"),
    # ---------------------------------------------------------------- values (issue 28, item 1)
    "supernet.lr overflows": (yaml_edit(lambda t: t.replace("supernet:\n", "supernet:\n  lr: 1.0e+400\n")),
                              ("supernet",), "supernet.lr: inf"),
    "lora_scale .inf": (section("model.lora_scale", float("inf")), ("pipeline",), "model.lora_scale: inf"),
    "retrain.lr .inf": (section("retrain.lr", float("inf")), ("retrain", "--method", "linear"), "retrain.lr: inf"),
    "weight_decay .nan": (section("retrain.weight_decay", float("nan")), ("pipeline",), "retrain.weight_decay: nan"),
    "method_lr .inf": (section("retrain.method_lr", {"linear": float("inf")}), ("pipeline",),
                       "retrain.method_lr.linear: inf"),
    "param_limit -.inf": (section("search.param_limit", float("-inf")), ("search",), "search.param_limit: -inf"),
    "seed a word": (section("retrain.seeds", ["a"]), ("retrain", "--method", "linear"), "retrain.seeds: ['a']"),
    "seed a list": (section("retrain.seeds", [[0, 1]]), ("retrain", "--method", "linear"), "retrain.seeds: [[0, 1]]"),
    "seed a fraction": (section("retrain.seeds", [0.5]), ("retrain", "--method", "linear"), "retrain.seeds: [0.5]"),
    "seed a path": (section("retrain.seeds", ["0/../../../escaped"]), ("retrain", "--method", "linear"),
                    "retrain.seeds: ['0/../../../escaped']"),
    "seeds repeated": (section("retrain.seeds", [0, 0]), ("retrain", "--method", "linear"), "retrain.seeds: [0, 0]"),
    "no seeds": (section("retrain.seeds", []), ("retrain", "--method", "linear"), "retrain.seeds: []"),
    "test split outside the dataset": (outside_split, ("retrain", "--method", "linear"),
                                       "data.test_split: '../../outside'"),
    "train split with a slash": (section("data.train_split", "sub/train800"), ("supernet",),
                                 "data.train_split: 'sub/train800'"),
    "img_size against the model": (section("data.img_size", 3), ("supernet",), "data.img_size 3"),
    "duplicate key": (raw("name: tiny\nstorage: /tmp/x\nname: other\n"), ("pipeline",),
                      "key 'name' appears twice (lines 1 and 3)"),
    "duplicate nested key": (yaml_edit(lambda t: t.replace("  epochs: 1\nsearch:", "  epochs: 1\n  epochs: 2\nsearch:")),
                             ("supernet",), "key 'epochs' appears twice"),
    "duplicate JSON key": (json_text('{"name": "tiny", "name": "other"}'), ("pipeline",),
                           "key 'name' appears twice in one object"),
    "epochs absurd": (section("supernet.epochs", 10 ** 9), ("supernet",), "supernet.epochs: 1000000000"),
    "generations absurd": (section("search.generations", 10 ** 9), ("pipeline",), "search.generations: 1000000000"),
    # ---------------------------------------------------------------- lease timeout (item 2)
    "lease timeout inf": (env("NOAH_RAY_LEASE_TIMEOUT_S", "inf"), ("supernet",), "NOAH_RAY_LEASE_TIMEOUT_S='inf'"),
    "lease timeout nan": (env("NOAH_RAY_LEASE_TIMEOUT_S", "nan"), ("supernet",), "NOAH_RAY_LEASE_TIMEOUT_S='nan'"),
    "lease timeout 0": (env("NOAH_RAY_LEASE_TIMEOUT_S", "0"), ("supernet",), "NOAH_RAY_LEASE_TIMEOUT_S='0'"),
    "lease timeout negative": (env("NOAH_RAY_LEASE_TIMEOUT_S", "-30"), ("supernet",), "NOAH_RAY_LEASE_TIMEOUT_S='-30'"),
    "lease timeout a word": (env("NOAH_RAY_LEASE_TIMEOUT_S", "soon"), ("supernet",), "NOAH_RAY_LEASE_TIMEOUT_S='soon'"),
    # ---------------------------------------------------------------- secrets with '/' (item 5)
    "AWS key in the storage URI": (section("storage", f"s3://AKIAIOSFODNN7EXAMPLE:{AWS_SECRET}@bucket/noah"),
                                   ("pipeline",), "s3://***@bucket/noah"),
    "AWS key in the endpoint": (lambda w: w.cfg.update(storage="s3://bucket/noah",
                                                       storage_endpoint=f"http://AKIAIOSFODNN7EXAMPLE:{AWS_SECRET}@127.0.0.1:9"),
                                ("pipeline",), "http://***@127.0.0.1:9"),
    "AWS key in the checkpoint URI": (section("model.checkpoint", f"s3://AKIAIOSFODNN7EXAMPLE:{AWS_SECRET}@bucket/v.npz"),
                                      ("pipeline",), "s3://***@bucket/v.npz"),
    "AWS key in results": (lambda w: None, ("results", f"s3://AKIAIOSFODNN7EXAMPLE:{AWS_SECRET}@bucket/noah/tiny"),
                           "s3://***@bucket/noah/tiny"),
    # ---------------------------------------------------------------- stderr noise (item 6)
    "legacy pickled checkpoint": (legacy_pickled_checkpoint, ("supernet",), "legacy.pth"),
    "truncated train JPEG": (lambda w: truncated_jpeg(w, "train800"), ("supernet",), "images/train"),
    "truncated test JPEG": (lambda w: truncated_jpeg(w, "test"), ("retrain", "--method", "linear"), "images/test"),
}

#: warnings that Python hides by default (they never reach a user's stderr)
HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_before_ray_and_changes_nothing(case, tmp_path, template, backbone_bytes,
                                                              monkeypatch, capsys, tiny_job):
    import ray

    mutate, argv, needle = CASES[case]
    shutil.copytree(template, tmp_path / "data")
    world = World(tmp_path, tmp_path / "data", tmp_path / "store", {}, tmp_path / "job.yaml", backbone_bytes)
    world.cfg = tiny_job(world.data, world.store)
    storage.append_table(storage.resolve(str(world.store)).join("earlier", "retrain"), "runs",
                         pa.Table.from_pylist([{"run_id": "noah-seed0", "job": "earlier", "test_acc": 71.5}]))
    mutate(world)
    if world.cfg is not None:
        world.config.write_text(yaml.safe_dump(world.cfg))
    started: list = []

    def init_ray(*a, **k) -> None:          # a case that gets this far is late: stop it before Ray runs
        started.append(a)
        raise RuntimeError("Ray would start")

    monkeypatch.setattr(pipeline, "init_ray", init_ray)
    for k, v in world.env.items():
        monkeypatch.setenv(k, v)
    was_running = ray.is_initialized()
    before = checksums(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = cli.main(list(argv) if argv[0] == "results" else [argv[0], "--config", str(world.config), *argv[1:]])
    out, err = capsys.readouterr()
    shown = [f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, HIDDEN_WARNINGS)]
    assert shown == [], shown                # a warning on stderr breaks the one-line rule too
    assert rc == 1, (out, err)
    assert err.count("\n") == 1 and err.startswith("noah-ray: error: ") and "Traceback" not in err, err
    assert needle in err, err
    assert SECRET not in err + out and AWS_SECRET not in err + out
    assert "outside-the-dataset-line" not in err + out
    assert not (tmp_path / "escaped").exists()
    assert started == [] and ray.is_initialized() == was_running
    assert checksums(tmp_path) == before


def test_the_table_is_large_enough():
    assert len(CASES) >= 40


def test_a_large_split_is_checked_by_header_and_says_so(tmp_path, template, monkeypatch, capsys):
    """Above ``DECODE_LIMIT`` images only headers are read (a truncated JPEG passes) and one stdout
    line says why; at or below it the same image is decoded and refused with one line."""
    from noah_ray.config import DataConfig
    from noah_ray.errors import ConfigError
    from noah_ray.run import preflight
    from noah_ray.run.preflight import check_data

    shutil.copytree(template, tmp_path / "data")
    world = World(tmp_path, tmp_path / "data", tmp_path / "store", {}, tmp_path / "job.yaml")
    truncated_jpeg(world, "train800")
    job = type("Job", (), {"data": DataConfig(root=str(world.data), dataset="gen_color"), "storage_endpoint": None})
    with pytest.raises(ConfigError, match="image file is truncated"):
        check_data(job, {"supernet": ("train800",)}, 4)
    monkeypatch.setattr(preflight, "DECODE_LIMIT", 4)
    check_data(job, {"supernet": ("train800",)}, 4)
    out, err = capsys.readouterr()
    assert err == "" and "split 'train800': 8 images, more than 4: only their headers are checked" in out


def test_a_sweep_file_with_a_key_twice_is_refused(tmp_path):
    from noah_ray.errors import ConfigError
    from noah_ray.run.sweep import SweepConfig

    path = tmp_path / "sweep.yaml"
    path.write_text("sweep:\n  datasets: [gen_color]\nname: a\nname: b\n")
    with pytest.raises(ConfigError, match=r"key 'name' appears twice \(lines 3 and 4\)"):
        SweepConfig.load(path)
