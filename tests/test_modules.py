"""The prompt-module registry, timm's attention kept where no KV prompt sits, checkpoints of the
first layout, and backbones the modules cannot attach to (refused when the model is built)."""

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from timm.layers import Attention

from noah_ray.errors import ConfigError
from noah_ray.nn.backbones import create_backbone
from noah_ray.nn.modules import REGISTRY, LoRALinear, PromptAttention
from noah_ray.nn.supernet import PromptedViT
from noah_ray.space import SubnetConfig
from noah_ray.space.kinds import MODULES, SPECS, BackboneShape

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = "vit_noah_tiny_patch4_32"
V1_FILE = Path(__file__).parent / "data" / "v1_full_trainable.safetensors"


def test_every_kind_has_a_spec_and_a_class_and_counts_what_it_holds():
    assert tuple(REGISTRY) == MODULES == tuple(SPECS)
    torch.manual_seed(0)
    cfg = SubnetConfig.uniform(2, vpt=3, lora=2, adapter=4, kv_prompt=5)
    for shared in (False, True):
        net = PromptedViT(create_backbone(TINY, 5, depth=2), cfg, kv_shared=shared)
        shape = net.shape
        for m, cls in REGISTRY.items():
            mod = net.module(m, 0)
            assert isinstance(mod, cls) and cls.kind == m
            held = sum(p.numel() for p in mod.parameters())
            assert held == cls.count(mod.max_width, shape, shared) > 0
    d = 48  # the spec table's formulas, from the papers: VPT w*d, LoRA r*(d + 3d), adapter 2dr + r + d
    s = BackboneShape(embed_dim=d, num_heads=3)
    assert [SPECS[m].count(2, s, False) for m in MODULES] == [2 * d, 8 * d, 4 * d + 2 + d, 4 * d]
    assert SPECS["kv_prompt"].count(2, s, True) == 2 * d and SPECS["lora"].count(0, s) == 0


def test_timm_attention_runs_unchanged_without_kv_prompts():
    torch.manual_seed(0)
    cfg = SubnetConfig({"lora": [2, 2], "kv_prompt": [0, 3]})
    net = PromptedViT(create_backbone(TINY, 5, depth=2), cfg)
    first, second = (b.block.attn for b in net.blocks)
    assert type(first) is Attention and isinstance(first.qkv, LoRALinear)  # LoRA wraps qkv only
    assert isinstance(second, PromptAttention) and isinstance(second.attn.qkv, LoRALinear)
    plain = net.backbone()
    assert all(type(b.attn) is Attention and type(b.attn.qkv) is torch.nn.Linear for b in plain.blocks)


def test_a_checkpoint_of_the_first_layout_loads_and_computes_the_same_logits():
    """The file was written by the previous version (every block's attention wrapped), with
    backbone and modules trained; its names and its logits on a stored input must still hold."""
    with safe_open(str(V1_FILE), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    x, want = state.pop("__input__"), state.pop("__logits__")
    assert "vit.blocks.2.block.attn.attn.qkv.weight" in state and "vit.blocks.2.block.attn.lora.lora_A" in state
    torch.manual_seed(0)
    vit = create_backbone(TINY, 3, depth=3, embed_dim=24, num_heads=2)
    net = PromptedViT(vit, SubnetConfig.from_json(meta["subnet"]), train_backbone=True, recipe=meta["recipe"]).eval()
    net.load_trainable_state_dict(state)
    assert set(net.trainable_state_dict()) == set(state)
    with torch.no_grad():
        # float32 logits written on another machine: the same math summed in another order (AVX2 vs
        # AVX-512 kernels) differs in the last bits, so compare with float32's tolerance, not bit for bit
        torch.testing.assert_close(net(x), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(net.module("lora", 2).lora_A, state["vit.blocks.2.block.attn.lora.lora_A"])
    assert torch.equal(net.qkv_linear(0).weight, state["vit.blocks.0.block.attn.attn.qkv.weight"])


@pytest.mark.parametrize("name", ["vit_small_patch16_18x2_224", "vit_pwee_patch16_reg1_gap_256"])
def test_parallel_block_vits_are_refused_when_built(name):
    assert timm.is_model(name)
    vit = create_backbone(name, 3, depth=2, embed_dim=32, num_heads=2, img_size=32)
    with pytest.raises(ConfigError, match="blocks \\(no single attention module\\); noah_ray supports"):
        PromptedViT(vit, SubnetConfig.uniform(2, vpt=2))


def test_diff_attention_vits_take_lora_and_vpt_but_refuse_kv_prompts_when_built():
    name = "vit_dwee_patch16_reg1_gap_256"
    torch.manual_seed(0)
    vit = create_backbone(name, 3, depth=2, embed_dim=32, num_heads=2, img_size=32)
    net = PromptedViT(vit, SubnetConfig.uniform(2, vpt=2, lora=2, adapter=2)).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    vit = create_backbone(name, 3, depth=2, embed_dim=32, num_heads=2, img_size=32)
    with pytest.raises(ConfigError, match="KV prompts need timm's standard Attention, this backbone has DiffAttention"):
        PromptedViT(vit, SubnetConfig.uniform(2, kv_prompt=2))


def test_the_tiny_vit_is_registered_by_create_backbone_not_by_importing():
    code = ("import timm, noah_ray.nn.backbones as b; assert not timm.is_model('vit_noah_tiny_patch4_32'); "
            "m = b.create_backbone('vit_noah_tiny_patch4_32.fractal', 3); "
            "assert m.pretrained_cfg['tag'] == 'fractal'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-500:]
