"""Data readers, registry, generated tasks and bad-input errors."""

import hashlib
from pathlib import Path

import pytest
import torch

from noah_ray.config import DataConfig
from noah_ray.data import build_dataset, build_loader, num_classes, write_generated_vtab
from noah_ray.data import registry
from noah_ray.space import ConfigError


@pytest.fixture(scope="module")
def gen_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_generated_vtab(root, "gen_texture", num_train=16, num_val=8, num_test=8)
    return root


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_generated_tasks_are_deterministic_vtab_folders(tmp_path):
    a = write_generated_vtab(tmp_path / "a", "gen_shape", num_train=12, num_val=4, num_test=4, seed=3)
    b = write_generated_vtab(tmp_path / "b", "gen_shape", num_train=12, num_val=4, num_test=4, seed=3)
    c = write_generated_vtab(tmp_path / "c", "gen_shape", num_train=12, num_val=4, num_test=4, seed=4)
    for split in ("train800", "val200", "train800val200", "test"):
        assert (a / f"{split}.txt").is_file()
    assert len((a / "train800val200.txt").read_text().split("\n")) - 1 == 16
    assert _digest(a) == _digest(b) != _digest(c)


def test_vtab_reader_and_loader(gen_root):
    cfg = DataConfig(root=str(gen_root), dataset="gen_texture", num_workers=0, batch_size=4)
    ds = build_dataset(cfg, "train800", train=True, img_size=32)
    assert len(ds) == 16 and ds.num_classes == 4 and set(ds.targets) == {0, 1, 2, 3}
    x, y = next(iter(build_loader(cfg, "val200", train=False, img_size=32)))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (8,)
    assert -1.01 <= float(x.min()) and float(x.max()) <= 1.01  # 0.5/0.5 normalisation


def test_registry_knows_vtab_and_variants():
    assert len(registry.names("vtab")) == 19 and len(registry.names("fewshot")) == 5
    assert registry.get("cifar").name == "cifar100" and registry.get("oxford_iiit_pet").num_classes == 37
    groups = {registry.get(n).group for n in registry.names("vtab")}
    assert groups == {"Natural", "Specialized", "Structured"}
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet42'"):
        registry.get("imagenet42")


def test_folder_variant_and_class_count_from_registry(tmp_path):
    src = write_generated_vtab(tmp_path, "gen_color", num_train=8, num_val=4, num_test=4)
    src.rename(tmp_path / "oxford_iiit_pet")  # folder named by a variant
    cfg = DataConfig(root=str(tmp_path), dataset="oxford_pet", num_workers=0)
    assert num_classes(cfg) == 37
    with pytest.raises(ConfigError, match="data.num_classes 10 contradicts the registry: oxford_pet has 37"):
        num_classes(DataConfig(root=str(tmp_path), dataset="oxford_pet", num_classes=10))


def _bad(root: Path, lines: str) -> DataConfig:
    (root / "bad").mkdir(exist_ok=True)
    (root / "bad" / "train800.txt").write_text(lines)
    return DataConfig(root=str(root), dataset="bad", num_classes=4, num_workers=0)


def test_bad_input_errors_name_file_and_line(tmp_path, gen_root):
    img = gen_root / "gen_texture" / "images" / "train800" / "00000.png"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ok.png").write_bytes(img.read_bytes())
    cases = [
        ("ok.png 1\nmissing.png 0\n", r"train800.txt:2: image .*missing.png' does not exist"),
        ("ok.png 1\nok.png 9\n", r"train800.txt:2: label 9 is out of range 0..3"),
        ("ok.png one\n", r"train800.txt:1: label 'one' is not an integer"),
        ("ok.png\n", r"train800.txt:1: expected 'relative/path label'"),
        ("\n", r"train800.txt' is empty"),
    ]
    for lines, match in cases:
        with pytest.raises(ConfigError, match=match) as e:
            build_dataset(_bad(tmp_path, lines), "train800", train=True, img_size=32)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"split file .*val200.txt' does not exist"):
        build_dataset(_bad(tmp_path, "ok.png 1\n"), "val200", train=False)
    with pytest.raises(ConfigError, match="data root .* does not exist"):
        build_dataset(DataConfig(root=str(tmp_path / "nope"), dataset="x"), "train800", train=True)


def test_corrupt_image_error_or_skip(tmp_path, gen_root):
    img = gen_root / "gen_texture" / "images" / "train800" / "00000.png"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ok.png").write_bytes(img.read_bytes())
    (tmp_path / "bad" / "broken.png").write_bytes(b"not an image")
    cfg = _bad(tmp_path, "ok.png 1\nbroken.png 2\n")
    ds = build_dataset(cfg, "train800", train=False, img_size=32)
    with pytest.raises(ConfigError, match=r"broken.png' cannot be decoded .*skip_corrupt"):
        ds[1]
    cfg.skip_corrupt = True
    ds = build_dataset(cfg, "train800", train=False, img_size=32)
    assert len(ds) == 1 and len(ds.skipped) == 1 and ds[0][1] == 1


def test_fewshot_lists_and_folder_trees(tmp_path, gen_root):
    src = gen_root / "gen_texture"
    fs = tmp_path / "food-101"
    (fs / "annotations").mkdir(parents=True)
    (fs / "images").symlink_to(src / "images")
    lines = (src / "train800.txt").read_text().replace("images/", "")
    (fs / "annotations" / "train_meta.list.num_shot_2.seed_1").write_text(lines)
    (fs / "annotations" / "val_meta.list").write_text((src / "val200.txt").read_text())
    (fs / "annotations" / "test_meta.list").write_text((src / "test.txt").read_text())
    cfg = DataConfig(root=str(tmp_path), dataset="food101", format="fewshot", shots=2, seed=1,
                     train_split="train", val_split="val", test_split="test", num_workers=0)
    assert len(build_dataset(cfg, "train", train=True, img_size=32)) == 16
    assert build_dataset(cfg, "val", train=False, img_size=32).num_classes == 101
    with pytest.raises(ConfigError, match="few-shot data needs data.shots"):
        build_dataset(DataConfig(root=str(tmp_path), dataset="food101", format="fewshot"), "train", train=True)
    tree = tmp_path / "mine"
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tree / split / c).mkdir(parents=True)
            (tree / split / c / "a.png").write_bytes((src / "images/train800/00000.png").read_bytes())
    cfg = DataConfig(root=str(tmp_path), dataset="mine", format="folder", train_split="train", num_workers=0)
    ds = build_dataset(cfg, "val", train=False, img_size=32)
    assert ds.num_classes == 2 and ds.targets == [0, 1]
