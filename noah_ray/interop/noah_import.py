"""Original NOAH subnet files: reading them (:func:`read_noah_subnet`, the ``RETRAIN`` block),
the 19 VTAB-1k subnets of the original release (:func:`reference_subnet`), and
:func:`import_noah`, which counts the exact trainable parameters of the materialised subnet on a
backbone (ViT-B/16 by default).  No torch at import time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from noah_ray.errors import ConfigError
from noah_ray.space import ADAPTER, LORA, MODULES, VPT, ParamCount, SearchSpace, SubnetConfig, yaml_problem
from noah_ray.space.kinds import BackboneShape
from noah_ray.space.recipes import module_count

DEFAULT_MODEL = "vit_base_patch16_224"
# names used by the original NOAH YAML files
_NOAH_KEYS = {"VISUAL_PROMPT_DIM": VPT, "LORA_DIM": LORA, "ADAPTER_DIM": ADAPTER}


def is_noah_file(text: str) -> bool:
    """Whether YAML ``text`` is an original NOAH subnet file (a mapping with a RETRAIN block)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return isinstance(data, Mapping) and "RETRAIN" in data


def read_noah_subnet(path: str | Path) -> SubnetConfig:
    """Read an original NOAH subnet file, taking its ``RETRAIN`` block.

    The ``SUPERNET`` / ``SEARCH_SPACE`` blocks of those files are stale and ignored.
    ``PREFIX_DIM`` must be all zero (prefix tuning is not part of NOAH's space).
    """
    p = Path(path)
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise ConfigError(f"NOAH subnet file {str(p)!r} {what}; check the path")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a text (UTF-8) file; give a NOAH subnet YAML file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({yaml_problem(e)}); fix the file") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("RETRAIN"), Mapping):
        raise ConfigError(f"{p}: no RETRAIN block; a NOAH subnet file lists per-layer widths under RETRAIN")
    retrain = data["RETRAIN"]
    missing = [k for k in _NOAH_KEYS if k not in retrain]
    if missing:
        raise ConfigError(f"{p}: RETRAIN lacks {', '.join(missing)}; add one width per layer for each")
    prefix = retrain.get("PREFIX_DIM") or []
    if not isinstance(prefix, list) or any(prefix):
        raise ConfigError(f"{p}: RETRAIN.PREFIX_DIM {prefix} is not supported; set it to zeros")
    widths: dict[str, Any] = {}
    for key, module in _NOAH_KEYS.items():
        value = retrain[key]
        if not isinstance(value, list):
            raise ConfigError(f"{p}: RETRAIN.{key} must be a list of per-layer widths, got {value!r}")
        widths[module] = tuple(value)
    try:
        return SubnetConfig(widths)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


@dataclass(frozen=True)
class NoahImport:
    """One original NOAH subnet file, converted and counted."""

    path: str
    subnet: SubnetConfig
    dataset: str | None          # canonical registry name found in the file name
    num_classes: int
    model: str
    count: ParamCount
    space: str                   # "vtab" / "few-shot" (paper spaces containing it) or "custom"
    shot: int | None = None      # few-shot files (``..._shot<K>-seed<S>.yaml``): K and S
    seed: int | None = None
    noah_count: int = 0          # module parameters as NOAH's search counted them (recipes.module_count)


#: the 19 searched VTAB-1k subnets of the original NOAH release, shipped with the package
REFERENCE_DIR = Path(__file__).parents[1] / "reference" / "noah_vtab"


def reference_files() -> list[Path]:
    """The original NOAH VTAB-1k subnet files (``ViT-B_prompt_<dataset>.yaml``), sorted."""
    return sorted(REFERENCE_DIR.glob("ViT-B_prompt_*.yaml"))


def reference_subnet(dataset: str) -> SubnetConfig:
    """The subnet NOAH found for VTAB-1k ``dataset`` (registry names and variants accepted)."""
    from noah_ray.config.datasets import lookup

    info = lookup(dataset)
    found = {dataset_from_filename(p): p for p in reference_files()}
    if info is None or info.name not in found:
        raise ConfigError(f"no NOAH reference subnet for dataset {dataset!r}; use one of "
                          f"{', '.join(sorted(k for k in found if k))}")
    return read_noah_subnet(found[info.name])


_FEWSHOT_RE = re.compile(r"^(?P<stem>.+)_shot(?P<shot>\d+)-seed(?P<seed>\d+)$")


def parse_filename(path: str | Path) -> tuple[str | None, int | None, int | None]:
    """``(dataset, shot, seed)`` named by a NOAH file name: ``ViT-B_prompt_cifar100.yaml`` ->
    ``("cifar100", None, None)``, ``ViT-B_prompt_food-101_shot8-seed0.yaml`` ->
    ``("food101", 8, 0)``.  The dataset is the longest ``_``-separated suffix of the stem the
    registry knows (few-shot files prefer the few-shot benchmark's entry)."""
    from noah_ray.config.datasets import lookup

    stem, shot, seed = Path(path).stem, None, None
    m = _FEWSHOT_RE.match(stem)
    if m:
        stem, shot, seed = m["stem"], int(m["shot"]), int(m["seed"])
    parts = stem.split("_")
    for i in range(len(parts)):
        info = lookup("_".join(parts[i:]), "fewshot" if m else "vtab")
        if info is not None:
            return info.name, shot, seed
    return None, shot, seed


