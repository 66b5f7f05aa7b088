"""Backbones: timm model names (plus tiny registered test models) and checkpoint loading."""

from __future__ import annotations

import io
import logging
import math
import pickle
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer

from noah_ray.errors import ConfigError
from noah_ray.space.kinds import BackboneShape

log = logging.getLogger(__name__)


def _packaged(tag: str) -> dict:
    """The pretrained config of a tiny-ViT tag whose weights ship in ``noah_ray/weights/``."""
    return {"file": str(Path(__file__).parents[1] / "weights" / f"vit_noah_tiny_patch4_32.{tag}.safetensors"),
            "num_classes": 0, "input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bicubic",
            "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "first_conv": "patch_embed.proj", "classifier": "head",
            "license": "mit"}


#: pretrained configs of the tiny models; timm's ``register_model`` reads this module's
#: ``default_cfgs`` when :func:`register_tiny_models` registers them (data only: importing
#: this module registers nothing)
default_cfgs = generate_default_cfgs({
    # formula-driven pretraining on IFS fractal categories (python -m noah_ray.nn.pretrain), shipped
    # with the package; not ImageNet weights (no natural image was seen)
    "vit_noah_tiny_patch4_32.fractal": _packaged("fractal"),
    # pretrained on images Debian packages ship (wallpaper photographs, font glyphs) plus fractals
    # (python -m noah_ray.nn.pretrain --source photos:...,glyphs:...,fractals:... --tag shipped)
    "vit_noah_tiny_patch4_32.shipped": _packaged("shipped"),
    "vit_noah_tiny_patch4_32.untrained*": {     # "*" (after the tags with weights):
                                                 # the default without a tag (random init)
        "url": "", "num_classes": 10, "input_size": (3, 32, 32), "crop_pct": 1.0,
        "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
        "first_conv": "patch_embed.proj", "classifier": "head"},
})


