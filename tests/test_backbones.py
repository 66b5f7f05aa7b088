"""Backbone checkpoints: Google .npz, timm .pth, .safetensors, local and s3://; logits match."""

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from noah_ray import storage
from noah_ray.backbones import create_backbone
from noah_ray.space import ConfigError

MODEL = "vit_noah_tiny_patch4_32"


def write_google_npz(model, path) -> None:
    """Write a timm ViT in the layout of Google's ``ViT-B_16.npz`` (vit_jax)."""
    t = lambda x: x.detach().numpy()  # noqa: E731
    d = model.embed_dim
    h = model.blocks[0].attn.num_heads
    w = {"embedding/kernel": t(model.patch_embed.proj.weight.permute(2, 3, 1, 0)),
         "embedding/bias": t(model.patch_embed.proj.bias), "cls": t(model.cls_token),
         "Transformer/posembed_input/pos_embedding": t(model.pos_embed),
         "Transformer/encoder_norm/scale": t(model.norm.weight), "Transformer/encoder_norm/bias": t(model.norm.bias)}
    for i, blk in enumerate(model.blocks):
        p = f"Transformer/encoderblock_{i}/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = t(blk.norm1.weight), t(blk.norm1.bias)
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = t(blk.norm2.weight), t(blk.norm2.bias)
        qkv_w, qkv_b = blk.attn.qkv.weight.chunk(3), blk.attn.qkv.bias.chunk(3)
        for name, wt, b in zip(("query", "key", "value"), qkv_w, qkv_b):
            w[p + f"MultiHeadDotProductAttention_1/{name}/kernel"] = t(wt.T.reshape(d, h, d // h))
            w[p + f"MultiHeadDotProductAttention_1/{name}/bias"] = t(b.reshape(h, d // h))
        w[p + "MultiHeadDotProductAttention_1/out/kernel"] = t(blk.attn.proj.weight.reshape(d, h, d // h).permute(1, 2, 0))
        w[p + "MultiHeadDotProductAttention_1/out/bias"] = t(blk.attn.proj.bias)
        for r, fc in enumerate((blk.mlp.fc1, blk.mlp.fc2)):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"], w[p + f"MlpBlock_3/Dense_{r}/bias"] = t(fc.weight.T), t(fc.bias)
    np.savez(path, **w)


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    return timm.create_model(MODEL, num_classes=5).eval()


def _features(model, x):
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def _check_same(src, uri, endpoint=None):
    torch.manual_seed(123)  # a different random init, overwritten by the checkpoint
    loaded = create_backbone(MODEL, 5, uri, endpoint=endpoint).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(_features(src, x), _features(loaded, x), atol=1e-5)


@pytest.mark.parametrize("fmt", ["npz", "pth", "safetensors"])
def test_each_format_round_trips(tmp_path, source, fmt):
    path = tmp_path / f"backbone.{fmt}"
    if fmt == "npz":
        write_google_npz(source, path)
    elif fmt == "pth":
        torch.save(source.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    _check_same(source, str(path))


def test_safetensors_from_s3(s3_bucket, source):
    endpoint, bucket = s3_bucket
    from safetensors.torch import save

    loc = storage.resolve(f"s3://{bucket}/weights/b.safetensors", endpoint)
    storage.write_bytes(loc, save({k: v.contiguous() for k, v in source.state_dict().items()}))
    _check_same(source, loc.uri, endpoint)


def test_bad_checkpoints_give_one_line_errors(tmp_path, source):
    with pytest.raises(ConfigError, match="does not exist"):
        create_backbone(MODEL, 5, str(tmp_path / "none.pth"))
    (tmp_path / "junk.pth").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="is not a torch checkpoint"):
        create_backbone(MODEL, 5, str(tmp_path / "junk.pth"))
    big = timm.create_model("vit_tiny_patch16_224", num_classes=5)
    save_file({k: v.contiguous() for k, v in big.state_dict().items()}, str(tmp_path / "big.safetensors"))
    with pytest.raises(ConfigError, match="does not fit"):
        create_backbone(MODEL, 5, str(tmp_path / "big.safetensors"))
    with pytest.raises(ConfigError, match="unknown backbone 'vit_nope'"):
        create_backbone("vit_nope", 5)
