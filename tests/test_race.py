"""Finalist racing (noah_ray.hpo.race): the race section, the brackets' budget, the finalists (the
search's top-K distinct candidates plus the hand-sized baselines at the limit); end to end on Ray
Tune with a tiny ViT: the survivor has the best top-rung score, retraining trains it (with its
raced learning rate), a re-run answers from storage.  The search's outputs are written here
(a trials table and a winner), so the race runs without a supernet."""

import dataclasses
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from noah_ray.config import JobConfig, race_budget
from noah_ray.config.race import rungs
from noah_ray.config.resolved import param_limit
from noah_ray.data import write_generated_vtab
from noah_ray.errors import ConfigError
from noah_ray.hpo import race
from noah_ray.nn.backbones import shape_of
from noah_ray.space import SubnetConfig
from noah_ray.store import results, storage
from noah_ray.store.layout import JobPaths

TINY = "vit_noah_tiny_patch4_32"
SPACE = {"num_layers": 12, "modules": {"lora": {"depths": [6, 12], "widths": [1, 2]},
                                       "adapter": {"depths": [6, 12], "widths": [1, 2]}}}


def job_dict(tiny_job, root: Path, store: str, **race_cfg) -> dict:
    return tiny_job(root, store, name="r", data={"batch_size": 32, "eval_batch_size": 32}, space=SPACE,
                    supernet=None, search={"param_limit": 0.01},
                    retrain={"epochs": 2, "lr": 3e-3, "warmup_epochs": 0, "method": "noah", "baselines": [],
                             "seeds": [0], "max_failures": 0},
                    race={"enabled": True, "finalists": 3, "max_epochs": 2, "grace_period": 1,
                          "reduction_factor": 2, **race_cfg})


def cfg(lora: int, lora_depth: int, adapter: int, adapter_depth: int) -> SubnetConfig:
    return SubnetConfig({"lora": (lora,) * lora_depth + (0,) * (12 - lora_depth),
                         "adapter": (adapter,) * adapter_depth + (0,) * (12 - adapter_depth)})


#: what the search scored (val_acc), in the order it wrote them; the winner is C1 (its best_subnet.yaml)
C1, C2, C3, C4, C5 = cfg(1, 12, 1, 6), cfg(2, 6, 1, 12), cfg(1, 6, 2, 6), cfg(1, 6, 0, 0), cfg(0, 0, 1, 6)
SCORED = [(C4, 40.0, "done"), (C1, 70.0, "done"), (C2, 70.0, "done"), (C2, 65.0, "done"), (C3, 60.0, "done"),
          (C5, 99.0, "failed"), (C4, 55.0, "done")]


def write_search(job: JobConfig) -> None:
    """The search's outputs as the search stage leaves them: the trials rows and the winner."""
    from noah_ray.search.driver import search_run_name

    paths = JobPaths.of(job)
    rows = [{"run_id": search_run_name(job, None), "job": job.name, "dataset": job.data.dataset,
             "algorithm": "evolution", "trial_id": f"t{i}", "config_key": c.key(), "config_json": c.to_json(),
             "params": c.param_count(shape_of(TINY, 1)).modules, "val_acc": None if status == "failed" else acc,
             "status": status, "generation": 0} for i, (c, acc, status) in enumerate(SCORED)]
    rows.append({**rows[0], "run_id": "other-run", "trial_id": "x", "config_json": cfg(2, 12, 2, 12).to_json(),
                 "val_acc": 100.0})                                   # another search run: not this job's
    storage.append_table(paths.search, "trials", pa.Table.from_pylist(rows), part="g0")
    storage.write_text(paths.best_subnet(), C1.to_yaml())


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("race-data")
    write_generated_vtab(root, "gen_color", num_train=64, num_val=32, num_test=32)
    return root


# ----------------------------------------------------------------------------- no Ray
@pytest.mark.parametrize("bad, match", [
    ({"finalists": 0}, r"^config\.race\.finalists: 0 must be > 0$"),
    ({"finalists": 10_000}, r"^config\.race\.finalists: 10000 is above the sane limit 256; check the value$"),
    ({"reduction_factor": 1}, r"^config\.race\.reduction_factor: 1 must be > 1 \(e\.g\. 4: .*\)$"),
    ({"lrs": [0.01, -1]}, r"^config\.race\.lrs: -1 must be > 0, e\.g\. lrs: \[0\.001, 0\.003, 0\.01\]$"),
    ({"lrs": [0.01, 0.01]}, r"^config\.race\.lrs: \[0\.01, 0\.01\] names a value twice; list each learning rate once$"),
    ({"lrs": ["fast"]}, r"^config\.race\.lrs: "),
    ({"grace_period": 5, "max_epochs": 2}, r"^config\.race\.grace_period: 5 exceeds max_epochs 2; lower it$"),
    ({"finalist": 3}, r"^config\.race: unknown key 'finalist'"),
    ({"enabled": "yes"}, r"^config\.race\.enabled: "),
    ({"ties": "params"}, r"^config\.race\.ties: 'params' unknown; use one of incumbent, baseline, best$"),
    ({"tie_se": -1}, r"^config\.race\.tie_se: -1 must be between 0 and 10 standard errors \(e\.g\. 1\)$"),
    ({"tie_se": float("nan")}, r"^config\.race\.tie_se: nan is not a finite number"),
])
def test_bad_race_settings_fail_in_one_line(bad, match):
    with pytest.raises(ConfigError, match=match) as e:
        JobConfig.from_dict({"race": bad})
    assert "\n" not in str(e.value)


def test_racing_is_the_default_and_the_plain_procedure_stays_selectable():
    assert JobConfig().race.enabled and JobConfig().race.finalists == 8 and JobConfig().race.baselines
    job = JobConfig.from_dict({"race": {"enabled": False}})
    assert not race.race_applies(job) and race.race_done(job)
    assert not race.race_applies(JobConfig.from_dict({"retrain": {"subnet": "x.yaml"}}))   # a given subnet wins
    assert not race.race_applies(JobConfig.from_dict({"retrain": {"method": "lora"}}))     # NOAH not retrained
    assert JobConfig.from_dict(JobConfig.from_dict({"race": {"lrs": [0.01]}}).to_dict()).race.lrs == [0.01]


