"""Subnet artifacts: :func:`save_subnet` / :func:`load_subnet` write and read one small artifact
directory (``model.safetensors`` + ``meta.json`` via :mod:`noah_ray.store.storage`, local or ``s3://``)
that rebuilds a :class:`~noah_ray.nn.supernet.PromptedViT` on a stock timm backbone.  With
``merge_lora`` the LoRA deltas are folded into the qkv weights, so inference runs a plain timm ViT
plus prompts / adapters.  :func:`load_init_weights` starts a retraining run from one
(``retrain.init``); :func:`model_from_run` rebuilds a job's retrained run.

Artifact tensors: module and head weights under their :class:`PromptedViT` names
(``vit.blocks.3.vpt.prompts``, ``vit.head.weight``); backbone tensors that differ from the
backbone checkpoint (merged qkv weights, a fine-tuned or included backbone) under
``backbone.<timm name>`` (``backbone.blocks.3.attn.qkv.weight``).
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

import torch

from noah_ray.errors import ConfigError
from noah_ray.security import safe_name
from noah_ray.space import LORA, MODULES, SubnetConfig
from noah_ray.space.kinds import PRUNABLE_KINDS
from noah_ray.space.methods import RACED_NOAH
from noah_ray.space.recipes import recorded
from noah_ray.store import storage
from noah_ray.store.layout import JobPaths, retrain_run_id
from noah_ray.store.records import MetaRecord

ARTIFACT_FORMAT = "noah_ray.subnet"
ARTIFACT_VERSION = 1
_BACKBONE = "backbone."


def _fingerprint(vit: Any) -> str:   # a timm ViT: its submodules are read by name
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
    for i in range(model.shape.depth):
        for m in PRUNABLE_KINDS:
            mod = model.module(m, i)
            if getattr(mod, "gate", None) is None:
                continue
            keys = model.state_keys(mod)
            for name, t in mod.folded().items():
                if keys[name] in tensors:
                    tensors[keys[name]] = t


def _module_keys(model, modules: tuple[str, ...]) -> list[str]:
    """State-dict keys of the given prompt modules and of the head."""
    keys = []
    for i in range(model.shape.depth):
        for m in modules:
            mod = model.module(m, i)
            if mod is not None:
                keys += model.state_keys(mod).values()
    keys += model.state_keys(model.vit.head).values()
    return keys


def _merged_qkv(model) -> dict[str, torch.Tensor]:
    """``blocks.i.attn.qkv.weight`` with each layer's LoRA delta added (layers with LoRA only)."""
    out = {}
    with torch.no_grad():
        for i in range(len(model.vit.blocks)):
            lora = model.module(LORA, i)
            if lora is not None and lora.active > 0:
                w = model.qkv_linear(i).weight
                delta = lora.merged_weight_delta().to(torch.float64)
                out[f"blocks.{i}.attn.qkv.weight"] = (w.to(torch.float64) + delta).to(w.dtype)
    return out


def _backbone_tensors(model, full_backbone: bool, merge_lora: bool) -> dict[str, torch.Tensor]:
    """The backbone tensors an artifact stores (by timm name): all of them with ``full_backbone``,
    else those a loaded artifact overrode, plus the merged qkv weights with ``merge_lora``."""
    overrides = tuple(getattr(model, "backbone_overrides", ()))  # set by load_subnet (merged qkv, ...)
    backbone: dict[str, torch.Tensor] = {}
    if full_backbone or overrides:
        plain = model.backbone().state_dict()
        backbone = {k: v for k, v in plain.items() if not k.startswith("head.") and (full_backbone or k in overrides)}
    if merge_lora:
        backbone.update(_merged_qkv(model))
    return backbone


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
    from noah_ray.nn.backbones import is_backbone
    from noah_ray.nn.supernet import PromptedViT

    if not isinstance(model, PromptedViT):
        raise ConfigError(f"save_subnet needs a PromptedViT, got {type(model).__name__}")
    if not is_backbone(model_name):
        raise ConfigError(f"unknown timm model {model_name!r}; give the name the backbone was created with")
    vit = model.vit
    img_size = tuple(int(s) for s in vit.patch_embed.img_size)
    from noah_ray.nn.backbones import shape_of

    expected = shape_of(model_name, vit.num_classes)
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
    tensors.update({_BACKBONE + k: v for k, v in _backbone_tensors(model, full_backbone, merge_lora).items()})
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
    from noah_ray.nn.backbones import create_backbone
    from noah_ray.nn.supernet import PromptedViT

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


def model_from_run(job_path: str, run: str | None = None):
    """The retrained subnet of run ``run`` (e.g. ``noah-seed0``; default: NOAH's seed-0 run, the
    race's survivor ``noahplus-seed0`` when the job raced, else ``noah-seed0``) of the job in
    ``job_path``, with its backbone checkpoint URI and timm model name."""
    from noah_ray.config import JobConfig
    from noah_ray.nn.models import build_model

    if run is not None:                  # a bad name fails before the job file is read
        safe_name(run, "run (the run id from the runs table, e.g. noah-seed0)")
    job = JobConfig.load(job_path)
    paths = JobPaths.of(job)
    if run is None:
        raced = retrain_run_id(RACED_NOAH, 0)
        run = raced if storage.exists(paths.retrain_run(raced).join("final", "meta.json")) else "noah-seed0"
    base = paths.retrain_run(run)
    if not storage.exists(base.join("final", "meta.json")):
        raise ConfigError(f"no finished retrain run {run!r} at {base.uri!r}; run the retrain stage first")
    _, data = storage.load_state(base.join("final"))
    tensors, _ = storage.load_state(base.join("best"))
    meta = MetaRecord.from_dict(data)
    cfg = meta.subnet
    if cfg is None:
        raise ConfigError(f"run {run!r} records no subnet; export a retrain run such as noah-seed0")
    if meta.num_classes is None:
        raise ConfigError(f"run {run!r}: its final/meta.json records no num_classes; retrain the run")
    plan = None
    if meta.prune_plan:  # an e2vpt-pruned run: the kept tokens, pruned segments held at zero
        from noah_ray.nn.prune import PrunePlan, install_gates

        plan = PrunePlan.from_dict(meta.prune_plan)
        cfg = plan.config()
    model = build_model(job, cfg, meta.backbone, int(meta.num_classes),
                        train_backbone=meta.trains_backbone(run), recipe=meta.recipe)
    model.load_trainable_state_dict(tensors)
    if plan is not None:
        install_gates(model, plan)
    return model.eval(), meta.backbone, job.model.name, job.storage_endpoint

