"""Search space, subnet configs, operators and the exact parameter formula (pure Python)."""

import random

import pytest

from noah_ray.errors import ConfigError
from noah_ray.space import PAPER_FEWSHOT_WIDTHS, ModuleSpace, SearchSpace, SubnetConfig
from noah_ray.space.kinds import BackboneShape


def test_default_space_is_the_papers_vtab_space():
    space = SearchSpace()
    assert list(space.modules) == ["vpt", "lora", "adapter"]
    for s in space.modules.values():
        assert s.depths == (3, 6, 9, 12) and s.widths == (1, 5, 10)
    assert SearchSpace.paper_fewshot().modules["lora"].widths == PAPER_FEWSHOT_WIDTHS


def test_samples_are_valid_and_diverse():
    space, rng = SearchSpace(), random.Random(0)
    cfgs = [space.sample(rng) for _ in range(200)]
    for c in cfgs:
        space.validate(c)
        for m in space.modules:
            d = c.depth(m)
            assert d in (3, 6, 9, 12)
            assert all(w > 0 for w in c.layer_widths(m)[:d]) and not any(c.layer_widths(m)[d:])
    assert len({c.key() for c in cfgs}) == 200


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_round_trip(tmp_path, fmt):
    c = SearchSpace().sample(random.Random(1))
    text = c.to_json() if fmt == "json" else c.to_yaml()
    back = SubnetConfig.from_json(text) if fmt == "json" else SubnetConfig.from_yaml(text)
    assert back == c and back.key() == c.key()
    path = tmp_path / f"subnet.{fmt}"
    c.save(path)
    assert SubnetConfig.load(path) == c


@pytest.mark.parametrize("widths, match", [
    ({"vpt": [10, 5, 7] + [0] * 9, "lora": [1] * 3 + [0] * 9, "adapter": [1] * 3 + [0] * 9},
     r"vpt layer 2: width 7 is not in \[1, 5, 10\]"),
    ({"vpt": [10] * 4 + [0] * 8, "lora": [1] * 3 + [0] * 9, "adapter": [1] * 3 + [0] * 9},
     r"vpt: depth 4 is not in \[3, 6, 9, 12\]"),
    ({"vpt": [10] * 3, "lora": [1] * 3, "adapter": [1] * 3}, r"subnet has 3 layers, the space has 12"),
    ({"vpt": [1] * 3 + [0] * 9, "lora": [1] * 3 + [0] * 9, "adapter": [1] * 3 + [0] * 9,
      "kv_prompt": [5] * 3 + [0] * 9}, r"module 'kv_prompt' is not in this search space"),
    ({"vpt": [1] * 3 + [0] * 9, "lora": [1] * 3 + [0] * 9}, r"module 'adapter' is missing"),
])
def test_validation_names_module_layer_and_value(widths, match):
    with pytest.raises(ConfigError, match=match):
        SearchSpace().validate(SubnetConfig.from_dict(widths))


@pytest.mark.parametrize("data, match", [
    ({"prefix": [1] * 12}, r"unknown module 'prefix'"),
    ({"vpt": [1] * 12, "lora": [1] * 11}, r"one width per layer"),
    ({"vpt": [1, -1] + [0] * 10}, r"vpt layer 1: width -1"),
    ({"vpt": "10"}, r"widths of 'vpt' must be a list"),
])
def test_malformed_configs_fail_with_one_line(data, match):
    with pytest.raises(ConfigError, match=match) as e:
        SubnetConfig.from_dict(data)
    assert "\n" not in str(e.value)


def test_mutation_changes_kept_layer_widths_and_depths():
    space, rng = SearchSpace(), random.Random(2)
    parent = space.sample(rng)
    width_only = [space.mutate(parent, rng, prob=0.2, depth_prob=0.0) for _ in range(50)]
    assert all(c.depth(m) == parent.depth(m) for c in width_only for m in space.modules)
    assert any(c != parent for c in width_only)  # widths of kept layers do change
    with_depth = [space.mutate(parent, rng, prob=0.0, depth_prob=1.0) for _ in range(50)]
    assert any(c.depth(m) != parent.depth(m) for c in with_depth for m in space.modules)
    for c in width_only + with_depth:
        space.validate(c)
        for m in space.modules:  # kept layers keep their widths when only the depth moves
            keep = min(c.depth(m), parent.depth(m))
            if c in with_depth:
                assert c.layer_widths(m)[:keep] == parent.layer_widths(m)[:keep]


def test_crossover_mixes_within_a_module_per_layer():
    space, rng = SearchSpace(), random.Random(3)
    a = SubnetConfig.uniform(12, vpt=1, lora=1, adapter=1)
    b = SubnetConfig.uniform(12, vpt=10, lora=10, adapter=10)
    children = [space.crossover(a, b, rng) for _ in range(20)]
    for c in children:
        space.validate(c)
    mixed = [c for c in children if {1, 10} <= set(c.layer_widths("vpt"))]
    assert mixed, "crossover must mix per layer, not only swap whole modules"


def test_param_count_formula_vit_b():
    shape = BackboneShape(768, 12, 12, 100)
    c = SubnetConfig({"vpt": [10] + [0] * 11, "lora": [5] + [0] * 11, "adapter": [1] + [0] * 11,
                      "kv_prompt": [2] + [0] * 11})
    pc = c.param_count(shape)
    assert pc.per_module == {"vpt": 10 * 768, "lora": 4 * 768 * 5, "adapter": 2 * 768 + 1 + 768,
                             "kv_prompt": 2 * 2 * 768}
    assert pc.head == 768 * 100 + 100 and pc.total == pc.modules + pc.head
    assert c.param_count(shape, kv_shared=True).per_module["kv_prompt"] == 2 * 768


def test_space_from_dict_and_errors():
    space = SearchSpace.from_dict({"num_layers": 12, "modules": {"lora": {"depths": [6, 12], "widths": [5, 10, 50, 100]}}})
    assert space.max_widths() == {"lora": 100} and space.smallest().depth("lora") == 6
    assert SearchSpace.from_dict(space.to_dict()) == space
    with pytest.raises(ConfigError, match="depth 13 exceeds"):
        SearchSpace({"vpt": ModuleSpace(depths=(13,))})
    with pytest.raises(ConfigError, match="unknown key"):
        SearchSpace.from_dict({"modules": {"vpt": {"depth": [3]}}})