def test_rungs_and_budget_of_the_default_brackets():
    # Ray's milestones grace * rf**k for k < int(log(max_t / grace) / log(rf) + 1), then max_t itself
    assert rungs(6, 4.0, 100) == [6, 24, 96, 100]
    assert rungs(1, 4.0, 6) == [1, 4, 6] and rungs(1, 2.0, 2) == [1, 2] and rungs(3, 4.0, 3) == [3]
    # synchronous halving of 11 trials (8 finalists + 3 baselines), 100 epochs, the default grace 100 // 16:
    # 11 x 6 + ceil(11/4) x (24 - 6) + ceil(3/4) x (96 - 24) + 1 x (100 - 96)
    assert JobConfig().race.grace(100) == 6
    assert race_budget(11, 6, 4.0, 100) == 11 * 6 + 3 * 18 + 1 * 72 + 1 * 4 == 196      # 1.96 retrainings
    assert race_budget(11, 1, 4.0, 6) == 11 + 3 * 3 + 1 * 2                             # the demo's 6 epochs
    assert race_budget(1, 1, 2.0, 2) == 2


def test_the_widest_uniform_baseline_fits_and_one_more_does_not(tiny_job, data_root, tmp_path):
    job = JobConfig.from_dict(job_dict(tiny_job, data_root, str(tmp_path)))
    limit = param_limit(job, shape_of(TINY, 1))
    for kind in ("lora", "adapter", "vpt"):
        best = limit.widest_uniform(kind, 12)
        assert best is not None and set(best.widths) == {kind} and len(set(best.layer_widths(kind))) == 1
        w = best.layer_widths(kind)[0]
        assert limit.count(best) <= 0.01e6 < limit.count(SubnetConfig.uniform(12, **{kind: w + 1}))
    assert limit.widest_uniform("lora", 12, cap=1) == SubnetConfig.uniform(12, lora=1)


def test_finalists_are_the_top_k_distinct_search_candidates_then_the_baselines(tiny_job, data_root, tmp_path):
    job = JobConfig.from_dict(job_dict(tiny_job, data_root, str(tmp_path)))
    write_search(job)
    limit = param_limit(job, shape_of(TINY, 1))
    out = race.pick_finalists(job, limit)
    # the winner first, then by val_acc (C2 ties C1 at 70: more params first), a config once, failed ones never
    assert [f.subnet for f in out[:3]] == [C1, C2, C3]
    assert [f.search_val_acc for f in out[:3]] == [70.0, 70.0, 60.0] and [f.search_rank for f in out[:3]] == [0, 1, 2]
    assert [f.source for f in out] == ["search"] * 3 + ["baseline:lora", "baseline:adapter"]
    assert [f.subnet for f in out[3:]] == [limit.widest_uniform("lora", 12), limit.widest_uniform("adapter", 12)]
    assert all(f.params == limit.count(f.subnet) and limit.ok(f.subnet) for f in out)
    wide = JobConfig.from_dict(job_dict(tiny_job, data_root, str(tmp_path), finalists=8, baselines=False))
    assert [f.subnet for f in race.pick_finalists(wide, limit)] == [C1, C2, C3, C4]   # all 4 distinct ones


def test_retraining_needs_the_finished_race_unless_racing_is_off(tiny_job, data_root, tmp_path):
    from noah_ray.run import pipeline

    job = JobConfig.from_dict(job_dict(tiny_job, data_root, str(tmp_path)))
    write_search(job)
    with pytest.raises(ConfigError, match=r"^no race survivor at .*chosen\.json; run the race stage first "
                                          r"\(noah-ray race\), or set race\.enabled: false") as e:
        pipeline.retrain_subnet(job)
    assert "\n" not in str(e.value)
    job.race.enabled = False
    assert pipeline.retrain_subnet(job) == C1 and race.raced_job(job) is job


def test_the_plain_row_retrains_the_top_scored_candidate_and_its_run_id_is_one_segment(tiny_job, data_root, tmp_path):
    from noah_ray.run import pipeline
    from noah_ray.store.layout import retrain_run_id

    job = JobConfig.from_dict(job_dict(tiny_job, data_root, str(tmp_path), retrain_plain=True))
    write_search(job)
    # NOAH's own choice: the top val accuracy (C1 and C2 tie at 70.0: C1 has fewer params); the failed
    # C5 (99.0) and another run's candidate (100.0) never count
    assert C1.param_count(shape_of(TINY, 1)).modules < C2.param_count(shape_of(TINY, 1)).modules
    assert race.top_scored(job) == C1
    assert retrain_run_id("noah+", 0) == "noahplus-seed0" and retrain_run_id("noah", 1) == "noah-seed1"
    survivor = race.RaceResult(C3.to_dict(), "search", 2, "t2", None, 60.0, 2, 1, 5, 5, 3, 7, 7, "x")
    storage.write_text(JobPaths.of(job).race_chosen, json.dumps(dataclasses.asdict(survivor)))
    assert pipeline.noah_rows(job) == {"noah+": C3, "noah": C1}      # both rows, each its own subnet
    job.race.retrain_plain = False
    assert list(pipeline.noah_rows(job)) == ["noah+"]
    job.race.enabled = False
    assert pipeline.noah_rows(job) == {"noah": C1}
    hpo = job_dict(tiny_job, data_root, str(tmp_path), retrain_plain=True)
    with pytest.raises(ConfigError, match=r"^race\.retrain_plain: true with an hpo section: .*set "
                                          r"race\.retrain_plain: false, or remove hpo$"):
        pipeline.preflight(JobConfig.from_dict({**hpo, "hpo": {"trials": 2}}), ("retrain",))


def test_race_command_refuses_a_bad_race_section_in_one_line(tiny_job, data_root, tmp_path, capsys):
    from noah_ray.cli import main as cli

    data = job_dict(tiny_job, data_root, str(tmp_path / "store"), reduction_factor=0.5)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
    rc = cli.main(["race", "--config", str(tmp_path / "job.yaml"), "--address", "127.0.0.1:9"])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and "race.reduction_factor: 0.5 must be > 1" in err
    assert not (tmp_path / "store").exists()


