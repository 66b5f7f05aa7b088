"""A job no node type can ever run is refused before it starts (noah_ray.run.capacity).

The node types are read from the real cluster/aws.yaml: head {CPU: 0}, gpu.a10g.x1 {CPU: 8, GPU: 1},
gpu.a10g.x4 {CPU: 48, GPU: 4}, gpu.a100.x8 {CPU: 96, GPU: 8}.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from noah_ray.config import JobConfig
from noah_ray.errors import ConfigError
from noah_ray.run import capacity

AWS = Path(__file__).resolve().parents[1] / "cluster" / "aws.yaml"


@pytest.fixture()
def aws_nodes(monkeypatch) -> capacity.NodeTypes:
    monkeypatch.setenv(capacity.CONFIG_ENV, str(AWS))
    nodes = capacity.configured()
    assert nodes is not None
    return nodes


def _job(tiny_job, **sections) -> JobConfig:
    return JobConfig.from_dict(tiny_job("/data", "/store", **sections))


def test_node_types_are_the_yaml_ones(aws_nodes):
    raw = yaml.safe_load(AWS.read_text())["available_node_types"]
    assert set(aws_nodes.types) == set(raw)
    assert aws_nodes.types["gpu.a100.x8"] == {"CPU": 96.0, "GPU": 8.0}


def test_sixteen_gpus_per_trial_is_refused_naming_the_largest_gpu_node(aws_nodes, tiny_job):
    job = _job(tiny_job, search={"gpus_per_trial": 16})
    with pytest.raises(ConfigError) as e:
        capacity.check(job, ("supernet", "search", "retrain"), aws_nodes)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("search: a search trial needs")
    assert "GPU: 16" in msg and "largest GPU: gpu.a100.x8 {CPU: 96, GPU: 8}" in msg
    assert "search.gpus_per_trial" in msg and str(AWS) in msg


def test_what_one_node_type_holds_passes(aws_nodes, tiny_job):
    job = _job(tiny_job, search={"gpus_per_trial": 8, "cpus_per_trial": 90},
               supernet={"use_gpu": True, "cpus_per_worker": 8}, retrain={"use_gpu": True, "cpus_per_worker": 48})
    capacity.check(job, ("supernet", "search", "retrain"), aws_nodes)


def test_cpus_beyond_every_node_are_refused_for_the_stage_that_asks(aws_nodes, tiny_job):
    job = _job(tiny_job, retrain={"cpus_per_worker": 100})
    capacity.check(job, ("supernet", "search"), aws_nodes)            # retrain not requested
    with pytest.raises(ConfigError, match=r"^retrain: a Ray Train worker needs \{CPU: 100\}.*largest CPU: gpu.a100.x8"):
        capacity.check(job, ("retrain",), aws_nodes)


def test_a_combination_no_single_node_has_is_refused():
    nodes = capacity.NodeTypes({"cpu": {"CPU": 64.0}, "gpu": {"CPU": 4.0, "GPU": 1.0}}, "two.yaml")
    bundle = capacity.Bundle("search", "a search trial", {"CPU": 8.0, "GPU": 1.0}, "search.cpus_per_trial")
    assert nodes.fits(replace(bundle, resources={"CPU": 64.0})) and nodes.fits(replace(bundle, resources={"GPU": 1}))
    assert not nodes.fits(bundle)


def test_a_local_ray_is_checked_against_its_one_node(ray_session, tiny_job, monkeypatch):
    monkeypatch.delenv(capacity.CONFIG_ENV, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(capacity, "BOOTSTRAP", "/nonexistent/ray_bootstrap_config.yaml")
    nodes = capacity.node_types()
    assert nodes is not None and len(nodes.types) == 1
    with pytest.raises(ConfigError, match=r"needs \{CPU: 1, GPU: 1\} but no node in the running Ray cluster"):
        capacity.check(_job(tiny_job, supernet={"use_gpu": True}), ("supernet",), nodes)
    monkeypatch.setenv("RAY_ADDRESS", "ray://somewhere:10001")         # attached: an autoscaler may add it
    assert capacity.node_types() is None


def test_a_broken_cluster_config_is_one_line(tmp_path, monkeypatch):
    bad = tmp_path / "c.yaml"
    bad.write_text("cluster_name: x\n")
    monkeypatch.setenv(capacity.CONFIG_ENV, str(bad))
    with pytest.raises(ConfigError, match="has no available_node_types"):
        capacity.configured()
    monkeypatch.setenv(capacity.CONFIG_ENV, str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="cannot be read"):
        capacity.configured()


def test_race_trials_are_checked_when_the_race_runs(aws_nodes, tiny_job):
    job = _job(tiny_job, race={"enabled": True, "gpus_per_trial": 9})
    with pytest.raises(ConfigError, match=r"^race: a race trial needs \{CPU: 1, GPU: 9\}"):
        capacity.check(job, ("race", "retrain"), aws_nodes)
    capacity.check(_job(tiny_job, race={"enabled": False, "gpus_per_trial": 9}), ("race",), aws_nodes)
