"""Known datasets: the 19 VTAB-1k tasks, the 5 few-shot sets, the domain-generalisation sets
(ImageNet and its four shifted test sets), the generated tasks and the mini-VTAB tasks.

Each entry has a canonical name, its class count, its group (VTAB: Natural / Specialized /
Structured) and the folder-name variants seen in the wild, so ``cifar`` and ``cifar100``
or ``oxford_iiit_pet`` and ``oxford_pet`` find the same entry.  Some names exist in two
benchmarks (``oxford_flowers102`` is a VTAB task and a few-shot set); :func:`lookup` takes the
benchmark (``vtab``, ``fewshot``, ``dg``) to choose.
"""

from __future__ import annotations

from dataclasses import dataclass

from noah_ray.errors import ConfigError


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    group: str                     # Natural | Specialized | Structured | Few-shot | Domain generalisation | Generated
    benchmark: str                 # vtab | fewshot | dg | generated | minivtab
    aliases: tuple[str, ...] = ()


VTAB_GROUPS = ("Natural", "Specialized", "Structured")

_ENTRIES = [
    # VTAB-1k Natural
    DatasetInfo("cifar100", 100, "Natural", "vtab", ("cifar", "cifar_100", "vtab_cifar100")),
    DatasetInfo("caltech101", 102, "Natural", "vtab", ("caltech", "caltech_101")),
    DatasetInfo("dtd", 47, "Natural", "vtab", ("dtd47", "describable_textures")),
    DatasetInfo("oxford_flowers102", 102, "Natural", "vtab", ("flowers102", "oxford_flowers", "flowers")),
    DatasetInfo("oxford_pet", 37, "Natural", "vtab", ("oxford_iiit_pet", "oxford_pets", "pets", "pet")),
    DatasetInfo("svhn", 10, "Natural", "vtab", ("svhn_cropped",)),
    DatasetInfo("sun397", 397, "Natural", "vtab", ("sun",)),
    # VTAB-1k Specialized
    DatasetInfo("patch_camelyon", 2, "Specialized", "vtab", ("pcam", "patchcamelyon", "camelyon")),
    DatasetInfo("eurosat", 10, "Specialized", "vtab", ("eurosat_rgb",)),
    DatasetInfo("resisc45", 45, "Specialized", "vtab", ("resisc",)),
    DatasetInfo("diabetic_retinopathy", 5, "Specialized", "vtab",
                ("diabetic_retinopathy_detection", "retinopathy", "dr")),
    # VTAB-1k Structured
    DatasetInfo("clevr_count", 8, "Structured", "vtab", ("clevr_count_all", "clevr_count_all_label")),
    DatasetInfo("clevr_dist", 6, "Structured", "vtab", ("clevr_distance", "clevr_closest_object_distance")),
    DatasetInfo("dmlab", 6, "Structured", "vtab", ()),
    DatasetInfo("kitti", 4, "Structured", "vtab", ("kitti_dist", "kitti_distance", "kitti_closest_vehicle_distance")),
    DatasetInfo("dsprites_loc", 16, "Structured", "vtab", ("dsprites_location", "dsprites_label_x_position")),
    DatasetInfo("dsprites_ori", 16, "Structured", "vtab", ("dsprites_orientation", "dsprites_label_orientation")),
    DatasetInfo("smallnorb_azi", 18, "Structured", "vtab", ("smallnorb_azimuth", "smallnorb_label_azimuth")),
    DatasetInfo("smallnorb_ele", 9, "Structured", "vtab", ("smallnorb_elevation", "smallnorb_label_elevation")),
    # few-shot fine-grained sets (NOAH's annotation lists; folder names as in its data/few-shot)
    DatasetInfo("fgvc_aircraft", 100, "Few-shot", "fewshot", ("aircraft", "fgvcaircraft")),
    DatasetInfo("food101", 101, "Few-shot", "fewshot", ("food_101", "food")),
    DatasetInfo("oxford_flowers102", 102, "Few-shot", "fewshot", ("flowers102", "oxford_flowers", "flowers")),
    DatasetInfo("oxford_pets", 37, "Few-shot", "fewshot", ("oxford_pet", "oxford_iiit_pet", "pets")),
    DatasetInfo("stanford_cars", 196, "Few-shot", "fewshot", ("cars", "stanfordcars", "cars196", "standford_cars")),
    # domain generalisation: train on 16-shot ImageNet, test on shifted sets (labels in ImageNet's 1000)
    DatasetInfo("imagenet", 1000, "Domain generalisation", "dg", ("imagenet_1k", "ilsvrc2012")),
    DatasetInfo("imagenetv2", 1000, "Domain generalisation", "dg", ("imagenet_v2",)),
    DatasetInfo("imagenet_sketch", 1000, "Domain generalisation", "dg", ("sketch",)),
    DatasetInfo("imagenet_adversarial", 1000, "Domain generalisation", "dg", ("imagenet_a",)),
    DatasetInfo("imagenet_rendition", 1000, "Domain generalisation", "dg", ("imagenet_r",)),
    # generated tasks (noah_ray.data.generated)
    DatasetInfo("gen_shape", 4, "Generated", "generated"),
    DatasetInfo("gen_count", 4, "Generated", "generated"),
    DatasetInfo("gen_texture", 4, "Generated", "generated"),
    DatasetInfo("gen_color", 4, "Generated", "generated"),
    DatasetInfo("gen_position", 4, "Generated", "generated"),
    DatasetInfo("gen_orientation", 4, "Generated", "generated"),
    DatasetInfo("gen_distance", 4, "Generated", "generated"),
    # mini-VTAB (noah_ray.data.minivtab): 32x32 tasks in VTAB's groups, written on first use
    DatasetInfo("mv_digits", 10, "Natural", "minivtab"),
    DatasetInfo("mv_photos", 5, "Natural", "minivtab"),
    DatasetInfo("mv_textures", 5, "Natural", "minivtab"),
    DatasetInfo("mv_ihc_stain", 3, "Specialized", "minivtab"),
    DatasetInfo("mv_scientific", 4, "Specialized", "minivtab"),
    DatasetInfo("mv_count", 4, "Structured", "minivtab"),
    DatasetInfo("mv_position", 4, "Structured", "minivtab"),
    DatasetInfo("mv_orientation", 4, "Structured", "minivtab"),
    DatasetInfo("mv_distance", 4, "Structured", "minivtab"),
]


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_").replace(".", "_")