# ----------------------------------------------------------------------------- Ray Tune
@pytest.mark.slow
def test_race_picks_the_best_top_rung_finalist_and_retraining_trains_it(ray_session, data_root, tmp_path, tiny_job):
    from noah_ray.run import pipeline

    job = JobConfig.from_dict(job_dict(tiny_job, data_root, str(tmp_path), lrs=[3e-2, 1e-6], retrain_plain=True))
    write_search(job)
    summary = pipeline.run_stages(job, ("race", "retrain"))
    uri = str(tmp_path / "r")
    fin = results.finalists(uri)
    assert len(fin) == 5 * 2 and (fin.status == "done").all()
    assert sorted(fin.source.unique()) == ["baseline:adapter", "baseline:lora", "search"]
    assert fin[fin.source == "search"].config_key.nunique() == 3
    assert sorted(fin.lr.unique()) == [1e-6, 3e-2] and fin.groupby("finalist").lr.nunique().eq(2).all()
    # rung scores are the curve's val accuracy at the rung epochs the trial reached
    curves = results.load_table(uri, "hpo_curves").set_index(["trial_id", "epoch"]).val_acc
    for row in fin.itertuples():
        assert list(row.rungs) == [e for e in (1, 2) if e <= row.epochs_run]
        assert list(row.rung_scores) == [curves[(row.trial_id, e)] for e in row.rungs]
        assert row.last_val_acc == row.rung_scores[-1] and row.stopped == (row.epochs_run < 2)
    # the survivor (race.ties: incumbent, the default): the hand-sized LoRA (both of its learning rates)
    # ran to the top rung, never cut; it survives unless the best-ranked trial there beats it by
    # McNemar's exact one-sided test on the 32 val images at 0.05 / 8 (8 other trials started)
    lora = fin[fin.source == "baseline:lora"]
    assert len(lora) == 2 and (lora.epochs_run == 2).all() and (lora.status == "done").all()
    top = fin[fin.epochs_run == fin.epochs_run.max()]
    chosen = fin[fin.chosen]
    assert len(chosen) == 1 and chosen.trial_id.iloc[0] in set(top.trial_id)
    last = {r["trial_id"]: json.loads(r["config_json"])["last_result"] for r in
            pq.read_table(tmp_path / "r" / "race" / "hpo_trials").to_pylist()}
    ranked = sorted(top.itertuples(), key=lambda r: (-r.last_val_acc, r.last_val_loss, -r.params, r.finalist,
                                                     r.trial_id))
    best, inc = ranked[0], next(r for r in ranked if r.source == "baseline:lora")
    saved = json.loads((tmp_path / "r" / "race" / "chosen.json").read_text())
    assert saved["ties"] == "incumbent" and saved["incumbent"] == inc.finalist
    if best.trial_id == inc.trial_id:
        assert chosen.trial_id.iloc[0] == inc.trial_id and saved["paired"] is None
    else:
        bits = [[(int(h, 16) >> (3 - i)) & 1 for h in last[t]["val_hits"] for i in range(4)][:32]
                for t in (best.trial_id, inc.trial_id)]
        assert [sum(b) for b in bits] == [round(x * 32 / 100) for x in (best.last_val_acc, inc.last_val_acc)]
        b = sum(x and not y for x, y in zip(*bits))
        c = sum(y and not x for x, y in zip(*bits))
        p = sum(math.comb(b + c, k) for k in range(b, b + c + 1)) / 2 ** (b + c)
        assert chosen.trial_id.iloc[0] == (best.trial_id if p < 0.05 / 8 else inc.trial_id)
        assert (saved["paired"]["b"], saved["paired"]["c"], saved["paired"]["n"]) == (b, c, 32)
        assert math.isclose(saved["paired"]["p"], p) and math.isclose(saved["paired"]["level"], 0.05 / 8)
    assert saved["top_val_acc"] == (best.last_val_acc if chosen.trial_id.iloc[0] != best.trial_id else None)
    assert saved["trial_id"] == chosen.trial_id.iloc[0] and saved["lr"] == chosen.lr.iloc[0]
    assert SubnetConfig.from_json(chosen.config_json.iloc[0]) == SubnetConfig.from_dict(saved["subnet"])
    assert saved["epochs_trained"] == fin.epochs_run.sum() and summary["race"]["trial_id"] == saved["trial_id"]
    # how close the last contested rung was: 32 val images; s.e. of the best there, written out
    contested = max(e for e in (1, 2) if sum(e in list(r.rungs) for r in fin.itertuples()) > 1)
    at = [r.rung_scores[list(r.rungs).index(contested)] for r in fin.itertuples() if contested in list(r.rungs)]
    q = (max(at) / 100 * 32 + 2) / 36
    se = 100 * math.sqrt(q * (1 - q) / 36)
    assert saved["decided_at"] == contested and saved["val_images"] == 32 and math.isclose(saved["val_se"], se)
    assert saved["tied"] == sum(max(at) - x <= se for x in at) - 1
    # retraining trained the survivor with its raced learning rate as the row noah+, and (retrain_plain)
    # the search's top-scored candidate with retrain.lr as the row noah: C1 (70.0, fewer params than C2)
    _, meta = storage.load_state(storage.resolve(str(tmp_path / "r" / "retrain" / "noahplus-seed0" / "final")))
    assert SubnetConfig.from_dict(meta["subnet"]) == SubnetConfig.from_dict(saved["subnet"])
    assert math.isclose(meta["spec"]["lr"], saved["lr"]) and meta["spec"]["method"] == "noah"
    _, plain = storage.load_state(storage.resolve(str(tmp_path / "r" / "retrain" / "noah-seed0" / "final")))
    assert SubnetConfig.from_dict(plain["subnet"]) == C1 and math.isclose(plain["spec"]["lr"], 3e-3)
    rows = results.runs(uri).set_index("method")
    assert sorted(rows.index) == ["noah", "noah+"] and sorted(summary["retrain"]) == ["noah", "noah+"]
    assert SubnetConfig.from_json(rows.loc["noah", "config_json"]) == C1
    # a finished race and retraining answer from storage: no Ray, nothing rewritten
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "r").rglob("*") if p.is_file() and "runs" not in p.parts}
    assert pipeline.preflight(job, ("race", "retrain")).pending == ()
    again = pipeline.run_stages(job, ("race", "retrain"), start_ray=lambda: pytest.fail("Ray was started"))
    assert again["race"]["trial_id"] == saved["trial_id"]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "r").rglob("*") if p.is_file()
            and "runs" not in p.parts and p.name != "lease.json"} == {p: t for p, t in files.items()
                                                                      if p.name != "lease.json"}
    # other finalists: the race refuses to resume over the stored one
    changed = JobConfig.from_dict(job_dict(tiny_job, data_root, str(tmp_path), lrs=[3e-2, 1e-6], finalists=2))
    (tmp_path / "r" / "race" / "chosen.json").unlink()
    with pytest.raises(ConfigError, match="was started with other finalists"):
        pipeline.run_stages(changed, ("race",))
    assert len(results.hpo(uri)) == 0                   # the race's trials are not hyper-parameter trials
    assert results.plot_finalists(uri, tmp_path / "f.png").stat().st_size > 5000


