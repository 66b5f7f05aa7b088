"""The Ray Train stages on the driver: supernet training, subnet retraining and the baselines.

Each stage is a Ray Train ``TorchTrainer`` (DDP: gloo on CPU, nccl on GPU) running
:func:`noah_ray.train.worker.train_loop` on every worker, described by a
:class:`~noah_ray.train.worker.RunSpec`; its run directory lives in the job's storage (a local
directory or ``s3://``).  The stages take the job as :func:`noah_ray.run.preflight.resolve` checked
it (a :class:`~noah_ray.config.resolved.ResolvedJob`); a plain :class:`JobConfig` is refused, naming
that call.  What the runs write under ``<storage>/<job.name>/`` (``supernet/``,
``retrain/``, ``backbone.safetensors``) is described in :mod:`noah_ray.store.layout`.

Re-running a stage resumes from its last checkpoint (same RunConfig name and storage); a finished
one returns at once.  A worker that dies is restarted (``FailureConfig``) and continues from the
last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import cast

import pyarrow as pa
import torch

from noah_ray import progress
from noah_ray.config import JobConfig, SupernetConfig
from noah_ray.config.resolved import ResolvedJob, resolved
from noah_ray.errors import ConfigError, RunError
from noah_ray.nn import optim
from noah_ray.nn.models import build_model, ensure_backbone, subnet_for
from noah_ray.nn.prune import PrunePlan, prune
from noah_ray.space import SubnetConfig
from noah_ray.space.methods import method_of, trains_backbone
from noah_ray.store import lease, storage, tracking
from noah_ray.store.layout import SUPERNET_RUN, JobPaths, retrain_run_id
from noah_ray.store.records import BestRecord, MetaRecord, SpecRecord
from noah_ray.train.faults import FaultPlan
from noah_ray.train.worker import ERROR_FILE, RunSpec, finished, train_loop


@dataclass
class TrainResult:
    stage: str
    run_name: str
    epochs_done: int
    final_uri: str
    metrics: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- specs
def spec_for(job: JobConfig, stage: str, method: str, subnet: SubnetConfig | None, lr: float, seed: int,
             num_classes: int) -> SpecRecord:
    """What defines a run (its checkpoints are only valid for this); ``epochs`` may grow."""
    tc, d, m = (job.supernet if stage == "supernet" else job.retrain), job.data, job.model
    recipe = m.resolved_recipe(method)
    return SpecRecord(
        stage=stage, method=method, model=m.name, checkpoint=m.checkpoint, drop_path_rate=m.drop_path_rate,
        lora_scale=m.lora_scale, kv_shared=recipe.kv_shared, recipe=recipe.to_dict(),
        space=job.space.to_dict() if stage == "supernet" else None, subnet=subnet.to_dict() if subnet else None,
        num_classes=num_classes,
        data={"dataset": d.dataset, "format": d.format, "train_split": d.train_split, "batch_size": d.batch_size,
              "img_size": d.img_size, "shots": d.shots, "seed": d.seed},
        lr=lr, weight_decay=tc.weight_decay, warmup_epochs=tc.warmup_epochs, min_lr=tc.min_lr, seed=seed,
        sampling=cast(SupernetConfig, tc).sampling if stage == "supernet" else None,
        # only when set: the fingerprints of other runs stay as they were
        init=job.retrain.init if stage == "retrain" and method == "noah" and job.retrain.init else None)


def _read_spec(loc: storage.Location) -> SpecRecord:
    return SpecRecord.from_dict(json.loads(storage.read_text(loc)))


def _read_meta(loc: storage.Location) -> MetaRecord:
    return MetaRecord.from_dict(json.loads(storage.read_text(loc)))


def _check_spec(run_dir: storage.Location, spec: SpecRecord) -> None:
    loc = run_dir.join("spec.json")
    if storage.exists(loc):
        old, new = _read_spec(loc).content(), spec.content()
        diff = next((k for k in new if old.get(k) != new[k]), None)
        if diff is not None:
            raise ConfigError(f"{run_dir.uri!r} was trained with {diff} = {json.dumps(old.get(diff))[:120]}, "
                              f"this job has {json.dumps(new[diff])[:120]}; restore the setting, or use "
                              f"another run_name or job name")
    else:
        storage.write_text(loc, json.dumps(spec.to_dict(), indent=1, sort_keys=True))


def _finished(run_dir: storage.Location, spec: SpecRecord, epochs: int) -> bool:
    """Whether ``run_dir`` holds a finished run of ``spec`` with at least ``epochs`` epochs (and an
    intact ``final/``: one that fails its checksum is not finished)."""
    spec_loc, final = run_dir.join("spec.json"), run_dir.join("final", "meta.json")
    if not (storage.exists(spec_loc) and storage.exists(final)):
        return False
    try:
        same = _read_spec(spec_loc) == SpecRecord.from_dict(json.loads(json.dumps(spec.to_dict())))
        return same and _final_meta(run_dir.join("final")).epochs_done >= epochs
    except (ValueError, ConfigError):
        return False


def _final_meta(final: storage.Location) -> MetaRecord:
    """The meta of an intact ``final/`` (every file checked: :func:`storage.load_state`)."""
    return MetaRecord.from_dict(storage.load_state(final)[1])


def _intact(folder: storage.Location) -> bool:
    """Whether ``folder`` (a ``final/`` or ``best/``) loads and passes its checksums."""
    try:
        storage.load_state(folder)
        return True
    except ConfigError:
        return False


#: Ray Train's record of the checkpoints it keeps (and deletes beyond ``num_to_keep``) in a run folder
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def _forget_checkpoints(loc: storage.Location, names: list[str]) -> None:
    """Drop ``names`` (checkpoints set aside) from Ray Train's snapshot of run ``loc``, so that
    its checkpoint manager neither deletes them nor a new checkpoint of the same name later; an
    unreadable snapshot is removed (Ray then starts its bookkeeping afresh)."""
    snap = loc.join(RAY_SNAPSHOT)
    if not storage.exists(snap):
        return
    try:
        st = json.loads(storage.read_text(snap))
        for results, paired in (("checkpoint_results", "checkpoint_report_indices"),
                                ("pending_training_results", "pending_validation_specs")):
            kept = [(r, v) for r, v in zip(st[results], st[paired], strict=True)
                    if r["checkpoint_dir_name"] not in names]
            st[results], st[paired] = [r for r, _ in kept], [v for _, v in kept]
        latest = st.get("latest_checkpoint_result")
        if latest is not None and latest["checkpoint_dir_name"] in names:
            st["latest_checkpoint_result"] = st["checkpoint_results"][-1] if st["checkpoint_results"] else None
        for key in [k for k in st if k.endswith("_checkpoint_dir_names")]:
            st[key] = [n for n in st[key] if n not in names]
        storage.write_text(snap, json.dumps(st))
    except (ValueError, KeyError, TypeError):
        storage.delete(snap)


def _set_aside_bad(tag: str, loc: storage.Location) -> None:
    """Before a run (re)starts: move its bad newest checkpoints aside (one line naming them and the
    checkpoint it resumes from) and make Ray Train forget them."""
    bad, good = optim.set_aside_bad(loc)
    if not bad:
        return
    _forget_checkpoints(loc, bad)
    progress.echo(f"{tag} checkpoint(s) {', '.join(bad)} at {loc.uri} are truncated or corrupt: set aside as "
                  f"{optim.CORRUPT_PREFIX}<name>; " + (f"resuming from {good}" if good else "starting afresh"))


# ----------------------------------------------------------------------------- one Ray Train run
def _fit(run: RunSpec, faults: FaultPlan | None = None) -> MetaRecord:
    """Run (or resume, or skip when finished) one Ray Train run; returns the final meta."""
    from ray.train import TrainingFailedError

    began = _begin(run)
    if isinstance(began, MetaRecord):
        return began
    run = began
    try:
        _launch(_trainer(run, _run_loc(run), faults), run)
        _raise_error_file(run)
    except TrainingFailedError as e:
        tracking.end_run(run.tracking, "FAILED")
        _raise_config_error(e)
        raise
    except BaseException:
        tracking.end_run(run.tracking, "FAILED")
        raise
    finally:
        progress.drain()         # the workers' last lines before the driver's next one
    return _end(run)


def _run_loc(run: RunSpec) -> storage.Location:
    return JobPaths.of(run.job).root.join(run.run_dir)


def _begin(run: RunSpec) -> RunSpec | MetaRecord:
    """Before a run trains: its spec checked (or written); the final meta when it finished
    earlier, else the run ready to train (bad checkpoints set aside, tracking started, an earlier
    attempt's ``error.json`` removed)."""
    loc = _run_loc(run)
    run.fence()
    _check_spec(loc, run.spec)
    final = loc.join("final", "meta.json")
    if storage.exists(final):
        if not _intact(loc.join("final")):
            progress.echo(f"{run.tag} {loc.join('final').uri} is truncated or corrupt: writing it again")
        elif (meta := _read_meta(final)).epochs_done >= run.tc.epochs:
            progress.echo(f"{run.tag} finished earlier ({meta.epochs_done} epochs) at {loc.uri}")
            return meta
    _set_aside_bad(run.tag, loc)
    ref = tracking.start_run(run.job, run.stage, run.run_id, extra=tracking.chosen_params(run.spec.hpo))
    error = loc.join(ERROR_FILE)
    if storage.exists(error):                    # left by an earlier attempt whose cause may be fixed now
        loc.fs.delete_file(error.path)
    return dataclasses.replace(run, backbone=ensure_backbone(run.job), progress=progress.sink_name(), tracking=ref)


#: Ray Train's controller polls its workers every ``$RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (Ray's
#: default 2 s), so a finished run was noticed on average 1 s late and its ``fit()`` returned up to
#: 2 s after the last epoch.  Unless the user set it, we poll every 0.25 s: a status call per worker,
#: nothing next to an epoch (``bench/fit_overhead.py`` measures a stage run's fixed cost).
POLL_ENV, POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"


def _launch(trainer, run: RunSpec) -> None:
    """``trainer.fit()`` without Ray Train's own SIGINT handler, which would end fit() as if the run
    were done; SIGINT / SIGTERM are the command's (a KeyboardInterrupt out of fit: run.pipeline.interrupts).
    The controller (which reads its settings from this process's environment) polls every
    :data:`POLL_S` s unless ``$RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` says otherwise."""
    os.environ.setdefault(POLL_ENV, POLL_S)
    with storage.tidy(JobPaths.of(run.job).root):
        trainer._register_sigint_handler = lambda controller: None
        trainer.fit()


def _raise_error_file(run: RunSpec) -> None:
    """A worker's ConfigError, left in the run's ``error.json``, as one line."""
    error = _run_loc(run).join(ERROR_FILE)
    if storage.exists(error):
        raise ConfigError(json.loads(storage.read_text(error))["error"])


def _end(run: RunSpec) -> MetaRecord:
    """After a run trained: its final meta, recorded in tracking."""
    meta = _final_meta(_run_loc(run).join("final"))
    tracking.finish_training(run.job, run.stage, run.tracking, meta)
    return meta


def _trainer(run: RunSpec, loc: storage.Location, faults: FaultPlan | None):
    """The ``TorchTrainer`` of ``run``: its workers and resources, storage and failure handling
    (``faults``: a test's injected failures, beside the run)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tc = run.tc
    parent = loc.path.rsplit("/", 1)[0]
    return TorchTrainer(
        train_loop, train_loop_config={"run": run.to_dict(), "faults": faults.to_dict() if faults else None},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker,
                                                           **({"GPU": 1} if tc.use_gpu else {})}),
        run_config=RunConfig(name=run.run_dir.rsplit("/", 1)[-1], storage_path=parent, storage_filesystem=loc.fs,
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints)))


# ----------------------------------------------------------------------------- one session, many runs
def _fit_session(runs: list[RunSpec], faults: dict[str, FaultPlan] | None = None, limit: int = 1) -> list[MetaRecord]:
    """Train ``runs`` (same job, same worker shape) in sessions of reused workers
    (:func:`noah_ray.train.worker.train_loop` with ``runs``): one worker group trains its runs one
    after another, so the fixed cost of starting workers, importing, decoding the images is paid
    once per group, not per run.  ``limit`` above 1: up to that many groups at once
    (:func:`_train_groups`), the runs dealt to them in turn.  Each run writes where it would alone
    (checkpoints, ``best/``, ``final/``, metrics) and ends as it would alone.  Every run is checked
    (spec, lease, tracking) before any trains, and recorded here once its group ended.  Returns
    the runs' final metas, in order.  ``faults`` (tests): a :class:`FaultPlan` per run id."""
    began = [_begin(r) for r in runs]            # one at a time, here: the backbone, the sink, tracking
    todo = [r for r in began if isinstance(r, RunSpec)]
    groups = [todo[i::limit] for i in range(min(limit, len(todo)))]
    try:
        if len(groups) > 1:
            _train_groups(groups, faults or {})
        elif todo:
            _train_session(todo, faults or {})
    except BaseException:
        for r in todo:                           # the runs that finished before it are recorded as such
            if finished(r):
                _end(r)
            else:
                tracking.end_run(r.tracking, "FAILED")
        raise
    finally:
        progress.drain()
    return [b if isinstance(b, MetaRecord) else _end(b) for b in began]


def _train_session(todo: list[RunSpec], faults: dict[str, FaultPlan]) -> None:
    """One worker group trains ``todo`` one after another; a run that fails restarts the group on
    the runs left, up to ``max_failures`` times per run, from its newest checkpoint."""
    from ray.train import TrainingFailedError

    failures: dict[str, int] = {}
    while todo:
        failed: BaseException | None = None
        try:
            with tempfile.TemporaryDirectory(prefix="noah-session-") as folder:
                _launch(_session_trainer(todo, folder, faults), todo[0])
        except TrainingFailedError as e:
            failed = e
        for r in todo:
            _raise_error_file(r)
        if failed is not None:
            _after_failure(todo, failed, failures)
        elif not all(finished(r) for r in todo):
            raise RunError(f"{next(r for r in todo if not finished(r)).tag} ended without an intact final/; "
                           f"run the stage again")
        todo = [r for r in todo if not finished(r)]


def _session_task(runs: list[dict], faults: dict[str, dict]) -> None:
    """A Ray task: :func:`_train_session` of ``runs`` (:meth:`RunSpec.to_dict`); the worker group's
    controller belongs to this task, so cancelling the task ends the group."""
    _train_session([RunSpec.from_dict(r) for r in runs], {k: FaultPlan.from_dict(f) for k, f in faults.items()})


def _train_groups(groups: list[list[RunSpec]], faults: dict[str, FaultPlan]) -> None:
    """Each group's :func:`_train_session` in its own Ray task (no CPU of its own; on this node
    when it can), all at once.  Every group runs to its end even when another fails (what each
    trained stays), then the first group's failure is raised (a Ray task's error as the error
    itself).  An interrupt (KeyboardInterrupt) cancels the tasks, which ends their worker groups;
    checkpoints and results written so far stay."""
    import ray
    from ray.exceptions import RayTaskError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():                 # as a Ray Train run would: start Ray on first use
        ray.init()
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    task = ray.remote(_session_task).options(
        num_cpus=0, max_retries=0, scheduling_strategy=here, name="noah-ray-retrain-session",
        runtime_env={"env_vars": {POLL_ENV: os.environ.get(POLL_ENV, POLL_S)}})   # the controllers' poll, as here
    refs = [task.remote([r.to_dict() for r in g], {k: f.to_dict() for k, f in faults.items()
                                                   if any(r.run_id == k for r in g)}) for g in groups]
    try:
        pending = list(refs)
        while pending:                           # short waits, so that SIGINT reaches this thread
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.25)
    except BaseException:
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        raise
    for ref in refs:
        try:
            ray.get(ref)
        except RayTaskError as e:
            if isinstance(e.cause, BaseException):
                raise e.cause from e
            raise


