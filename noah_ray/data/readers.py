"""Readers for the on-disk layouts users bring; each returns a list of ``(path, label)``.

- VTAB-1k: ``<root>/<dataset>/{train800,val200,train800val200,test}.txt``, lines
  ``relative/path.jpg label`` (paths relative to the dataset folder).
- Few-shot (NOAH's lists, as its repository ships them under ``data/few-shot/``: folders
  ``fgvc-aircraft``, ``food101``, ``oxford-flowers102``, ``oxford-pets``, ``standford-cars`` (sic),
  ``imagenet``): ``<root>/<dataset>/annotations/train_meta.list.num_shot_K.seed_S``,
  ``val_meta.list``, ``test_meta.list``; images under ``images/`` (Stanford Cars: the dataset
  folder itself; ImageNet: ``train/`` for the shot lists and the held-out list, ``val/`` for
  ``val_meta.list``).  Without ``test_meta.list`` (ImageNet) ``val_meta.list`` is the test split
  and validation reads NOAH's held-out ``unofficial_val_list_4_shot{K}seed{S}`` (else its
  ``..._shot16seed0``, which NOAH uses for every shot count); with neither, it refuses.
- Domain generalisation: the source set (ImageNet) as few-shot lists, validated as above;
  a target set is read by naming its folder as the split (e.g. ``test_split: imagenet-sketch``
  reads ``<root>/imagenet-sketch/annotations/val_meta.list``, or ``test_meta.list``).
- Class-per-folder trees: ``<root>/<dataset>/<split>/<class>/<image>``.

``root`` may be ``s3://bucket/prefix``: the dataset folder is then copied once to a local cache
(``$NOAH_RAY_DATA_CACHE``, default ``~/.cache/noah_ray/data``; files already there with the same
size are kept) and read from there.  Nothing is ever downloaded from the internet.

Every problem raises one :class:`ConfigError` naming the file and line.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from noah_ray.config import DataConfig
from noah_ray.config import datasets as registry
from noah_ray.errors import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
Sample = tuple[str, int]


# ------------------------------------------------------------------ locating the dataset folder
def dataset_dir(cfg: DataConfig, name: str | None = None, *, endpoint: str | None = None) -> Path:
    """The local folder of dataset ``name`` (default ``cfg.dataset``) under ``cfg.root``, trying the
    registry's folder-name variants; an ``s3://`` root is staged to the local cache first."""
    name = name or cfg.dataset
    tried = registry.candidates(name, cfg.format)
    if str(cfg.root).startswith("s3://"):
        return _stage_from_s3(cfg.root, name, tried, endpoint)
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data root {str(root)!r} does not exist; set data.root to your dataset folder")
    for folder in tried:
        if (root / folder).is_dir():
            return root / folder
    raise ConfigError(f"dataset {name!r} not found under {str(root)!r} (tried {', '.join(tried[:8])}); "
                      f"check data.root and data.dataset")


def data_cache_dir() -> Path:
    return Path(os.environ.get("NOAH_RAY_DATA_CACHE", "~/.cache/noah_ray/data")).expanduser()


def _stage_from_s3(root_uri: str, name: str, tried: list[str], endpoint: str | None) -> Path:
    import pyarrow.fs as pafs

    from noah_ray.store import storage

    root = storage.resolve(root_uri, endpoint)
    try:
        found = next((root.join(f) for f in tried
                      if root.fs.get_file_info(root.join(f).path).type == pafs.FileType.Directory), None)
    except OSError as e:
        raise ConfigError(f"data root {root_uri!r} cannot be listed ({str(e).splitlines()[0][:120]}); "
                          f"check the bucket, endpoint and credentials") from None
    if found is None:
        raise ConfigError(f"dataset {name!r} not found under {root_uri!r} (tried {', '.join(tried[:8])}); "
                          f"check data.root and data.dataset")
    local = data_cache_dir() / hashlib.sha1(found.uri.encode()).hexdigest()[:16] / posixpath.basename(found.path)
    local.mkdir(parents=True, exist_ok=True)
    with open(local.parent / ".lock", "w") as lock:  # one copier per machine; the others wait, then find it done
        fcntl.flock(lock, fcntl.LOCK_EX)
        infos = found.fs.get_file_info(pafs.FileSelector(found.path, recursive=True))
        todo = []
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            dst = local / _cache_relpath(info.path, found.path, found.uri)
            if not (dst.is_file() and dst.stat().st_size == info.size):
                todo.append((info.path, dst))

        def fetch(item: tuple[str, Path]) -> None:
            src, dst = item
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.part-{os.getpid()}")
            with found.fs.open_input_stream(src) as f:
                tmp.write_bytes(f.read())
            tmp.replace(dst)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(fetch, todo))
    return local


