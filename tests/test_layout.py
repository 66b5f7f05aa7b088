"""JobPaths: the one place that knows where a job's files live (docs/architecture.md)."""

from __future__ import annotations

import pytest

from noah_ray.config import JobConfig
from noah_ray.store.layout import TABLE_STAGES, JobPaths, backbone_trained, retrain_run_id
from noah_ray.store.tables import TABLES


def test_every_location_under_the_job_root(tmp_path):
    p = JobPaths.of(JobConfig.from_dict({"name": "j1", "storage": str(tmp_path)}))
    rel = {k: loc.path[len(str(tmp_path)) + 1:] for k, loc in {
        "root": p.root, "lease": p.lease, "backbone": p.backbone,
        "supernet": p.supernet(), "supernet_default": p.supernet("supernet"), "named": p.supernet("warm"),
        "final": p.supernet_final(), "named_final": p.supernet_final("warm"),
        "search": p.search, "best": p.best_subnet(), "run_best": p.best_subnet("evolution-seed0"),
        "state": p.search_state("r"), "state_v1": p.search_state_v1("r"), "search_tune": p.search_tune,
        "hpo": p.hpo, "hpo_vpt": p.hpo_method("vpt"), "hpo_tune": p.hpo_tune,
        "retrain": p.retrain, "run": p.retrain_run(retrain_run_id("noah", 2)),
        "config": p.retrain_config("noah-seed2", "abc"),
        "trials": p.table("trials"), "runs": p.table("runs"), "sn_metrics": p.table("train_metrics", "supernet"),
    }.items()}
    assert rel == {
        "root": "j1", "lease": "j1/lease.json", "backbone": "j1/backbone.safetensors",
        "supernet": "j1/supernet", "supernet_default": "j1/supernet", "named": "j1/supernet/named/warm",
        "final": "j1/supernet/final", "named_final": "j1/supernet/named/warm/final",
        "search": "j1/search", "best": "j1/search/best_subnet.yaml",
        "run_best": "j1/search/runs/evolution-seed0/best_subnet.yaml",
        "state": "j1/search/state/r", "state_v1": "j1/search/state/r.json", "search_tune": "j1/search/tune",
        "hpo": "j1/hpo", "hpo_vpt": "j1/hpo/vpt", "hpo_tune": "j1/hpo/tune",
        "retrain": "j1/retrain", "run": "j1/retrain/noah-seed2", "config": "j1/retrain/noah-seed2/abc",
        "trials": "j1/search/trials", "runs": "j1/retrain/runs", "sn_metrics": "j1/supernet/train_metrics",
    }


def test_s3_locations_keep_the_uri(s3_endpoint):
    p = JobPaths.at("s3://bucket/prefix", "job", s3_endpoint)
    assert p.supernet_final().uri == "s3://bucket/prefix/job/supernet/final"
    assert p.root.endpoint == s3_endpoint


def test_table_stage_must_be_named_where_two_stages_write_it(tmp_path):
    p = JobPaths.at(str(tmp_path), "j")
    assert set(TABLE_STAGES) == set(TABLES)
    with pytest.raises(ValueError, match="supernet and retrain"):
        p.table("train_metrics")
    with pytest.raises(ValueError, match="does not live in 'search'"):
        p.table("runs", "search")


def test_named_supernet_run_is_one_path_segment(tmp_path):
    from noah_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="supernet run name: '../x'"):
        JobPaths.at(str(tmp_path), "j").supernet("../x")


@pytest.mark.parametrize("meta,run,trained", [
    ({"method": "full", "backbone_trained": True}, "full-seed0", True),
    ({"method": "noah", "backbone_trained": False}, "noah-seed0", False),
    ({"method": "full"}, "x", True),           # before backbone_trained was recorded
    ({"method": "vpt"}, "full-seed0", False),
    ({}, "full-seed1", True),                  # oldest files: only the run name tells
    ({}, "noah-seed1", False),
])
def test_backbone_trained_reads_meta_then_falls_back(meta, run, trained):
    assert backbone_trained(meta, run) is trained