def _after_failure(todo: list[RunSpec], err: BaseException, failures: dict[str, int]) -> None:
    """A session's worker group failed: a worker's ConfigError is raised as one line; else the
    failure counts against the run in flight (the first one not finished), which is restarted
    unless it used up its ``max_failures``."""
    _raise_config_error(err)
    run = next((r for r in todo if not finished(r)), None)
    if run is None:                              # it failed after its last run finished: nothing to redo
        return
    failures[run.run_id] = failures.get(run.run_id, 0) + 1
    limit = run.tc.max_failures
    if 0 <= limit < failures[run.run_id]:
        raise err
    run.fence()                                  # no new worker group for a job whose lease is gone
    text = (f"{run.tag} failed ({type(err).__name__}); restarting it from its newest checkpoint "
            f"(failure {failures[run.run_id]} of {'unlimited' if limit < 0 else limit} allowed)")
    if progress.current() is not None:
        progress.echo(text)
    else:                                        # in a group's Ray task: through the driver's sink
        progress.say(run.progress, text)


def _session_trainer(runs: list[RunSpec], folder: str, faults: dict[str, FaultPlan]):
    """One ``TorchTrainer`` for ``runs`` (their common workers); Ray Train's own run folder (it
    holds no checkpoint: the runs write theirs) is ``folder``, a local temporary one."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tc = runs[0].tc
    shapes = {(r.tc.num_workers, r.tc.use_gpu, r.tc.cpus_per_worker) for r in runs}
    if len(shapes) > 1:
        raise ValueError(f"one session trains runs of one worker shape, not {sorted(shapes)}")
    return TorchTrainer(
        train_loop, train_loop_config={"runs": [r.to_dict() for r in runs],
                                                "run_faults": {k: f.to_dict() for k, f in faults.items()}},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker,
                                                           **({"GPU": 1} if tc.use_gpu else {})}),
        run_config=RunConfig(name="session", storage_path=folder,
                             failure_config=FailureConfig(max_failures=0)))


def _fence(rj: ResolvedJob) -> None:
    """The driver's writes check the job's lease first, as the workers' do (:meth:`RunSpec.fence`)."""
    lease.fence(rj.job, rj.lease)


