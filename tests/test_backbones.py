"""Backbone checkpoints: Google .npz (vit_jax and big_vision layouts), timm .pth, .safetensors,
local and s3://; the loaded model must give the same features as the one that was written."""

import argparse
import io

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save, save_file

from noah_ray.errors import ConfigError
from noah_ray.nn.backbones import (
    backbone_shape,
    create_backbone,
    google_to_timm,
    load_backbone_weights,
    register_tiny_models,
)
from noah_ray.store import storage

register_tiny_models()  # these tests also call timm.create_model on the tiny ViT

MODEL = "vit_noah_tiny_patch4_32"


def google_arrays(model, *, layout: str = "vit_jax", prefix: str = "") -> dict[str, np.ndarray]:
    """A timm ViT as the arrays of a Google checkpoint: ``vit_jax`` (``ViT-B_16.npz``: one
    ``encoderblock_i`` per layer, MultiHeadDotProductAttention_1 / MlpBlock_3 / LayerNorm_2) or
    ``big_vision`` (blocks stacked in one ``encoderblock``, *_0 / LayerNorm_1 names)."""
    def a(t):
        return t.detach().float().numpy().copy()

    d, h = model.embed_dim, model.blocks[0].attn.num_heads
    mha, mlp, ln2 = (("MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_2") if layout == "vit_jax"
                     else ("MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_1"))
    w = {"embedding/kernel": a(model.patch_embed.proj.weight).transpose(2, 3, 1, 0),   # OIHW -> HWIO
         "embedding/bias": a(model.patch_embed.proj.bias), "cls": a(model.cls_token),
         "Transformer/posembed_input/pos_embedding": a(model.pos_embed),
         "Transformer/encoder_norm/scale": a(model.norm.weight), "Transformer/encoder_norm/bias": a(model.norm.bias),
         "head/kernel": np.zeros((d, 21843), np.float32), "head/bias": np.zeros(21843, np.float32),
         "pre_logits/kernel": np.eye(d, dtype=np.float32), "pre_logits/bias": np.zeros(d, np.float32)}
    blocks = []
    for blk in model.blocks:
        b = {"LayerNorm_0/scale": a(blk.norm1.weight), "LayerNorm_0/bias": a(blk.norm1.bias),
             f"{ln2}/scale": a(blk.norm2.weight), f"{ln2}/bias": a(blk.norm2.bias)}
        qkv_w = a(blk.attn.qkv.weight).reshape(3, d, d)          # (3 * out, in)
        qkv_b = a(blk.attn.qkv.bias).reshape(3, d)
        for j, name in enumerate(("query", "key", "value")):
            b[f"{mha}/{name}/kernel"] = qkv_w[j].T.reshape(d, h, d // h)   # (in, heads, head_dim)
            b[f"{mha}/{name}/bias"] = qkv_b[j].reshape(h, d // h)
        b[f"{mha}/out/kernel"] = a(blk.attn.proj.weight).T.reshape(h, d // h, d)
        b[f"{mha}/out/bias"] = a(blk.attn.proj.bias)
        for r, fc in enumerate((blk.mlp.fc1, blk.mlp.fc2)):
            b[f"{mlp}/Dense_{r}/kernel"], b[f"{mlp}/Dense_{r}/bias"] = a(fc.weight).T, a(fc.bias)
        blocks.append(b)
    if layout == "vit_jax":
        for i, b in enumerate(blocks):
            w.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in b.items()})
    else:
        w.update({f"Transformer/encoderblock/{k}": np.stack([b[k] for b in blocks]) for k in blocks[0]})
    return {prefix + k: v for k, v in w.items()}


def npz_bytes(arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=5).eval()
    with torch.no_grad():  # make every tensor distinct from a fresh init (norms and biases too)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _features(model, x):
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def _check_same(src, uri, endpoint=None):
    torch.manual_seed(123)  # a different random init, overwritten by the checkpoint
    loaded = create_backbone(MODEL, 7, uri, endpoint=endpoint).eval()
    fresh_head = timm.create_model(MODEL, num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(_features(src, x), _features(loaded, x), atol=1e-5)
    assert loaded.head.weight.shape == (7, 48)          # the head is the new task's, not the checkpoint's
    return loaded, fresh_head


@pytest.mark.parametrize("fmt", ["npz", "npz-big_vision", "npz-opt-target", "pth", "pth-wrapped", "safetensors"])
def test_each_format_round_trips(tmp_path, source, fmt):
    path = tmp_path / f"backbone.{fmt.split('-')[0]}"
    sd = {k: v.contiguous() for k, v in source.state_dict().items()}
    if fmt == "npz":
        path.write_bytes(npz_bytes(google_arrays(source)))
    elif fmt == "npz-big_vision":
        path.write_bytes(npz_bytes(google_arrays(source, layout="big_vision", prefix="params/")))
    elif fmt == "npz-opt-target":
        path.write_bytes(npz_bytes(google_arrays(source, prefix="opt/target/")))
    elif fmt == "pth":
        torch.save(sd, path)
    elif fmt == "pth-wrapped":  # DDP prefix, a "model" wrapper and the training script's args (DeiT / MAE style)
        torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "args": argparse.Namespace(lr=1e-3),
                    "epoch": 3}, path)
    else:
        save_file(sd, str(path))
    _check_same(source, str(path))


