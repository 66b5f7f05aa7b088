"""Recipes: each setting checked against the fact it encodes (formulas from the original NOAH /
E2VPT code, written out here), never against the code under test."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from noah_ray.config import JobConfig, PruneConfig
from noah_ray.config.resolved import param_limit
from noah_ray.errors import ConfigError
from noah_ray.interop import import_noah, reference_files
from noah_ray.nn.backbones import create_backbone
from noah_ray.nn.modules import Adapter, DeepPrompt, KVPrompt, LoRA, LoRALinear
from noah_ray.nn.modules.adapter import quick_gelu
from noah_ray.nn.modules.vpt import expand_gate
from noah_ray.nn.prune import mask_scores, prune
from noah_ray.nn.supernet import PromptedViT
from noah_ray.space import SearchSpace, SubnetConfig, recipes
from noah_ray.space.budget import ParamLimit
from noah_ray.space.kinds import BackboneShape

MODEL = "vit_noah_tiny_patch4_32"   # dim 48, 3 heads (head_dim 16), 12 layers, patch 4
ROOT = Path(__file__).resolve().parents[1]


def _net(recipe, cfg: SubnetConfig, *, drop_path_rate: float = 0.0, classes: int = 5) -> PromptedViT:
    torch.manual_seed(0)
    return PromptedViT(create_backbone(MODEL, classes, drop_path_rate=drop_path_rate), cfg, recipe=recipe)


def _only(**overrides) -> recipes.Recipe:
    """The noah recipe with every dropout 0 except the ones given."""
    return recipes.resolve("noah", **{"lora_dropout": 0.0, "prompt_dropout": 0.0, "adapter_dropout": 0.0, **overrides})


# ------------------------------------------------------------------ defaults and the config
def test_default_is_noah_and_every_setting_overrides_alone():
    net = PromptedViT.supernet(MODEL, 5, SearchSpace())
    assert net.recipe == recipes.RECIPES["noah"]
    assert JobConfig().model.resolved_recipe().name == "noah"
    assert JobConfig().model.resolved_recipe("e2vpt").name == "e2vpt"           # the E2VPT baseline
    job = JobConfig.from_dict({"model": {"recipe": "modern", "adapter_act": "quick_gelu", "lora_dropout": 0.2}})
    r = job.model.resolved_recipe()
    assert (r.name, r.adapter_act, r.lora_dropout, r.adapter_dropout) == ("modern", "quick_gelu", 0.2, 0.0)
    with pytest.raises(ConfigError, match=r"model.drop_path: 'middle' unknown; use before_adapter or after_adapter"):
        JobConfig.from_dict({"model": {"drop_path": "middle"}})
    with pytest.raises(ConfigError, match=r"model.recipe: 'paper' unknown; use noah, e2vpt, modern"):
        JobConfig.from_dict({"model": {"recipe": "paper"}})


def test_paper_config_uses_noah_recipe_and_noah_count():
    job = JobConfig.load(ROOT / "jobs" / "configs" / "vtab_cifar100.yaml")
    r = job.model.resolved_recipe()
    assert r.name == "noah" and r.param_count == "noah"
    limit = param_limit(job, BackboneShape(768, 12, 12, 100))
    assert (limit.convention, limit.max_vpt, limit.max_m) == ("noah", 10, 0.64)


# ------------------------------------------------------------------ activation
def test_quick_gelu_values_from_the_formula():
    xs = [-3.0, -1.0, -0.25, 0.0, 0.5, 1.0, 2.0, 4.0]
    want = torch.tensor([x / (1.0 + math.exp(-1.702 * x)) for x in xs], dtype=torch.float64)
    assert torch.allclose(quick_gelu(torch.tensor(xs, dtype=torch.float64)), want, atol=1e-15, rtol=0)
    grid = torch.linspace(-6, 6, 20001, dtype=torch.float64)
    gap = (quick_gelu(grid) - F.gelu(grid)).abs().max().item()
    assert 0.015 < gap < 0.021                      # "up to 0.020 apart" (issue 19)


def test_noah_adapter_computes_h_plus_up_quickgelu_down():
    a = Adapter(8, 4, act="quick_gelu", init="xavier").double().eval()
    h = torch.randn(3, 8, dtype=torch.float64)
    z = h @ a.down_weight.T + a.down_bias
    z = z / (1 + torch.exp(-1.702 * z))
    want = h + z @ a.up_weight.T + a.up_bias
    assert torch.allclose(a(h), want, atol=1e-12)
    gelu = Adapter(8, 4, act="gelu", init="xavier").double().eval()
    gelu.load_state_dict(a.state_dict())
    assert not torch.allclose(gelu(h), want, atol=1e-6)


# ------------------------------------------------------------------ inits
def _uniform_bound_ok(t: torch.Tensor, bound: float) -> None:
    """Every value within +-bound, the extremes near it, variance bound^2 / 3."""
    a = t.detach().double().abs()
    assert a.max() <= bound + 1e-7 and a.max() > 0.95 * bound
    assert abs(t.detach().double().var().item() / (bound ** 2 / 3) - 1) < 0.1


def test_vpt_inits():
    torch.manual_seed(0)
    noah = DeepPrompt(768, 100, init="xavier_tensor")
    assert abs(math.sqrt(6 / (100 * 768 + 768)) - 0.0088) < 5e-5
    _uniform_bound_ok(noah.prompts, math.sqrt(6 / (100 * 768 + 768)))          # Xavier over (1, 100, 768)
    _uniform_bound_ok(DeepPrompt(768, 10, init="xavier_token").prompts, math.sqrt(6 / 1536))   # ours: 0.0625
    _uniform_bound_ok(DeepPrompt(48, 200, init="vpt", patch_area=256).prompts, math.sqrt(6 / (3 * 256 + 48)))
    net = _net("noah", SubnetConfig.uniform(12, vpt=100))
    _uniform_bound_ok(net.module("vpt", 3).prompts, math.sqrt(6 / (100 * 48 + 48)))


def test_adapter_inits_noah_xavier_with_tiny_biases_not_identity():
    torch.manual_seed(0)
    a = Adapter(768, 64, init="xavier")
    bound = math.sqrt(6 / (768 + 64))
    _uniform_bound_ok(a.down_weight, bound)
    _uniform_bound_ok(a.up_weight, bound)
    for b in (a.down_bias, a.up_bias):
        assert b.abs().max() < 1e-5 and 0.5e-6 < b.std().item() < 2e-6 and (b != 0).all()
    h = torch.randn(2, 768)
    assert not torch.allclose(a.eval()(h), h, atol=1e-4)                      # NOAH's adapter is no identity
    modern = Adapter(768, 64, init="zero_up").eval()
    assert torch.equal(modern(h), h) and torch.count_nonzero(modern.up_weight) == 0
    vit = Adapter(768, 64, init="vit")
    assert abs(vit.down_weight.std().item() - 0.02) < 0.001 and torch.count_nonzero(vit.up_bias) == 0


def test_lora_init_kaiming_a_zero_b():
    torch.manual_seed(0)
    lora = LoRA(768, 3 * 768, 64)
    _uniform_bound_ok(lora.lora_A, 1 / math.sqrt(768))   # kaiming_uniform a=sqrt5: gain sqrt(1/3) * sqrt(3/fan_in)
    assert torch.count_nonzero(lora.lora_B) == 0
    net = _net("noah", SubnetConfig.uniform(12, lora=8))
    assert torch.count_nonzero(net.module("lora", 0).lora_B) == 0


def test_kv_prompt_init_matches_e2vpt():
    torch.manual_seed(0)
    kv = KVPrompt(12, 64, 5, shared=True, init="kaiming")
    assert abs(math.sqrt(6 / (5 * 64)) - 0.137) < 1e-3                         # E2VPT: ~0.137 at 5 tokens
    _uniform_bound_ok(kv.key, math.sqrt(6 / (5 * 64)))
    _uniform_bound_ok(KVPrompt(12, 64, 5, init="xavier").key, math.sqrt(6 / (2 * 768)))    # ours: 0.0625
    net = _net("e2vpt", SubnetConfig.uniform(12, kv_prompt=50))
    _uniform_bound_ok(net.module("kv_prompt", 2).key, math.sqrt(6 / (50 * 16)))


# ------------------------------------------------------------------ dropout
def test_lora_dropout_acts_on_the_input_in_training_only():
    # A = I and B = [I; I; I]: delta = [drop(x), drop(x), drop(x)], so the mask is visible.  On the
    # input, all three copies of an input element share its mask; on the product they would not.
    lora = LoRA(6, 18, 6, dropout=0.5)
    with torch.no_grad():
        lora.lora_A.copy_(torch.eye(6))
        lora.lora_B.copy_(torch.eye(6).repeat(3, 1))
    x = torch.randn(2000, 6) + 3.0                      # no zeros in x
    torch.manual_seed(7)
    got = lora.train().delta(x)
    first = got[:, :6]
    assert torch.equal(first, got[:, 6:12]) and torch.equal(first, got[:, 12:])
    kept = first != 0
    assert torch.allclose(first[kept], 2 * x[kept], rtol=1e-6) and abs(kept.float().mean().item() - 0.5) < 0.02
    base = torch.nn.Linear(6, 18)
    torch.manual_seed(7)                                 # the fused qkv + LoRA path draws the same mask
    fused = LoRALinear(base, lora)(x)
    assert torch.allclose(fused, base(x) + got, atol=1e-5)
    assert torch.allclose(lora.eval().delta(x), (x @ lora.lora_A.T) @ lora.lora_B.T, atol=1e-6)


def test_prompt_dropout_per_sample_on_prompt_tokens_only():
    torch.manual_seed(0)
    vpt = DeepPrompt(16, 4, dropout=0.5)
    x = torch.randn(64, 1 + 9, 16)
    out = vpt.train().insert(x, 1, 0)
    p = out[:, 1:5]
    ratio = p / vpt.prompts.detach()
    assert torch.all((ratio.abs() < 1e-6) | ((ratio - 2).abs() < 1e-5))       # dropped, or scaled by 1/(1-p)
    assert not torch.equal(p[0], p[1])                                          # an own mask per sample
    assert torch.equal(out[:, :1], x[:, :1]) and torch.equal(out[:, 5:], x[:, 1:])
    assert torch.equal(vpt.eval().insert(x, 1, 0)[:, 1:5], vpt.prompts.detach().expand(64, -1, -1))


def test_adapter_dropout_on_the_hidden_layer_in_training_only():
    # up = [I; 0] (8 x 6) and up bias 0: a(h) - h = [drop(z), 0, 0] with z the hidden layer
    torch.manual_seed(0)
    a = Adapter(8, 6, act="quick_gelu", dropout=0.5, init="xavier")
    with torch.no_grad():
        a.up_weight.copy_(torch.cat([torch.eye(6), torch.zeros(2, 6)]))
        a.up_bias.zero_()
    h = torch.randn(4000, 8)
    z = quick_gelu(h @ a.down_weight.T + a.down_bias)
    out = a.train()(h) - h
    dz, kept = out[:, :6], out[:, :6] != 0
    assert torch.equal(out[:, 6:], torch.zeros(4000, 2))
    assert torch.allclose(dz[kept], 2 * z[kept], rtol=1e-4, atol=1e-6)
    assert abs(kept.float().mean().item() - 0.5) < 0.02
    assert torch.allclose(a.eval()(h) - h, torch.cat([z, torch.zeros(4000, 2)], 1), atol=1e-6)


@pytest.mark.parametrize("which", recipes.DROPOUTS)
def test_each_dropout_changes_training_outputs_and_not_eval(which):
    cfg = SubnetConfig.uniform(12, vpt=4, lora=4, adapter=4)
    net, ref = _net(_only(**{which: 0.3}), cfg), _net(_only(), cfg)
    for m in (net, ref):   # LoRA B starts at zero: give it values, or input dropout has no effect
        for i in range(12):
            torch.nn.init.normal_(m.module("lora", i).lora_B, generator=torch.Generator().manual_seed(i))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), ref.eval()(x))
        net.train()
        assert not torch.allclose(net(x), net(x))
        ref.train()
        assert torch.equal(ref(x), ref(x))             # no other randomness (drop_path_rate 0)


# ------------------------------------------------------------------ drop-path placement
@pytest.mark.parametrize("placement", ["before_adapter", "after_adapter"])
def test_drop_path_placement_with_the_last_block_always_dropped(placement):
    # drop_path_rate 1.0: timm's linear rule gives the last block drop probability 1 (branch = 0)
    cfg = SubnetConfig({"adapter": (0,) * 11 + (6,)})
    net = _net(_only(drop_path=placement), cfg, drop_path_rate=1.0).train()
    seen = {}
    blk = net.vit.blocks[11].block
    blk.register_forward_hook(lambda m, i, o: seen.update(x=i[0].detach(), y=o.detach()))
    with torch.no_grad():
        net(torch.randn(2, 3, 32, 32))
    a = net.module("adapter", 11)
    if placement == "after_adapter":                  # x + drop_path(adapter(mlp(.))) = x
        assert torch.equal(seen["y"], seen["x"])
    else:                                             # NOAH: x + adapter(drop_path(mlp(.))) = x + adapter(0)
        z = quick_gelu(a.down_bias.detach())
        want = seen["x"] + z @ a.up_weight.detach().T + a.up_bias.detach()
        assert torch.allclose(seen["y"], want, atol=1e-6)
    plain = net.backbone()                            # the backbone keeps its own drop-path
    assert type(plain.blocks[11].drop_path2).__name__ == "DropPath"


# ------------------------------------------------------------------ KV sharing
def test_kv_sharing_one_tensor_for_keys_and_values():
    cfg = SubnetConfig.uniform(12, kv_prompt=5)
    shared, separate = _net("e2vpt", cfg), _net("modern", cfg)
    kv = shared.module("kv_prompt", 0)
    assert kv.value is None
    k, v = torch.randn(2, 3, 7, 16), torch.randn(2, 3, 7, 16)
    pk, pv = kv.extend(k, v)
    assert torch.equal(pk[:, :, :5], pv[:, :, :5]) and torch.equal(pk[:, :, 5:], k)
    assert shared.num_trainable()["kv_prompt"] == 12 * 5 * 48                 # heads * n * head_dim per layer
    assert separate.num_trainable()["kv_prompt"] == 2 * 12 * 5 * 48
    assert _net("noah", cfg).kv_shared and not separate.kv_shared


# ------------------------------------------------------------------ pruning pieces
def test_strided_pieces_feature_f_in_piece_f_mod_s():
    gate = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    strided = expand_gate(gate, 12, "strided")
    contiguous = expand_gate(gate, 12, "contiguous")
    for t in range(2):
        for f in range(12):
            assert strided[t, f] == gate[t, f % 4]
            assert contiguous[t, f] == gate[t, f // 3]
    vpt = DeepPrompt(12, 2, gate_layout="strided").eval()
    vpt.gate = gate
    out = vpt.insert(torch.zeros(1, 1, 12), 1, 0)[0, 1:3]
    assert torch.equal(out, vpt.prompts.detach() * strided)


def _batches(n: int = 2, classes: int = 5):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, classes, (4,), generator=g)) for _ in range(n)]


def test_shared_masks_score_the_sum_over_layers_and_prune_the_same_everywhere():
    cfg = SubnetConfig.uniform(12, vpt=6, kv_prompt=4)
    net = _net("e2vpt", cfg).eval()
    per_layer = mask_scores(net, _batches(), num_segments=4, score="signed", shared=False, modules=("vpt",))
    shared = mask_scores(net, _batches(), num_segments=4, score="signed", modules=("vpt",))   # recipe: shared
    total = sum(per_layer[("vpt", i)] for i in range(12))
    for i in range(12):   # d/dg of one gate used by all layers = sum of the per-layer gradients
        assert torch.allclose(shared[("vpt", i)], total, atol=1e-6)
    _, plan = prune(net, _batches(), PruneConfig(token_fraction=0.5, segment_fraction=0.25, num_segments=4))
    assert set(plan.kept) == {"vpt"}                                            # visual prompts only
    assert len(set(plan.kept["vpt"])) == 1 and len(set(plan.segment_masks["vpt"])) == 1
    ours = _net("modern", cfg)
    _, plan2 = prune(ours, _batches(), PruneConfig(token_fraction=0.5, segment_fraction=0.25, num_segments=4))
    assert set(plan2.kept) == {"vpt", "kv_prompt"}                              # our extension: KV prompts too


# ------------------------------------------------------------------ parameter-count conventions
def _noah_search_count(retrain: dict, d: int = 768, max_vpt: int = 10) -> int:
    """NOAH's ``get_sampled_params_numel``: per block VPT w*d, LoRA A (r x d) + B (3d x r), adapter
    (d x a + a + a x d + d); plus the top-level prompt (VPT[0] tokens) and its position embedding
    (max_vpt tokens) when VPT[0] > 0.  Head excluded."""
    total = 0
    for w, r, a in zip(retrain["VISUAL_PROMPT_DIM"], retrain["LORA_DIM"], retrain["ADAPTER_DIM"]):
        total += w * d + (r * d + 3 * d * r) + ((2 * d * a + a + d) if a else 0)
    v0 = retrain["VISUAL_PROMPT_DIM"][0]
    return total + ((v0 + max_vpt) * d if v0 else 0)


@pytest.mark.parametrize("path", reference_files(), ids=lambda p: p.stem)
def test_both_counts_on_the_released_subnets(path):
    retrain = yaml.safe_load(path.read_text())["RETRAIN"]
    r = import_noah(path)
    v0 = retrain["VISUAL_PROMPT_DIM"][0]
    assert r.noah_count - r.count.modules == ((v0 + 10) * 768 if v0 > 0 else 0)
    assert r.noah_count == _noah_search_count(retrain)
    shape = BackboneShape(768, 12, 12, r.num_classes)
    exact, noah = ParamLimit(0.64, shape), ParamLimit(0.64, shape, convention="noah", max_vpt=10)
    assert exact.count(r.subnet) == r.count.modules and noah.count(r.subnet) == r.noah_count


def test_noah_count_changes_what_a_limit_admits():
    shape = BackboneShape(768, 12, 12, 100)
    cfg = SubnetConfig({"vpt": (10,) + (0,) * 11, "lora": (0,) * 12, "adapter": (0,) * 12})
    assert cfg.param_count(shape).modules == 7680                              # 10 tokens * 768
    exact = ParamLimit(0.01, shape)
    noah = ParamLimit(0.01, shape, convention="noah", max_vpt=10)
    assert exact.ok(cfg) and noah.count(cfg) == 7680 + 20 * 768 and not noah.ok(cfg)


# ------------------------------------------------------------------ checkpoints record the recipe
def test_meta_recipe_round_trip_and_legacy_is_modern():
    r = recipes.resolve("noah", lora_dropout=0.2)
    assert recipes.recorded({"recipe": r.to_dict()}) == r
    assert recipes.recorded({}) == recipes.RECIPES["modern"]
    assert recipes.recorded({"recipe": "e2vpt"}) == recipes.RECIPES["e2vpt"]
    with pytest.raises(ConfigError, match="recipe: unknown setting 'colour'"):
        recipes.recorded({"recipe": {"name": "noah", "colour": 1}})


def test_artifact_records_the_recipe_and_one_without_loads_as_modern(tmp_path):
    from noah_ray.interop import load_subnet, save_subnet

    cfg = SubnetConfig.uniform(12, vpt=2, adapter=3)
    net = _net(recipes.resolve("noah", adapter_dropout=0.2), cfg).eval()
    save_subnet(net, str(tmp_path / "a"), model_name=MODEL, include_backbone=True)
    meta = yaml.safe_load((tmp_path / "a" / "meta.json").read_text())
    assert meta["recipe"]["name"] == "noah" and meta["recipe"]["adapter_dropout"] == 0.2
    x = torch.randn(2, 3, 32, 32)
    again = load_subnet(str(tmp_path / "a"))
    assert again.recipe == net.recipe and torch.allclose(again(x), net(x), atol=1e-6)
    del meta["recipe"]                                   # an artifact from before recipes existed
    meta["kv_shared"] = False                            # (it wrote kv_shared, then False by default)
    (tmp_path / "a" / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "a" / "checksums.json").unlink()          # (and no checksum manifest, which came later)
    legacy = load_subnet(str(tmp_path / "a"))
    assert legacy.recipe == recipes.RECIPES["modern"]
    assert legacy.module("adapter", 0).act_name == "gelu" and not torch.allclose(legacy(x), net(x), atol=1e-6)


# ------------------------------------------------------------------ import-noah few-shot names
FEWSHOT_FILES = {"ViT-B_prompt_food-101_shot8-seed0.yaml": ("food101", 101, 8, 0),
                 "ViT-B_prompt_stanford_cars_shot1-seed0.yaml": ("stanford_cars", 196, 1, 0),
                 "ViT-B_prompt_oxford_flowers_shot4-seed0.yaml": ("oxford_flowers102", 102, 4, 0),
                 "ViT-B_prompt_oxford_pets_shot16-seed2.yaml": ("oxford_pets", 37, 16, 2),
                 "ViT-B_prompt_fgvc_aircraft_shot2-seed0.yaml": ("fgvc_aircraft", 100, 2, 0),
                 "ViT-B_prompt_imagenet_shot16-seed0.yaml": ("imagenet", 1000, 16, 0)}


@pytest.mark.parametrize("name", sorted(FEWSHOT_FILES))
def test_import_noah_reads_few_shot_file_names(tmp_path, name):
    vpt = [5, 10, 50, 100] * 3                         # few-shot widths; 5 and 10 alone would fit VTAB's too
    body = {"RETRAIN": {"VISUAL_PROMPT_DIM": vpt, "LORA_DIM": [10] * 12, "ADAPTER_DIM": [5] * 6 + [0] * 6,
                        "PREFIX_DIM": [0] * 12}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body))
    r = import_noah(path)                              # no num_classes: the file name says the dataset
    assert (r.dataset, r.num_classes, r.shot, r.seed, r.space) == (*FEWSHOT_FILES[name][:1], *FEWSHOT_FILES[name][1:],
                                                                    "few-shot")
    assert r.noah_count - r.count.modules == (5 + 100) * 768      # max VPT of the few-shot space: 100
    small = tmp_path / "sub" / name
    small.parent.mkdir(exist_ok=True)
    small.write_text(yaml.safe_dump({"RETRAIN": {**body["RETRAIN"], "VISUAL_PROMPT_DIM": [5, 10] * 6}}))
    assert import_noah(small).space == "few-shot"      # not "vtab": the file came from the few-shot search