def _raise_config_error(err: BaseException) -> None:
    """A ConfigError raised inside a worker reaches the caller as itself (one line)."""
    seen, todo = set(), [err, *getattr(err, "worker_failures", {}).values()]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ConfigError):
            raise ConfigError(str(e)) from None
        todo += [getattr(e, "cause", None), e.__cause__]


# ----------------------------------------------------------------------------- supernet
def train_supernet(job: JobConfig | ResolvedJob, *, run_name: str | None = None,
                   _faults: list | None = None) -> TrainResult:
    """Train the job's supernet, a random subnet per step (the same on every worker); resumes
    from the last checkpoint if run before, returns at once if finished.

    ``_faults`` (tests): ``[(epoch, "raise" | "kill"), ...]``, each triggered once on rank 0."""
    rj = resolved(job, "supernet")
    job, tc, n = rj.job, rj.job.supernet, rj.num_classes
    paths = JobPaths.of(job)
    run_id, run_dir = run_name or SUPERNET_RUN, paths.relative(paths.supernet(run_name))
    spec = spec_for(job, "supernet", "noah", None, tc.lr, tc.seed, n)
    meta = _fit(RunSpec(job, "supernet", run_id, run_dir, method="noah", seed=tc.seed, lr=tc.lr, num_classes=n,
                        backbone=rj.backbone, spec=spec, metrics_part=run_id, lease=rj.lease), FaultPlan.of(_faults))
    return TrainResult("supernet", run_id, meta.epochs_done, paths.supernet_final(run_name).uri,
                       {f"val_acc_{k}": v for k, v in meta.val_acc.items()})