def test_the_last_contested_rung_counts_the_trials_within_one_standard_error_of_its_best():
    """At epoch 4 (the last rung two trials reached) the best is 92.0 % on 200 images (184 hits):
    s.e. 100 * sqrt(q (1 - q) / 204) with q = 186 / 204 = 1.986 points; 90.5 lies within it, 90.0
    and 86.0 do not;
    the epoch-10 rung had one trial and decided nothing."""
    curves = {"a": {1: 60.0, 4: 92.0, 10: 94.0}, "b": {1: 58.0, 4: 90.5}, "c": {1: 57.0, 4: 90.0},
              "d": {1: 55.0, 4: 86.0}, "e": {1: 40.0}}
    ties = race.rung_ties(curves, [1, 4, 10], 200)
    assert ties is not None and (ties.rung, ties.best, ties.n, ties.tied) == (4, 92.0, 200, 1)
    assert math.isclose(ties.se, 100 * math.sqrt(186 * 18 / 204 ** 3))
    assert race.rung_ties({"a": {1: 50.0, 4: 50.0}, "b": {1: 50.0}}, [1, 4], 100).tied == 1   # exact ties count
    assert race.rung_ties({"a": {1: 70.0}}, [1, 4], 200) is None                             # one racer
    unknown = race.rung_ties(curves, [1, 4, 10], None)                                       # images not recorded
    assert unknown is not None and unknown.se is None and unknown.tied == 0
    res = {"decided_at": 4, "tied": 1, "val_se": ties.se, "val_images": 200}
    assert race.tie_clause(res) == "; at epoch 4, 1 other trial(s) within 1 s.e. (1.99 points on 200 images) of the best"
    assert race.tie_clause({"decided_at": 0, "val_se": None}) == "" and race.tie_clause({}) == ""


def test_the_survivor_does_not_depend_on_the_order_tune_returns_results_in():
    """Two learning rates of one finalist tie at the top rung (same accuracy and loss): the earlier
    trial wins whatever order the results come in (a retried trial finishes last); then the rule's
    other keys, each written out."""
    def row(trial: str, finalist: int, acc: float, loss: float, epoch: int = 4) -> dict:
        return {"trial_id": trial, "config": {"finalist": finalist}, "m": {"epoch": epoch, "val_acc": acc,
                                                                          "val_loss": loss}}

    params = [100, 300, 200]
    tied = [row("r_00002", 0, 90.0, 0.5), row("r_00000", 0, 90.0, 0.5), row("r_00005", 2, 80.0, 0.1)]
    for order in (tied, tied[::-1], tied[1:] + tied[:1]):
        assert race.survivor(order, params)["trial_id"] == "r_00000"
    assert race.survivor([row("a", 1, 90.0, 0.5), row("b", 0, 90.0, 0.4)], params)["trial_id"] == "b"  # lower loss
    assert race.survivor([row("a", 0, 90.0, 0.5), row("b", 1, 90.0, 0.5)], params)["trial_id"] == "b"  # more params
    same = [100, 100, 100]
    assert race.survivor([row("b", 1, 90.0, 0.5), row("a", 2, 90.0, 0.5)], same)["trial_id"] == "b"  # earlier finalist
    # only the trials that reached the top rung count, however good a stopped one was
    assert race.survivor([row("a", 0, 99.0, 0.1, epoch=2), row("b", 1, 70.0, 0.9)], params)["trial_id"] == "b"


# ------------------------------------------------------------------ synchronous successive halving
#: finalist -> val accuracy at epochs 1..6 (loss equal): the order changes from rung to rung
_SH_ACC = {0: [10, 11, 12, 13, 14, 15], 1: [50, 30, 31, 32, 33, 34], 2: [40, 60, 61, 40, 41, 42],
           3: [30, 50, 51, 70, 71, 72], 4: [20, 21, 22, 23, 24, 25]}


def test_cohorts_replay_successive_halving_from_the_rung_scores():
    """Rungs 1, 2, 4 (top 6), rf 2: 5 trials -> the best 3 at epoch 1 -> the best 2 at 2 -> 1 at 4,
    worked out by hand from the table above; an undecided rung names itself."""
    from noah_ray.hpo.halving import cohorts

    def scores(upto: int, trials=range(5)) -> dict:
        return {f"t{f}": {e: (float(_SH_ACC[f][e - 1]), 1.0) for e in (1, 2, 4) if e <= upto} for f in trials}

    order = [f"t{f}" for f in range(5)]
    def rank(t, s):
        return s

    assert cohorts(order, {}, (1, 2, 4), 2, rank).pending == 1
    st = cohorts(order, scores(1), (1, 2, 4), 2, rank)
    assert (st.racing, st.pending) == (("t1", "t2", "t3"), 2)              # 50, 40, 30 of 10..50
    st = cohorts(order, scores(2, (1, 2, 3)) | {"t0": {1: (10.0, 1.0)}, "t4": {1: (20.0, 1.0)}}, (1, 2, 4), 2, rank)
    assert (st.racing, st.pending) == (("t2", "t3"), 4)                     # 60, 50 beat 30
    st = cohorts(order, scores(4, (2, 3)) | {f"t{f}": {e: (float(_SH_ACC[f][e - 1]), 1.0) for e in (1, 2)}
                                            for f in (1,)} | {"t0": {1: (10.0, 1.0)}, "t4": {1: (20.0, 1.0)}},
                 (1, 2, 4), 2, rank)
    assert (st.racing, st.pending) == (("t3",), None)                       # 70 beats 40
    # a rung waits for every trial still racing; equal scores go to the earlier trial
    assert cohorts(order, {t: {1: (5.0, 1.0)} for t in order[:4]}, (1,), 2, rank).pending == 1
    assert cohorts(order, {t: {1: (5.0, 1.0)} for t in order}, (1,), 2, rank).racing == ("t0", "t1", "t2")


