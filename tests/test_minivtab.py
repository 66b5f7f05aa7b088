"""mini-VTAB tasks (VTAB-1k folders, deterministic, registered) and the shipped fractal-pretrained
backbone (loads by its timm tag, beats the random backbone on a linear probe)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from noah_ray.config import DataConfig
from noah_ray.config import datasets as registry
from noah_ray.data import minivtab, read_split
from noah_ray.data.fractal import fill_rate, orbit, sample_category
from noah_ray.nn.backbones import create_backbone

pytest.importorskip("sklearn")
pytest.importorskip("skimage")

SPLIT_SIZES = {"train800": 800, "val200": 200}


def _check_folder(root, name):
    info = registry.get(name)
    cfg = DataConfig(root=str(root), dataset=name)
    splits = {s: read_split(cfg, s, num_classes=info.num_classes) for s in ("train800", "val200", "train800val200", "test")}
    assert {s: len(splits[s]) for s in SPLIT_SIZES} == SPLIT_SIZES
    assert splits["train800val200"] == splits["train800"] + splits["val200"]
    assert len(splits["test"]) == (1797 - 1000 if name == "mv_digits" else 2000)   # v2: 2,000 where the source allows
    for split in ("train800", "test"):
        assert {y for _, y in splits[split]} == set(range(info.num_classes)), f"{name}/{split}: a class is missing"
    with Image.open(splits["test"][0][0]) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
    return splits


def _first_pixels(name, split, n=12):
    gen = minivtab.TASKS[name].split_images(split, 0)
    return [(np.asarray(img), y) for (img, y), _ in zip(gen, range(n))]


def test_the_nine_tasks_cover_vtabs_three_groups():
    groups = {t.group for t in minivtab.TASKS.values()}
    assert len(minivtab.TASKS) >= 8 and groups == set(registry.VTAB_GROUPS)
    for name, task in minivtab.TASKS.items():       # registered: jobs can name them, vtab_table groups them
        info = registry.get(name)
        assert (info.num_classes, info.group, registry.vtab_group(name)) == (task.num_classes, task.group, task.group)


@pytest.mark.parametrize("name", list(minivtab.TASKS))
def test_task_writes_vtab_folders_deterministically(tmp_path, name):
    a = minivtab.write_task(tmp_path / "a", name)
    _check_folder(tmp_path / "a", name)
    for split in ("train800", "test"):               # a second generation yields the same images
        rows = (a / f"{split}.txt").read_text().splitlines()[:12]
        again = _first_pixels(name, split)
        for row, (pix, y) in zip(rows, again):
            rel, label = row.rsplit(maxsplit=1)
            assert int(label) == y and np.array_equal(np.asarray(Image.open(a / rel)), pix)


def test_digits_are_the_real_uci_digits_split_without_overlap(tmp_path):
    from sklearn.datasets import load_digits

    d = minivtab.write_task(tmp_path, "mv_digits")
    splits = _check_folder(tmp_path, "mv_digits")
    assert sum(len(splits[s]) for s in ("train800", "val200", "test")) == len(load_digits().target) == 1797
    small = [np.asarray(Image.open(p).convert("L").resize((8, 8), Image.BILINEAR), dtype=np.float32)
             for p, _ in splits["test"][:5]]
    assert all(img.std() > 20 for img in small)      # real strokes, not blank images
    assert (d / ".generated").read_text().startswith(f"minivtab-v{minivtab.VERSION} mv_digits")


def test_v2_keeps_train_and_val_of_v1_and_never_reuses_an_older_folder(tmp_path, monkeypatch):
    """v2 only adds test images: train800 / val200 are the images v1 had; a v1 folder under the
    data root is neither read by a job nor reused by write_task."""
    v1 = minivtab.write_task(tmp_path / "old", "mv_position")
    (v1 / ".generated").write_text("minivtab-2 mv_position 32 500 0")     # what v1 stamped
    job = minivtab.job_config("mv_position", tmp_path / "s", tmp_path / "old")
    assert job.data.root == str(tmp_path / "old" / f"minivtab-v{minivtab.VERSION}")
    again = minivtab.write_task(tmp_path / "old", "mv_position")          # stamp differs: rewritten
    assert (again / ".generated").read_text().startswith(f"minivtab-v{minivtab.VERSION} ")
    monkeypatch.setattr(minivtab, "NUM_TEST", 500)                       # the v1 test size
    small = minivtab.write_task(tmp_path / "v1", "mv_position")
    for split in ("train800", "val200"):
        assert (small / f"{split}.txt").read_text() == (again / f"{split}.txt").read_text()
        for row in (again / f"{split}.txt").read_text().splitlines()[:20]:
            rel = row.split()[0]
            assert np.array_equal(np.asarray(Image.open(small / rel)), np.asarray(Image.open(again / rel)))


def test_fractal_categories_are_bounded_and_fill_the_image():
    rng = np.random.default_rng(0)
    cats = [sample_category(rng) for _ in range(4)]
    for c in cats:
        assert np.linalg.svd(c.maps[:, :, :2], compute_uv=False).max() < 1      # contractions only
        assert abs(c.probs.sum() - 1) < 1e-9
        pts = orbit(c.maps[None], c.probs[None], 800, rng)[0]
        assert np.isfinite(pts).all() and fill_rate(pts) >= 0.12


# ------------------------------------------------------------------ the shipped backbone
def _features(model, samples):
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32)).permute(2, 0, 1)
                     for p, _ in samples]) / 127.5 - 1.0
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True).numpy()


def test_shipped_weights_load_by_tag_and_beat_the_random_backbone(tmp_path, one_thread):
    from safetensors import safe_open
    from sklearn.linear_model import LogisticRegression

    pre = create_backbone("vit_noah_tiny_patch4_32.fractal", 4).eval()
    rnd = create_backbone("vit_noah_tiny_patch4_32", 4).eval()
    assert rnd.pretrained_cfg["tag"] == "untrained"          # no tag: still the random backbone
    with safe_open(pre.pretrained_cfg["file"], "pt") as f:
        recipe = json.loads(f.metadata()["noah_ray.pretrain"])
        assert not any(k.startswith("head.") for k in f.keys())
    assert recipe["recipe"]["num_classes"] >= 100
    task = "mv_position"
    minivtab.write_task(tmp_path, task)
    cfg = DataConfig(root=str(tmp_path), dataset=task)
    train, test = read_split(cfg, "train800"), read_split(cfg, "test")
    acc = {}
    for name, model in (("pretrained", pre), ("random", rnd)):
        probe = LogisticRegression(max_iter=2000, C=1.0)
        xtr, xte = _features(model, train), _features(model, test)
        mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
        probe.fit((xtr - mu) / sd, [y for _, y in train])
        acc[name] = 100 * probe.score((xte - mu) / sd, [y for _, y in test])
    assert acc["pretrained"] > acc["random"] + 10, acc


# ------------------------------------------------------------------ the benchmark script
def _fake_results(out):
    """A stored benchmark without training: runs of noah, noah+, linear and lora on three tasks x
    3 seeds (linear = base + seed, lora = linear + 10, noah = linear + 8, noah+ = linear + 12), the
    cached floor and the stage times (supernet 60 s, search 120 s, race 30 s, retrain 300 s per task;
    every run's training 20 s; 2 cores per task)."""
    from datetime import datetime, timedelta, timezone

    import pyarrow as pa

    from noah_ray.store import storage

    base = {"mv_digits": 50.0, "mv_photos": 20.0, "mv_count": 40.0}
    offset = {"linear": 0.0, "lora": 10.0, "noah": 8.0, "noah+": 12.0}
    params = {"linear": 0, "lora": 18432, "noah": 11000, "noah+": 12000}
    t0, i = datetime(2026, 1, 1, tzinfo=timezone.utc), 0
    for task, b in base.items():
        loc = storage.resolve(str(out / "pretrained")).join(task, "retrain")
        for method, off in offset.items():
            for seed in range(3):
                i += 1
                row = {"run_id": f"{method}-seed{seed}", "job": task, "dataset": task, "method": method, "seed": seed,
                       "params": params[method], "params_head": 40, "val_acc": 50.0, "test_acc": b + seed + off,
                       "best_epoch": 1, "epochs": 1, "wall_time_s": 20.0, "timestamp": t0 + timedelta(seconds=i),
                       # noah+ reuses the lora runs (their folder): they trained once
                       "checkpoint_uri": f"{task}/{'lora' if method == 'noah+' else method}-seed{seed}"}
                storage.append_table(loc, "runs", pa.Table.from_pylist([row]), part=f"{method}-seed{seed}")
    (out / "pixels.json").write_text(json.dumps({f"v{minivtab.VERSION}": {"mv_digits": 55.0, "mv_photos": 25.0,
                                                                           "mv_count": 30.0}}))
    storage.write_text(storage.resolve(str(out / "pretrained")).join("mv_digits", "supernet", "final", "meta.json"),
                       json.dumps({"train_time_s": 90.0}))
    storage.append_table(storage.resolve(str(out / "pretrained")).join("mv_digits", "race"), "hpo_trials",
                         pa.Table.from_pylist([{"wall_time_s": 30.0}, {"wall_time_s": 6.0}]), part="race")
    stages = {"supernet": 60.0, "search": 120.0, "race": 30.0, "retrain": 300.0}
    (out / "times.json").write_text(json.dumps({"cores_per_task": 2.0, "jobs": {t: stages for t in base}}))


def test_doc_writer_prints_averages_wins_intervals_and_costs_worked_out_by_hand(tmp_path, load_bench):
    bench = load_bench("mini_vtab")
    out = tmp_path / "storage"
    _fake_results(out)
    doc = tmp_path / "mv.md"
    bench.write_doc(doc, out, ["--report"], None, [], "abc123")
    text = doc.read_text()
    assert "Commit: `abc123`" in text and "Command: `python bench/mini_vtab.py --report`" in text
    # noah per task: digits 59, photos 29, count 49 -> Natural 44, Structured 49; groups 46.5, tasks 45.67
    assert "| noah | 46.50 | 45.67 | 45.67 | 3 | 9 |" in text
    assert "| pixels | 35.00 | 36.67 |" in text           # Natural (55 + 25) / 2 = 40, Structured 30
    # paired differences are constant: noah - lora = -2, noah+ - lora = +2, noah - linear = +8
    assert "| noah - lora | -2.00 | [-2.00, -2.00] | 9 |" in text
    assert "| noah+ - lora | +2.00 | [+2.00, +2.00] | 9 |" in text
    assert "| noah - linear | +8.00 | [+8.00, +8.00] | 9 |" in text
    # and racing against the plain procedure: (+2) - (-2) on every pair, once (not noah - noah+)
    assert "| noah+ - noah | +4.00 | [+4.00, +4.00] | 9 |" in text and "| noah - noah+ |" not in text
    lines = text.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("| method | vs "))
    header = [c.strip() for c in lines[at].split("|")]
    table = lines[at + 2:lines.index("", at)]
    cell = {r[1]: dict(zip(header, r)) for r in ([c.strip() for c in ln.split("|")] for ln in table)}
    assert cell["noah"]["vs lora"] == "0-3" and cell["noah+"]["vs lora"] == "3-0"
    assert cell["noah"]["vs pixels"] == "3-0" and cell["linear"]["vs pixels"] == "1-2"   # count 41 > 30 only
    # cost: retrain 300 s = 12 runs x 20 s + 60 s split evenly (5 s a run): 75 s per method and task;
    # noah adds supernet + search (180 s), noah+ also the race (30 s); x 3 tasks, x 2 cores
    costs = {c.method: c for c in bench.method_costs(bench.load_runs(out)[0], bench.Times.read(out))}
    assert costs["noah"].wall_s == pytest.approx(3 * 255) and costs["noah"].cpu_min == pytest.approx(3 * 255 / 30)
    assert costs["noah+"].wall_s == pytest.approx(3 * 285) and costs["lora"].wall_s == pytest.approx(3 * 75)
    assert "pixels" not in costs and "| noah+ | 28.5 | 14.2 | 3 |" in text
    assert "floor (pixels, mean over tasks 36.67 %): all 4 methods clear it" in text
    # training: 3 tasks x 3 distinct methods (noah+ trained nothing) x 3 seeds x 20 s = 540 s; a
    # supernet of 90 s, race trials of 30 + 6 s: 666 s = 11.1 CPU-minutes
    assert "- training epochs alone: 11.1 CPU-minutes (supernet 1.5, race 0.6, retraining 9.0), so at least" in text


