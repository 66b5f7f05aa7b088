"""Data: generated tasks, readers of every layout (local and s3://), registry, transforms,
decoded-image cache and the bad-input errors."""

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from noah_ray.config import DataConfig, JobConfig
from noah_ray.config import datasets as registry
from noah_ray.data import (
    GENERATED_TASKS,
    build_dataset,
    build_loader,
    build_transform,
    norm_for,
    num_classes,
    write_generated_vtab,
)
from noah_ray.errors import ConfigError
from noah_ray.nn.backbones import create_backbone
from noah_ray.store import storage


@pytest.fixture(scope="module")
def gen_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_generated_vtab(root, "gen_texture", num_train=16, num_val=8, num_test=8)
    return root


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(folder)).encode() + f.read_bytes())
    return h.hexdigest()


def _png(path: Path, src: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(src.read_bytes())


# ------------------------------------------------------------------ generated tasks
def test_generated_tasks_are_deterministic_vtab_folders(tmp_path):
    a = write_generated_vtab(tmp_path / "a", "gen_shape", num_train=12, num_val=4, num_test=4, seed=3)
    b = write_generated_vtab(tmp_path / "b", "gen_shape", num_train=12, num_val=4, num_test=4, seed=3)
    c = write_generated_vtab(tmp_path / "c", "gen_shape", num_train=12, num_val=4, num_test=4, seed=4)
    lines = {s: (a / f"{s}.txt").read_text().splitlines() for s in ("train800", "val200", "train800val200", "test")}
    assert [len(v) for v in lines.values()] == [12, 4, 16, 4]
    assert lines["train800val200"] == lines["train800"] + lines["val200"]
    labels = [int(x.split()[1]) for x in lines["train800"]]
    assert sorted(labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]        # balanced
    rel = lines["test"][0].split()[0]
    assert Image.open(a / rel).size == (32, 32) and Image.open(a / rel).format == "PNG"
    assert _digest(a) == _digest(b) != _digest(c)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["gen_shape"]   # no temporary folders left


def test_generated_rewrite_replaces_other_arguments_and_reuses_same(tmp_path):
    out = write_generated_vtab(tmp_path, "gen_count", num_train=8, num_val=4, num_test=4)
    stamp = (out / "train800.txt").stat().st_mtime_ns
    assert write_generated_vtab(tmp_path, "gen_count", num_train=8, num_val=4, num_test=4) == out
    assert (out / "train800.txt").stat().st_mtime_ns == stamp                  # reused, not rewritten
    write_generated_vtab(tmp_path, "gen_count", num_train=4, num_val=4, num_test=4, img_size=24)
    assert len((out / "train800.txt").read_text().splitlines()) == 4
    assert not (out / "images" / "train800" / "00007.png").exists()           # nothing stale
    assert Image.open(out / "images" / "test" / "00000.png").size == (24, 24)
    with pytest.raises(ConfigError, match="unknown generated task 'gen_nope'"):
        write_generated_vtab(tmp_path, "gen_nope")
    with pytest.raises(ConfigError, match="num_train 0 must be a positive integer"):
        write_generated_vtab(tmp_path, "gen_count", num_train=0)


def test_every_generated_task_carries_its_label(tmp_path):
    """The label must be visible: a nearest-centroid classifier on simple image statistics, fit on
    train and scored on test, beats chance clearly for every task."""
    def feats(img: np.ndarray, task: str) -> np.ndarray:
        x = img.astype(np.float32) / 255
        bright = (x.max(-1) > 0.3).astype(np.float32)                 # objects on a dark background
        if task == "gen_color":
            return (x * bright[..., None]).sum((0, 1)) / bright.sum()
        if task == "gen_position":
            return bright.reshape(2, 16, 2, 16).sum((1, 3)).ravel()  # mass per quadrant
        if task == "gen_count":
            return np.array([bright.sum()])
        if task == "gen_distance":                                    # extent of the two objects
            ys, xs = np.nonzero(bright)
            return np.array([np.hypot(np.ptp(xs), np.ptp(ys))])
        return np.abs(np.fft.fft2(bright))[:6, :6].ravel()           # shape / texture / orientation

    for task in GENERATED_TASKS:
        d = write_generated_vtab(tmp_path, task, num_train=160, num_val=4, num_test=80)
        data = {}
        for split in ("train800", "test"):
            rows = [ln.split() for ln in (d / f"{split}.txt").read_text().splitlines()]
            data[split] = (np.stack([feats(np.asarray(Image.open(d / p)), task) for p, _ in rows]),
                           np.array([int(y) for _, y in rows]))
        (xtr, ytr), (xte, yte) = data["train800"], data["test"]
        mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
        cent = np.stack([((xtr[ytr == c] - mu) / sd).mean(0) for c in range(4)])
        pred = np.argmin(((((xte - mu) / sd)[:, None, :] - cent[None]) ** 2).sum(-1), axis=1)
        acc = float((pred == yte).mean())
        assert acc > 0.6, f"{task}: nearest-centroid accuracy {acc:.2f}, chance 0.25"


# ------------------------------------------------------------------ VTAB reader, loader, cache
def test_vtab_reader_and_loader_with_a_worker(gen_root):
    cfg = DataConfig(root=str(gen_root), dataset="gen_texture", num_workers=1, batch_size=4)
    ds = build_dataset(cfg, "train800", train=True, img_size=32)
    assert len(ds) == 16 and ds.num_classes == 4 and set(ds.targets) == {0, 1, 2, 3}
    loader = build_loader(cfg, "val200", train=False, img_size=32)
    assert loader.num_workers == 1 and loader.batch_size == cfg.eval_batch_size
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (8,)
    assert -1.01 <= float(x.min()) and float(x.max()) <= 1.01 and float(x.min()) < -0.5  # 0.5/0.5 normalisation
    train = build_loader(cfg, "train800", train=True, img_size=32)
    assert train.batch_size == 4 and len(list(train)) == 4   # all 16 images, last batch kept


def test_decoded_cache_gives_identical_tensors_and_holds_resized_images(gen_root):
    cfg = DataConfig(root=str(gen_root), dataset="gen_texture", num_workers=0)
    plain = build_dataset(cfg, "test", train=False, img_size=48)
    cfg.cache_decoded = True
    cached = build_dataset(cfg, "test", train=False, img_size=48)
    assert plain.cache_bytes == 0 and cached.cache_bytes == 8 * 48 * 48 * 3    # kept after the VTAB resize
    for i in range(len(plain)):
        assert torch.equal(plain[i][0], cached[i][0]) and plain[i][1] == cached[i][1]


def test_transforms_follow_the_paper():
    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 60, 3), dtype=np.uint8))
    vtab = build_transform("vtab", train=True, img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert vtab(img).shape == (3, 32, 32) and torch.equal(vtab(img), vtab(img))   # no augmentation
    assert "bicubic" in repr(vtab.pre).lower()
    fs_train = build_transform("fewshot", train=True, img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    text = repr(fs_train.post)
    assert "RandAugment" in text and "BICUBIC" in text.upper()
    assert "ColorJitter" in text and fs_train.pre is None
    torch.manual_seed(0)
    assert not torch.equal(fs_train(img), fs_train(img))
    fs_eval = build_transform("dg", train=False, img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert fs_eval(img).shape == (3, 32, 32) and "CenterCrop" in repr(fs_eval.pre)


def test_norm_for_reads_the_backbone_config():
    mean, std, size = norm_for(create_backbone("vit_noah_tiny_patch4_32", 3))
    assert mean == (0.5, 0.5, 0.5) and std == (0.5, 0.5, 0.5) and size == 32
    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=2)
    mean, std, size = norm_for(deit)
    assert mean[0] == pytest.approx(0.485) and std[0] == pytest.approx(0.229) and size == 224


# ------------------------------------------------------------------ registry and class counts
def test_registry_knows_vtab_fewshot_dg_and_variants():
    vtab = registry.names("vtab")
    assert len(vtab) == 19 and len(registry.names("fewshot")) == 5 and "imagenet_sketch" in registry.names("dg")
    groups = [registry.vtab_group(n) for n in vtab]
    assert (groups.count("Natural"), groups.count("Specialized"), groups.count("Structured")) == (7, 4, 8)
    assert registry.get("cifar").name == "cifar100" and registry.get("oxford_iiit_pet").num_classes == 37
    assert registry.get("caltech101").num_classes == 102 and registry.get("smallnorb_ele").num_classes == 9
    assert registry.lookup("oxford-flowers102", "fewshot").group == "Few-shot"
    assert registry.lookup("oxford_flowers102", "vtab").group == "Natural"
    assert registry.lookup("food-101", "fewshot").num_classes == 101
    assert registry.lookup("imagenet-adversarial", "dg").num_classes == 1000
    assert "stanford-cars" in registry.candidates("stanford_cars", "fewshot")
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet42'"):
        registry.get("imagenet42")


def test_folder_variant_and_class_count_from_registry(tmp_path):
    src = write_generated_vtab(tmp_path, "gen_color", num_train=8, num_val=4, num_test=4)
    src.rename(tmp_path / "oxford_iiit_pet")  # folder named by a variant
    cfg = DataConfig(root=str(tmp_path), dataset="oxford_pet", num_workers=0)
    assert num_classes(cfg) == 37 and build_dataset(cfg, "val200", train=False, img_size=32).num_classes == 37
    with pytest.raises(ConfigError, match="data.num_classes 10 contradicts the registry: oxford_pet has 37"):
        num_classes(DataConfig(root=str(tmp_path), dataset="oxford_pet", num_classes=10))
    (tmp_path / "mine").mkdir()   # an unknown dataset: the class count comes from its labels
    (tmp_path / "mine" / "a.png").write_bytes(next((tmp_path / "oxford_iiit_pet").rglob("*.png")).read_bytes())
    for s in ("train800val200", "train800"):
        (tmp_path / "mine" / f"{s}.txt").write_text("a.png 0\na.png 6\n")
    assert num_classes(DataConfig(root=str(tmp_path), dataset="mine")) == 7


# ------------------------------------------------------------------ bad input
def _bad(root: Path, lines: str, **kw) -> DataConfig:
    (root / "bad").mkdir(exist_ok=True)
    (root / "bad" / "train800.txt").write_text(lines)
    return DataConfig(root=str(root), dataset="bad", num_classes=4, num_workers=0, **kw)


def test_bad_input_errors_name_file_and_line(tmp_path, gen_root):
    _png(tmp_path / "bad" / "ok.png", gen_root / "gen_texture" / "images" / "train800" / "00000.png")
    cases = [
        ("ok.png 1\nmissing.png 0\n", r"train800.txt:2: image .*missing.png' does not exist"),
        ("ok.png 1\n\nok.png 9\n", r"train800.txt:3: label 9 is out of range 0..3"),
        ("ok.png -1\n", r"train800.txt:1: label -1 is out of range"),
        ("ok.png one\n", r"train800.txt:1: label 'one' is not an integer"),
        ("ok.png\n", r"train800.txt:1: expected 'relative/path label'"),
        ("\n# only a comment\n", r"train800.txt' is empty"),
    ]
    for lines, match in cases:
        with pytest.raises(ConfigError, match=match) as e:
            build_dataset(_bad(tmp_path, lines), "train800", train=True, img_size=32)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"split file .*val200.txt' does not exist"):
        build_dataset(_bad(tmp_path, "ok.png 1\n"), "val200", train=False)
    with pytest.raises(ConfigError, match="data root .* does not exist"):
        build_dataset(DataConfig(root=str(tmp_path / "nope"), dataset="x"), "train800", train=True)
    with pytest.raises(ConfigError, match=r"dataset 'cifar' not found under .*tried cifar, cifar100"):
        build_dataset(DataConfig(root=str(tmp_path), dataset="cifar"), "train800", train=True)
    # labels beyond the registry's class count (a cifar folder with 4-class files is fine, 100+ is not)
    (tmp_path / "bad").rename(tmp_path / "cifar")
    (tmp_path / "cifar" / "train800.txt").write_text("ok.png 3\nok.png 100\n")
    with pytest.raises(ConfigError, match=r"train800.txt:2: label 100 is out of range 0..99"):
        build_dataset(DataConfig(root=str(tmp_path), dataset="cifar"), "train800", train=True)
    with pytest.raises(ConfigError, match="data.num_workers: -1 must be >= 0"):
        JobConfig.from_dict({"data": {"num_workers": -1}})


def test_corrupt_image_error_or_skip_with_count(tmp_path, gen_root, caplog):
    good = gen_root / "gen_texture" / "images" / "train800" / "00000.png"
    _png(tmp_path / "bad" / "ok.png", good)
    (tmp_path / "bad" / "broken.png").write_bytes(b"not an image")
    (tmp_path / "bad" / "cut.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])  # truncated
    cfg = _bad(tmp_path, "ok.png 1\nbroken.png 2\ncut.png 3\n")
    ds = build_dataset(cfg, "train800", train=False, img_size=32)
    with pytest.raises(ConfigError, match=r"broken.png' cannot be decoded .*skip_corrupt: true"):
        ds[1]
    with pytest.raises(ConfigError, match=r"cut.png' cannot be decoded"):
        ds[2]
    cfg.cache_decoded = True
    with pytest.raises(ConfigError, match=r"broken.png' cannot be decoded"):   # the cache decodes up front
        build_dataset(cfg, "train800", train=False, img_size=32)
    cfg.skip_corrupt = True
    with caplog.at_level(logging.WARNING, logger="noah_ray.data.loader"):
        ds = build_dataset(cfg, "train800", train=False, img_size=32)
    assert len(ds) == 1 and len(ds.skipped) == 2 and ds[0][1] == 1 and ds.cache_bytes == 32 * 32 * 3
    assert "skipped 2 corrupt image(s) of 3" in caplog.text
    with pytest.raises(ConfigError, match="no usable images left"):
        build_dataset(_bad(tmp_path, "broken.png 2\n", skip_corrupt=True), "train800", train=False)


# ------------------------------------------------------------------ few-shot, DG, folders
def _fewshot_layout(tmp_path: Path, gen_root: Path) -> Path:
    """NOAH's few-shot layout, with a space in a file name as in its lists."""
    src = gen_root / "gen_texture"
    fs = tmp_path / "food-101"
    (fs / "annotations").mkdir(parents=True)
    for f in (src / "images").rglob("*.png"):
        _png(fs / "images" / f.parent.name / f.name.replace("000", "a b "), f)
    for split, name in (("train800", "train_meta.list.num_shot_2.seed_1"), ("val200", "val_meta.list"),
                        ("test", "test_meta.list")):
        text = (src / f"{split}.txt").read_text().replace("images/", "").replace("000", "a b ")
        (fs / "annotations" / name).write_text(text)
    return fs


def test_fewshot_lists(tmp_path, gen_root):
    _fewshot_layout(tmp_path, gen_root)
    cfg = DataConfig(root=str(tmp_path), dataset="food101", format="fewshot", shots=2, seed=1, num_workers=0)
    train = build_dataset(cfg, cfg.train_split, train=True, img_size=32)       # default split names map too
    assert len(train) == 16 and train.num_classes == 101 and " " in Path(train.samples[0][0]).name
    assert len(build_dataset(cfg, cfg.final_train_split, train=True, img_size=32)) == 16
    assert len(build_dataset(cfg, "val", train=False, img_size=32)) == 8
    test = build_dataset(cfg, cfg.test_split, train=False, img_size=32)
    assert len(test) == 8 and test[0][0].shape == (3, 32, 32)
    with pytest.raises(ConfigError, match="few-shot data needs data.shots"):
        build_dataset(DataConfig(root=str(tmp_path), dataset="food101", format="fewshot"), "train", train=True)
    with pytest.raises(ConfigError, match=r"train_meta.list.num_shot_4.seed_1' does not exist"):
        build_dataset(DataConfig(root=str(tmp_path), dataset="food101", format="fewshot", shots=4, seed=1),
                      "train", train=True)


def test_domain_generalisation_source_and_target_sets(tmp_path, gen_root):
    src = gen_root / "gen_texture"
    inet = tmp_path / "imagenet"
    (inet / "annotations").mkdir(parents=True)
    for split, folder in (("train800", "train"), ("val200", "val")):
        for f in (src / "images" / split).glob("*.png"):
            _png(inet / folder / "n0001" / f.name, f)
    rows = (src / "train800.txt").read_text().replace("images/train800/", "n0001/")
    (inet / "annotations" / "train_meta.list.num_shot_16.seed_0").write_text(rows)
    (inet / "annotations" / "unofficial_val_list_4_shot16seed0").write_text(rows.splitlines()[0] + "\n")
    (inet / "annotations" / "val_meta.list").write_text(
        (src / "val200.txt").read_text().replace("images/val200/", "n0001/").replace(" 3\n", " 999\n"))
    sketch = tmp_path / "imagenet-sketch"
    (sketch / "annotations").mkdir(parents=True)
    for f in (src / "images" / "test").glob("*.png"):
        _png(sketch / "sketch" / "n0001" / f.name, f)
    (sketch / "annotations" / "val_meta.list").write_text(
        (src / "test.txt").read_text().replace("images/test/", "sketch/n0001/"))
    cfg = DataConfig(root=str(tmp_path), dataset="imagenet", format="dg", shots=16, seed=0, num_workers=0,
                     test_split="imagenet-sketch")
    assert num_classes(cfg) == 1000
    assert len(build_dataset(cfg, cfg.train_split, train=True, img_size=32)) == 16
    assert len(build_dataset(cfg, cfg.val_split, train=False, img_size=32)) == 1     # the held-out list
    source_test = build_dataset(cfg, "test", train=False, img_size=32)                # ImageNet val, under val/
    assert len(source_test) == 8 and 999 in source_test.targets and "/val/" in source_test.samples[0][0]
    target = build_dataset(cfg, cfg.test_split, train=False, img_size=32)
    assert len(target) == 8 and "imagenet-sketch" in target.samples[0][0]


def test_class_folder_trees(tmp_path, gen_root):
    img = gen_root / "gen_texture" / "images" / "train800" / "00000.png"
    tree = tmp_path / "mine"
    for split in ("train", "val"):
        for c in ("cat", "dog", "eel"):
            _png(tree / split / c / "a.png", img)
    _png(tree / "train" / "dog" / "sub" / "b.jpeg", img)
    (tree / "train" / "dog" / "notes.txt").write_text("not an image")
    cfg = DataConfig(root=str(tmp_path), dataset="mine", format="folder", train_split="train", num_workers=0)
    assert num_classes(cfg) == 3
    assert build_dataset(cfg, "train", train=True, img_size=32).targets == [0, 1, 1, 2]
    assert build_dataset(cfg, "val", train=False, img_size=32).targets == [0, 1, 2]
    (tree / "val" / "eel").rename(tree / "val" / "emu")
    with pytest.raises(ConfigError, match=r"class folders differ from train's \(e.g. \['eel', 'emu'\]\)"):
        build_dataset(cfg, "val", train=False, img_size=32)
    pets = DataConfig(root=str(tmp_path), dataset="mine", format="folder", train_split="train", num_classes=2)
    with pytest.raises(ConfigError, match="3 class folders but data.num_classes is 2"):
        build_dataset(pets, "train", train=True, img_size=32)


# ------------------------------------------------------------------ object storage
def test_dataset_in_s3_is_staged_once_and_read_like_local(tmp_path, gen_root, s3_bucket, monkeypatch):
    endpoint, bucket = s3_bucket
    monkeypatch.setenv("NOAH_RAY_DATA_CACHE", str(tmp_path / "cache"))
    base = storage.resolve(f"s3://{bucket}/vtab-1k", endpoint)
    src = gen_root / "gen_texture"
    for f in src.rglob("*"):
        if f.is_file() and not f.name.startswith("."):
            storage.write_bytes(base.join("gen-texture", str(f.relative_to(src))), f.read_bytes())
    cfg = DataConfig(root=base.uri, dataset="gen_texture", num_workers=0)
    remote = build_dataset(cfg, "val200", train=False, img_size=32, endpoint=endpoint)
    local = build_dataset(DataConfig(root=str(gen_root), dataset="gen_texture"), "val200", train=False, img_size=32)
    assert remote.targets == local.targets and str(tmp_path / "cache") in remote.samples[0][0]
    assert all(torch.equal(remote[i][0], local[i][0]) for i in range(len(local)))
    staged = Path(remote.samples[0][0])
    mtime = staged.stat().st_mtime_ns
    build_dataset(cfg, "test", train=False, img_size=32, endpoint=endpoint)
    assert staged.stat().st_mtime_ns == mtime          # already there: not copied again
    with pytest.raises(ConfigError, match=r"dataset 'dtd' not found under 's3://"):
        build_dataset(DataConfig(root=base.uri, dataset="dtd"), "test", train=False, endpoint=endpoint)
