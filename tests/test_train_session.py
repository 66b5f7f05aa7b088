"""Retraining seeds and baselines in one session of reused workers (``runs.retrain_methods``): one
Ray Train worker group for all runs, the same results and files as one Ray Train run per run, and
exact resume after a kill in the middle of the second run."""

import io

import pytest
import torch
from ray.train.torch import TorchTrainer

from noah_ray import progress
from noah_ray.config import JobConfig
from noah_ray.data import write_generated_vtab
from noah_ray.run.preflight import resolve
from noah_ray.store import storage
from noah_ray.train import runs

WIDTHS = {"vpt": {"vpt": 2}, "lora": {"lora": 2}}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_generated_vtab(root, "gen_color", num_train=48, num_val=16, num_test=16)
    return root


@pytest.fixture()
def fits(monkeypatch):
    """How many ``TorchTrainer.fit`` calls (worker groups) the driver makes."""
    calls = []
    real = TorchTrainer.fit

    def counted(self):
        calls.append(1)
        return real(self)

    monkeypatch.setattr(TorchTrainer, "fit", counted)
    return calls


def _job(tiny_job, data_root, store, *, methods=("lora", "vpt"), epochs=3, max_failures=0, max_concurrent=1):
    return JobConfig.from_dict(tiny_job(
        data_root, store, name="sess", data={"batch_size": 16}, search=None, supernet=None,
        model={"drop_path_rate": 0.1},
        retrain={"epochs": epochs, "lr": 3e-3, "warmup_epochs": 0, "num_workers": 1, "seeds": [0, 1],
                 "method": methods[0], "baselines": list(methods[1:]), "baseline_widths": WIDTHS,
                 "max_failures": max_failures, "keep_checkpoints": 1, "max_concurrent": max_concurrent}))


def _outcome(job):
    """Per run: (val, test, best epoch, epochs) of its ``runs`` row and its final weights."""
    root = storage.resolve(job.storage).join(job.name, "retrain")
    rows = storage.read_table(root, "runs").to_pandas().sort_values("run_id")
    out = {}
    for r in rows.itertuples():
        tensors, meta = storage.load_state(root.join(r.run_id, "final"))
        out[r.run_id] = ((r.val_acc, r.test_acc, r.best_epoch, r.epochs), tensors, meta)
    return out


def _files(loc):
    return {f.uri[len(loc.uri):] for f in storage.list_files(loc)}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][0] == b[k][0], k
        assert a[k][1].keys() == b[k][1].keys()
        assert all(torch.equal(a[k][1][n], b[k][1][n]) for n in a[k][1]), k


@pytest.fixture(scope="module")
def reference(ray_session, data_root, tmp_path_factory, tiny_job):
    """The uninterrupted session (LoRA and VPT, seeds 0 and 1, 3 epochs): its job, its summary,
    how many worker groups it started and what it wrote."""
    job = _job(tiny_job, data_root, str(tmp_path_factory.mktemp("session")))
    calls = []
    real = TorchTrainer.fit
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TorchTrainer, "fit", lambda self: calls.append(1) or real(self))
        summary = runs.retrain_methods(resolve(job, ("retrain",)), None, ("lora", "vpt"))
    return job, summary, len(calls), _outcome(job)


@pytest.mark.slow
def test_one_worker_group_same_results_as_one_run_each(reference, data_root, tmp_path, tiny_job, fits):
    job, summary, groups, session = reference
    assert groups == 1                                     # 4 runs, one worker group
    assert sorted(session) == ["lora-seed0", "lora-seed1", "vpt-seed0", "vpt-seed1"]
    assert summary["lora"]["runs"] == [session["lora-seed0"][0][1], session["lora-seed1"][0][1]]

    alone = _job(tiny_job, data_root, str(tmp_path / "alone"))
    picked = {"lora-seed1": ("lora", 1), "vpt-seed0": ("vpt", 0)}   # a later seed and the second method
    for m, s in picked.values():
        runs.retrain(resolve(alone, ("retrain",)), None, method=m, seed=s)
    assert len(fits) == 2                                  # the per-run path: one worker group each
    _same({k: session[k] for k in picked}, _outcome(alone))
    # the same files in each run's folder: checkpoints (keep_checkpoints 1), best/, final/, spec
    for run_id in picked:
        got = _files(storage.resolve(job.storage).join(job.name, "retrain", run_id))
        want = _files(storage.resolve(alone.storage).join(alone.name, "retrain", run_id))
        assert got == {n for n in want if n.rsplit("/", 1)[-1] not in (runs.RAY_SNAPSHOT, *storage.RAY_MARKERS)}
        assert any("/checkpoint_e00002/" in n for n in got) and not any("/checkpoint_e00001/" in n for n in got)

    fits.clear()                                           # finished: answered from storage
    again = runs.retrain_methods(resolve(job, ("retrain",)), None, ("lora", "vpt"))
    assert fits == [] and again["vpt"]["runs"] == summary["vpt"]["runs"]


