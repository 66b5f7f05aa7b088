"""A real multi-node Ray (``ray.cluster_utils.Cluster``: one raylet per node) loses a node.

The scenario runs in its own process (``bench/node_loss.py``), so its cluster never meets the
test session's Ray; storage is the local S3 endpoint, so no node's disk holds the truth."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_supernet_worker_node_dies_mid_epoch_and_the_run_resumes_exactly(s3_bucket):
    endpoint, bucket = s3_bucket
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "node_loss.py"), "--storage", f"s3://{bucket}/nl",
                           "--endpoint", endpoint, "--epochs", "3"],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(out)                                    # recovery_s: measured, reported by the bench, not asserted
    assert "error" not in out and "removed_at" not in out and "recovery_s" in out
    assert out["epochs"] == 3
    assert out["start_epochs"][0] == 0 and len(out["start_epochs"]) == 2      # exactly one restart (the loss)
    assert out["finished_epochs_redone"] == 0     # only the epoch in flight was trained again
    assert out["weights_equal"] and out["max_abs_diff"] == 0.0    # = the run that never lost a node


def test_the_fake_autoscaling_config_keeps_our_yamls_node_types_scaled_to_this_machine(load_bench):
    """``bench/autoscale.py`` runs Ray's autoscaler on ``cluster/aws.yaml``'s node types: same
    names and head, CPUs capped, GPUs a custom resource, max_workers capped, idle timeout short."""
    import yaml

    bench = load_bench("autoscale")
    aws = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    cfg = bench.fake_config(REPO / "cluster" / "aws.yaml", "10.0.0.1:6400", cpus_per_node=1, max_per_type=2,
                            max_workers=3, idle_timeout_minutes=0.1)
    assert set(cfg["available_node_types"]) == set(aws["available_node_types"])
    assert cfg["head_node_type"] == aws["head_node_type"] == "ray.head.default"
    head = cfg["available_node_types"]["ray.head.default"]
    assert head["resources"] == {"CPU": 0.0} and head["max_workers"] == 0       # no work on the head, as in the YAML
    assert cfg["available_node_types"]["gpu.a10g.x1"]["resources"] == {"CPU": 1.0, "GPU_SIM": 1.0}
    assert cfg["available_node_types"]["gpu.a100.x8"]["resources"] == {"CPU": 1.0, "GPU_SIM": 8.0}
    assert [cfg["available_node_types"][t]["max_workers"] for t in ("gpu.a10g.x1", "gpu.a10g.x4", "gpu.a100.x8")] \
        == [2, 2, 1]                                                           # min(YAML's 8 / 2 / 1, 2)
    assert cfg["max_workers"] == 3 and cfg["idle_timeout_minutes"] == 0.1
    assert cfg["provider"]["type"] == "fake_multinode" and cfg["provider"]["gcs_address"] == "10.0.0.1:6400"
