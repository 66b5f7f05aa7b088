"""Shared fixtures: one local Ray per session, a real S3 endpoint (moto) on 127.0.0.1."""

from __future__ import annotations

import copy
import importlib.util
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

# Fake credentials for the local moto endpoint, set before Ray starts so that workers inherit
# them through the environment (never through pickled objects).
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY_VIT = "vit_noah_tiny_patch4_32"

#: the smallest job that runs every stage: the tiny ViT on a generated task, one epoch each
TINY_JOB: dict[str, Any] = {
    "name": "tiny",
    "data": {"dataset": "gen_color", "batch_size": 8, "num_workers": 0},
    "model": {"name": TINY_VIT, "drop_path_rate": 0.0},
    "space": {"num_layers": 12, "modules": {"lora": {"widths": [1, 2]}, "adapter": {"widths": [1, 2]}}},
    "supernet": {"epochs": 1},
    "search": {"generations": 1, "population": 4, "top_k": 2, "mutations": 1, "crossovers": 1,
               "param_limit": 0.01},
    "retrain": {"epochs": 1},
    "race": {"enabled": False},           # NOAH's plain procedure; tests/test_race.py turns racing on
}


def make_tiny_job(data_root: str | Path | None = None, storage: str | Path | None = None,
                  **sections: Any) -> dict[str, Any]:
    """A fresh copy of :data:`TINY_JOB` (a job dict, as a YAML file holds it) with ``data.root``
    and ``storage`` set and ``sections`` applied: a mapping updates that section key by key, a
    scalar (``name=...``) replaces the value, ``None`` drops the section (its defaults apply)."""
    job = copy.deepcopy(TINY_JOB)
    if data_root is not None:
        job["data"]["root"] = str(data_root)
    if storage is not None:
        job["storage"] = str(storage)
    for key, value in sections.items():
        if value is None:
            job.pop(key, None)
        elif isinstance(value, dict) and isinstance(job.get(key), dict):
            job[key] = {**job[key], **copy.deepcopy(value)}
        else:
            job[key] = copy.deepcopy(value)
    return job


@pytest.fixture(scope="session")
def load_bench():
    """``load_bench(name) -> module``: ``bench/<name>.py`` imported by its path (``bench/`` holds
    scripts, not a package) and registered in ``sys.modules``, where its dataclasses look their
    module up."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "bench" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def tiny_job():
    """``tiny_job(data_root, storage, **sections) -> dict``: see :func:`make_tiny_job`; give the
    dict to ``JobConfig.from_dict`` or write it as the YAML a command reads."""
    return make_tiny_job


@pytest.fixture(scope="module")
def one_thread():
    """In-process torch on one intra-op thread: two OpenMP threads on 2 shared cores (Ray
    workers beside them) stall badly."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def backbone_file(tmp_path_factory) -> str:
    """A fixed tiny backbone (vit_noah_tiny_patch4_32) saved like a real checkpoint (no head)."""
    import torch
    from safetensors.torch import save_file

    from noah_ray.nn.backbones import create_backbone

    rng = torch.random.get_rng_state()
    torch.manual_seed(123)
    vit = create_backbone("vit_noah_tiny_patch4_32", 1)
    torch.random.set_rng_state(rng)
    path = tmp_path_factory.mktemp("backbone") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items() if not k.startswith("head.")}, str(path))
    return str(path)


@pytest.fixture(scope="session")
def ray_session():
    """Ray started once per test session: ``ray.init(address="local", num_cpus=2)``."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint (moto server) on 127.0.0.1; yields its URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture()
def s3_bucket(s3_endpoint, request):
    """A fresh bucket on the moto endpoint; yields ``(endpoint, bucket)``."""
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-[]")
    name = "".join(c for c in name if c.isalnum() or c == "-")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return s3_endpoint, name


@pytest.fixture()
def s3_markers():
    """``s3_markers(endpoint, bucket)``: every directory-marker-like object in ``bucket`` (a key
    ending in ``/`` or a zero-byte object); fails if the bucket is empty."""
    return _s3_markers


def _s3_markers(endpoint: str, bucket: str) -> list[str]:
    import boto3

    pages = boto3.client("s3", endpoint_url=endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    objs = [o for page in pages for o in page.get("Contents", [])]
    assert objs, f"bucket {bucket} is empty"
    return sorted(o["Key"] for o in objs if o["Key"].endswith("/") or o["Size"] == 0)


# ----------------------------------------------------------------------------- mypy in the background
#: tests/test_static.py's mypy check takes about a minute of CPU; when it is selected it starts at
#: collection, at the lowest priority, and uses the CPU the Ray tests leave idle while they wait.
MYPY_TEST = "test_static.py::test_mypy_finds_nothing"
_MYPY = pytest.StashKey[Any]()


def start_mypy(cache_dir: str | Path):
    """``python -m mypy`` with pyproject.toml's settings and a fresh ``cache_dir``, niced; its Popen."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    return subprocess.Popen([sys.executable, "-m", "mypy", "--cache-dir", str(cache_dir)], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: os.nice(19))


def pytest_collection_finish(session: pytest.Session) -> None:
    import importlib.util
    import tempfile

    if os.environ.get("PYTEST_XDIST_WORKER"):       # under pytest -n every worker collects every test;
        return                                       # the one that gets the check starts mypy then
    if importlib.util.find_spec("mypy") and any(item.nodeid.endswith(MYPY_TEST) for item in session.items):
        cache = tempfile.mkdtemp(prefix="noah-mypy-")
        session.config.stash[_MYPY] = (start_mypy(cache), cache)


def pytest_unconfigure(config: pytest.Config) -> None:
    import shutil

    proc, cache = config.stash.get(_MYPY, (None, None))
    if proc is not None:
        if proc.poll() is None:                      # its test was deselected or did not get to it
            proc.kill()
            proc.communicate()
        shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture()
def mypy_run(request, tmp_path):
    """mypy's exit status and output: from the run started at collection, else a run now."""
    proc, _ = request.config.stash.get(_MYPY, (None, None))
    proc = proc or start_mypy(tmp_path / "mypy_cache")
    out, _ = proc.communicate()
    return proc.returncode, out