@pytest.mark.slow
def test_kill_in_second_run_resumes_exactly(reference, data_root, tmp_path, tiny_job, fits):
    """The worker is killed after epoch 2 of the second run: re-running the stage skips the first
    run and resumes the second from its checkpoint; with ``max_failures`` 1 the session restarts it
    by itself.  Both end bit-exact with an uninterrupted session."""
    want = reference[3]
    killed = _job(tiny_job, data_root, str(tmp_path / "killed"))
    with pytest.raises(Exception, match="(?i)fail|died|error"):
        runs.retrain_methods(resolve(killed, ("retrain",)), None, ("lora", "vpt"),
                             _faults={"lora-seed1": [(1, "kill")]})
    runs.retrain_methods(resolve(killed, ("retrain",)), None, ("lora", "vpt"))
    assert len(fits) == 2
    got = _outcome(killed)
    _same(got, want)
    assert got["lora-seed0"][2]["start_epochs"] == [0] and got["lora-seed1"][2]["start_epochs"] == [0, 2]
    assert got["vpt-seed1"][2]["start_epochs"] == [0]

    retried = _job(tiny_job, data_root, str(tmp_path / "retried"), max_failures=1)
    fits.clear()
    runs.retrain_methods(resolve(retried, ("retrain",)), None, ("lora", "vpt"), _faults={"lora-seed1": [(1, "kill")]})
    assert len(fits) == 2                                  # the group restarted once, on the runs left
    got = _outcome(retried)
    _same(got, want)
    assert got["lora-seed1"][2]["start_epochs"] == [0, 2]


@pytest.mark.slow
def test_two_sessions_at_once_same_results(reference, data_root, tmp_path, tiny_job):
    """``retrain.max_concurrent: 2``: two worker groups at once (each in a Ray task), the runs dealt
    between them; every run ends bit-equal with the one-session reference (the job's random
    backbone is written once, before the groups start: both would draw it from one torch RNG).  A
    run killed in one group fails the stage only after the other group finished its runs; the
    re-run trains only what is left and ends bit-equal too."""
    want = reference[3]
    two = _job(tiny_job, data_root, str(tmp_path / "two"), max_concurrent=2)
    dealt = []
    real = runs._train_groups
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runs, "_train_groups", lambda groups, faults: dealt.append(groups) or real(groups, faults))
        runs.retrain_methods(resolve(two, ("retrain",)), None, ("lora", "vpt"))
    assert [[[r.run_id for r in g] for g in groups] for groups in dealt] == \
        [[["lora-seed0", "vpt-seed0"], ["lora-seed1", "vpt-seed1"]]]
    _same(_outcome(two), want)

    killed = _job(tiny_job, data_root, str(tmp_path / "killed2"), max_concurrent=2)
    from ray.exceptions import RayTaskError
    from ray.train import TrainingFailedError

    with pytest.raises(TrainingFailedError) as failed:     # lora-seed0 and vpt-seed0 share a group
        runs.retrain_methods(resolve(killed, ("retrain",)), None, ("lora", "vpt"), _faults={"vpt-seed0": [(1, "kill")]})
    assert not isinstance(failed.value, RayTaskError)      # the group's own error, not Ray's task wrapper
    root = storage.resolve(killed.storage).join(killed.name, "retrain")
    other = {}                                             # the other group's runs finished
    for run_id in ("lora-seed1", "vpt-seed1"):
        final = [f for f in storage.list_files(root) if f"/{run_id}/" in f.uri and f.uri.endswith("/final/meta.json")]
        assert len(final) == 1, run_id
        other[run_id] = storage.read_bytes(final[0])
    runs.retrain_methods(resolve(killed, ("retrain",)), None, ("lora", "vpt"))
    got = _outcome(killed)
    _same(got, want)
    assert got["vpt-seed0"][2]["start_epochs"] == [0, 2] and got["lora-seed0"][2]["start_epochs"] == [0]
    for run_id, before in other.items():                   # not trained again
        final = [f for f in storage.list_files(root) if f"/{run_id}/" in f.uri and f.uri.endswith("/final/meta.json")
                 and f"/{run_id}/final/" not in f.uri]
        assert storage.read_bytes(final[0]) == before, run_id