@pytest.mark.slow
def test_sync_halving_stops_the_same_trials_whatever_order_results_arrive(ray_session, tmp_path):
    """5 trials, rungs 1, 2, 4, 6, rf 2 through real Ray Tune: the epochs each trial ran are the
    hand-worked halving above, with two opposite orders of arrival (per-trial delays), 2 trials at
    once and 1 at a time; with 1 at a time (the session's Ray has 2 CPUs) no two trials' epochs
    overlap: the variant generator, not the CPUs, held the second trial back."""
    from ray import tune

    from noah_ray.hpo.halving import GatedVariants, SyncHalving

    acc = dict(_SH_ACC)                    # the trial function is pickled by value (this module is not
    log = str(tmp_path / "epochs.log")     # importable in Ray's workers), with what it captures

    def trainable(config):
        """A race-like trial: deterministic scores, a checkpoint every epoch, resumes from it."""
        import tempfile
        import time
        from pathlib import Path

        from ray import tune

        ckpt, start = tune.get_checkpoint(), 0
        if ckpt is not None:
            start = int((Path(ckpt.path) / "epoch").read_text())
        for epoch in range(start + 1, 7):
            t0 = time.time()
            time.sleep(config["delay"] + 0.05)
            with open(log, "a") as f:
                f.write(f"{config['run']} {config['finalist']} {t0} {time.time()}\n")
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "epoch").write_text(str(epoch))
                tune.report({"epoch": epoch, "val_acc": float(acc[config["finalist"]][epoch - 1]), "val_loss": 1.0},
                            checkpoint=tune.Checkpoint.from_directory(d))

    def run(delays: list[float], name: str, concurrent: int) -> dict[int, int]:
        sched = SyncHalving(5, [1, 2, 4, 6], 2, concurrent, rank=lambda config, score, tid: score)
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 1}),
            param_space={"finalist": tune.grid_search(list(range(5))), "run": name, "delay": tune.sample_from(
                lambda spec: delays[spec.config.finalist])},
            tune_config=tune.TuneConfig(metric="val_acc", mode="max", scheduler=sched, reuse_actors=True,
                                        search_alg=GatedVariants(sched)),
            run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0))
        grid = tuner.fit()
        assert grid.num_errors == 0 and grid.num_terminated == 5, grid.errors   # cut trials stop (none left paused)
        failed = list((tmp_path / name).rglob("error.txt"))        # Tune's record of any failure, even recovered
        assert failed == [], failed[0].read_text()[-1500:]
        return {r.config["finalist"]: int(r.metrics["epoch"]) for r in grid}

    expected = {0: 1, 1: 2, 2: 4, 3: 6, 4: 1}
    assert run([0.0, 0.3, 0.1, 0.2, 0.0], "a", 2) == expected
    assert run([0.3, 0.0, 0.2, 0.0, 0.1], "b", 1) == expected
    spans = sorted((float(a), float(b), int(f)) for r, f, a, b in (ln.split() for ln in Path(log).read_text().splitlines())
                   if r == "b")
    assert len(spans) == sum(expected.values())                            # every epoch of run b logged once
    assert all(nxt[0] >= cur[1] or nxt[2] == cur[2] for cur, nxt in zip(spans, spans[1:]))   # one at a time


class _Tune:
    """A stand-in for Tune's controller: ``stop_trial`` records the trial, marks it ended and calls
    the scheduler back at once, as Tune's does."""

    def __init__(self, trials: list) -> None:
        self.trials, self.stopped, self.sched = trials, [], None

    def get_trials(self) -> list:
        return self.trials

    def stop_trial(self, trial) -> None:
        from ray.tune.experiment import Trial

        self.stopped.append(trial.trial_id)
        if trial.status in (Trial.PENDING, Trial.PAUSED):
            self.sched.on_trial_remove(self, trial)
        trial.status = Trial.TERMINATED


def _standin(n: int, rf: float, marks: list[int], acc: dict, history: dict | None = None, order=None,
             rescue=None):
    """``n`` stand-in trials ``a_0000k`` (finalist k, pending), added in ``order``, under SyncHalving."""
    from types import SimpleNamespace

    from ray.tune.experiment import Trial

    from noah_ray.hpo.halving import SyncHalving

    trials = [SimpleNamespace(trial_id=f"a_{k:05d}", config={"finalist": k}, is_saving=False, status=Trial.PENDING,
                              relative_logdir=f"trial_{k}") for k in range(n)]
    tc = _Tune(trials)
    tc.sched = SyncHalving(n, marks, rf, 2, rank=lambda config, score, tid: score,
                           history=(lambda: history) if history is not None else None, rescue=rescue)
    for k in order or range(n):
        tc.sched.on_trial_add(tc, trials[k])
    return tc, trials


def _report(tc, trial, epoch: int, acc: float) -> str:
    from ray.tune.experiment import Trial

    trial.status = Trial.RUNNING
    action = tc.sched.on_trial_result(tc, trial, {"epoch": epoch, "val_acc": acc, "val_loss": 1.0})
    trial.status = {"PAUSE": Trial.PAUSED, "STOP": Trial.TERMINATED}.get(action, Trial.RUNNING)
    return action


def test_sync_halving_keeps_its_decisions_through_a_retry_and_a_permanent_error():
    """The default race's shape: 11 trials, rf 4, rungs 6, 24, 96, 100.  After rung 6 (the best 3:
    a_00000..2), a_00000 fails and Tune retries it (status ERROR, on_trial_error, then pending and
    added again): it still races and nothing is stopped.  Then a_00001 fails for good: it leaves
    rung 24, and no trial cut at rung 6 comes back."""
    from ray.tune.experiment import Trial

    tc, trials = _standin(11, 4, [6, 24, 96, 100], {})
    for k, t in enumerate(trials):
        assert _report(tc, t, 6, 100.0 - k) == ("STOP" if k == 10 else "PAUSE")   # the last decides, is cut
    assert tc.sched.standing().racing == ("a_00000", "a_00001", "a_00002") and tc.sched.standing().pending == 24
    assert sorted(tc.stopped) == [f"a_{k:05d}" for k in range(3, 10)]          # a_00010 stopped by STOP
    first = list(tc.stopped)
    t0 = trials[0]
    t0.status = Trial.ERROR                                                   # Tune's retry sequence
    tc.sched.on_trial_error(tc, t0)
    t0.status = Trial.PENDING
    tc.sched.on_trial_add(tc, t0)
    assert tc.sched.standing().racing == ("a_00000", "a_00001", "a_00002") and tc.stopped == first
    t1 = trials[1]
    t1.status = Trial.RUNNING                                                 # a permanent failure
    tc.sched.on_trial_error(tc, t1)
    t1.status = Trial.ERROR
    st = tc.sched.standing()
    assert st.racing == ("a_00000", "a_00002") and st.pending == 24 and tc.stopped == first
    assert _report(tc, trials[2], 24, 50.0) == "PAUSE" and _report(tc, t0, 24, 40.0) == "STOP"
    assert tc.sched.standing().racing == ("a_00002",) and tc.stopped == first
    assert tc.sched.choose_trial_to_run(tc) is trials[2]                      # the survivor resumes