def _cache_relpath(key: str, prefix: str, uri: str) -> str:
    """The object's path below the dataset prefix, refused when it could leave the cache folder."""
    rel = key[len(prefix):].lstrip("/") if key.startswith(prefix) else key
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") for p in parts) or "\\" in rel:
        raise ConfigError(f"object {key!r} under {uri!r} has a '.', '..' or empty path segment and is not "
                          f"copied (it would land outside the data cache); rename or delete it")
    return rel


# ------------------------------------------------------------------ list files
def read_list(list_file: Path, bases: Path | list[Path], *, num_classes: int | None = None) -> list[Sample]:
    """Parse ``path label`` lines (paths may contain spaces); each path is relative to the first of
    ``bases`` where it exists; labels must be below ``num_classes`` when given."""
    bases = [bases] if isinstance(bases, Path) else list(bases)
    if not list_file.is_file():
        raise ConfigError(f"split file {str(list_file)!r} does not exist; check data.root / the split name")
    samples: list[Sample] = []
    base = bases[0]
    try:
        text = list_file.read_text()
    except UnicodeDecodeError:
        raise ConfigError(f"split file {str(list_file)!r} is not a text file of 'path label' lines") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
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
        if not path.is_file():
            base = next((b for b in bases if (b / rel).is_file()), base)
            path = base / rel
        if not path.is_file():
            raise ConfigError(f"{list_file}:{lineno}: image {str(path)!r} does not exist; fix the path or the list")
        samples.append((str(path), y))
    if not samples:
        raise ConfigError(f"split file {str(list_file)!r} is empty; it needs 'path label' lines")
    return samples


_TRAIN_NAMES = ("train", "train800", "train800val200", "trainval")
_VAL_NAMES = ("val", "val200", "validation")


def _annotation_file(cfg: DataConfig, base: Path, split: str) -> Path:
    """The annotation list of ``split`` for few-shot / DG data."""
    ann = base / "annotations"
    if (ann / split).is_file():                                     # a list file named directly
        return ann / split
    if split in (cfg.train_split, cfg.final_train_split, *_TRAIN_NAMES):
        if cfg.shots is None:
            raise ConfigError("few-shot data needs data.shots (K of train_meta.list.num_shot_K.seed_S)")
        return ann / f"train_meta.list.num_shot_{cfg.shots}.seed_{cfg.seed}"
    has_test = (ann / "test_meta.list").is_file()
    if split in (cfg.val_split, *_VAL_NAMES):
        return ann / "val_meta.list" if has_test else _held_out(cfg, ann)
    if split in (cfg.test_split, "test"):  # ImageNet has no test_meta.list: its val_meta.list is the test split
        return ann / "test_meta.list" if has_test else ann / "val_meta.list"
    raise ConfigError(f"split {split!r} is not a list in {str(ann)!r}; use train / val / test, a file name "
                      f"in annotations/ or (domain generalisation) a target dataset folder")


