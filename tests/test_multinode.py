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