def test_sync_halving_ties_go_to_the_earlier_trial_in_any_order_of_adding():
    """Tune adds restored trials newest first: a tie at a rung still goes to the earlier trial."""
    for order in (range(4), [3, 2, 1, 0], [2, 0, 3, 1]):
        tc, trials = _standin(4, 2, [1, 2], {}, order=list(order))
        for t in trials:
            _report(tc, t, 1, 70.0)
        assert tc.sched.standing().racing == ("a_00000", "a_00001")


def test_a_restored_sync_race_decides_from_the_recorded_scores():
    """``Tuner.restore`` re-creates the scheduler empty: it takes the rung scores recorded so far
    (``history``).  Recorded: all 5 at rung 1 (a_00001..3 went on), a_00001 and a_00002 at rung 2.
    Tune starts the restored pending trials itself: one that trains past rung 2 is paused there; a_00003's
    rung-2 score decides; the cut a_00001 is stopped; a_00002, let through, is the one to resume."""
    from ray.tune.experiment import Trial

    acc = {f"a_{f:05d}": {e: (float(_SH_ACC[f][e - 1]), 1.0) for e in (1, 2)} for f in range(5)}
    history = {t: {1: s[1]} for t, s in acc.items()} | {t: acc[t] for t in ("a_00001", "a_00002")}
    tc, trials = _standin(5, 2, [1, 2, 4, 6], acc, history=history, order=[4, 3, 2, 1, 0])
    trials[4].status = Trial.TERMINATED
    trials[0].relative_logdir = None      # made again by the generator after the restore: never started
    st = tc.sched.standing()
    assert (st.racing, st.pending) == (("a_00001", "a_00002", "a_00003"), 2)
    tc.sched.on_trial_remove(tc, trials[4])
    assert tc.stopped == []                      # Tune cannot report on a trial stopped before it had a folder
    assert _report(tc, trials[0], 1, 10.0) == "STOP"                           # cut at rung 1: stops at once
    assert tc.sched.choose_trial_to_run(tc) is None                           # nothing paused to resume
    assert _report(tc, trials[1], 3, 31.0) == "PAUSE"                          # past rung 2: wait there
    assert _report(tc, trials[2], 3, 61.0) == "PAUSE"
    assert _report(tc, trials[3], 2, acc["a_00003"][2][0]) == "CONTINUE"       # 60 and 50 beat 30
    assert tc.stopped == ["a_00001"] and tc.sched.standing().racing == ("a_00002", "a_00003")
    assert tc.sched.choose_trial_to_run(tc) is trials[2]


def test_a_restored_variant_generator_keeps_its_live_scheduler(tmp_path):
    """Tune saves the generator's state in every experiment checkpoint and sets it back on restore:
    the scheduler must not travel with it (a frozen copy would keep the gate shut for ever)."""
    from noah_ray.hpo.halving import GatedVariants, SyncHalving

    def sched() -> SyncHalving:
        return SyncHalving(3, [1, 2], 2, 1, rank=lambda config, score, tid: score)

    first = GatedVariants(sched())
    assert "scheduler" not in first.get_state()
    first.save_to_dir(str(tmp_path), "s")
    live = sched()
    again = GatedVariants(live)
    again.restore_from_dir(str(tmp_path))
    assert again.scheduler is live
    again.set_state({**again.get_state(), "scheduler": sched()})      # a state that still carries one
    assert again.scheduler is live


# ------------------------------------------------------------------ race.ties: baseline
def _top(trial: str, finalist: int, acc: float, epoch: int = 4) -> dict:
    return {"trial_id": trial, "config": {"finalist": finalist}, "m": {"epoch": epoch, "val_acc": acc, "val_loss": 1.0}}


def test_a_baseline_within_one_standard_error_of_the_best_is_the_survivor():
    """Finalists 0-2 from the search, 3-4 the hand-sized baselines; 200 val images.  The best at the
    top rung scores 92.0 % (184 hits): s.e. 100 * sqrt(q (1 - q) / 204), q = 186 / 204, = 1.986 points,
    so the window starts at 90.014.  Baselines at 90.5 and 90.2 are tied with it: the better of them survives; at 90.0 and
    89.9 neither is, and the search's finalist does.  A baseline stopped at an earlier rung never
    counts, and under ``ties: best`` (no rule) the best score wins."""
    rule = race.TieRule(frozenset({3, 4}), 200, 1.0)
    params = [100, 100, 100, 100, 100]
    rows = [_top("a", 0, 92.0), _top("b", 1, 91.0), _top("c", 4, 90.2), _top("d", 3, 90.5)]
    assert race.survivor(rows, params, rule)["trial_id"] == "d"
    assert race.survivor(rows, params)["trial_id"] == "a"
    apart = [_top("a", 0, 92.0), _top("c", 4, 89.9), _top("d", 3, 90.0), _top("e", 3, 99.0, epoch=1)]
    assert race.survivor(apart, params, rule)["trial_id"] == "a"
    assert race.survivor(apart, params, race.TieRule(frozenset({3, 4}), 200, 2.0))["trial_id"] == "d"   # 2 s.e.: 88.03
    assert race.survivor(rows, params, race.TieRule(frozenset({3, 4}), None, 1.0))["trial_id"] == "a"   # n unknown
    R = race.Racer
    assert race.TieRule(frozenset({3}), 200, 1.0).pick([]) is None
    assert race.TieRule(frozenset({3}), 200, 1.0).pick([R(3, 90.08, "x"), R(0, 90.0, "a")]) == "x"   # the best itself
    assert race.TieRule(frozenset({3}), 200, 1.0).pick([R(0, 92.0, "a"), R(3, 90.015, "x")]) == "x"
    assert race.TieRule(frozenset({3}), 200, 1.0).pick([R(0, 92.0, "a"), R(3, 90.014, "x")]) is None   # from 90.0141
    kept = {"top_finalist": 0, "top_val_acc": 92.0}
    assert race.tie_clause(kept) == "; kept as tied with the best, finalist 0 (val 92.00%), under race.ties: baseline"