def test_rows_with_one_config_train_once(reference, data_root, tmp_path, tiny_job, fits):
    """Two rows (``noah+`` and ``noah``) that retrain the same subnet with the same seeds and
    settings train it once: both rows carry its result, the first row's run folder holds it, and
    both count as done (a finished pipeline is not run again)."""
    from noah_ray.space import SubnetConfig

    job = _job(tiny_job, data_root, str(tmp_path / "rows"), epochs=1)
    cfg = SubnetConfig.uniform(job.space.num_layers, lora=2)
    rj = resolve(job, ("retrain",))
    summary = runs.retrain_methods(rj, {"noah+": cfg, "noah": cfg}, ("noah+", "noah"))
    assert len(fits) == 1
    rows = storage.read_table(storage.resolve(job.storage).join(job.name, "retrain"), "runs").to_pandas()
    assert sorted(rows.run_id) == ["noah-seed0", "noah-seed1", "noahplus-seed0", "noahplus-seed1"]
    by = rows.set_index("run_id")
    for s in (0, 1):
        assert by.loc[f"noah-seed{s}", "test_acc"] == by.loc[f"noahplus-seed{s}", "test_acc"]
        assert by.loc[f"noah-seed{s}", "checkpoint_uri"] == by.loc[f"noahplus-seed{s}", "checkpoint_uri"]
        assert f"/noahplus-seed{s}/" in by.loc[f"noah-seed{s}", "checkpoint_uri"]
        for label in ("noah", "noah+"):
            assert runs.retrain_done(job, cfg, label, s, rj.num_classes)
    assert not runs.retrain_done(job, SubnetConfig.uniform(job.space.num_layers, lora=1), "noah", 0, rj.num_classes)
    assert summary["noah"]["runs"] == summary["noah+"]["runs"]


def test_a_noah_row_with_a_baselines_config_reuses_the_baselines_runs(ray_session, data_root, tmp_path, tiny_job,
                                                                      fits):
    """A NOAH row whose subnet is a baseline's uniform config (a race that kept the hand-sized LoRA)
    trains nothing of its own: the baseline's runs, under the baseline's name, are both rows'
    results, and both rows count as done.  The same row trained by itself ends bit-equal to the
    baseline (what makes the reuse right); a row whose own run exists keeps it, and a baseline
    added later reuses that."""
    from noah_ray.space import SubnetConfig

    job = _job(tiny_job, data_root, str(tmp_path / "same"), methods=("lora",), epochs=1)
    cfg = SubnetConfig.uniform(job.space.num_layers, lora=2)     # WIDTHS["lora"]: the baseline's own config
    rj = resolve(job, ("retrain",))
    summary = runs.retrain_methods(rj, {"noah+": cfg}, ("noah+", "lora"))
    root = storage.resolve(job.storage).join(job.name, "retrain")
    by = storage.read_table(root, "runs").to_pandas().set_index("run_id")
    assert sorted(by.index) == ["lora-seed0", "lora-seed1", "noahplus-seed0", "noahplus-seed1"]
    assert not [f for f in _files(root) if "noahplus" in f and (f.endswith("spec.json") or "train_metrics" in f)]
    for s in (0, 1):
        assert f"/lora-seed{s}/" in by.loc[f"noahplus-seed{s}", "checkpoint_uri"]
        assert by.loc[f"noahplus-seed{s}", "test_acc"] == by.loc[f"lora-seed{s}", "test_acc"]
        assert by.loc[f"noahplus-seed{s}", "method"] == "noah+"
        for label in ("noah+", "lora"):
            assert runs.retrain_done(job, cfg, label, s, rj.num_classes)
    assert summary["noah+"]["runs"] == summary["lora"]["runs"]

    alone = _job(tiny_job, data_root, str(tmp_path / "alone"), methods=("lora",), epochs=1)
    rj2 = resolve(alone, ("retrain",))
    runs.retrain_methods(rj2, {"noah+": cfg}, ("noah+",))        # trains itself: no baseline beside it
    own, base = _outcome(alone), _outcome(job)
    _same(own, {k.replace("lora", "noahplus"): base[k] for k in base if k.startswith("lora")})
    before = len(fits)
    runs.retrain_methods(rj2, {"noah+": cfg}, ("noah+", "lora"))  # the baseline joins: noah+'s run is reused
    rows = storage.read_table(storage.resolve(alone.storage).join(alone.name, "retrain"), "runs").to_pandas()
    lora = rows[rows.method == "lora"]
    assert len(lora) == 2 and all("/noahplus-seed" in u for u in lora.checkpoint_uri)
    assert len(fits) == before                                   # nothing trained again
    assert all(runs.retrain_done(alone, cfg, "lora", s, rj2.num_classes) for s in (0, 1))


