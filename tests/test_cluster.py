"""cluster/: the AWS cluster-launcher YAML passes Ray's own schema validation offline, and the
KubeRay manifests have what matters (Ray version, a CPU-0 head, autoscaling GPU groups, the
job entrypoint of a config that loads)."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from noah_ray import cli

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def prepared(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    out = prepare_config(copy.deepcopy(cfg))
    validate_config(out)
    return out


@pytest.fixture(scope="module")
def aws() -> dict:
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def test_aws_yaml_passes_ray_validation(aws):
    cfg = prepared(aws)
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}                 # nothing scheduled on the head
    gpu = {n: t for n, t in types.items() if t.get("resources", {}).get("GPU", 0) > 0}
    assert len(gpu) >= 2
    for t in gpu.values():                                  # scale from zero, up to a bound
        assert t["min_workers"] == 0 < t["max_workers"] <= cfg["max_workers"]
        assert t["resources"]["CPU"] > 0
    assert cfg["idle_timeout_minutes"] > 0
    assert any("pip install" in c and "noah_ray" in c for c in cfg["setup_commands"])
    image = cfg["docker"]["image"]
    assert f":{ray.__version__}-" in image                  # the cluster runs the Ray we submit from


def test_ray_validation_rejects_a_broken_copy(aws):
    from jsonschema import ValidationError

    bad = copy.deepcopy(aws)
    bad["available_node_types"]["gpu.a10g.x1"]["gpus"] = 1   # not a node-type field
    with pytest.raises(ValidationError):
        prepared(bad)
    bad = copy.deepcopy(aws)
    bad["head_node_type"] = "nope"
    with pytest.raises(ValueError, match="head_node_type"):
        prepared(bad)


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (container,) = head["template"]["spec"]["containers"]
    assert {p["containerPort"] for p in container["ports"]} >= {6379, 8265}
    groups = spec["workerGroupSpecs"]
    assert groups and len({g["groupName"] for g in groups}) == len(groups)
    for g in groups:
        assert 0 == g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["maxReplicas"] > 0
        (c,) = g["template"]["spec"]["containers"]
        gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus >= 1 and int(c["resources"]["requests"]["nvidia.com/gpu"]) == gpus
        assert c["image"] == container["image"]


def test_kuberay_raycluster():
    (doc,) = _docs("raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    _check_cluster_spec(doc["spec"])


def test_kuberay_rayjob_runs_the_pipeline_on_a_valid_config():
    (doc,) = _docs("rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    _check_cluster_spec(spec["rayClusterSpec"])
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.pipeline"]
    assert (REPO / "jobs" / "pipeline.py").is_file()
    args = cli.build_parser().parse_args(["pipeline", *argv[3:]])     # the options the job gets
    assert (REPO / args.config).is_file()
    job = cli.load_job(str(REPO / args.config), args.set)              # loads and validates as a schema
    assert job.storage.startswith("s3://") and job.data.root.startswith("s3://")
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    workdir = runtime_env["working_dir"]
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"WORKDIR {workdir}" in dockerfile and f"FROM rayproject/ray:{ray.__version__}-" in dockerfile
    image = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    (rc,) = _docs("raycluster.yaml")
    assert image == rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
