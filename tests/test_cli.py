"""The ``noah-ray`` command: --help everywhere, one-line errors that write nothing, --set
overrides, the results command, and (slow) the whole demo end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from noah_ray.cli import main as cli
from noah_ray.data import write_generated_vtab
from noah_ray.store import storage

SUBCOMMANDS = ("demo", "pipeline", "supernet", "search", "race", "retrain", "hpo", "results", "import-noah", "export")


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_generated_vtab(root, "gen_color", num_train=16, num_val=8, num_test=8)
    return root


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help_everywhere(sub, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([sub, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: noah-ray {sub}") and "--help" in out


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(s in out for s in SUBCOMMANDS)


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"noah-ray {version('noah_ray')}\n"


def test_top_level_help_is_plain_text(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out and ":func:" not in out and "ray job submit --working-dir ." in out


@pytest.mark.parametrize("argv", [[], ["bogus"], ["demo", "--nope"], ["pipeline"], ["results"],
                                  ["results", "x", "--table", "nope"], ["results", "x", "--max-rows", "many"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: noah-ray") and "noah-ray" in err.splitlines()[-1] and "error:" in err


BAD = {
    "unknown dataset": (lambda c: c["data"].update(dataset="cifar1000"), "dataset 'cifar1000' not found"),
    "limit below the smallest subnet": (lambda c: c["search"].update(param_limit=1e-5),
                                        "below the smallest subnet"),
    "unknown module": (lambda c: c["space"]["modules"].update(prefix={"widths": [1]}), "unknown module 'prefix'"),
    "bad URI scheme": (lambda c: c.update(storage="ftp://host/noah"), "scheme 'ftp' unsupported"),
    "S3 URI without bucket": (lambda c: c.update(storage="s3:///noah"), "has no bucket"),
    "bad S3 endpoint": (lambda c: c.update(storage="s3://b/noah", storage_endpoint="localhost:9000"),
                        "is not a URL"),
    "typo in a key": (lambda c: c["search"].update(generation=3), "unknown key 'generation'"),
    "missing checkpoint": (lambda c: c["model"].update(checkpoint="/nonexistent/ViT-B_16.npz"),
                           "model.checkpoint '/nonexistent/ViT-B_16.npz' does not exist"),
    "layers do not match the model": (lambda c: c["space"].update(num_layers=6, modules={"lora": {"depths": [3, 6]}}),
                                      "space.num_layers 6 does not match vit_noah_tiny_patch4_32 (12 blocks)"),
    "unknown baseline": (lambda c: c["retrain"].update(baselines=["prefix"]), "retrain method 'prefix' unknown"),
    "unknown timm model": (lambda c: c["model"].update(name="vit_nope"), "not a timm model"),
    "batch does not split over workers": (lambda c: c["supernet"].update(num_workers=3),
                                          "data.batch_size 8 does not split evenly over supernet.num_workers 3"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_is_one_line_and_writes_nothing(case, tmp_path, data_root, capsys, tiny_job):
    mutate, message = BAD[case]
    cfg = tiny_job(data_root, str(tmp_path / "results"))
    mutate(cfg)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    before_data, before = tree(data_root), tree(tmp_path)
    rc, out, err = run_cli(capsys, "pipeline", "--config", str(path))
    assert rc == 1, (out, err)
    assert err.startswith("noah-ray: error: ") and message in err, err
    assert err.count("\n") == 1
    assert tree(tmp_path) == before and tree(data_root) == before_data
    assert not (tmp_path / "results").exists()


def test_missing_generated_data_is_not_an_error_but_other_data_is(tmp_path, capsys, tiny_job):
    """A generated task is written by the pipeline; a real dataset folder must exist up front."""
    cfg = tiny_job(tmp_path / "nodata", str(tmp_path / "results"))
    cfg["data"]["dataset"] = "dtd"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc, _, err = run_cli(capsys, "supernet", "--config", str(path))
    assert rc == 1 and "data root" in err and "does not exist" in err
    from noah_ray.config import JobConfig
    from noah_ray.run.preflight import resolve

    cfg["data"]["dataset"] = "gen_shape"
    resolve(JobConfig.from_dict(cfg), generate=True)         # fine: it gets generated
    assert not (tmp_path / "nodata").exists()


def test_set_overrides(tmp_path, data_root, capsys, tiny_job):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_job(data_root, str(tmp_path / "r"))))
    job = cli.load_job(str(path), ["search.generations=7", "retrain.seeds=[0, 1, 2]", "storage=s3://b/p",
                                   "model.checkpoint=null"])
    assert job.search.generations == 7 and job.retrain.seeds == (0, 1, 2) and job.storage == "s3://b/p"
    assert job.search.population == 4 and job.model.checkpoint is None       # the rest stays
    for bad, msg in (("search.generations", "use KEY=VALUE"), ("search.nope=1", "unknown key 'nope'"),
                     ("search.generations=[1", "not valid YAML"), ("name.x=1", "'name' is not a section"),
                     ("search.generations=abc", "search.generations")):
        rc, _, err = run_cli(capsys, "search", "--config", str(path), "--set", bad)
        assert rc == 1 and err.startswith("noah-ray: error: ") and msg in err, (bad, err)
    assert not (tmp_path / "r").exists()


def test_retrain_rejects_bad_method_and_subnet(tmp_path, data_root, capsys, tiny_job):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_job(data_root, str(tmp_path / "r"))))
    rc, _, err = run_cli(capsys, "retrain", "--config", str(path), "--method", "prompt")
    assert rc == 1 and "retrain method 'prompt' unknown" in err
    sub = tmp_path / "subnet.yaml"
    sub.write_text("widths: {vpt: [10, 10, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0]}\n")   # vpt is not in this space
    rc, _, err = run_cli(capsys, "retrain", "--config", str(path), "--subnet", str(sub))
    assert rc == 1 and err.startswith("noah-ray: error: ") and "vpt" in err
    rc, _, err = run_cli(capsys, "retrain", "--config", str(path), "--subnet", str(tmp_path / "none.yaml"))
    assert rc == 1 and "does not exist" in err
    assert not (tmp_path / "r").exists()


def test_results_command(tmp_path, capsys):
    job = storage.resolve(str(tmp_path)).join("j")
    rows = [{"run_id": f"{m}-seed{s}", "job": "j", "dataset": "dtd", "method": m, "seed": s, "config_json": "{}",
             "params": 1000, "params_head": 10, "val_acc": 50.0, "test_acc": acc, "best_epoch": 1, "epochs": 2}
            for m, s, acc in (("noah", 0, 70.0), ("noah", 1, 74.0), ("linear", 0, 60.0))]
    storage.append_table(job.join("retrain"), "runs", pa.Table.from_pylist(rows))
    rc, out, _ = run_cli(capsys, "results", job.uri, "--csv", str(tmp_path / "lb.csv"))
    assert rc == 0
    lines = out.splitlines()
    assert "test_acc_mean" in lines[0] and "noah" in lines[1] and "72.0" in lines[1] and "linear" in lines[2]
    assert (tmp_path / "lb.csv").read_text().startswith("dataset,job,method")
    rc, out, _ = run_cli(capsys, "results", job.uri, "--table", "vtab")
    assert rc == 0 and "Natural" in out
    rc, out, _ = run_cli(capsys, "results", job.uri, "--table", "trials")
    assert rc == 0 and "no trials rows" in out
    rc, _, err = run_cli(capsys, "results", str(tmp_path / "missing"))
    assert rc == 1 and err.startswith("noah-ray: error: ") and "does not exist" in err


def test_console_script_error_is_one_line(tmp_path):
    exe = Path(sys.executable).with_name("noah-ray")
    p = subprocess.run([str(exe), "pipeline", "--config", str(tmp_path / "missing.yaml")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert p.stderr == f"noah-ray: error: config file '{tmp_path / 'missing.yaml'}' does not exist; check the path\n"


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    """``noah-ray demo --quick``: generated data, supernet, search, NOAH + baseline retraining,
    the leaderboard and the plots; everything under --out."""
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ""}
    exe = Path(sys.executable).with_name("noah-ray")
    p = subprocess.run([str(exe), "demo", "--quick", "--out", str(out)], capture_output=True, text=True,
                       timeout=900, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    text = p.stdout
    for marker in ("== supernet", "== search", "== retrain", "leaderboard", "plots:"):
        assert marker in text, text[-3000:]
    board = text[text.index("leaderboard"):text.index("plots:")]
    assert "noah" in board and "linear" in board
    plots = [Path(line.strip()) for line in text[text.index("plots:"):].splitlines()[1:] if line.strip().endswith(".png")]
    assert {p.name for p in plots} >= {"pareto.png", "supernet_curves.png", "architecture_demo.png"}
    assert all(p.is_file() and p.stat().st_size > 5000 and out in p.parents for p in plots)
    from noah_ray.store import results

    runs = results.runs(str(out / "demo"))
    # the demo races its finalists (the service's default): NOAH's rows are the race's survivor, noah+
    assert set(runs["method"]) == {"noah+", "linear"} and runs["test_acc"].between(0, 100).all()
    assert len(results.load_trials(str(out / "demo"))) > 0
    assert (out / "demo" / "search" / "best_subnet.yaml").is_file()
    assert sorted(os.listdir(tmp_path)) == ["out"]          # nothing written outside --out
    # the console holds our lines only: no line from Ray's internals (they are in Ray's log files)
    assert p.stderr == "", p.stderr[-3000:]
    progress_lines = text[:text.index("\nsupernet: ")].splitlines()
    ours = re.compile(r"^(noah-ray demo: |== (data|supernet|search|race|retrain): |\[(supernet|search|race|retrain)[ \]])")
    assert [ln for ln in progress_lines if not ours.match(ln)] == []
    for chatter in ("pid=", "PlacementGroupCleaner", "Failed to query", "View detailed results", "tensorboard",
                    "TrainingReport", "Checkpoint", "Trial ", "╭", "WARNING", "INFO", "Traceback"):
        assert chatter not in text, chatter
    assert "[search evolution-seed0] generation 0 (1/1): 4 scored" in text
    # generations mean the same in the log and in the tables (counted from 0)
    assert set(results.generations(str(out / "demo"))["generation"]) == {0}
    assert set(results.load_trials(str(out / "demo"))["generation"]) == {0}
    # epochs mean the same in the log and in the tables (counted from 1)
    assert "[supernet supernet] epoch 1/1 " in text and "[retrain noahplus-seed0] epoch 1/1 " in text
    assert set(results.supernet_curves(str(out / "demo"))["epoch"]) == {1} and set(runs["best_epoch"]) == {1}


def test_unreachable_s3_fails_fast_in_one_line(tmp_path, data_root, capsys, tiny_job):
    cfg = tiny_job(data_root, "s3://bucket/noah")
    cfg["storage_endpoint"] = "http://127.0.0.1:1"           # nothing listens there
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    import ray

    was_running = ray.is_initialized()
    rc, _, err = run_cli(capsys, "supernet", "--config", str(path))
    assert rc == 1 and err.startswith("noah-ray: error: storage 's3://bucket/noah' (endpoint http://127.0.0.1:1) "
                                      "is not writable") and err.count("\n") == 1
    assert ray.is_initialized() == was_running               # failed before starting Ray
    rc, _, err = run_cli(capsys, "results", "s3://bucket/noah", "--endpoint", "http://127.0.0.1:1")
    assert rc == 1 and err.startswith("noah-ray: error: cannot read 's3://bucket/noah'") and err.count("\n") == 1