def test_the_tie_rule_applies_to_baselines_only_and_is_in_the_race_settings(tiny_job, data_root, tmp_path):
    """``TieRule.of``: the baselines' finalist indices, the val split's size asked only when the rule
    applies; ``ties: best`` leaves the settings as races before the option wrote them."""
    job = JobConfig.from_dict(job_dict(tiny_job, data_root, str(tmp_path), ties="baseline"))
    assert job.race.tie_se == 1.0                                                  # the default
    write_search(job)
    fin = race.pick_finalists(job, param_limit(job, shape_of(TINY, 1)))
    rule = race.TieRule.of(job, fin, race._val_images)
    assert rule is not None and rule.val_images == 32                              # data_root's val split
    assert rule.baselines == {i for i, f in enumerate(fin) if f.source.startswith("baseline:")} == {3, 4}
    assert race._settings(job, fin)["race"]["ties"] == "baseline"
    best = JobConfig.from_dict(job_dict(tiny_job, data_root, str(tmp_path), ties="best"))
    assert race.TieRule.of(best, fin, lambda j: pytest.fail("val split read")) is None
    assert "ties" not in race._settings(best, fin)["race"] and "tie_se" not in race._settings(best, fin)["race"]
    search_only = [f for f in fin if f.source == "search"]
    assert race.TieRule.of(job, search_only, lambda j: pytest.fail("val split read")) is None
    assert race.sync_race(job, [f.params for f in fin], rule)[0].rescue is not None


def test_sync_halving_keeps_a_tied_baseline_beside_the_rungs_best():
    """5 trials, rf 2, rung 1 then the top at 4; finalists 3 and 4 are baselines; 200 val images.
    Rung 1: 80, 78, 79 (search), 77.5 and 60 (baselines).  The best 3 go on (80, 79, 78); s.e. of 80 %
    is 100 * sqrt(q (1 - q) / 204), q = 162 / 204, = 2.831, so 77.5 >= 77.169 is tied and goes on too; at
    77.0 it is not."""
    import functools

    rule = race.TieRule(frozenset({3, 4}), 200, 1.0)
    for baseline, racing in ((77.5, ("a_00000", "a_00001", "a_00002", "a_00003")), (77.0, ("a_00000", "a_00001", "a_00002"))):
        tc, trials = _standin(5, 2, [1, 4], {}, rescue=functools.partial(race._rescue, rule))
        actions = [_report(tc, t, 1, acc) for t, acc in zip(trials, (80.0, 78.0, 79.0, baseline, 60.0))]
        assert tc.sched.standing().racing == racing and actions[-1] == "STOP"      # the last decides, is cut
        assert tc.stopped == [t for t in ("a_00003",) if t not in racing]           # a paused one cut: stopped