def supernet_done(job: JobConfig, num_classes: int) -> bool:
    """Whether the job's supernet is trained (so the stage only reads it back)."""
    tc = job.supernet
    spec = spec_for(job, "supernet", "noah", None, tc.lr, tc.seed, num_classes)
    return _finished(JobPaths.of(job).supernet(), spec, tc.epochs)


# ----------------------------------------------------------------------------- retraining
def retrain(job: JobConfig | ResolvedJob, subnet: SubnetConfig | None, *, method: str = "noah", seed: int = 0,
            hpo: dict | None = None, _faults: list | None = None) -> TrainResult:
    """Train one fixed config from scratch on ``data.train_split``; pick the epoch on
    ``data.val_split``, evaluate ``data.test_split`` once with it; add a row to ``runs``.

    With a ``prune`` section, ``e2vpt`` then prunes the trained prompts (token-wise, then
    segment-wise, scored on training batches), rewinds the kept ones to their initial values and
    retrains them: a second run and row, ``e2vpt-pruned``, which is what is returned.

    ``hpo`` (from :mod:`noah_ray.hpo`: the chosen values and their trial) is recorded with the run:
    in its spec and ``meta.json`` (key ``hpo``) and the ``runs`` row (``hpo_json``)."""
    rj = resolved(job, "retrain")
    cfg = subnet_for(method_of(method), rj.job, subnet)
    _check_init(rj, cfg, method_of(method))
    return _retrain(rj, cfg, method, seed, hpo=hpo, faults=_faults)