def test_summary_of_a_run_without_a_linear_row_skips_the_probe_line(load_bench):
    bench = load_bench("mini_vtab")
    pre = pd.DataFrame({"method": ["noah", "lora"], "mv_digits": [90.0, 92.0], "Mean": [90.0, 92.0],
                        "Mean_tasks": [90.0, 92.0], "params_m": [0.018, 0.018]})
    rnd = pd.DataFrame({"method": ["linear"], "mv_digits": [20.0], "Mean": [20.0]})
    lines = bench.summary(pre, rnd)                          # --methods lora: no linear row on the pretrained side
    assert not any(ln.startswith("linear probe") for ln in lines)
    assert "noah mean 90.00 % (0.0180 M) vs best single module at >= its params: lora 92.00 % (0.0180 M): " \
           "-2.00 points" in lines


def test_mini_vtab_bench_set_overrides_the_recipe_of_both_jobs(tmp_path, load_bench):
    bench = load_bench("mini_vtab")
    args = bench._parser().parse_args(["--quick", "--set", "search.param_min=0.012", "--set", "race.finalists=3"])
    budget = bench.budget_of(args)
    assert budget["search"]["param_min"] == 0.012 and budget["search"]["generations"] == 1   # quick's kept
    (_, pre), (_, rnd) = bench.task_jobs("mv_digits", tmp_path, budget, [0])
    assert pre["search"]["param_min"] == 0.012 and pre["race"]["finalists"] == 3      # the recipe's: 0.0157
    assert rnd["retrain"]["method"] == "linear" and rnd["search"]["param_min"] == 0.012
    with pytest.raises(SystemExit) as e:                   # a usage error: exit 2, before anything runs
        bench.main(["--set", "search", "--out", str(tmp_path)])
    assert e.value.code == 2