# ------------------------------------------------------------------ race.ties: incumbent
def _hits(right: set[int], n: int = 200) -> str:
    """The paired record of ``right`` (image indices) among ``n``: image 0 in the high bit of the first byte."""
    return bytes(sum(0x80 >> j for j in range(8) if 8 * i + j in right) for i in range((n + 7) // 8)).hex()


#: 200 val images: both right on 0-169; only the challenger on 170-181 (b = 12), only the incumbent
#: on 182-183 (c = 2): 182 vs 172 right (91.0 vs 86.0 %).  McNemar: P(Binomial(14, 1/2) >= 12) =
#: (C(14,12) + C(14,13) + C(14,14)) / 2^14 = (91 + 14 + 1) / 16384 = 0.006470
CHALLENGER = _hits(set(range(182)))
INCUMBENT = _hits(set(range(170)) | {182, 183})
P_12_2 = 106 / 16384


def _top_hits(trial: str, finalist: int, acc: float, hits: str) -> dict:
    row = _top(trial, finalist, acc, epoch=10)
    row["m"].update(val_hits=hits, val_images=200)
    return row


def test_the_incumbent_survives_unless_a_paired_test_shows_the_best_challenger_better():
    """Finalist 4 is the incumbent.  Against 10 challengers the level is 0.05 / 10 = 0.005 and p = 0.00647:
    the incumbent survives though 5 points (2.5 s.e.) below; against 5 (level 0.01) the challenger does.
    The unpaired rule (ties: baseline) cuts this incumbent: 86.0 is outside one s.e. of 91.0."""
    params = [100] * 5
    rows = [_top_hits("a", 0, 91.0, CHALLENGER), _top_hits("b", 1, 88.0, CHALLENGER), _top_hits("e", 4, 86.0, INCUMBENT)]
    kept, verdict = race.decide(rows, params, race.IncumbentRule(4, 10, 0.05))
    assert kept["trial_id"] == "e" and verdict is not None and verdict.trial_id == "e"
    assert verdict.test is not None and (verdict.test.n, verdict.test.b, verdict.test.c) == (200, 12, 2)
    assert math.isclose(verdict.test.p, P_12_2, rel_tol=1e-12) and math.isclose(verdict.level, 0.005)
    beaten, verdict = race.decide(rows, params, race.IncumbentRule(4, 5, 0.05))
    assert beaten["trial_id"] == "a" and verdict.trial_id is None and math.isclose(verdict.level, 0.01)
    assert race.survivor(rows, params, race.TieRule(frozenset({3, 4}), 200, 1.0))["trial_id"] == "a"
    # the incumbent ranked first: no test; not at the top rung (or not racing): the best
    first = [_top_hits("e", 4, 92.0, INCUMBENT), _top_hits("a", 0, 91.0, CHALLENGER)]
    assert race.decide(first, params, race.IncumbentRule(4, 10, 0.05))[1] == race.Verdict(None)
    assert race.survivor(first, params, race.IncumbentRule(4, 10, 0.05))["trial_id"] == "e"
    cut = rows[:2] + [_top("e", 4, 99.0, epoch=1)]
    assert race.survivor(cut, params, race.IncumbentRule(4, 10, 0.05))["trial_id"] == "a"
    # a trial without a paired record (reported before they existed): the incumbent stays
    bare = [_top("a", 0, 99.0, epoch=10), _top_hits("e", 4, 50.0, INCUMBENT)]
    assert race.survivor(bare, params, race.IncumbentRule(4, 10, 0.05))["trial_id"] == "e"
    R = race.Racer
    rule = race.IncumbentRule(4, 10, 0.05)
    assert rule.keeps == {4} and rule.rescue([R(0, 90.0, "a"), R(2, 80.0, "c"), R(4, 10.0, "e")]) == "e"
    assert rule.rescue([R(0, 90.0, "a")]) is None


def test_clauses_say_what_the_incumbent_rule_decided():
    kept = {"incumbent": 4, "top_finalist": 0, "top_val_acc": 91.0,
            "paired": {"n": 200, "b": 12, "c": 2, "p": P_12_2, "level": 0.005}}
    assert race.rule_clause(kept) == ("; kept the incumbent, finalist 4, over finalist 0 (val 91.00%; McNemar p "
                                      "0.00647: 12 of 200 val images right only for the challenger, 2 only for "
                                      "the incumbent; level 0.005)")
    beaten = {**kept, "top_finalist": None, "paired": {**kept["paired"], "level": 0.01}}
    assert race.rule_clause(beaten).startswith("; beat the incumbent, finalist 4 (McNemar p 0.00647: 12 of 200")
    assert race.rule_clause({"top_finalist": None}) == ""


def test_paired_records_of_two_models_and_mcnemars_exact_test():
    from noah_ray.evolution.ties import hits_hex, paired_test

    assert hits_hex([True, False, True, True, False, False, False, False, True]) == "b080"
    assert hits_hex([]) == ""
    t = paired_test(CHALLENGER, INCUMBENT, 200)
    assert (t.b, t.c) == (12, 2) and math.isclose(t.p, P_12_2, rel_tol=1e-12)
    assert paired_test(INCUMBENT, CHALLENGER, 200).p == pytest.approx(1 - 1 / 16384 * (1 + 14), rel=1e-12)  # P(X >= 2)
    ten = _hits(set(range(10)), 16)
    assert paired_test(ten, _hits(set(), 16), 16).p == pytest.approx(2 ** -10, rel=1e-12)          # b 10, c 0
    five = (_hits(set(range(5)), 10), _hits(set(range(5, 10)), 10))
    assert paired_test(*five, 10).p == pytest.approx(638 / 1024, rel=1e-12)                         # b 5, c 5
    assert paired_test(ten, ten, 16).p == 1.0 and paired_test(_hits(set(), 16), ten, 16).p == 1.0
    # large n: the tail summed exactly in integers
    big = paired_test(_hits(set(range(700)), 1000), _hits(set(range(60, 700)) | set(range(700, 740)), 1000), 1000)
    exact = sum(math.comb(100, k) for k in range(60, 101)) / 2 ** 100
    assert (big.b, big.c) == (60, 40) and big.p == pytest.approx(exact, rel=1e-9)
    with pytest.raises(ValueError, match="do not both hold 200 images"):
        paired_test(CHALLENGER, "ff", 200)


def test_the_incumbent_is_the_hand_sized_baseline_of_its_kind(tiny_job, data_root, tmp_path, monkeypatch):
    job = JobConfig.from_dict(job_dict(tiny_job, data_root, str(tmp_path)))
    assert job.race.ties == "incumbent" and job.race.incumbent is None and job.race.alpha == 0.05   # the defaults
    write_search(job)
    limit = param_limit(job, shape_of(TINY, 1))
    fin = race.pick_finalists(job, limit)
    rule = race.RACE_RULES["incumbent"](job, fin)
    assert isinstance(rule, race.IncumbentRule) and fin[rule.incumbent].source == "baseline:lora"
    assert rule.challengers == len(fin) - 1 == 4 and rule.alpha == 0.05
    settings = race._settings(job, fin)["race"]
    assert settings["ties"] == "incumbent" and settings["incumbent"] is None and settings["alpha"] == 0.05
    for ties in ("baseline", "best"):               # the settings of races started before race.incumbent
        other = JobConfig.from_dict(job_dict(tiny_job, data_root, str(tmp_path), ties=ties))
        assert not {"incumbent", "alpha"} & set(race._settings(other, fin)["race"])
    lrs = JobConfig.from_dict(job_dict(tiny_job, data_root, str(tmp_path), incumbent="adapter", lrs=[1e-3, 1e-2]))
    rule = race.RACE_RULES["incumbent"](lrs, fin)
    assert fin[rule.incumbent].source == "baseline:adapter" and rule.challengers == 4 * 2
    assert race.RACE_RULES["incumbent"](job, [f for f in fin if f.source == "search"]) is None
    # the LoRA baseline found by the search races once, as the search's, and is still the incumbent
    base = limit.widest_uniform("lora", 12)
    found = race.Finalist(base, "search", limit.count(base), 1, 65.0)
    monkeypatch.setattr(race, "search_finalists", lambda job, limit, k: [fin[0], found])
    again = race.pick_finalists(job, limit)
    assert [f.source for f in again] == ["search", "search", "baseline:adapter"]
    assert again[1].hand_sized == "lora" and race.RACE_RULES["incumbent"](job, again).incumbent == 1


@pytest.mark.parametrize("cfg, message", [
    ({"incumbent": "vpt"}, r"^config\.race\.incumbent: 'vpt' is not a module kind of the search space; "
                           r"use one of lora, adapter$"),
    ({"alpha": 0.0}, r"^config\.race\.alpha: 0\.0 must be between 0 and 1 \(e\.g\. 0\.05\)$"),
    ({"alpha": 1.5}, r"^config\.race\.alpha: 1\.5 must be between 0 and 1"),
])
def test_bad_incumbent_settings_are_one_line_config_errors(tiny_job, data_root, tmp_path, cfg, message):
    with pytest.raises(ConfigError, match=message):
        JobConfig.from_dict(job_dict(tiny_job, data_root, str(tmp_path), **cfg))


def test_sync_halving_keeps_the_incumbent_at_every_rung_and_asha_never_cuts_it():
    """5 trials, rf 2, rungs 1 and 4; finalist 4 (the incumbent) scores worst at rung 1 and goes on
    beside the best 3.  Under ASHA (rf 2, grace 1, max 4) the incumbent's worse score is answered
    CONTINUE where another trial's is STOP; at max_t it ends like any trial."""
    import functools
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from noah_ray.hpo.halving import KeepingASHA

    rule = race.IncumbentRule(4, 4, 0.05)
    tc, trials = _standin(5, 2, [1, 4], {}, rescue=functools.partial(race._rescue, rule))
    for t, acc in zip(trials, (80.0, 78.0, 79.0, 77.0, 10.0)):
        _report(tc, t, 1, acc)
    assert tc.sched.standing().racing == ("a_00000", "a_00001", "a_00002", "a_00004")
    asha = KeepingASHA(frozenset({4}), time_attr="epoch", metric="val_acc", mode="max", max_t=4, grace_period=1,
                       reduction_factor=2)
    t = [SimpleNamespace(trial_id=f"t{k}", config={"finalist": k}) for k in (0, 4, 1)]
    for trial in t:
        asha.on_trial_add(None, trial)
    assert asha.on_trial_result(None, t[0], {"epoch": 1, "val_acc": 90.0}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, t[1], {"epoch": 1, "val_acc": 10.0}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, t[2], {"epoch": 1, "val_acc": 5.0}) == TrialScheduler.STOP
    assert asha.on_trial_result(None, t[1], {"epoch": 4, "val_acc": 10.0}) == TrialScheduler.STOP