def _held_out(cfg: DataConfig, ann: Path) -> Path:
    """Validation where ``val_meta.list`` is the test split (ImageNet): NOAH's held-out part of the
    train set, ``unofficial_val_list_4_shot{K}seed{S}``, else the ``shot16seed0`` list NOAH's
    loader uses for every shot count.  Never the test list."""
    for name in (f"unofficial_val_list_4_shot{cfg.shots}seed{cfg.seed}", "unofficial_val_list_4_shot16seed0"):
        if (ann / name).is_file():
            return ann / name
    raise ConfigError(f"{str(ann)!r} has no held-out validation list (its val_meta.list is the test split, "
                      f"test_meta.list is absent); add unofficial_val_list_4_shot16seed0 or set data.val_split "
                      f"to a held-out list file in annotations/")


def _target_domain(cfg: DataConfig, split: str) -> Path | None:
    """For DG data: the folder of target set ``split`` (a sibling of the source set), if it is one."""
    if cfg.format != "dg" or split in (cfg.train_split, cfg.final_train_split, cfg.val_split,
                                       *_TRAIN_NAMES, *_VAL_NAMES, "test"):
        return None
    try:
        folder = dataset_dir(cfg, split)
    except ConfigError:
        return None
    return folder if folder != dataset_dir(cfg) else None


# ------------------------------------------------------------------ folders of classes
def read_folder_tree(split_dir: Path) -> tuple[list[Sample], list[str]]:
    """Images under ``split_dir/<class>/`` (recursively), labelled by the sorted class folder names."""
    if not split_dir.is_dir():
        raise ConfigError(f"split folder {str(split_dir)!r} does not exist; expected <root>/<dataset>/<split>/<class>/")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    samples = [(str(f), i) for i, c in enumerate(classes) for f in sorted((split_dir / c).rglob("*"))
               if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()]
    if not samples:
        raise ConfigError(f"split folder {str(split_dir)!r} holds no images in class folders")
    return samples, classes


# ------------------------------------------------------------------ entry point
def split_source(cfg: DataConfig, split: str, *, endpoint: str | None = None) -> tuple[Path, list[Path]]:
    """``(list file or split folder, bases for relative paths)`` of ``split``."""
    if cfg.format == "folder":
        base = dataset_dir(cfg, endpoint=endpoint)
        return base / split, [base]
    target = _target_domain(cfg, split) if cfg.format == "dg" else None
    if target is not None:
        ann = target / "annotations"
        name = "test_meta.list" if (ann / "test_meta.list").is_file() else "val_meta.list"
        return ann / name, [target, target / "images", target / "val"]
    base = dataset_dir(cfg, endpoint=endpoint)
    if cfg.format == "vtab":
        return base / (split if split.endswith(".txt") else f"{split}.txt"), [base]
    lst = _annotation_file(cfg, base, split)
    from_train = lst.name.startswith(("train", "unofficial_val"))  # ImageNet: train lists under train/, others val/
    sub = ["train", "val"] if from_train else ["val", "train"]
    return lst, [base, base / "images", *(base / d for d in sub)]


def read_split(cfg: DataConfig, split: str, num_classes: int | None = None, *,
               endpoint: str | None = None) -> list[Sample]:
    """The samples of ``split`` for the layout in ``cfg.format``."""
    src, bases = split_source(cfg, split, endpoint=endpoint)
    if cfg.format != "folder":
        return read_list(src, bases, num_classes=num_classes)
    samples, classes = read_folder_tree(src)
    train_dir = bases[0] / cfg.train_split
    if split != cfg.train_split and train_dir.is_dir():
        _, train_classes = read_folder_tree(train_dir)
        if classes != train_classes:
            extra = sorted(set(classes) ^ set(train_classes))[:3]
            raise ConfigError(f"{src}: class folders differ from {cfg.train_split}'s (e.g. {extra}); "
                              f"every split needs the same class folders")
    if num_classes is not None and len(classes) > num_classes:
        raise ConfigError(f"{src}: {len(classes)} class folders but data.num_classes is {num_classes}; fix one")
    return samples


def folder_classes(cfg: DataConfig, *, endpoint: str | None = None) -> list[str]:
    """Class names of a class-per-folder dataset (from its train split)."""
    return read_folder_tree(dataset_dir(cfg, endpoint=endpoint) / cfg.train_split)[1]