def test_the_training_key_ignores_the_row_name_but_not_what_training_differs_in(tiny_job, data_root, tmp_path):
    """``noah`` on the LoRA baseline's config and ``lora`` itself share a training key (their
    fingerprints differ); another learning rate, seed, config, NOAH's ``retrain.init`` or a trained
    backbone does not."""
    from noah_ray.space import SubnetConfig

    job = _job(tiny_job, data_root, str(tmp_path), methods=("lora",))
    cfg = SubnetConfig.uniform(job.space.num_layers, lora=2)

    def key(method, lr=3e-3, seed=0, subnet=cfg, j=job):
        return runs.training_key(runs.spec_for(j, "retrain", method, subnet, lr, seed, 4))

    assert runs.spec_for(job, "retrain", "noah", cfg, 3e-3, 0, 4).fingerprint() != \
        runs.spec_for(job, "retrain", "lora", cfg, 3e-3, 0, 4).fingerprint()
    assert key("noah") == key("lora")
    assert key("noah", lr=1e-3) != key("lora")
    assert key("noah", seed=1) != key("lora")
    assert key("noah", subnet=SubnetConfig.uniform(job.space.num_layers, lora=1)) != key("lora")
    assert key("full", subnet=SubnetConfig.uniform(job.space.num_layers)) != \
        key("linear", subnet=SubnetConfig.uniform(job.space.num_layers))
    init = JobConfig.from_dict({**job.to_dict(), "retrain": {**job.to_dict()["retrain"], "init": "/x/subnet"}})
    assert key("noah", j=init) != key("lora", j=init)


def test_a_linear_probe_trains_its_head_on_cached_features_as_on_the_images(ray_session, data_root, tmp_path,
                                                                            tiny_job):
    """The ``linear`` runs of a session (no drop-path, a deterministic transform) train the head on
    pre-logit features computed once, and end where training on the images ends
    (``retrain.cache_features: false``): the same val / test accuracy and best epoch, the same final
    head to float rounding."""
    outcomes, lines = [], []
    for cache in (True, False):
        job = JobConfig.from_dict(tiny_job(
            data_root, str(tmp_path / str(cache)), name="probe", data={"batch_size": 16}, search=None,
            supernet=None, retrain={"epochs": 3, "lr": 1e-2, "warmup_epochs": 0, "num_workers": 1, "seeds": [0, 1],
                                    "method": "linear", "baselines": [], "cache_features": cache}))
        out = io.StringIO()
        with progress.session(stream=out):
            runs.retrain_methods(resolve(job, ("retrain",)), None, ("linear",))
        outcomes.append(_outcome(job))
        lines.append(out.getvalue().count("the head on cached features"))
    assert lines == [2, 0]
    cached, images = outcomes
    assert cached.keys() == images.keys() == {"linear-seed0", "linear-seed1"}
    for k in cached:
        assert cached[k][0] == images[k][0], k                  # (val, test, best epoch, epochs)
        assert cached[k][1].keys() == images[k][1].keys()
        for name in cached[k][1]:
            torch.testing.assert_close(cached[k][1][name], images[k][1][name], rtol=0, atol=1e-6)
    assert not torch.equal(cached["linear-seed0"][1]["vit.head.weight"], cached["linear-seed1"][1]["vit.head.weight"])