def _index() -> dict[str, list[DatasetInfo]]:
    out: dict[str, list[DatasetInfo]] = {}
    for e in _ENTRIES:
        for n in dict.fromkeys(_norm(x) for x in (e.name, *e.aliases)):
            out.setdefault(n, []).append(e)
    return out


_INDEX = _index()
_FORMAT_BENCHMARK = {"vtab": "vtab", "fewshot": "fewshot", "dg": "dg"}


def lookup(name: str, benchmark: str | None = None) -> DatasetInfo | None:
    """The registry entry for ``name`` or any of its folder-name variants (None if unknown).

    ``benchmark`` (``vtab``, ``fewshot``, ``dg``; a data format name is accepted too) prefers the
    entry of that benchmark where a name exists in several; an exact canonical name wins next."""
    hits = _INDEX.get(_norm(name), [])
    if not hits:
        return None
    bench = _FORMAT_BENCHMARK.get(benchmark or "", benchmark)
    for pick in ([h for h in hits if h.benchmark == bench],
                 [h for h in hits if _norm(h.name) == _norm(name)], hits):
        if pick:
            return pick[0]
    return None


def get(name: str, benchmark: str | None = None) -> DatasetInfo:
    info = lookup(name, benchmark)
    if info is None:
        raise ConfigError(f"unknown dataset {name!r}; use one of {', '.join(dict.fromkeys(e.name for e in _ENTRIES))} "
                          f"(or set data.num_classes for your own data)")
    return info


def names(benchmark: str | None = None) -> list[str]:
    """Canonical names, optionally of one benchmark (``vtab``, ``fewshot``, ``dg``, ``generated``)."""
    return list(dict.fromkeys(e.name for e in _ENTRIES if benchmark is None or e.benchmark == benchmark))


#: benchmarks whose tasks are written locally on first use (VTAB-1k layout)
WRITTEN = ("generated", "minivtab")


def vtab_group(name: str) -> str | None:
    """``Natural`` / ``Specialized`` / ``Structured`` for a VTAB-1k (or mini-VTAB) task name or variant."""
    info = lookup(name, "vtab")
    return info.group if info is not None and info.benchmark in ("vtab", "minivtab") else None


def candidates(name: str, benchmark: str | None = None) -> list[str]:
    """Folder names to try on disk for ``name``: itself, then the registry's variants (each also
    with ``-`` for ``_``), the entry of ``benchmark`` first."""
    out = [name]
    entries = _INDEX.get(_norm(name), [])
    first = lookup(name, benchmark)
    for info in ([first] if first else []) + [e for e in entries if e is not first]:
        for n in (info.name, *info.aliases):
            for v in (n, n.replace("_", "-"), n.replace("_", "")):
                if v not in out:
                    out.append(v)
    return out