def retrain_seeds(job: JobConfig | ResolvedJob, subnet: SubnetConfig | None, method: str = "noah",
                  hpo: dict | None = None) -> dict:
    """Retrain for every seed in ``retrain.seeds``; test accuracy as mean and (population) std."""
    return retrain_methods(job, subnet, (method,), hpo=hpo)[method]


def retrain_methods(job: JobConfig | ResolvedJob, subnet: SubnetConfig | Mapping[str, SubnetConfig] | None,
                    methods: Sequence[str], hpo: dict | None = None,
                    _faults: dict[str, list] | None = None) -> dict[str, dict]:
    """Retrain every method (``subnet``: NOAH's, or one per NOAH row; a method may be a row label
    such as ``noah+``, :data:`noah_ray.space.methods.ROW_METHODS`) for every seed in ``retrain.seeds``, all in one
    session of reused workers (:func:`_fit_session`); E2VPT with a ``prune`` section (its second
    run needs the first's weights) runs by itself after them.  Per method: test accuracy as mean
    and (population) std over the seeds.  ``_faults`` (tests): ``{run id: [(epoch, mode), ...]}``."""
    rj = resolved(job, "retrain")
    seeds = rj.job.retrain.seeds
    subnets = subnet if isinstance(subnet, Mapping) else {m: subnet for m in methods if method_of(m) == "noah"}
    cfgs = {m: subnet_for(method_of(m), rj.job, subnets.get(m)) for m in methods}
    for m, cfg in cfgs.items():
        _check_init(rj, cfg, method_of(m))
    alone = {m for m in methods if m == "e2vpt" and rj.job.prune is not None}
    planned = [(m, s, _plan_run(rj, m, cfgs[m], s, hpo=hpo)) for m in methods if m not in alone for s in seeds]
    plans = {k: p for k, v in (_faults or {}).items() if (p := FaultPlan.of(v)) is not None}
    trained = _trainers(rj, [run for _, _, run in planned])
    firsts = list({t.run_id: t for t in (trained[run.run_id] for _, _, run in planned)}.values())
    metas = dict(zip((t.run_id for t in firsts), _fit_session(firsts, plans, rj.job.retrain.max_concurrent),
                     strict=True))
    results: dict[str, list[TrainResult]] = {m: [] for m in methods}
    for m, s, run in planned:
        first = trained[run.run_id]
        if first is not run:
            progress.echo(f"[retrain] {m} seed {s} trains what {first.run_id} trained (same config, seed and "
                          f"settings): its result is reused")
        results[m].append(_record_run(rj, dataclasses.replace(run, run_dir=first.run_dir,
                                                              fingerprint=first.fingerprint),
                                      m, s, cfgs[m], metas[first.run_id], hpo))
    for m in alone:
        results[m] = [_retrain(rj, cfgs[m], m, s, hpo=hpo) for s in seeds]
    return {m: _seeds_summary(results[m]) for m in methods}


