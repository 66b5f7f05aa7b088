"""One subnet encoding on disk: YAML files, meta.json, spec.json, artifacts and the Parquet
config_json columns all hold SubnetConfig.to_dict(); files written before still read."""

from __future__ import annotations

import json

import pytest
import yaml

from noah_ray.space import SubnetConfig

MIXED = SubnetConfig({"vpt": (5, 0, 0), "lora": (1, 2, 0), "kv_prompt": (0, 0, 3)})


def test_yaml_json_and_dict_are_one_shape():
    shape = {"vpt": [5, 0, 0], "lora": [1, 2, 0], "kv_prompt": [0, 0, 3]}
    assert MIXED.to_dict() == shape
    assert yaml.safe_load(MIXED.to_yaml()) == shape
    assert json.loads(MIXED.to_json()) == shape
    for text in (MIXED.to_yaml(), MIXED.to_json()):
        assert SubnetConfig.decode(yaml.safe_load(text)) == MIXED


def test_files_from_before_still_read(tmp_path):
    # subnet YAML (best_subnet.yaml, subnet.yaml) used to wrap the widths in a `widths:` key
    old = tmp_path / "best_subnet.yaml"
    old.write_text("# winner\nwidths:\n  vpt: [5, 0, 0]\n  lora: [1, 2, 0]\n  kv_prompt: [0, 0, 3]\n")
    assert SubnetConfig.load(old) == MIXED
    assert SubnetConfig.from_yaml(old.read_text()) == MIXED
    # final/meta.json used to hold the subnet as a JSON string
    assert SubnetConfig.decode('{"vpt": [5, 0, 0], "lora": [1, 2, 0], "kv_prompt": [0, 0, 3]}') == MIXED


def test_new_yaml_file_round_trips(tmp_path):
    path = tmp_path / "subnet.yaml"
    MIXED.save(path)
    assert "widths" not in path.read_text() and SubnetConfig.load(path) == MIXED


@pytest.mark.parametrize("bad", ['{"vpt": [1, -1]}', "not json", {"vpt": "abc"}])
def test_decode_refuses_bad_values_in_one_line(bad):
    from noah_ray.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        SubnetConfig.decode(bad)
    assert "\n" not in str(e.value)