def test_npz_conversion_agrees_with_timms_own_converter(tmp_path, source):
    """timm's independent reader of Google .npz files must load the same weights as ours."""
    path = tmp_path / "ViT-B_16.npz"
    path.write_bytes(npz_bytes(google_arrays(source)))
    ours = create_backbone(MODEL, 5, str(path)).eval()
    theirs = timm.create_model(MODEL, num_classes=5).eval()
    theirs.load_pretrained(str(path))
    state, source_keys = google_to_timm(dict(np.load(path)))
    assert source_keys["blocks.0.attn.qkv.weight"].endswith("MultiHeadDotProductAttention_1/{query,key,value}/kernel")
    for k, v in theirs.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(ours.state_dict()[k], v), k
            assert torch.equal(state[k], v), k


def test_npz_at_another_resolution_resamples_position_embedding(tmp_path, source):
    path = tmp_path / "b.npz"
    path.write_bytes(npz_bytes(google_arrays(source)))
    big = create_backbone(MODEL, 5, str(path), img_size=48).eval()
    assert big.pos_embed.shape == (1, 1 + 12 * 12, 48)
    assert torch.equal(big.pos_embed[:, :1], source.pos_embed[:, :1])           # the class token's row is kept
    assert torch.allclose(big.blocks[3].attn.qkv.weight, source.blocks[3].attn.qkv.weight)
    out = _features(big, torch.randn(2, 3, 48, 48))
    assert out.shape == (2, 48) and torch.isfinite(out).all()


def test_safetensors_and_npz_from_s3(s3_bucket, source):
    endpoint, bucket = s3_bucket
    loc = storage.resolve(f"s3://{bucket}/weights/b.safetensors", endpoint)
    storage.write_bytes(loc, save({k: v.contiguous() for k, v in source.state_dict().items()}))
    _check_same(source, loc.uri, endpoint)
    loc = storage.resolve(f"s3://{bucket}/weights/ViT-B_16.npz", endpoint)
    storage.write_bytes(loc, npz_bytes(google_arrays(source)))
    _check_same(source, loc.uri, endpoint)


class _Custom:  # an arbitrary object: must not be unpickled
    pass


def test_bad_checkpoints_give_one_line_errors(tmp_path, source):
    def bad(data: bytes, name: str, match: str, **kw):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError, match=match) as e:
            create_backbone(MODEL, 5, str(tmp_path / name), **kw)
        assert "\n" not in str(e.value)

    with pytest.raises(ConfigError, match="does not exist; check model.checkpoint"):
        create_backbone(MODEL, 5, str(tmp_path / "none.pth"))
    bad(b"garbage", "junk.pth", "is not a torch checkpoint")
    buf = io.BytesIO()
    torch.save({"model": source.state_dict(), "obj": _Custom()}, buf)
    bad(buf.getvalue(), "pickle.pth", "holds Python objects besides tensors")
    big = timm.create_model("vit_tiny_patch16_224", num_classes=5)
    sd = {k: v.contiguous() for k, v in big.state_dict().items()}
    bad(save(sd), "big.safetensors", r"pos_embed of shape \(1, 197, 192\) does not fit vit_noah_tiny_patch4_32")
    sd.pop("pos_embed")
    bad(save(sd), "big2.safetensors", r"cls_token has shape \(1, 1, 192\) but "
                                      r"vit_noah_tiny_patch4_32 needs \(1, 1, 48\); the checkpoint is for another")
    arrays = google_arrays(source)
    bad(npz_bytes({k: v for k, v in arrays.items() if k != "embedding/kernel"}), "noemb.npz",
        "no 'embedding/kernel' array, so it is not a Google ViT")
    key = "Transformer/encoderblock_2/MlpBlock_3/Dense_1/bias"
    bad(npz_bytes({k: v for k, v in arrays.items() if k != key}), "partial.npz", f"array '{key}' is missing")
    shallow = timm.create_model(MODEL, num_classes=5, depth=6)
    bad(npz_bytes(google_arrays(shallow)), "shallow.npz", "has 6 transformer blocks but vit_noah_tiny_patch4_32 has 12")
    bad(npz_bytes(arrays), "deep.npz", "has 12 transformer blocks but vit_noah_tiny_patch4_32 has 6", depth=6)
    sd = {k: v.contiguous() for k, v in source.state_dict().items() if k != "norm.bias"}
    sd["extra.weight"] = torch.zeros(2)
    bad(save(sd), "odd.safetensors", r"unexpected \['extra.weight'\], missing \['norm.bias'\]; 1 unexpected, 1 missing")
    with pytest.raises(ConfigError, match="unknown backbone 'vit_nope'"):
        create_backbone("vit_nope", 5)


def test_loading_keeps_the_head_and_shape(tmp_path, source):
    path = tmp_path / "b.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = timm.create_model(MODEL, num_classes=3)
    head = model.head.weight.clone()
    load_backbone_weights(model, str(path))
    assert torch.equal(model.head.weight, head)                   # source had 5 classes; ours stays
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    s = backbone_shape(model)
    assert (s.embed_dim, s.num_heads, s.depth, s.num_classes) == (48, 3, 12, 3)