def training_key(spec: SpecRecord) -> str:
    """What a run trains, whatever its row is called: a hash of its spec with the method replaced by
    what the method changes in training (whether the backbone trains; the recipe, config, learning
    rate and seed are in the spec already).  A NOAH row whose subnet is a baseline's uniform config
    (a race that kept the hand-sized LoRA) has the baseline's key."""
    content = {**spec.content(), "method": None, "trains_backbone": trains_backbone(spec.method)}
    return hashlib.sha1(json.dumps(content, sort_keys=True).encode()).hexdigest()[:10]


def _trainers(rj: ResolvedJob, planned: list[RunSpec]) -> dict[str, RunSpec]:
    """Run id -> the run that trains it: rows of one :func:`training_key` train once, as the first
    baseline row among them (NOAH rows after baselines: the baseline's run keeps its own name).
    A row whose own run was started earlier keeps training (or holding) it, and rows after it reuse it."""
    root = JobPaths.of(rj.job).root
    started = {run.run_id for run in planned if storage.exists(root.join(run.run_dir, "spec.json"))}
    by_key: dict[str, RunSpec] = {}
    out: dict[str, RunSpec] = {}
    for run in sorted(planned, key=lambda r: (r.run_id not in started, r.method == "noah")):
        first = by_key.setdefault(training_key(run.spec), run)
        out[run.run_id] = run if run.run_id in started else first
    return out


def _seeds_summary(results: list[TrainResult]) -> dict:
    accs = [r.metrics["test_acc"] for r in results]
    return {"method": results[0].metrics["method"], "test_acc_mean": statistics.fmean(accs),
            "test_acc_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0, "runs": accs,
            "val_acc_mean": statistics.fmean(r.metrics["val_acc"] for r in results),
            "run_ids": [r.run_name for r in results]}


def retrain_done(job: JobConfig, subnet: SubnetConfig | None, method: str, seed: int, num_classes: int,
                 hpo: dict | None = None) -> bool:
    """Whether retraining ``method`` with ``seed`` finished earlier (E2VPT with pruning: unknown, False)."""
    label, method = method, method_of(method)
    if method == "e2vpt" and job.prune is not None:
        return False
    cfg = subnet_for(method, job, subnet)
    lr = float(job.retrain.method_lr.get(method, job.retrain.lr))
    spec = dataclasses.replace(spec_for(job, "retrain", method, cfg, lr, seed, num_classes), hpo=hpo or None)
    paths, run_id = JobPaths.of(job), retrain_run_id(label, seed)
    published = [paths.retrain_run(run_id).join(p) for p in ("best", "final")]
    own = paths.retrain_config(run_id, spec.fingerprint())
    if storage.exists(own.join("spec.json")):
        return _finished(own, spec, job.retrain.epochs) \
            and all(_intact(p) for p in published if storage.exists(p.join("meta.json")))
    return _reused(paths, published, run_id, spec, job.retrain.epochs)


