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

from noah_ray.cli import main as cli

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
    commands = [c for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                            "worker_setup_commands") for c in cfg.get(k, [])]
    assert not any("pip install" in c for c in commands)   # everything is in the image
    assert "file_mounts" not in aws or not aws["file_mounts"]
    (rc,) = _docs("raycluster.yaml")
    assert cfg["docker"]["image"] == project_image(rc["spec"])   # the project's image, not stock Ray


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


def project_image(spec: dict) -> str:
    return spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]


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
    assert f"WORKDIR {workdir}" in dockerfile
    (rc,) = _docs("raycluster.yaml")
    assert project_image(spec["rayClusterSpec"]) == project_image(rc["spec"])


# ---------------------------------------------------------------------------- the image
def _ray_requirement():
    import tomllib
    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [r for r in map(Requirement, deps) if r.name == "ray"]
    return req


def test_image_ray_version_is_the_one_pyproject_resolves():
    """The Dockerfile's Ray = the Ray installed from pyproject here (what a submitting machine
    runs), within pyproject's range, pinned in the image with pyproject's extras; the image tag is
    noah_ray's version and every cluster file runs that image and declares that Ray."""
    import re

    import noah_ray

    text = (CLUSTER / "Dockerfile").read_text()
    (version,) = re.findall(r"^ARG RAY_VERSION=(\S+)$", text, re.M)
    req = _ray_requirement()
    assert version == ray.__version__ and req.specifier.contains(version)
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py3\d+(-gpu)?$", text, re.M)
    (pinned,) = re.findall(r'"ray\[([a-z,]+)\]==\$\{RAY_VERSION\}"', text)   # pip cannot move Ray
    assert set(pinned.split(",")) == req.extras
    assert "pip install -e" not in text
    (rc,) = _docs("raycluster.yaml")
    (job,) = _docs("rayjob.yaml")
    image = project_image(rc["spec"])
    assert image.endswith(f"/noah-ray:{noah_ray.__version__}")
    assert yaml.safe_load((CLUSTER / "aws.yaml").read_text())["docker"]["image"] == image
    for spec in (rc["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"] == version
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        assert {c["image"] for g in groups for c in g["template"]["spec"]["containers"]} == {image}
    readme = (REPO / "README.md").read_text()
    assert f"docker build -f cluster/Dockerfile -t MY-REGISTRY/noah-ray:{noah_ray.__version__} ." in readme
    assert f"docker push MY-REGISTRY/noah-ray:{noah_ray.__version__}" in readme


def dockerignored(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore rule for one context path: patterns are relative to the context root
    (``*`` within a segment, ``**`` any number of segments), a match on a parent excludes what is
    below it, ``!`` re-includes, the last matching line wins."""
    import re

    def regex(p: str) -> str:
        out = re.escape(p.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        return out.replace(r"\*", "[^/]*").replace(r"\?", "[^/]").replace(r"\[", "[").replace(r"\]", "]")

    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for line in patterns:
        neg = line.startswith("!")
        pat = regex(line[1:] if neg else line)
        if any(re.fullmatch(pat, p) for p in prefixes):
            ignored = not neg
    return ignored


def test_dockerignore_keeps_the_build_context_small():
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [ln for ln in lines if ln and not ln.startswith("#")]
    for path in (".venv/lib/python3.11/site-packages/torch/__init__.py", ".git/objects/ab/cdef",
                 ".worktrees/x/noah_ray/cli.py", "noah-results/demo/supernet/final/model.safetensors",
                 "noah_ray/__pycache__/cli.cpython-311.pyc", "tests/__pycache__/conftest.cpython-311.pyc",
                 ".pytest_cache/v/cache/nodeids", "noah_ray.egg-info/PKG-INFO", "mlruns/0/meta.yaml"):
        assert dockerignored(patterns, path), path
    needed = ["pyproject.toml", "README.md", "noah_ray/configs/demo.yaml", "noah_ray/data/loader.py",
              "noah_ray/reference/noah_vtab/ViT-B_prompt_dtd.yaml", "jobs/pipeline.py", "jobs/configs/demo.yaml"]
    needed += [str(p.relative_to(REPO)) for p in (REPO / "noah_ray").rglob("*.py") if "__pycache__" not in p.parts]
    assert not [p for p in needed if dockerignored(patterns, p)]
    assert dockerignored(["*.pyc", "!keep.pyc"], "a.pyc") and not dockerignored(["*.pyc", "!keep.pyc"], "keep.pyc")
    assert not dockerignored(["data"], "noah_ray/data/loader.py")       # root-relative, as Docker does