@pytest.mark.slow
def test_mini_vtab_bench_quick_on_one_task(tmp_path, ray_session, load_bench):
    """``bench/mini_vtab.py --quick`` settings on one task, through the real pipeline on the
    session's local Ray: NOAH twice (the race's survivor ``noah+`` and the plain procedure
    ``noah``) + a linear probe, the random-backbone probe, the VTAB table and the Markdown report."""
    bench = load_bench("mini_vtab")
    doc = tmp_path / "mini_vtab.md"
    rc = bench.main(["--quick", "--tasks", "mv_position", "--seeds", "0", "--methods", "linear",
                     "--supernet-epochs", "1", "--retrain-epochs", "1", "--out", str(tmp_path), "--doc", str(doc),
                     "--backbone", "vit_noah_tiny_patch4_32.fractal"])
    assert rc == 0
    pre, rnd = bench.tables(tmp_path / "storage")
    assert set(pre["method"]) == {"noah", "noah+", "linear", "pixels"} and set(rnd["method"]) == {"linear"}
    assert {"mv_position", "Structured", "Mean", "Mean_tasks", "params_m"} <= set(pre.columns)
    assert pre["Mean"].between(0, 100).all() and pre.set_index("method").loc["linear", "params_m"] == 0
    text = doc.read_text()
    assert "Commit: `" in text and "linear probe, mean over 1 tasks: pretrained" in text
    assert "| noah - linear |" in text and "| noah - pixels |" in text and "## Cost per method" in text
    assert "| noah+ - linear |" in text and "| noah+ - noah |" in text and "| noah+ | " in text
    times = json.loads((tmp_path / "storage" / "times.json").read_text())
    assert times["jobs"]["mv_position"]["supernet"] > 0
    # the doc names the backbone the run used (--backbone), not the recipe's (.shipped)
    assert times["backbone"] == "vit_noah_tiny_patch4_32.fractal"
    assert "## Pretrained backbone (`vit_noah_tiny_patch4_32.fractal`)" in text
    assert ray_session.is_initialized()                  # the bench left the session's Ray running
