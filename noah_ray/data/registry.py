"""Known datasets: the 19 VTAB-1k tasks, the 5 few-shot sets, the generated tasks.

Each entry has a canonical name, its class count, its group (VTAB: Natural / Specialized /
Structured) and the folder-name variants seen in the wild, so ``cifar`` and ``cifar100``
or ``oxford_iiit_pet`` and ``oxford_pet`` find the same entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from noah_ray.space import ConfigError


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    group: str                     # Natural | Specialized | Structured | Few-shot | Generated
    benchmark: str                 # vtab | fewshot | generated
    aliases: tuple[str, ...] = ()


_ENTRIES = [
    # VTAB-1k Natural
    DatasetInfo("cifar100", 100, "Natural", "vtab", ("cifar", "cifar-100", "cifar_100")),
    DatasetInfo("caltech101", 102, "Natural", "vtab", ("caltech", "caltech-101")),
    DatasetInfo("dtd", 47, "Natural", "vtab", ("dtd47",)),
    DatasetInfo("oxford_flowers102", 102, "Natural", "vtab", ("flowers102", "oxford_flowers", "flowers", "oxford-flowers102")),
    DatasetInfo("oxford_pet", 37, "Natural", "vtab", ("oxford_iiit_pet", "oxford_pets", "pets", "oxford-iiit-pet")),
    DatasetInfo("svhn", 10, "Natural", "vtab", ("svhn_cropped",)),
    DatasetInfo("sun397", 397, "Natural", "vtab", ("sun",)),
    # VTAB-1k Specialized
    DatasetInfo("patch_camelyon", 2, "Specialized", "vtab", ("pcam", "patchcamelyon", "patch-camelyon")),
    DatasetInfo("eurosat", 10, "Specialized", "vtab", ("eurosat_rgb",)),
    DatasetInfo("resisc45", 45, "Specialized", "vtab", ("resisc",)),
    DatasetInfo("diabetic_retinopathy", 5, "Specialized", "vtab", ("diabetic_retinopathy_detection", "retinopathy", "dr")),
    # VTAB-1k Structured
    DatasetInfo("clevr_count", 8, "Structured", "vtab", ("clevr-count", "clevr_count_all")),
    DatasetInfo("clevr_dist", 6, "Structured", "vtab", ("clevr-dist", "clevr_closest_object_distance")),
    DatasetInfo("dmlab", 6, "Structured", "vtab", ()),
    DatasetInfo("kitti", 4, "Structured", "vtab", ("kitti_dist", "kitti_closest_vehicle_distance")),
    DatasetInfo("dsprites_loc", 16, "Structured", "vtab", ("dsprites_location", "dsprites-loc", "dsprites_label_x_position")),
    DatasetInfo("dsprites_ori", 16, "Structured", "vtab", ("dsprites_orientation", "dsprites-ori", "dsprites_label_orientation")),
    DatasetInfo("smallnorb_azi", 18, "Structured", "vtab", ("smallnorb_azimuth", "smallnorb-azi", "smallnorb_label_azimuth")),
    DatasetInfo("smallnorb_ele", 9, "Structured", "vtab", ("smallnorb_elevation", "smallnorb-ele", "smallnorb_label_elevation")),
    # few-shot fine-grained sets (NOAH / FGVC few-shot lists)
    DatasetInfo("fgvc_aircraft", 100, "Few-shot", "fewshot", ("fgvc-aircraft", "aircraft")),
    DatasetInfo("food101", 101, "Few-shot", "fewshot", ("food-101", "food")),
    DatasetInfo("oxford_flowers102_fs", 102, "Few-shot", "fewshot", ("oxford-flowers102",)),
    DatasetInfo("oxford_pets_fs", 37, "Few-shot", "fewshot", ("oxford-pets",)),
    DatasetInfo("stanford_cars", 196, "Few-shot", "fewshot", ("stanford-cars", "cars")),
    # generated tasks (noah_ray.data.generated)
    DatasetInfo("gen_shape", 4, "Generated", "generated"),
    DatasetInfo("gen_count", 4, "Generated", "generated"),
    DatasetInfo("gen_texture", 4, "Generated", "generated"),
    DatasetInfo("gen_color", 4, "Generated", "generated"),
]

VTAB_GROUPS = ("Natural", "Specialized", "Structured")


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


_INDEX: dict[str, DatasetInfo] = {}
for _e in _ENTRIES:
    for _n in (_e.name, *_e.aliases):
        _INDEX.setdefault(_norm(_n), _e)


def lookup(name: str) -> DatasetInfo | None:
    """The registry entry for ``name`` or any of its folder-name variants (None if unknown)."""
    return _INDEX.get(_norm(name))


def get(name: str) -> DatasetInfo:
    info = lookup(name)
    if info is None:
        raise ConfigError(f"unknown dataset {name!r}; use one of {', '.join(e.name for e in _ENTRIES)} "
                          f"(or set data.num_classes for your own data)")
    return info


def names(benchmark: str | None = None) -> list[str]:
    return [e.name for e in _ENTRIES if benchmark is None or e.benchmark == benchmark]


def candidates(name: str) -> list[str]:
    """Folder names to try on disk for ``name``: itself, then the registry's variants."""
    info = lookup(name)
    out = [name]
    if info:
        out += [n for n in (info.name, *info.aliases) if n not in out]
        out += [n.replace("_", "-") for n in list(out) if n.replace("_", "-") not in out]
    return out
