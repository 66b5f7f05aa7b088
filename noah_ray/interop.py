"""Interop: import original NOAH subnet files, export searched subnets for inference and peft.

* :func:`import_noah` reads an original NOAH subnet YAML (its ``RETRAIN`` block) and counts the
  exact trainable parameters of the materialised subnet on a backbone (ViT-B/16 by default).
* :func:`save_subnet` / :func:`load_subnet` write and read one small artifact directory
  (``model.safetensors`` + ``meta.json`` via :mod:`noah_ray.storage`, local or ``s3://``) that
  rebuilds a :class:`~noah_ray.supernet.PromptedViT` on a stock timm backbone.  With
  ``merge_lora`` the LoRA deltas are folded into the qkv weights, so inference runs a plain timm
  ViT plus prompts / adapters.
* :func:`export_peft` writes the LoRA part (and the head) as a peft LoRA adapter for a stock timm
  ViT; VPT, Adapter and KV prompts cannot be expressed in peft and are reported.  The other
  direction (a peft adapter -> subnet + weights) is :mod:`noah_ray.peft_import`.

Artifact tensors: module and head weights under their :class:`PromptedViT` names
(``vit.blocks.3.vpt.prompts``, ``vit.head.weight``); backbone tensors that differ from the
backbone checkpoint (merged qkv weights, a fine-tuned or included backbone) under
``backbone.<timm name>`` (``backbone.blocks.3.attn.qkv.weight``).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from noah_ray import storage
from noah_ray.recipes import module_count, recorded
from noah_ray.space import (ADAPTER, KV_PROMPT, LORA, MODULES, VPT, BackboneShape, ConfigError, ParamCount,
                            SearchSpace, SubnetConfig)

ARTIFACT_FORMAT = "noah_ray.subnet"
ARTIFACT_VERSION = 1
DEFAULT_MODEL = "vit_base_patch16_224"
_BACKBONE = "backbone."
#: modules peft's LoRA cannot express, with the name printed to users
PEFT_UNSUPPORTED = {VPT: "VPT prompts", ADAPTER: "Adapter", KV_PROMPT: "KV prompts"}


# ============================================================================ import
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
REFERENCE_DIR = Path(__file__).parent / "reference" / "noah_vtab"


def reference_files() -> list[Path]:
    """The original NOAH VTAB-1k subnet files (``ViT-B_prompt_<dataset>.yaml``), sorted."""
    return sorted(REFERENCE_DIR.glob("ViT-B_prompt_*.yaml"))


def reference_subnet(dataset: str) -> SubnetConfig:
    """The subnet NOAH found for VTAB-1k ``dataset`` (registry names and variants accepted)."""
    from noah_ray.data.registry import lookup

    info = lookup(dataset)
    found = {dataset_from_filename(p): p for p in reference_files()}
    if info is None or info.name not in found:
        raise ConfigError(f"no NOAH reference subnet for dataset {dataset!r}; use one of "
                          f"{', '.join(sorted(k for k in found if k))}")
    return SubnetConfig.from_noah_yaml(found[info.name])


_FEWSHOT_RE = re.compile(r"^(?P<stem>.+)_shot(?P<shot>\d+)-seed(?P<seed>\d+)$")


def parse_filename(path: str | Path) -> tuple[str | None, int | None, int | None]:
    """``(dataset, shot, seed)`` named by a NOAH file name: ``ViT-B_prompt_cifar100.yaml`` ->
    ``("cifar100", None, None)``, ``ViT-B_prompt_food-101_shot8-seed0.yaml`` ->
    ``("food101", 8, 0)``.  The dataset is the longest ``_``-separated suffix of the stem the
    registry knows (few-shot files prefer the few-shot benchmark's entry)."""
    from noah_ray.data.registry import lookup

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


def backbone_shape_of(model_name: str, num_classes: int) -> BackboneShape:
    """The :class:`BackboneShape` of a timm ViT (meta device: no memory, no init)."""
    from noah_ray.backbones import shape_of

    return shape_of(model_name, num_classes)


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
    cfg = SubnetConfig.from_noah_yaml(path)
    dataset, shot, seed = parse_filename(path)
    if num_classes is None:
        if dataset is None:
            raise ConfigError(f"{path}: cannot tell the dataset (and head size) from the file name; "
                              f"pass --num-classes N")
        from noah_ray.data.registry import get

        num_classes = get(dataset).num_classes
    if not isinstance(num_classes, int) or num_classes <= 0:
        raise ConfigError(f"num_classes {num_classes!r} must be a positive integer")
    shape = shape or backbone_shape_of(model_name, num_classes)
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


def import_noah_command(args: Any) -> int:
    """``noah-ray import-noah FILE... [--out DIR] [--num-classes N] [--model NAME] [--markdown]``.

    Bad files are reported one line each on stderr and skipped; the exit code is 2 if any was bad.
    """
    import sys

    model_name = getattr(args, "model", None) or DEFAULT_MODEL
    shape = backbone_shape_of(model_name, 1)
    rows: list[NoahImport] = []
    failed = 0
    for f in args.files:
        try:
            rows.append(import_noah(f, num_classes=args.num_classes, model_name=model_name, shape=shape))
        except ConfigError as e:
            print(f"noah-ray: error: {e}", file=sys.stderr)
            failed += 1
    if getattr(args, "markdown", False):
        if rows:
            print(markdown_table(rows))
    else:
        for r in rows:
            print(format_import(r))
    if args.out and rows:
        out = storage.resolve(args.out, getattr(args, "endpoint", None))
        names: dict[str, str] = {}
        for r in rows:
            name = f"{r.dataset or Path(r.path).stem}.yaml"
            if name in names:
                name = f"{Path(r.path).stem}.yaml"
            if name in names:
                raise ConfigError(f"{r.path} and {names[name]} would both be written to {name}; "
                                  f"convert them in separate runs")
            names[name] = r.path
        for name, src in names.items():
            target = out.join(name)
            if not target.is_s3 and os.path.abspath(target.path) == os.path.abspath(src):
                raise ConfigError(f"--out would overwrite the source file {src}; choose another directory")
        for r, name in zip(rows, names):
            storage.write_text(out.join(name), r.subnet.to_yaml())
        print(f"wrote {len(rows)} subnet config(s) to {out.uri}", file=sys.stderr)
    return 1 if failed else 0


# ============================================================================ artifacts
def _fingerprint(vit: torch.nn.Module) -> str:
    """A short hash of backbone tensors that no prompt module changes: tells whether a loaded
    backbone checkpoint is the one the subnet was trained on."""
    h = hashlib.sha256()
    # ``norm`` is an Identity in fc-norm ViTs (e.g. *_gap_*), so its weight may not exist
    for t in (vit.patch_embed.proj.weight, vit.pos_embed, getattr(vit.norm, "weight", None)):
        if t is not None:
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _active_subnet(model) -> Any:
    """``model`` itself when it holds exactly its active subnet, else a standalone extract."""
    if model.active.key() != model.capacity.key():
        sub = model.extract(model.active)
        for attr in ("backbone_overrides", "merged_lora_subnet"):
            if hasattr(model, attr):
                setattr(sub, attr, getattr(model, attr))
        return sub
    return model


def _fold_gates(model, tensors: dict[str, torch.Tensor]) -> None:
    """Multiply fixed pruning gates (non-persistent buffers of VPT / KV prompts) into the saved
    weights, so the artifact needs no gates."""
    names = {id(mod): n for n, mod in model.named_modules()}
    for i in range(model.shape.depth):
        for m in (VPT, KV_PROMPT):
            mod = model.module(m, i)
            gate = getattr(mod, "gate", None)
            if gate is None:
                continue
            if m == VPT:
                key = f"{names[id(mod)]}.prompts"
                t = tensors[key]
                tensors[key] = t * mod.gate_multiplier(gate.detach()[: t.shape[0]]).to(t.dtype)
            else:
                g = mod.gate_multiplier(gate.detach()[: mod.key.shape[1]])
                for part in ("key", "value"):
                    key = f"{names[id(mod)]}.{part}"
                    if key in tensors:
                        tensors[key] = tensors[key] * g.to(tensors[key].dtype)


def _module_keys(model, modules: tuple[str, ...]) -> list[str]:
    """State-dict keys of the given prompt modules and of the head."""
    names = {id(mod): n for n, mod in model.named_modules()}
    keys = []
    for i in range(model.shape.depth):
        for m in modules:
            mod = model.module(m, i)
            if mod is not None:
                keys += [f"{names[id(mod)]}.{k}" for k in mod.state_dict()]
    keys += [f"{names[id(model.vit.head)]}.{k}" for k in model.vit.head.state_dict()]
    return keys


def _merged_qkv(model) -> dict[str, torch.Tensor]:
    """``blocks.i.attn.qkv.weight`` with each layer's LoRA delta added (layers with LoRA only)."""
    out = {}
    with torch.no_grad():
        for i, blk in enumerate(model.vit.blocks):
            lora = model.module(LORA, i)
            if lora is not None and lora.active > 0:
                w = blk.block.attn.attn.qkv.weight
                delta = lora.merged_weight_delta().to(torch.float64)
                out[f"blocks.{i}.attn.qkv.weight"] = (w.to(torch.float64) + delta).to(w.dtype)
    return out


def save_subnet(model, uri: str, *, model_name: str, backbone_checkpoint: str | None = None,
                merge_lora: bool = False, include_backbone: bool = False,
                endpoint: str | None = None) -> storage.Location:
    """Save ``model``'s active subnet as one artifact directory at ``uri`` (path, ``file://`` or
    ``s3://``): ``model.safetensors`` (module + head weights, merged qkv weights with
    ``merge_lora``, the whole backbone with ``include_backbone`` or when the backbone was trained)
    and ``meta.json`` naming the backbone.  Returns the artifact's location.

    ``backbone_checkpoint`` is recorded so :func:`load_subnet` can rebuild the frozen backbone; a
    fingerprint of the backbone weights is recorded too and checked on load.
    """
    import timm

    from noah_ray.supernet import PromptedViT

    if not isinstance(model, PromptedViT):
        raise ConfigError(f"save_subnet needs a PromptedViT, got {type(model).__name__}")
    if not timm.is_model(model_name):
        raise ConfigError(f"unknown timm model {model_name!r}; give the name the backbone was created with")
    vit = model.vit
    img_size = tuple(int(s) for s in vit.patch_embed.img_size)
    expected = backbone_shape_of(model_name, vit.num_classes)
    if expected != model.shape:
        raise ConfigError(f"model_name {model_name!r} has shape {expected} but the model is {model.shape}; "
                          f"give the timm name the backbone was created with")
    model = _active_subnet(model)
    cfg = model.capacity
    state = model.state_dict()
    modules = tuple(m for m in MODULES if not (merge_lora and m == LORA))
    tensors = {k: state[k] for k in _module_keys(model, modules)}
    _fold_gates(model, tensors)
    full_backbone = include_backbone or model.train_backbone
    overrides = tuple(getattr(model, "backbone_overrides", ()))  # set by load_subnet (merged qkv, ...)
    backbone: dict[str, torch.Tensor] = {}
    if full_backbone or overrides:
        plain = model.backbone().state_dict()
        backbone = {k: v for k, v in plain.items() if not k.startswith("head.") and (full_backbone or k in overrides)}
    if merge_lora:
        backbone.update(_merged_qkv(model))
    tensors.update({_BACKBONE + k: v for k, v in backbone.items()})
    if backbone_checkpoint is None and not full_backbone:
        warnings.warn("save_subnet: no backbone_checkpoint recorded; load_subnet will need one "
                      "(or save with include_backbone=True)", stacklevel=2)
    count = cfg.param_count(model.shape, model.kv_shared)
    merged_from = getattr(model, "merged_lora_subnet", None)  # a loaded merged artifact, saved again
    meta = {
        "format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION,
        "model_name": model_name, "num_classes": int(vit.num_classes), "img_size": list(img_size),
        "subnet": merged_from or cfg.to_dict(), "lora_scale": float(model.lora_scale),
        "kv_shared": bool(model.kv_shared), "recipe": model.recipe.to_dict(),
        "backbone_checkpoint": backbone_checkpoint,
        "backbone_fingerprint": _fingerprint(vit), "backbone_included": bool(full_backbone),
        "merged_lora": bool(merge_lora or merged_from),
        "params": {**{m: int(n) for m, n in count.per_module.items()}, "head": int(count.head)},
    }
    loc = storage.resolve(uri, endpoint)
    storage.save_state(loc, tensors, meta)
    return loc


def read_artifact(uri: str, *, endpoint: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of a :func:`save_subnet` artifact (checked)."""
    loc = storage.resolve(uri, endpoint)
    if not storage.exists(loc.join("meta.json")):
        raise ConfigError(f"{loc.uri!r} is not a subnet artifact (no meta.json); give the directory "
                          f"written by save_subnet / noah-ray export")
    tensors, meta = storage.load_state(loc)
    if meta.get("format") != ARTIFACT_FORMAT:
        raise ConfigError(f"{loc.uri!r} holds {meta.get('format') or 'a checkpoint'}, not a subnet artifact; "
                          f"export it with noah-ray export first")
    if int(meta.get("version", 0)) > ARTIFACT_VERSION:
        raise ConfigError(f"{loc.uri!r}: artifact version {meta['version']} is newer than this noah_ray "
                          f"({ARTIFACT_VERSION}); upgrade noah_ray")
    return tensors, meta


def load_subnet(uri: str, *, backbone_checkpoint: str | None = None, endpoint: str | None = None,
                check_backbone: bool = True):
    """Rebuild a saved subnet on a stock timm backbone; returns a :class:`PromptedViT` in eval mode.

    ``backbone_checkpoint`` overrides the recorded one.  When the artifact carries no backbone,
    the loaded backbone's fingerprint must match the recorded one (``check_backbone=False`` skips
    that).  A merged artifact has no LoRA modules: its qkv weights carry the LoRA deltas.
    """
    from noah_ray.backbones import create_backbone
    from noah_ray.supernet import PromptedViT

    tensors, meta = read_artifact(uri, endpoint=endpoint)
    ckpt = backbone_checkpoint or meta.get("backbone_checkpoint")
    included = bool(meta.get("backbone_included"))
    if not ckpt and not included:
        raise ConfigError(f"{uri!r} records no backbone checkpoint; pass backbone_checkpoint= "
                          f"(the weights of {meta['model_name']} the subnet was trained on)")
    vit = create_backbone(meta["model_name"], int(meta["num_classes"]), None if included else ckpt,
                          endpoint=endpoint, img_size=tuple(meta["img_size"]))
    if not included and check_backbone and _fingerprint(vit) != meta.get("backbone_fingerprint"):
        raise ConfigError(f"backbone checkpoint {ckpt!r} is not the one the subnet in {uri!r} was trained on "
                          f"(weights differ); pass the right backbone_checkpoint")
    backbone = {k[len(_BACKBONE):]: v for k, v in tensors.items() if k.startswith(_BACKBONE)}
    own = vit.state_dict()
    bad = sorted(k for k, v in backbone.items() if k not in own or own[k].shape != v.shape)
    if bad:
        raise ConfigError(f"{uri!r}: backbone tensor {bad[0]!r} does not fit {meta['model_name']}; "
                          f"the artifact is damaged or for another model")
    with torch.no_grad():
        vit.load_state_dict(backbone, strict=False)
    cfg = SubnetConfig.from_dict(meta["subnet"])
    if meta.get("merged_lora"):
        cfg = SubnetConfig({**cfg.widths, LORA: (0,) * cfg.num_layers})
    model = PromptedViT(vit, cfg, lora_scale=float(meta["lora_scale"]), kv_shared=bool(meta["kv_shared"]),
                        recipe=recorded(meta))
    model.load_trainable_state_dict({k: v for k, v in tensors.items() if not k.startswith(_BACKBONE)})
    # so that save_subnet(load_subnet(a)) keeps what differs from the backbone checkpoint
    model.backbone_overrides = tuple(sorted(backbone))
    model.merged_lora_subnet = meta["subnet"] if meta.get("merged_lora") else None
    return model.eval()


def check_init_artifact(uri: str, *, model_name: str, subnet: SubnetConfig, num_classes: int,
                        endpoint: str | None = None) -> dict:
    """The meta of the artifact ``retrain.init`` names, checked against what retraining builds
    (the timm model, the subnet, the head size); one :class:`ConfigError` otherwise."""
    loc = storage.resolve(uri, endpoint)
    if not storage.exists(loc.join("meta.json")):
        raise ConfigError(f"retrain.init {uri!r} is not a subnet artifact (no meta.json); give a directory "
                          f"written by noah-ray import-peft or export --out")
    import json

    meta = json.loads(storage.read_text(loc.join("meta.json")))
    got = SubnetConfig.from_dict(meta.get("subnet") or {"widths": {}})
    checks = (("model", meta.get("model_name"), model_name), ("subnet", got.to_json(), subnet.to_json()),
              ("num_classes", meta.get("num_classes"), num_classes), ("merged_lora", meta.get("merged_lora"), False))
    for what, have, want in checks:
        if have != want:
            raise ConfigError(f"retrain.init {uri!r} has {what} {str(have)[:80]}, retraining needs "
                              f"{str(want)[:80]}; import or export the artifact for this job")
    return meta


def load_init_weights(model, uri: str, *, endpoint: str | None = None) -> None:
    """Start ``model`` from a subnet artifact's module and head weights (``retrain.init``): the
    backbone fingerprint must match, a different ``lora_scale`` is folded into LoRA's ``B``."""
    tensors, meta = read_artifact(uri, endpoint=endpoint)
    if meta.get("backbone_fingerprint") != _fingerprint(model.vit):
        raise ConfigError(f"retrain.init {uri!r} was made on other backbone weights than model.checkpoint; "
                          f"import it with --backbone-checkpoint set to the job's backbone")
    ratio = float(meta["lora_scale"]) / float(model.lora_scale)
    own = {k: v for k, v in tensors.items() if not k.startswith(_BACKBONE)}
    if ratio != 1.0:
        own = {k: v * ratio if k.endswith(".lora_B") else v for k, v in own.items()}
    model.load_trainable_state_dict(own)


# ============================================================================ peft
@dataclass(frozen=True)
class PeftExport:
    """What :func:`export_peft` wrote and what it could not represent."""

    uri: str
    ranks: dict[str, int]                      # target module -> LoRA rank
    unsupported: dict[str, list[int]] = field(default_factory=dict)  # module -> layers left out

    def describe(self) -> str:
        lines = [f"wrote a peft LoRA adapter ({len(self.ranks)} qkv layers, ranks "
                 f"{' '.join(str(r) for r in self.ranks.values())}) and the head to {self.uri}"]
        for m, layers in self.unsupported.items():
            lines.append(f"not in the peft adapter (peft cannot represent it): {PEFT_UNSUPPORTED[m]} "
                         f"in layers {','.join(map(str, layers))}")
        return "\n".join(lines)


def _clean_number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _timm_name(vit: torch.nn.Module) -> str | None:
    """The timm architecture a ViT was created as (its pretrained_cfg); the weights' tag is left
    out, the backbone checkpoint decides them."""
    return (getattr(vit, "pretrained_cfg", None) or {}).get("architecture")


def export_peft(model, uri: str, *, include_head: bool = True, endpoint: str | None = None,
                model_name: str | None = None) -> PeftExport:
    """Write the LoRA part of ``model``'s active subnet as a peft LoRA adapter at ``uri``.

    ``target_modules`` are the ``blocks.N.attn.qkv`` layers with LoRA, ``rank_pattern`` /
    ``alpha_pattern`` reproduce each layer's rank and the scale (``alpha = scale * rank``); the
    head is saved as a peft ``modules_to_save`` module.  Load with
    ``PeftModel.from_pretrained(timm.create_model(name, num_classes=...), dir)`` on the same
    backbone weights.  ``adapter_config.json`` names the base model (``base_model_name_or_path``:
    ``model_name``, default the timm name the backbone was created with).  VPT, Adapter and KV
    prompts have no peft equivalent: they are left out, a warning names them and the returned
    :class:`PeftExport` lists them.  :func:`noah_ray.peft_import.import_peft` reads it back.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("peft is not installed; install it (pip install peft) to export peft adapters") from None
    from noah_ray.supernet import PromptedViT

    if not isinstance(model, PromptedViT):
        raise ConfigError(f"export_peft needs a PromptedViT, got {type(model).__name__}")
    model = _active_subnet(model)
    cfg = model.capacity
    ranks = {f"blocks.{i}.attn.qkv": r for i, r in enumerate(cfg.layer_widths(LORA)) if r}
    if not ranks:
        raise ConfigError("the subnet has no LoRA layers, so there is nothing to export to peft")
    unsupported = {m: [i for i, w in enumerate(cfg.layer_widths(m)) if w]
                   for m in PEFT_UNSUPPORTED if any(cfg.layer_widths(m))}
    if model.train_backbone:
        warnings.warn("export_peft: the backbone was trained; the peft adapter holds only LoRA and head "
                      "weights, load it on the trained backbone", stacklevel=2)
    scale = float(model.lora_scale)
    top = max(ranks.values())
    peft_cfg = LoraConfig(r=top, lora_alpha=_clean_number(scale * top), target_modules=list(ranks),
                          rank_pattern=dict(ranks), alpha_pattern={k: _clean_number(scale * r) for k, r in ranks.items()},
                          lora_dropout=float(model.recipe.lora_dropout), bias="none",
                          modules_to_save=["head"] if include_head else None)
    base = model.backbone()
    base.name_or_path = model_name or _timm_name(model.vit)   # peft records it as base_model_name_or_path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(base, peft_cfg)
    with torch.no_grad():
        for name in ranks:
            i = int(name.split(".")[1])
            lora = model.module(LORA, i)
            layer = pm.base_model.model.blocks[i].attn.qkv
            if layer.scaling["default"] != scale:
                raise ConfigError(f"peft computes scale {layer.scaling['default']} for {name}, expected {scale}")
            layer.lora_A["default"].weight.copy_(lora.lora_A)
            layer.lora_B["default"].weight.copy_(lora.lora_B)
    loc = storage.resolve(uri, endpoint)
    with tempfile.TemporaryDirectory(prefix="noah-peft-") as tmp:
        # a ViT has no embedding layer to save; "auto" would look the base model up on the Hugging Face Hub
        pm.save_pretrained(tmp, save_embedding_layers=False)
        for f in sorted(os.listdir(tmp)):
            storage.write_bytes(loc.join(f), Path(tmp, f).read_bytes())
    result = PeftExport(loc.uri, ranks, unsupported)
    if unsupported:
        warnings.warn("export_peft: " + "; ".join(result.describe().splitlines()[1:]), stacklevel=2)
    return result


# ============================================================================ CLI export
_RUN_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def model_from_run(job_path: str, run: str):
    """The retrained subnet of run ``run`` (e.g. ``noah-seed0``) of the job in ``job_path``, with
    its backbone checkpoint URI and timm model name."""
    from noah_ray.config import JobConfig
    from noah_ray.train import build_model, job_root

    if not _RUN_RE.match(run):
        raise ConfigError(f"run name {run!r} is not valid; use the run id from the runs table, e.g. noah-seed0")
    job = JobConfig.load(job_path)
    base = job_root(job).join("retrain", run)
    if not storage.exists(base.join("final", "meta.json")):
        raise ConfigError(f"no finished retrain run {run!r} at {base.uri!r}; run the retrain stage first")
    _, meta = storage.load_state(base.join("final"))
    tensors, _ = storage.load_state(base.join("best"))
    subnet = meta.get("subnet")
    cfg = SubnetConfig.from_json(subnet) if subnet else None
    if cfg is None:
        raise ConfigError(f"run {run!r} records no subnet; export a retrain run such as noah-seed0")
    plan = None
    if meta.get("prune_plan"):  # an e2vpt-pruned run: the kept tokens, pruned segments held at zero
        from noah_ray.prune import PrunePlan, install_gates

        plan = PrunePlan.from_dict(meta["prune_plan"])
        cfg = plan.config()
    model = build_model(job, cfg, meta["backbone"], int(meta["num_classes"]),
                        train_backbone=run.startswith("full-"), recipe=recorded(meta))
    model.load_trainable_state_dict(tensors)
    if plan is not None:
        install_gates(model, plan)
    return model.eval(), meta["backbone"], job.model.name, job.storage_endpoint


def export_command(args: Any) -> int:
    """``noah-ray export SOURCE [--run RUN] [--out URI] [--merge-lora] [--peft DIR]``."""
    import sys

    if not args.out and not args.peft:
        raise ConfigError("nothing to do; give --out URI (subnet artifact) and/or --peft DIR (peft adapter)")
    src = args.source
    artifact = not src.endswith((".yaml", ".yml"))
    meta: dict = {}
    if not artifact:
        model, ckpt, model_name, endpoint = model_from_run(src, args.run)
        endpoint = args.endpoint or endpoint
    else:
        endpoint = args.endpoint
        _, meta = read_artifact(src, endpoint=endpoint)
        if args.peft and meta.get("merged_lora"):
            raise ConfigError(f"{src!r} has its LoRA merged into the qkv weights; export peft from the job run "
                              f"or an unmerged artifact")
        model = load_subnet(src, endpoint=endpoint)
        ckpt, model_name = meta.get("backbone_checkpoint"), meta["model_name"]
    if args.out:
        include = args.include_backbone or bool(meta.get("backbone_included"))
        loc = save_subnet(model, args.out, model_name=model_name, backbone_checkpoint=ckpt,
                          merge_lora=args.merge_lora, include_backbone=include, endpoint=endpoint)
        print(f"wrote subnet artifact to {loc.uri}" + (" (LoRA merged into qkv)" if args.merge_lora else ""))
    if args.peft:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = export_peft(model, args.peft, endpoint=endpoint, model_name=model_name)
        print(res.describe())
    sys.stdout.flush()
    return 0
