"""Result queries and plots on Parquet tables written here through ``storage.append_table``
(local and on a real S3 endpoint), checked against numbers computed from the same rows."""

from __future__ import annotations

import io
import random
import statistics
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from noah_ray.errors import ConfigError
from noah_ray.space import MODULES, SearchSpace, SubnetConfig
from noah_ray.store import results, storage

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _module_cols(cfg: SubnetConfig) -> dict:
    out = {}
    for m in MODULES:
        out[f"{m}_depth"] = cfg.depth(m)
        out[f"{m}_widths"] = list(cfg.layer_widths(m))
    return out


def write_job(root: storage.Location, job: str, dataset: str, *, seed: int, methods=("noah", "linear", "lora"),
              seeds=(0, 1, 2), n_trials=8) -> dict:
    """Tables of one finished job with random numbers; returns what was written."""
    rng = random.Random(seed)
    space = SearchSpace()
    base = root.join(job)
    cfgs = [space.sample(rng) for _ in range(n_trials)]
    trials = [{"run_id": "evolution-seed0", "job": job, "dataset": dataset, "algorithm": "evolution",
               "trial_id": f"g{i // 4:03d}-{i % 4:03d}", "config_key": c.key(), "config_json": c.to_json(),
               **_module_cols(c), "params": 1000 * (i + 1), "params_head": 40, "val_acc": rng.uniform(20, 90),
               "generation": i // 4, "origin": "random", "parent_ids": [], "status": "done",
               "wall_time_s": 0.1, "worker": "w", "timestamp": T0 + timedelta(seconds=i)} for i, c in enumerate(cfgs)]
    trials[-1]["status"], trials[-1]["val_acc"] = "failed", None
    for g in range(n_trials // 4):   # one file per generation, as the search writes them
        storage.append_table(base.join("search"), "trials", pa.Table.from_pylist(trials[4 * g:4 * g + 4]),
                             part=f"evolution-seed0-g{g:04d}")
    done = [t for t in trials if t["status"] == "done"]
    front, best_acc = [], -1.0
    for t in sorted(done, key=lambda t: t["params"]):
        if t["val_acc"] > best_acc:
            front.append(t)
            best_acc = t["val_acc"]
    keep = set(storage.TABLES["pareto"].names)
    storage.append_table(base.join("search"), "pareto",
                         pa.Table.from_pylist([{k: v for k, v in t.items() if k in keep} for t in front]))
    run_rows = []
    for method in methods:
        for s in seeds:
            cfg = cfgs[0] if method == "noah" else SubnetConfig.empty(12)
            run_rows.append({"run_id": f"{method}-seed{s}", "job": job, "dataset": dataset, "method": method,
                             "seed": s, "config_json": cfg.to_json(), "params": rng.randint(0, 10**6),
                             "params_head": 40, "val_acc": rng.uniform(20, 90), "test_acc": rng.uniform(20, 90),
                             "best_epoch": 3, "epochs": 10, "wall_time_s": 1.0, "checkpoint_uri": "x",
                             "timestamp": T0 + timedelta(minutes=len(run_rows))})
            storage.append_table(base.join("retrain"), "runs", pa.Table.from_pylist([run_rows[-1]]),
                                 part=f"{method}-seed{s}")
    metrics = [{"run_id": "supernet", "job": job, "dataset": dataset, "stage": "supernet", "method": "noah",
                "seed": 0, "epoch": e, "subnet": sub, "train_loss": 2.0 / (e + 1), "val_acc": 30.0 + e + k,
                "lr": 1e-3, "images_per_s": 100.0, "timestamp": T0}
               for e in range(3) for k, sub in enumerate(("largest", "smallest"))]
    storage.append_table(base.join("supernet"), "train_metrics", pa.Table.from_pylist(metrics))
    return {"trials": trials, "front": front, "runs": run_rows, "best": max(done, key=lambda t: t["val_acc"])}


@pytest.fixture(scope="module")
def two_jobs(tmp_path_factory):
    root = storage.resolve(str(tmp_path_factory.mktemp("res")))
    written = {"cifar100-noah": write_job(root, "cifar100-noah", "cifar100", seed=1),
               "dmlab-noah": write_job(root, "dmlab-noah", "dmlab", seed=2)}
    return root, written


def test_leaderboard_is_mean_and_std_over_seeds(two_jobs):
    root, written = two_jobs
    lb = results.leaderboard(root.uri)
    assert list(lb.columns) == results.LEADERBOARD_COLUMNS
    assert len(lb) == 6
    for job, w in written.items():
        for method in ("noah", "linear", "lora"):
            rows = [r for r in w["runs"] if r["method"] == method]
            got = lb[(lb["job"] == job) & (lb["method"] == method)].iloc[0]
            assert got["seeds"] == 3
            assert got["test_acc_mean"] == pytest.approx(statistics.fmean(r["test_acc"] for r in rows))
            assert got["test_acc_std"] == pytest.approx(statistics.pstdev(r["test_acc"] for r in rows))
            assert got["params_m"] == pytest.approx(statistics.fmean(r["params"] for r in rows) / 1e6)
    for _, d in lb.groupby("dataset"):          # best first within each dataset
        assert list(d["test_acc_mean"]) == sorted(d["test_acc_mean"], reverse=True)
    # the same numbers when the URI is one job
    one = results.leaderboard(root.join("dmlab-noah").uri)
    assert set(one["job"]) == {"dmlab-noah"} and len(one) == 3


def test_rerun_of_a_seed_replaces_the_older_row(tmp_path):
    root = storage.resolve(str(tmp_path))
    w = write_job(root, "j", "cifar100", seed=3, methods=("noah",), seeds=(0, 1))
    newer = {**w["runs"][0], "test_acc": 99.0, "timestamp": T0 + timedelta(days=1)}
    storage.append_table(root.join("j", "retrain"), "runs", pa.Table.from_pylist([newer]), part="noah-seed0-again")
    assert len(results.load_table(root.uri, "runs")) == 3          # raw table keeps both rows
    r = results.runs(root.uri)
    assert len(r) == 2 and r.loc[r["seed"] == 0, "test_acc"].item() == 99.0
    lb = results.leaderboard(root.uri)
    assert lb["test_acc_mean"].item() == pytest.approx((99.0 + w["runs"][1]["test_acc"]) / 2)


def test_vtab_table_groups(tmp_path):
    root = storage.resolve(str(tmp_path))
    datasets = {"cifar100": "Natural", "dtd": "Natural", "eurosat": "Specialized", "dmlab": "Structured",
                "kitti": "Structured", "gen_texture": None}
    written = {d: write_job(root, f"{d}-job", d, seed=i, methods=("noah", "vpt"), seeds=(0, 1), n_trials=4)
               for i, d in enumerate(datasets)}
    t = results.vtab_table(root.uri).set_index("method")
    # VTAB order first (registry order), then the others
    assert list(t.columns[:6]) == ["cifar100", "dtd", "eurosat", "dmlab", "kitti", "gen_texture"]

    def mean_of(d, m):
        return statistics.fmean(r["test_acc"] for r in written[d]["runs"] if r["method"] == m)

    for m in ("noah", "vpt"):
        groups = {g: statistics.fmean(mean_of(d, m) for d, gg in datasets.items() if gg == g)
                  for g in ("Natural", "Specialized", "Structured")}
        for g, v in groups.items():
            assert t.loc[m, g] == pytest.approx(v)
        assert t.loc[m, "Mean"] == pytest.approx(statistics.fmean(groups.values()))
        assert t.loc[m, "gen_texture"] == pytest.approx(mean_of("gen_texture", m))


def test_trials_pareto_and_generations(two_jobs):
    root, written = two_jobs
    trials = results.load_trials(root.uri)
    assert len(trials) == sum(len(w["trials"]) for w in written.values())
    assert list(trials.columns) == storage.TABLES["trials"].names
    w = written["cifar100-noah"]
    job = results.load_trials(root.join("cifar100-noah").uri)
    assert sorted(job["trial_id"]) == sorted(t["trial_id"] for t in w["trials"])
    # a URI naming the table folder itself works too
    folder = results.load_trials(root.join("cifar100-noah", "search", "trials").uri)
    assert sorted(folder["trial_id"]) == sorted(job["trial_id"])
    widths = job.set_index("trial_id").loc[w["trials"][2]["trial_id"], "lora_widths"]
    assert list(widths) == w["trials"][2]["lora_widths"]
    front = results.pareto(root.join("cifar100-noah").uri)
    assert list(front["trial_id"]) == [t["trial_id"] for t in w["front"]]
    assert front["params"].is_monotonic_increasing and front["val_acc"].is_monotonic_increasing
    assert results.generations(root.uri).empty       # none written here: empty, with the columns
    assert "best_val_acc" in results.generations(root.uri).columns


def test_plain_pandas_reads_the_same_tables(two_jobs):
    root, _ = two_jobs
    path = root.join("cifar100-noah", "search", "trials").path
    plain = pd.read_parquet(path)
    ours = results.load_trials(root.join("cifar100-noah").uri)
    assert sorted(plain["trial_id"]) == sorted(ours["trial_id"])
    assert pq.read_schema(storage.list_files(root.join("cifar100-noah", "search", "trials"))[0].path) \
        .metadata[b"noah_ray_schema_version"] == str(storage.SCHEMA_VERSION).encode()


def test_supernet_curves_and_searched_subnets(two_jobs):
    root, written = two_jobs
    curves = results.supernet_curves(root.uri)
    assert len(curves) == 2 * 3 * 2 and set(curves["subnet"]) == {"largest", "smallest"}
    assert (curves["stage"] == "supernet").all()
    subs = results.searched_subnets(root.uri)
    # the retrained NOAH subnet wins over the best trial
    for job, w in written.items():
        assert subs[job] == SubnetConfig.from_json(w["runs"][0]["config_json"])


def test_searched_subnet_without_retraining_is_the_best_trial(tmp_path):
    root = storage.resolve(str(tmp_path))
    w = write_job(root, "j", "dtd", seed=5, methods=())
    assert results.searched_subnets(root.uri)["j"] == SubnetConfig.from_json(w["best"]["config_json"])


def _is_png(path) -> bool:
    data = open(path, "rb").read()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plots_are_written(two_jobs, tmp_path):
    root, written = two_jobs
    p1 = results.plot_pareto(root.uri, tmp_path / "a" / "pareto.png")
    p2 = results.plot_supernet_curves(root.uri, tmp_path / "curves.png")
    cfg = SubnetConfig.from_json(written["dmlab-noah"]["runs"][0]["config_json"])
    p3 = results.plot_architecture(cfg, tmp_path / "arch.png", title="dmlab")
    for p in (p1, p2, p3):
        assert _is_png(p)
    from PIL import Image

    w, h = Image.open(p3).size
    assert w > h            # layers along x, modules along y
    with pytest.raises(ConfigError, match="no modules"):
        results.plot_architecture(SubnetConfig.empty(12), tmp_path / "x.png")


def test_empty_and_bad_uris(tmp_path):
    (tmp_path / "job").mkdir()
    assert results.leaderboard(str(tmp_path / "job")).empty
    assert results.load_trials(str(tmp_path / "job")).empty
    with pytest.raises(ConfigError, match="no search trials"):
        results.plot_pareto(str(tmp_path / "job"), tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()
    with pytest.raises(ConfigError, match="does not exist"):
        results.leaderboard(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="unsupported"):
        results.load_trials("ftp://host/x")
    with pytest.raises(ConfigError, match="unknown table"):
        results.load_table(str(tmp_path), "nope")


def test_newer_schema_version_is_refused(tmp_path):
    root = storage.resolve(str(tmp_path))
    write_job(root, "j", "dtd", seed=6, methods=("noah",), seeds=(0,))
    f = storage.list_files(root.join("j", "retrain", "runs"))[0]
    t = pq.read_table(f.path)
    pq.write_table(t.replace_schema_metadata({b"noah_ray_schema_version": b"99"}), f.path)
    with pytest.raises(ConfigError, match="schema version 99"):
        results.runs(root.uri)


def test_s3_queries_and_plain_pandas(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    root = storage.resolve(f"s3://{bucket}/noah", endpoint)
    w = write_job(root, "eurosat-noah", "eurosat", seed=7)
    lb = results.leaderboard(f"s3://{bucket}/noah", endpoint=endpoint)
    rows = [r["test_acc"] for r in w["runs"] if r["method"] == "lora"]
    assert lb.set_index("method").loc["lora", "test_acc_mean"] == pytest.approx(np.mean(rows))
    trials = results.load_trials(f"s3://{bucket}/noah/eurosat-noah", endpoint)
    assert len(trials) == len(w["trials"])
    # what a user does without noah_ray: pandas + a pyarrow S3 filesystem
    fs = pafs.S3FileSystem(endpoint_override=endpoint.split("://")[1], scheme="http")
    plain = pd.read_parquet(f"{bucket}/noah/eurosat-noah/search/trials", filesystem=fs)
    assert sorted(plain["trial_id"]) == sorted(trials["trial_id"])
    assert _is_png(results.plot_pareto(f"s3://{bucket}/noah", tmp_path / "p.png", endpoint=endpoint))
    with pytest.raises(ConfigError, match="does not exist"):
        results.leaderboard(f"s3://{bucket}/nothing-here", endpoint=endpoint)


def _write_v1(base: storage.Location, table: str, rows: list[dict], part: str) -> None:
    """A file as schema version 1 wrote it: its own columns, version 1 in the metadata."""
    t = pa.Table.from_pylist(rows)
    t = t.replace_schema_metadata({b"noah_ray_schema_version": b"1"})
    buf = io.BytesIO()
    pq.write_table(t, buf)
    storage.write_bytes(base.join(table, f"{part}.parquet"), buf.getvalue())


def test_schema_v1_files_are_read_as_the_current_schema(tmp_path):
    """v1 pareto files have no timestamp, v1 epochs counted from 0: read back, the timestamp is a
    null column and every epoch counts from 1, the same as in files written now."""
    job = storage.resolve(str(tmp_path)).join("old")
    ids = {"run_id": "evolution-seed0", "job": "old", "dataset": "dtd", "algorithm": "evolution"}
    _write_v1(job.join("search"), "pareto", [{**ids, "trial_id": "c1", "config_json": SubnetConfig.empty(12).to_json(),
                                              "params": 10, "params_head": 4, "val_acc": 50.0}], "evolution-seed0")
    metrics = {"run_id": "supernet", "job": "old", "dataset": "dtd", "stage": "supernet", "method": "noah",
               "seed": 0, "subnet": "largest", "train_loss": 1.0, "val_acc": 40.0, "lr": 1e-3,
               "images_per_s": 10.0, "timestamp": T0}
    _write_v1(job.join("supernet"), "train_metrics", [{**metrics, "epoch": e} for e in (0, 1)], "supernet-old")
    run = {"run_id": "noah-seed0", "job": "old", "dataset": "dtd", "method": "noah", "seed": 0, "config_json": "{}",
           "params": 10, "params_head": 4, "val_acc": 50.0, "test_acc": 45.0, "best_epoch": 0, "epochs": 2,
           "wall_time_s": 1.0, "checkpoint_uri": "x", "timestamp": T0}
    _write_v1(job.join("retrain"), "runs", [run], "noah-seed0-old")
    # a current (v2) file beside them
    storage.append_table(job.join("supernet"), "train_metrics", pa.Table.from_pylist([{**metrics, "epoch": 3}]),
                         part="supernet-e00003")
    front = results.pareto(job.uri)
    assert list(front.columns) == storage.TABLES["pareto"].names and front["timestamp"].isna().all()
    assert sorted(results.supernet_curves(job.uri)["epoch"]) == [1, 2, 3]
    assert list(results.runs(job.uri)["best_epoch"]) == [1]
    assert storage.TABLES["pareto"].field("timestamp").type == storage.TABLES["trials"].field("timestamp").type
    assert storage.SCHEMA_VERSION == 2


def test_pareto_rows_carry_when_they_were_scored(tmp_path):
    from noah_ray.evolution import DONE, Candidate
    from noah_ray.search.store import SearchStore

    store = SearchStore(str(tmp_path / "search"), None, "r", "j", "dtd", "evolution")
    t = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)
    cand = Candidate("c1", SubnetConfig.empty(12), params=10, generation=0, origin="random")
    cand.status, cand.score, cand.info = DONE, 55.0, {"t": t.timestamp(), "params_head": 4}
    store.write_final([cand], cand)
    front = results.pareto(str(tmp_path))
    assert list(front["timestamp"]) == [pd.Timestamp(t)]


def test_no_directory_markers_left_in_s3(s3_bucket, s3_markers):
    """pyarrow writes ``<prefix>/`` markers on create_dir and for a parent emptied by a delete;
    check_writable and every stage (storage.tidy) remove them, through S3's API."""
    endpoint, bucket = s3_bucket
    root = storage.resolve(f"s3://{bucket}/noah/job", endpoint)
    storage.check_writable(root)
    storage.write_text(root.join("keep", "a.txt"), "a")
    with storage.tidy(root):
        root.fs.create_dir(root.join("supernet", "checkpoint_e00000").path)
        storage.write_text(root.join("supernet", "x", "b.txt"), "b")
        root.fs.delete_file(root.join("supernet", "x", "b.txt").path)      # leaves supernet/x/
        with root.fs.open_output_stream(root.join("tune", ".validate_storage_marker").path):
            pass
        assert len(s3_markers(endpoint, bucket)) >= 3
    assert s3_markers(endpoint, bucket) == []
    assert storage.read_text(root.join("keep", "a.txt")) == "a" and storage.exists(root)
    storage.remove_markers(root)                           # nothing left to do: fine
    assert s3_markers(endpoint, bucket) == []