def _reused(paths: JobPaths, published: list[storage.Location], run_id: str, spec: SpecRecord, epochs: int) -> bool:
    """Whether row ``run_id``, which never trained itself, has published the finished run that
    another row trained with ``spec``'s training (:func:`retrain_methods` trains rows of one
    :func:`training_key` once): ``best/`` and ``final/`` intact, another run id, all ``epochs``,
    and that run's fingerprint ``spec``'s or its ``spec.json`` of the same training key."""
    best, final = published
    if not (storage.exists(best.join("meta.json")) and storage.exists(final.join("meta.json")) and _intact(best)):
        return False
    try:
        meta = _final_meta(final)                # loads and checks final/ once
        if meta.run_id in (None, run_id) or meta.epochs_done < epochs or meta.fingerprint is None:
            return False
        if meta.fingerprint == spec.fingerprint():
            return True
        trainer = paths.retrain_config(meta.run_id, meta.fingerprint).join("spec.json")
        return storage.exists(trainer) and training_key(_read_spec(trainer)) == training_key(spec)
    except (ValueError, ConfigError):
        return False


def _check_init(rj: ResolvedJob, cfg: SubnetConfig, method: str) -> None:
    """``retrain.init`` (NOAH only) fits what retraining builds."""
    job = rj.job
    if method == "noah" and job.retrain.init:
        from noah_ray.interop.artifact import check_init_artifact

        check_init_artifact(job.retrain.init, model_name=job.model.name, subnet=cfg, num_classes=rj.num_classes,
                            endpoint=job.storage_endpoint)


def _retrain(rj: ResolvedJob, cfg: SubnetConfig, method: str, seed: int, *, hpo: dict | None = None,
             faults: list | None = None) -> TrainResult:
    result = _retrain_run(rj, method, cfg, seed, faults=faults, hpo=hpo)
    if method != "e2vpt" or rj.job.prune is None:
        return result
    plan = _prune_plan(rj, cfg, seed, result.metrics["checkpoint_uri"])
    return _retrain_run(rj, "e2vpt-pruned", cfg, seed, prune_plan=plan, hpo=hpo)


def _retrain_run(rj: ResolvedJob, label: str, cfg: SubnetConfig, seed: int, *,
                 faults: list | None = None, prune_plan: dict | None = None, hpo: dict | None = None) -> TrainResult:
    """One retraining run (a Ray Train run of its own)."""
    run = _plan_run(rj, label, cfg, seed, prune_plan=prune_plan, hpo=hpo)
    return _record_run(rj, run, label, seed, cfg, _fit(run, FaultPlan.of(faults)), hpo)


def _plan_run(rj: ResolvedJob, label: str, cfg: SubnetConfig, seed: int, *, prune_plan: dict | None = None,
              hpo: dict | None = None) -> RunSpec:
    """The :class:`RunSpec` of one retraining run; ``prune_plan`` is the plan's JSON as stored
    (hashed as it is into the spec)."""
    job, n, tc = rj.job, rj.num_classes, rj.job.retrain
    method = "e2vpt" if prune_plan else method_of(label)
    lr = float(tc.method_lr.get(method, tc.lr))
    init = tc.init if method == "noah" else None
    run_id = retrain_run_id(label, seed)
    spec = dataclasses.replace(spec_for(job, "retrain", method, cfg, lr, seed, n), prune_plan=prune_plan or None,
                               hpo=hpo or None)
    fp = spec.fingerprint()
    paths = JobPaths.of(job)
    return RunSpec(job, "retrain", run_id, paths.relative(paths.retrain_config(run_id, fp)), method=method, seed=seed,
                   lr=lr, num_classes=n, backbone=rj.backbone, spec=spec, metrics_part=f"{run_id}-{fp}",
                   subnet=cfg.to_json(), fingerprint=fp, prune_plan=PrunePlan.from_dict(prune_plan) if prune_plan
                   else None, init=init, lease=rj.lease)


def _record_run(rj: ResolvedJob, run: RunSpec, label: str, seed: int, cfg: SubnetConfig, meta: MetaRecord,
                hpo: dict | None) -> TrainResult:
    """A trained run's ``best/`` and ``final/`` published under its stable name, its ``runs`` row."""
    job, paths, fp = rj.job, JobPaths.of(rj.job), cast(str, run.fingerprint)
    run_dir = paths.root.join(run.run_dir)
    _fence(rj)
    _publish(run_dir, paths.retrain_run(run.run_id), fp)
    trained = run.prune_plan.config() if run.prune_plan else cfg
    row = _runs_row(job, run.run_id, label, seed, trained, meta, hpo)
    _fence(rj)
    storage.append_table(paths.retrain, "runs", pa.Table.from_pylist([row]), part=f"{run.run_id}-{fp}")
    progress.echo(f"[retrain] {label} seed {seed}: val {row['val_acc']:.2f}% (epoch {row['best_epoch']}) "
                  f"test {row['test_acc']:.2f}% params {row['params'] / 1e6:.4f}M")
    return TrainResult("retrain", run.run_id, meta.epochs_done, run_dir.join("final").uri, {**row, "fingerprint": fp})