def dataset_from_filename(path: str | Path) -> str | None:
    """The registry dataset named by a NOAH file name (see :func:`parse_filename`)."""
    return parse_filename(path)[0]


def _space_name(cfg: SubnetConfig, fewshot: bool = False) -> str:
    """The paper space a subnet came from: a few-shot file's from the few-shot space (whose
    widths 5 and 10 also fit the VTAB space), any other the first paper space containing it."""
    spaces = {"vtab": SearchSpace.paper_vtab(cfg.num_layers), "few-shot": SearchSpace.paper_fewshot(cfg.num_layers)}
    for name in (["few-shot"] if fewshot else ["vtab", "few-shot"]):
        if spaces[name].contains(cfg):
            return name
    return "custom"


def import_noah(path: str | Path, *, num_classes: int | None = None, model_name: str = DEFAULT_MODEL,
                shape: BackboneShape | None = None) -> NoahImport:
    """Read an original NOAH subnet file and count its parameters on ``model_name``.

    The head size is ``num_classes`` or, when not given, the class count of the dataset named in
    the file name.  Raises :class:`ConfigError` (one line) for a malformed file.
    """
    cfg = read_noah_subnet(path)
    dataset, shot, seed = parse_filename(path)
    if num_classes is None:
        if dataset is None:
            raise ConfigError(f"{path}: cannot tell the dataset (and head size) from the file name; "
                              f"pass --num-classes N")
        from noah_ray.config.datasets import get

        num_classes = get(dataset).num_classes
    if not isinstance(num_classes, int) or num_classes <= 0:
        raise ConfigError(f"num_classes {num_classes!r} must be a positive integer")
    if shape is None:
        from noah_ray.nn.backbones import shape_of

        shape = shape_of(model_name, num_classes)
    shape = BackboneShape(shape.embed_dim, shape.num_heads, shape.depth, num_classes)
    if cfg.num_layers != shape.depth:
        raise ConfigError(f"{path}: {cfg.num_layers} per-layer widths but {model_name} has {shape.depth} "
                          f"layers; give one width per layer")
    space = _space_name(cfg, fewshot=shot is not None)
    max_vpt = (SearchSpace.paper_fewshot() if space == "few-shot" else SearchSpace.paper_vtab()).max_widths()[VPT]
    noah = module_count(cfg, shape, convention="noah", max_vpt=max_vpt)
    return NoahImport(str(path), cfg, dataset, num_classes, model_name, cfg.param_count(shape), space,
                      shot, seed, noah)


def _fmt(n: int) -> str:
    return f"{n:,}"


def format_import(r: NoahImport) -> str:
    """Human-readable block for one imported file."""
    shots = f", {r.shot} shots seed {r.seed}" if r.shot is not None else ""
    head = f"{Path(r.path).name}: {r.dataset or '?'}{shots} ({r.num_classes} classes), {r.model}, space {r.space}"
    lines = [head]
    for m, ws in r.subnet.widths.items():
        lines.append(f"  {m:<9} {_fmt(r.count.per_module[m]):>10}   widths {' '.join(map(str, ws))}")
    lines.append(f"  {'modules':<9} {_fmt(r.count.modules):>10}   ({r.count.modules / 1e6:.4f} M)")
    lines.append(f"  {'noah':<9} {_fmt(r.noah_count):>10}   ({r.noah_count / 1e6:.4f} M, as NOAH's search counted: "
                 f"+{_fmt(r.noah_count - r.count.modules)} dead top-level prompt and position embedding)")
    lines.append(f"  {'head':<9} {_fmt(r.count.head):>10}")
    lines.append(f"  {'total':<9} {_fmt(r.count.total):>10}   ({r.count.total / 1e6:.4f} M)")
    return "\n".join(lines)


def markdown_table(rows: list[NoahImport]) -> str:
    """A Markdown table of imported files (per-module params, modules, head, total)."""
    mods = [m for m in MODULES if any(m in r.subnet.widths for r in rows)]
    head = ["file", "dataset", "classes", *mods, "modules", "modules (M)", "head", "total"]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|"]
    for r in rows:
        cells = [Path(r.path).name, r.dataset or "?", str(r.num_classes),
                 *(_fmt(r.count.per_module.get(m, 0)) for m in mods),
                 _fmt(r.count.modules), f"{r.count.modules / 1e6:.4f}", _fmt(r.count.head), _fmt(r.count.total)]
        out.append("| " + " | ".join(cells) + " |")
    if len(rows) > 1:
        mean = sum(r.count.modules for r in rows) / len(rows)
        cells = [f"mean of {len(rows)}", "", "", *([""] * len(mods)), _fmt(round(mean)), f"{mean / 1e6:.4f}", "", ""]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)

