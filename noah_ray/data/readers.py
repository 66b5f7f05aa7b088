"""Readers for the on-disk layouts users bring; each returns a list of ``(path, label)``.

- VTAB-1k: ``<root>/<dataset>/{train800,val200,train800val200,test}.txt``, lines
  ``relative/path.jpg label`` (paths relative to the dataset folder).
- Few-shot / domain generalisation (NOAH's lists): ``<root>/<dataset>/annotations/
  train_meta.list.num_shot_K.seed_S``, ``val_meta.list``, ``test_meta.list``; paths relative to
  the dataset folder (or its ``images/`` folder).
- Class-per-folder trees: ``<root>/<dataset>/<split>/<class>/<image>``.

Every problem raises one :class:`ConfigError` naming the file and line.
"""

from __future__ import annotations

from pathlib import Path

from noah_ray.config import DataConfig
from noah_ray.data import registry
from noah_ray.space import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
Sample = tuple[str, int]


def dataset_dir(cfg: DataConfig) -> Path:
    """The dataset folder under ``cfg.root``, trying the registry's folder-name variants."""
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data root {str(root)!r} does not exist; set data.root to your dataset folder")
    for name in registry.candidates(cfg.dataset):
        if (root / name).is_dir():
            return root / name
    raise ConfigError(f"dataset {cfg.dataset!r} not found under {str(root)!r} "
                      f"(tried {', '.join(registry.candidates(cfg.dataset))}); check data.root and data.dataset")


def read_list(list_file: Path, base: Path, *, alt_base: Path | None = None,
              num_classes: int | None = None) -> list[Sample]:
    """Parse ``path label`` lines; paths relative to ``base`` (or ``alt_base``); labels must be
    below ``num_classes`` when given."""
    if not list_file.is_file():
        raise ConfigError(f"split file {str(list_file)!r} does not exist; check data.root / the split name")
    samples: list[Sample] = []
    for lineno, line in enumerate(list_file.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise ConfigError(f"{list_file}:{lineno}: expected 'relative/path label', got {line!r}")
        rel, label = parts
        try:
            y = int(label)
        except ValueError:
            raise ConfigError(f"{list_file}:{lineno}: label {label!r} is not an integer") from None
        if y < 0 or (num_classes is not None and y >= num_classes):
            raise ConfigError(f"{list_file}:{lineno}: label {y} is out of range 0..{(num_classes or 1) - 1}; "
                              f"fix the list or data.num_classes")
        path = base / rel
        if not path.is_file() and alt_base is not None and (alt_base / rel).is_file():
            path = alt_base / rel
        if not path.is_file():
            raise ConfigError(f"{list_file}:{lineno}: image {str(path)!r} does not exist; fix the path or the list")
        samples.append((str(path), y))
    if not samples:
        raise ConfigError(f"split file {str(list_file)!r} is empty; it needs 'path label' lines")
    return samples


def _fewshot_list(cfg: DataConfig, split: str) -> str:
    if split in (cfg.train_split, cfg.final_train_split, "train"):
        if cfg.shots is None:
            raise ConfigError("few-shot data needs data.shots (K of train_meta.list.num_shot_K.seed_S)")
        return f"train_meta.list.num_shot_{cfg.shots}.seed_{cfg.seed}"
    if split in (cfg.val_split, "val"):
        return "val_meta.list"
    if split in (cfg.test_split, "test"):
        return "test_meta.list"
    return split  # a list file name given directly


def read_folder_tree(split_dir: Path) -> tuple[list[Sample], list[str]]:
    if not split_dir.is_dir():
        raise ConfigError(f"split folder {str(split_dir)!r} does not exist; expected <root>/<dataset>/<split>/<class>/")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    samples = [(str(f), i) for i, c in enumerate(classes) for f in sorted((split_dir / c).rglob("*"))
               if f.suffix.lower() in IMAGE_SUFFIXES]
    if not samples:
        raise ConfigError(f"split folder {str(split_dir)!r} holds no images")
    return samples, classes


def read_split(cfg: DataConfig, split: str, num_classes: int | None = None) -> list[Sample]:
    """The samples of ``split`` for the layout in ``cfg.format``."""
    base = dataset_dir(cfg)
    if cfg.format == "vtab":
        name = split if split.endswith(".txt") else f"{split}.txt"
        return read_list(base / name, base, num_classes=num_classes)
    if cfg.format in ("fewshot", "dg"):
        return read_list(base / "annotations" / _fewshot_list(cfg, split), base, alt_base=base / "images",
                         num_classes=num_classes)
    samples, classes = read_folder_tree(base / split)
    train_dir = base / cfg.train_split
    if split != cfg.train_split and train_dir.is_dir():
        _, train_classes = read_folder_tree(train_dir)
        if classes != train_classes:
            raise ConfigError(f"{base / split}: class folders {classes[:5]}... differ from "
                              f"{cfg.train_split}'s; every split needs the same class folders")
    return samples
