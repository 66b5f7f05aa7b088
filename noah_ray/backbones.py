"""Backbones: timm model names (plus tiny registered test models) and checkpoint loading."""

from __future__ import annotations

import timm
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer

from noah_ray.space import BackboneShape, ConfigError


default_cfgs = generate_default_cfgs({
    "vit_noah_tiny_patch4_32.untrained": {
        "url": "", "num_classes": 10, "input_size": (3, 32, 32), "crop_pct": 1.0,
        "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
        "first_conv": "patch_embed.proj", "classifier": "head"},
})


@register_model
def vit_noah_tiny_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Tiny ViT for tests and the demo: 32x32 images, patch 4, width 48, depth 12, 3 heads."""
    args = dict(img_size=32, patch_size=4, embed_dim=48, depth=12, num_heads=3, mlp_ratio=2.0)
    return _create_vision_transformer("vit_noah_tiny_patch4_32", pretrained=pretrained, **dict(args, **kwargs))


def create_backbone(name: str, num_classes: int, checkpoint: str | None = None, *,
                    endpoint: str | None = None, **kwargs) -> VisionTransformer:
    """A timm ViT with a fresh ``num_classes`` head; ``checkpoint`` (a path, ``file://`` or
    ``s3://`` URI) loads backbone weights.  Nothing is ever downloaded from a hub."""
    if not timm.is_model(name):
        raise ConfigError(f"unknown backbone {name!r}; use a timm ViT name such as "
                          f"vit_base_patch16_224.augreg_in21k or vit_noah_tiny_patch4_32")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"backbone {name!r} is a {type(model).__name__}, not a timm VisionTransformer")
    if checkpoint:
        load_backbone_weights(model, checkpoint, endpoint=endpoint)
    return model


def load_backbone_weights(model: VisionTransformer, uri: str, *, endpoint: str | None = None) -> None:
    """Load backbone weights (the head stays fresh) from a Google ``.npz`` (``ViT-B_16.npz``
    layout, loaded by timm's own converter), a timm ``.pth`` / ``.bin`` or a ``.safetensors`` file."""
    import os
    import tempfile

    import torch

    from noah_ray import storage

    loc = storage.resolve(uri, endpoint)
    if not storage.exists(loc):
        raise ConfigError(f"backbone checkpoint {uri!r} does not exist; check model.checkpoint")
    data = storage.read_bytes(loc)
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    suffix = os.path.splitext(loc.path)[1].lower()
    if suffix == ".npz":
        with tempfile.NamedTemporaryFile(suffix=".npz") as f:
            f.write(data)
            f.flush()
            try:
                model.load_pretrained(f.name)
            except (KeyError, ValueError, RuntimeError) as e:
                raise ConfigError(f"{uri!r} is not a Google ViT .npz for {type(model).__name__} of this size "
                                  f"({type(e).__name__}: {str(e)[:120]}); check model.name") from None
        model.head.load_state_dict(head)
        return
    if suffix == ".safetensors":
        from safetensors.torch import load

        state = load(data)
    else:
        import io

        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling problem is a bad file
            raise ConfigError(f"{uri!r} is not a torch checkpoint ({type(e).__name__}); "
                              f"use .npz, .pth/.bin or .safetensors") from None
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("head.")}
    if "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
        from timm.layers import resample_abs_pos_embed

        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], model.patch_embed.grid_size,
            num_prefix_tokens=0 if model.no_embed_class else model.num_prefix_tokens)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e)[:160])
        raise ConfigError(f"checkpoint {uri!r} does not fit {type(model).__name__} ({first}); "
                          f"check model.name") from None
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise ConfigError(f"checkpoint {uri!r} does not fit {type(model).__name__}: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}; check model.name")


def backbone_shape(model: VisionTransformer) -> BackboneShape:
    blk = model.blocks[0]
    return BackboneShape(embed_dim=model.embed_dim, num_heads=blk.attn.num_heads,
                         depth=len(model.blocks), num_classes=model.num_classes)