def vit_noah_tiny_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Tiny ViT for tests and the demo: 32x32 images, patch 4, width 48, depth 12, 3 heads."""
    args = dict(img_size=32, patch_size=4, embed_dim=48, depth=12, num_heads=3, mlp_ratio=2.0)
    return _create_vision_transformer("vit_noah_tiny_patch4_32", pretrained=pretrained, **dict(args, **kwargs))


#: the timm models this package adds (architecture name -> entry point)
TINY_MODELS: dict[str, Callable[..., VisionTransformer]] = {"vit_noah_tiny_patch4_32": vit_noah_tiny_patch4_32}


def register_tiny_models() -> None:
    """Register :data:`TINY_MODELS` (and their pretrained tags, e.g. ``.fractal``) with timm;
    idempotent.  :func:`create_backbone`, :func:`is_backbone` and the entry points call it."""
    for name, fn in TINY_MODELS.items():
        if not timm.is_model(name):
            register_model(fn)


def is_backbone(name: str) -> bool:
    """Whether ``name`` (with or without a pretrained tag) is a timm model, ours included."""
    register_tiny_models()
    return timm.is_model(name)


def create_backbone(name: str, num_classes: int, checkpoint: str | None = None, *,
                    endpoint: str | None = None, **kwargs) -> VisionTransformer:
    """A timm ViT with a fresh ``num_classes`` head; ``checkpoint`` (a path, ``file://`` or
    ``s3://`` URI) loads backbone weights, else a pretrained tag whose weights ship with a
    package (a local ``file`` in its pretrained config, e.g. ``vit_noah_tiny_patch4_32.fractal``)
    loads those.  Nothing is ever downloaded from a hub."""
    if not is_backbone(name):
        raise ConfigError(f"unknown backbone {name!r}; use a timm ViT name such as "
                          f"vit_base_patch16_224.augreg_in21k or vit_noah_tiny_patch4_32")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"backbone {name!r} is a {type(model).__name__}, not a timm VisionTransformer")
    # shape queries (meta device) skip the file
    if not checkpoint and cast(torch.nn.Parameter, model.pos_embed).device.type != "meta":
        checkpoint = packaged_weights(model)
    if checkpoint:
        load_backbone_weights(model, checkpoint, endpoint=endpoint)
    return model


def packaged_weights(model: VisionTransformer) -> str | None:
    """The local weights file of ``model``'s pretrained tag (None for tags without one)."""
    path = (getattr(model, "pretrained_cfg", None) or {}).get("file")
    if not path:
        return None
    if not Path(path).is_file():
        cfg: Any = model.pretrained_cfg
        raise ConfigError(f"the weights of {cfg.get('architecture')}."
                          f"{cfg.get('tag')} are missing ({path}); "
                          f"reinstall noah_ray or rebuild them with python -m noah_ray.pretrain")
    return path


def load_backbone_weights(model: VisionTransformer, uri: str, *, endpoint: str | None = None) -> None:
    """Load backbone weights into ``model`` (its classifier head stays as it is).

    ``uri`` is a local path, ``file://`` or ``s3://`` URI of a Google ``.npz`` (vit_jax
    ``ViT-B_16.npz`` / ``ViT-L_16.npz`` layout, also big_vision / ``opt/target/`` prefixed), a
    timm / torch ``.pth`` / ``.bin`` state dict (optionally wrapped in ``state_dict`` / ``model``)
    or a ``.safetensors`` file; the format is recognised from the content.  The position
    embedding is resampled when the checkpoint was trained at another resolution.  Anything that
    does not fit raises one :class:`ConfigError` naming the tensor.
    """
    state, source, fmt = read_checkpoint(uri, endpoint=endpoint)
    fit_to_model(model, state, source, uri)
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    log.info("loaded %d backbone tensors from %s (%s)", len(state), uri, fmt)


def read_checkpoint(uri: str, *, endpoint: str | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """A checkpoint as a timm-keyed state dict, a map from each timm key to the tensor's name
    in the file (for error messages) and the detected format (``npz``, ``safetensors``, ``torch``)."""
    from noah_ray.store import storage

    loc = storage.resolve(uri, endpoint)
    if not storage.exists(loc):
        raise ConfigError(f"backbone checkpoint {uri!r} does not exist; check model.checkpoint")
    data = storage.read_bytes(loc)
    fmt = _sniff(data)
    if fmt == "npz":
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            raise ConfigError(f"{uri!r} is not a readable .npz ({type(e).__name__}: {str(e)[:100]})") from None
        state, source = google_to_timm(arrays, where=uri)
        return state, source, fmt
    if fmt == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            state = load(data)
        except (SafetensorError, ValueError) as e:
            raise ConfigError(f"{uri!r} is not a readable .safetensors file ({str(e)[:100]})") from None
    else:
        state = _torch_state(data, uri)
    state = _strip_prefixes(state)
    return state, {k: k for k in state}, fmt


def _sniff(data: bytes) -> str:
    if data[:4] == b"PK\x03\x04":
        try:
            names = zipfile.ZipFile(io.BytesIO(data)).namelist()
        except zipfile.BadZipFile:
            return "torch"
        return "npz" if names and all(n.endswith(".npy") for n in names) else "torch"
    if len(data) > 9 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") < len(data):
        return "safetensors"
    return "torch"


def _torch_state(data: bytes, uri: str) -> dict[str, torch.Tensor]:
    import argparse

    try:  # training scripts (DeiT, MAE, ...) store their argparse.Namespace beside the weights
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            # torch warns about the pickle protocol of legacy files before refusing or reading them: the
            # outcome is this function's one line (or the tensors), never a warning beside it
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported global" in msg or ("Weights only load failed" in msg and "Unsupported operand" not in msg):
            raise ConfigError(f"{uri!r} was refused for safety: it holds Python objects besides tensors, and "
                              f"unpickling them could run code; convert it once where you trust it, e.g. "
                              f"torch.save(torch.load(f, weights_only=False).state_dict(), 'weights.pth') or as "
                              f".safetensors") from None
        raise ConfigError(f"{uri!r} is not a torch checkpoint ({type(e).__name__}); "
                          f"use .npz, .pth/.bin or .safetensors") from None
    except Exception as e:
        raise ConfigError(f"{uri!r} is not a torch checkpoint ({type(e).__name__}); "
                          f"use .npz, .pth/.bin or .safetensors") from None
    for key in ("state_dict", "model", "module", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{uri!r} is not a state dict of tensors; save model.state_dict()")
    return state


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (DDP ``module.``, ``model.``, ``backbone.``) shared by all keys."""
    changed = True
    while changed and state:
        changed = False
        for p in ("module.", "model.", "backbone.", "encoder."):
            if all(k.startswith(p) for k in state):
                state = {k[len(p):]: v for k, v in state.items()}
                changed = True
    return state


# ------------------------------------------------------------------ Google .npz -> timm
@dataclass(frozen=True)
class _NpzLayout:
    """Where a Google ViT ``.npz`` keeps its arrays."""

    prefix: str          # "", "opt/target/", "params/" or "params/img/"
    stacked: bool        # big_vision: one ``encoderblock`` with a leading depth axis
    depth: int
    mha: str             # attention / MLP / second LayerNorm scope names (vit_jax or big_vision)
    mlp: str
    ln2: str

    def block(self, i: int) -> str:
        return "Transformer/encoderblock/" if self.stacked else f"Transformer/encoderblock_{i}/"


def _npz_layout(w: Mapping[str, np.ndarray], where: str) -> _NpzLayout:
    prefix = next((p for p in ("", "opt/target/", "params/", "params/img/") if f"{p}embedding/kernel" in w), None)
    if prefix is None:
        raise ConfigError(f"{where!r} has no 'embedding/kernel' array, so it is not a Google ViT .npz; "
                          f"give a ViT-B_16.npz-style file, a .pth or a .safetensors checkpoint")
    if any("conv_root" in k or "/block1/" in k for k in w):
        raise ConfigError(f"{where!r} is a hybrid ResNet+ViT checkpoint; only plain ViTs (ViT-B_16, ViT-L_16, ...) "
                          f"are supported")
    stacked = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in w
    if stacked:
        depth = int(w[f"{prefix}Transformer/encoderblock/LayerNorm_0/scale"].shape[0])
    else:
        depth = 0
        while f"{prefix}Transformer/encoderblock_{depth}/LayerNorm_0/scale" in w:
            depth += 1
    first = "Transformer/encoderblock/" if stacked else "Transformer/encoderblock_0/"
    if f"{prefix}{first}MlpBlock_3/Dense_0/kernel" in w:  # vit_jax scope names
        return _NpzLayout(prefix, stacked, depth, "MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_2")
    return _NpzLayout(prefix, stacked, depth, "MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_1")


class _Converter:
    """Collects timm-keyed tensors and, per key, the name of the array each came from."""

    def __init__(self, w: Mapping[str, np.ndarray], layout: _NpzLayout, where: str) -> None:
        self.w, self.layout, self.where = w, layout, where
        self.state: dict[str, torch.Tensor] = {}
        self.source: dict[str, str] = {}

    def put(self, key: str, name: str, arr: np.ndarray) -> None:
        self.state[key] = torch.from_numpy(np.ascontiguousarray(np.asarray(arr, dtype=np.float32)))
        self.source[key] = self.layout.prefix + name

    def top(self, key: str, name: str, fn: Callable[[np.ndarray], np.ndarray] = lambda a: a) -> None:
        self.put(key, name, fn(np.asarray(self.w[self.layout.prefix + name], dtype=np.float32)))

    def arr(self, i: int, name: str) -> np.ndarray:
        """Array ``name`` of block ``i`` (sliced out of the stacked array in big_vision files)."""
        full = self.layout.prefix + self.layout.block(i) + name
        try:
            a = self.w[full]
        except KeyError:
            raise ConfigError(f"{self.where!r}: array {full!r} is missing; "
                              f"the file is not a complete Google ViT checkpoint") from None
        return a[i] if self.layout.stacked else a

    def block(self, i: int) -> None:
        """Norms, fused qkv ``(3 D, D)`` from ``(D, heads, head_dim)`` kernels, proj and MLP of block ``i``."""
        L, blk, t = self.layout, self.layout.block(i), f"blocks.{i}."
        mha = L.mha
        for ln, timm_ln in (("LayerNorm_0", "norm1"), (L.ln2, "norm2")):
            for part, suffix in (("scale", "weight"), ("bias", "bias")):
                self.put(t + f"{timm_ln}.{suffix}", blk + f"{ln}/{part}", self.arr(i, f"{ln}/{part}"))
        q, k, v = (self.arr(i, f"{mha}/{n}/kernel") for n in ("query", "key", "value"))
        d = q.shape[0]
        self.put(t + "attn.qkv.weight", blk + f"{mha}/{{query,key,value}}/kernel",
                 np.concatenate([x.reshape(d, -1).T for x in (q, k, v)]))
        self.put(t + "attn.qkv.bias", blk + f"{mha}/{{query,key,value}}/bias",
                 np.concatenate([self.arr(i, f"{mha}/{n}/bias").reshape(-1) for n in ("query", "key", "value")]))
        out = self.arr(i, f"{mha}/out/kernel")
        self.put(t + "attn.proj.weight", blk + f"{mha}/out/kernel", out.reshape(-1, out.shape[-1]).T)
        self.put(t + "attn.proj.bias", blk + f"{mha}/out/bias", self.arr(i, f"{mha}/out/bias"))
        for r in (0, 1):
            dense = f"{L.mlp}/Dense_{r}/"
            self.put(t + f"mlp.fc{r + 1}.weight", blk + dense + "kernel", self.arr(i, dense + "kernel").T)
            self.put(t + f"mlp.fc{r + 1}.bias", blk + dense + "bias", self.arr(i, dense + "bias"))


def google_to_timm(w: Mapping[str, np.ndarray], *, where: str = "npz"
                   ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Convert a Google ViT checkpoint (vit_jax ``ViT-B_16.npz`` / ``ViT-L_16.npz``; big_vision
    layouts with per-block or stacked ``encoderblock`` weights) to timm key names and layouts.

    Returns the state dict (without classifier head or ``pre_logits``) and, per timm key, the name
    of the array it came from.  Query, key and value kernels ``(D, heads, head_dim)`` are fused
    into timm's ``qkv`` ``(3 D, D)``; the output kernel ``(heads, head_dim, D)`` becomes ``proj``.
    """
    layout = _npz_layout(w, where)
    prefix, c = layout.prefix, _Converter(w, layout, where)
    c.top("patch_embed.proj.weight", "embedding/kernel", lambda a: a.transpose(3, 2, 0, 1))
    c.top("patch_embed.proj.bias", "embedding/bias")
    if prefix + "cls" in w:
        c.top("cls_token", "cls")
    pos = next((n for n in ("Transformer/posembed_input/pos_embedding", "pos_embedding") if prefix + n in w), None)
    if pos is None:
        raise ConfigError(f"{where!r} has no position embedding array; it is not a ViT checkpoint")
    c.top("pos_embed", pos, lambda a: a.reshape(1, -1, a.shape[-1]))
    c.top("norm.weight", "Transformer/encoder_norm/scale")
    c.top("norm.bias", "Transformer/encoder_norm/bias")
    for i in range(layout.depth):
        c.block(i)
    if any(k.startswith(prefix + "pre_logits/") for k in w):
        log.info("%s: the pre_logits (representation) layer is not part of timm ViTs and is not loaded", where)
    return c.state, c.source


# ------------------------------------------------------------------ fitting to the model
def _square_prefix(n_tokens: int, preferred: int) -> tuple[int, int] | None:
    """``(num_prefix_tokens, grid_side)`` for a position table of ``n_tokens`` rows."""
    for p in dict.fromkeys((preferred, 1, 0, 5, 4)):
        side = math.isqrt(max(n_tokens - p, 0))
        if n_tokens - p > 0 and side * side == n_tokens - p:
            return p, side
    return None


def fit_to_model(model: VisionTransformer, state: dict[str, torch.Tensor], source: dict[str, str],
                  uri: str) -> None:
    """Drop the classifier, resample ``pos_embed`` and check every tensor against ``model`` (in place)."""
    name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    for k in [k for k in state if k.startswith(("head.", "pre_logits.", "head_drop."))]:
        del state[k]
    own = model.state_dict()
    pos = state.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape:
        want = 0 if model.no_embed_class else model.num_prefix_tokens
        found = _square_prefix(pos.shape[1], want)
        if found is None or found[0] != want or pos.shape[-1] != own["pos_embed"].shape[-1]:
            raise ConfigError(f"checkpoint {uri!r}: {source['pos_embed']} of shape {tuple(pos.shape)} does not fit "
                              f"{name}'s position embedding {tuple(own['pos_embed'].shape)}; check model.name")
        state["pos_embed"] = resample_abs_pos_embed(pos, list(model.patch_embed.grid_size),
                                                    old_size=[found[1], found[1]], num_prefix_tokens=want)
        log.info("%s: resampled the position embedding from %dx%d to %dx%d", uri, found[1], found[1],
                 *model.patch_embed.grid_size)
    for k in own:  # in the model's order
        v = state.get(k)
        if v is not None and tuple(v.shape) != tuple(own[k].shape):
            as_key = "" if source.get(k, k) == k else f" for {k}"
            raise ConfigError(f"checkpoint {uri!r}: {source.get(k, k)} has shape {tuple(v.shape)} but {name} "
                              f"needs {tuple(own[k].shape)}{as_key}; the checkpoint is for another model size, "
                              f"check model.name")
    depth = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    if depth and len(depth) != len(model.blocks):
        raise ConfigError(f"checkpoint {uri!r} has {len(depth)} transformer blocks but {name} has "
                          f"{len(model.blocks)}; check model.name")
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not k.startswith("head.")]
    if unexpected or missing:
        what = (f"unexpected {[source.get(k, k) for k in unexpected[:3]]}" if unexpected else "") + \
               (", " if unexpected and missing else "") + (f"missing {missing[:3]}" if missing else "")
        raise ConfigError(f"checkpoint {uri!r} does not fit {name} ({what}; {len(unexpected)} unexpected, "
                          f"{len(missing)} missing); check model.name")


def backbone_shape(model: VisionTransformer) -> BackboneShape:
    """Width, heads, depth and classes of a ViT whose blocks have one ``attn`` each (timm
    ``Block`` / ``ResPostBlock``); parallel-block ViTs are refused with one line."""
    blk: Any = model.blocks[0]
    if not hasattr(getattr(blk, "attn", None), "num_heads"):
        name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
        raise ConfigError(f"backbone {name} has {type(blk).__name__} blocks (no single attention module); "
                          f"noah_ray supports ViTs with timm Block blocks, e.g. vit_base_patch16_224")
    return BackboneShape(embed_dim=model.embed_dim, num_heads=blk.attn.num_heads,
                         depth=len(model.blocks), num_classes=model.num_classes)


def shape_of(model_name: str, num_classes: int = 1) -> BackboneShape:
    """The :class:`BackboneShape` of a timm ViT by name, built on the meta device (no memory,
    no initialisation)."""
    with torch.device("meta"):
        return backbone_shape(create_backbone(model_name, num_classes))