def _runs_row(job: JobConfig, run_id: str, label: str, seed: int, trained: SubnetConfig, meta: MetaRecord,
              hpo: dict | None) -> dict:
    """The run's row of the ``runs`` table."""
    if meta.best_epoch is None:
        raise RunError(f"retrain run {run_id!r}: its final/meta.json records no best epoch; delete the run "
                       f"directory and retrain it")
    row = {"run_id": run_id, "job": job.name, "dataset": job.data.dataset, "method": label, "seed": seed,
           "config_json": trained.to_json(), "params": meta.params, "params_head": meta.params_head,
           "val_acc": meta.best_val, "test_acc": meta.test_acc, "best_epoch": meta.best_epoch + 1,
           "epochs": meta.epochs_done, "wall_time_s": meta.train_time_s, "checkpoint_uri": meta.best_uri,
           "timestamp": datetime.now(timezone.utc), "hpo_json": json.dumps(hpo, sort_keys=True) if hpo else None}
    if hpo and hpo.get("val_acc") is not None:   # a tuned run trains on its val images: report the search's val
        row["val_acc"] = hpo["val_acc"]
    return row


def _publish(attempt: storage.Location, alias: storage.Location, fp: str) -> None:
    """Make ``<run>/best`` and ``<run>/final`` hold this config's result (meta.json written last)."""
    current = alias.join("final", "meta.json")
    if storage.exists(current) and all(_intact(alias.join(p)) for p in ("best", "final")) \
            and _read_meta(current).fingerprint == fp:
        return
    for part in ("best", "final"):
        files = storage.read_checked(attempt.join(part), ["model.safetensors", "meta.json"]).files
        storage.write_checked(alias.join(part), files)


# ----------------------------------------------------------------------------- E2VPT pruning
def _prune_plan(rj: ResolvedJob, cfg: SubnetConfig, seed: int, best_uri: str) -> dict:
    """Score the trained E2VPT prompts (best-on-val weights at ``best_uri``) on training batches
    in a Ray task (the retraining's resources) and plan the pruning; the plan is stored next to
    the weights (``prune_plan.json``) and reused when the job is re-run."""
    import ray

    job = rj.job
    loc = storage.resolve(best_uri, job.storage_endpoint).join("prune_plan.json")
    assert job.prune is not None                  # called for a job that prunes (e2vpt)
    want = {"prune": dataclasses.asdict(job.prune), "weights": best_uri}
    if storage.exists(loc):
        saved = json.loads(storage.read_text(loc))
        if saved.get("for") == want:
            return saved["plan"]
    tc = job.retrain
    task = ray.remote(_score_and_plan).options(num_cpus=tc.cpus_per_worker, num_gpus=1 if tc.use_gpu else 0)
    plan = ray.get(task.remote(job.to_dict(), cfg.to_json(), rj.backbone, rj.num_classes, best_uri, seed))
    storage.write_text(loc, json.dumps({"for": want, "plan": plan}, indent=1))
    return plan


def _score_and_plan(job_dict: dict, cfg_json: str, backbone: str | None, n: int, best_uri: str, seed: int) -> dict:
    from noah_ray.data import build_loader, norm_for

    job = JobConfig.from_dict(job_dict)
    device = torch.device("cuda" if job.retrain.use_gpu and torch.cuda.is_available() else "cpu")
    tensors, meta = storage.load_state(storage.resolve(best_uri, job.storage_endpoint))
    recipe = BestRecord.from_dict(meta).recipe
    model = build_model(job, SubnetConfig.from_json(cfg_json), backbone, n, recipe=recipe).to(device)
    model.load_trainable_state_dict(tensors)
    mean, std, size = norm_for(model)
    torch.manual_seed(seed)
    batches = build_loader(job.data, job.data.train_split, train=False, mean=mean, std=std,
                           img_size=job.data.img_size or size, shuffle=True, endpoint=job.storage_endpoint)
    assert job.prune is not None                  # the job of _prune_plan
    _, plan = prune(model, batches, job.prune)
    return plan.to_dict()
