"""NOAH's few-shot data exactly as its repository lays it out (``data/few-shot/<name>/``):
folders ``fgvc-aircraft``, ``food101``, ``oxford-flowers102``, ``oxford-pets``, ``standford-cars``
(sic) and ``imagenet``; lists in ``annotations/``; images under ``images/`` (Stanford Cars: the
folder itself; ImageNet: ``train/`` for the shot lists and ``unofficial_val_list_4_shot16seed0``,
``val/`` for ``val_meta.list``, its test split; ImageNet has no ``test_meta.list``)."""

from pathlib import Path

import pytest
from PIL import Image

from noah_ray.config import DataConfig
from noah_ray.data.readers import read_split
from noah_ray.errors import ConfigError

FOLDERS = {"fgvc_aircraft": "fgvc-aircraft", "food101": "food101", "oxford_flowers102": "oxford-flowers102",
           "oxford_pets": "oxford-pets", "stanford_cars": "standford-cars"}


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (30, 60, 90)).save(path)


def _list(path: Path, rows: list[tuple[str, int]], image_base: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{rel} {y}\n" for rel, y in rows))
    for rel, _ in rows:
        _image(image_base / rel)


def _fewshot(root: Path, folder: str) -> Path:
    d = root / folder
    base = d if folder == "standford-cars" else d / "images"
    ann = d / "annotations"
    _list(ann / "train_meta.list.num_shot_2.seed_0", [("train/a 1.jpg", 0), ("train/b.jpg", 1)], base)
    _list(ann / "val_meta.list", [("val/c.jpg", 1)], base)
    _list(ann / "test_meta.list", [("test/d.jpg", 0), ("test/e.jpg", 1), ("test/f.jpg", 1)], base)
    return base


def _imagenet(root: Path, held_out: bool = True) -> Path:
    d = root / "imagenet"
    ann = d / "annotations"
    _list(ann / "train_meta.list.num_shot_16.seed_0", [("n01/x1.JPEG", 0), ("n02/x2.JPEG", 1)], d / "train")
    _list(ann / "train_meta.list.num_shot_8.seed_0", [("n01/x1.JPEG", 0)], d / "train")
    if held_out:
        _list(ann / "unofficial_val_list_4_shot16seed0", [("n01/h1.JPEG", 0), ("n02/h2.JPEG", 1)], d / "train")
    _list(ann / "val_meta.list", [("n01/ILSVRC_val_1.JPEG", 0), ("n02/ILSVRC_val_2.JPEG", 1),
                                   ("n02/ILSVRC_val_3.JPEG", 1)], d / "val")
    return d


@pytest.mark.parametrize("dataset", sorted(FOLDERS))
def test_noah_fewshot_folders_read_as_laid_out(tmp_path, dataset):
    base = _fewshot(tmp_path, FOLDERS[dataset])
    cfg = DataConfig(root=str(tmp_path), dataset=dataset, format="fewshot", shots=2, seed=0)
    train = read_split(cfg, cfg.train_split)
    assert [Path(p) for p, _ in train] == [base / "train/a 1.jpg", base / "train/b.jpg"]
    assert [Path(p) for p, _ in read_split(cfg, cfg.val_split)] == [base / "val/c.jpg"]
    assert len(read_split(cfg, cfg.test_split)) == 3


def test_imagenet_fewshot_validates_on_the_held_out_list_and_tests_on_val_meta(tmp_path):
    d = _imagenet(tmp_path)
    for shots in (16, 8):                    # NOAH's loader uses the shot-16 held-out list for every K
        cfg = DataConfig(root=str(tmp_path), dataset="imagenet", format="fewshot", shots=shots, seed=0)
        val = read_split(cfg, cfg.val_split)
        assert [Path(p) for p, _ in val] == [d / "train/n01/h1.JPEG", d / "train/n02/h2.JPEG"]
        test = read_split(cfg, cfg.test_split)
        assert [Path(p).parent.parent for p, _ in test] == [d / "val"] * 3 and len(test) == 3
        assert all(Path(p).parent.parent == d / "train" for p, _ in read_split(cfg, cfg.train_split))
    dg = DataConfig(root=str(tmp_path), dataset="imagenet", format="dg", shots=4, seed=1)
    assert [Path(p).name for p, _ in read_split(dg, dg.val_split)] == ["h1.JPEG", "h2.JPEG"]


def test_validation_never_falls_back_to_the_test_list(tmp_path):
    _imagenet(tmp_path, held_out=False)
    for fmt in ("fewshot", "dg"):
        cfg = DataConfig(root=str(tmp_path), dataset="imagenet", format=fmt, shots=16, seed=0)
        with pytest.raises(ConfigError, match="no held-out validation list .*val_meta.list is the test split") as e:
            read_split(cfg, cfg.val_split)
        assert "\n" not in str(e.value)
        assert len(read_split(cfg, cfg.test_split)) == 3          # the test split still reads
