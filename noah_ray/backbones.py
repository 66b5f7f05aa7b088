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


def create_backbone(name: str, num_classes: int, checkpoint: str | None = None,
                    **kwargs) -> VisionTransformer:
    """A timm ViT with a fresh ``num_classes`` head; ``checkpoint`` loads backbone weights
    (never downloads)."""
    if not timm.is_model(name):
        raise ConfigError(f"unknown backbone {name!r}; use a timm ViT name such as "
                          f"vit_base_patch16_224 or vit_noah_tiny_patch4_32")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"backbone {name!r} is a {type(model).__name__}, not a timm VisionTransformer")
    if checkpoint:
        load_backbone_weights(model, checkpoint)
    return model


def load_backbone_weights(model: VisionTransformer, path: str) -> None:
    """Load backbone weights (head excluded) from a timm ``.pth`` or ``.safetensors`` file."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise ConfigError(f"checkpoint {path!r} does not fit the backbone: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}; check the model name")


def backbone_shape(model: VisionTransformer) -> BackboneShape:
    blk = model.blocks[0]
    return BackboneShape(embed_dim=model.embed_dim, num_heads=blk.attn.num_heads,
                         depth=len(model.blocks), num_classes=model.num_classes)
