"""The chained stages (supernet -> search -> race -> retrain), shared by the CLI and the Ray jobs.

Everything about a job is validated once, before anything is written (:func:`preflight`:
:func:`noah_ray.run.preflight.resolve`); the stages take the resolved job and do not check again.  Each
stage resumes from what earlier runs of the same job left in storage, so running a finished
job again only re-reads its results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from noah_ray import progress
from noah_ray.config import STAGES, JobConfig
from noah_ray.config.resolved import ResolvedJob
from noah_ray.errors import ConfigError, Interrupted
from noah_ray.interop import read_subnet
from noah_ray.run import capacity
from noah_ray.run.preflight import check_artifacts, is_generated, resolve
from noah_ray.space import SubnetConfig
from noah_ray.space.methods import RACED_NOAH
from noah_ray.store import storage


@dataclass(frozen=True)
class PreflightReport:
    resolved: ResolvedJob
    pending: tuple[str, ...]          # stages that need Ray; the others answer from storage


def preflight(job: JobConfig, stages: tuple[str, ...] = STAGES) -> PreflightReport:
    """Everything checked before Ray starts, once per command: the job (:func:`~noah_ray.run.preflight.resolve`),
    earlier stages' artifacts, and which stages still need Ray."""
    resolved = resolve(job, stages, generate=True)
    check_artifacts(job, stages)
    return PreflightReport(resolved, pending_stages(job, stages, resolved.num_classes))


def _stage_done(stage: str, job: JobConfig, num_classes: int) -> bool:
    from noah_ray.hpo import driver as hpo
    from noah_ray.hpo import race
    from noah_ray.search import driver as search
    from noah_ray.train import runs

    if stage == "supernet":
        return runs.supernet_done(job, num_classes)
    if stage == "search":
        return search.search_done(job)
    if stage == "race":
        return race.race_done(job)
    if stage == "hpo" and job.hpo is None:
        return True
    methods = _methods(job)
    try:
        noah = noah_rows(job) if "noah" in methods else {}
    except ConfigError:                  # e.g. the winner file is not written yet: the search stage writes it
        return False
    if stage == "hpo":
        return all(hpo.hpo_done(job, m) for m in methods)
    done = runs.retrain_done if job.hpo is None else hpo.tuned_retrain_done
    rows = [*noah, *(m for m in methods if m != "noah")]
    return all(done(race.raced_job(job) if r == RACED_NOAH else job, noah.get(r), r, seed, num_classes)
               for r in rows for seed in job.retrain.seeds)


def pending_stages(job: JobConfig, stages: tuple[str, ...], num_classes: int) -> tuple[str, ...]:
    """The requested stages that still have work (every stage after a pending one is pending)."""
    out: list[str] = []
    for stage in (s for s in STAGES if s in stages):
        if out or not _stage_done(stage, job, num_classes):
            out.append(stage)
    return tuple(out)


def _methods(job: JobConfig) -> tuple[str, ...]:
    return tuple(dict.fromkeys((job.retrain.method, *job.retrain.baselines)))


def prepare_data(job: JobConfig) -> None:
    """Write a generated (``gen_*``) or mini-VTAB (``mv_*``) task under ``data.root`` if it is not
    there yet."""
    if is_generated(job) and not str(job.data.root).startswith("s3://"):
        from noah_ray.data import minivtab, write_generated_vtab

        root = Path(job.data.root).expanduser()
        folder = root / job.data.dataset
        if not folder.is_dir():
            progress.echo(f"== data: writing task {job.data.dataset!r} to {folder}")
            if job.data.dataset in minivtab.TASKS:
                minivtab.write_task(root, job.data.dataset, seed=job.data.seed)
            else:
                write_generated_vtab(root, job.data.dataset, seed=job.data.seed)


def init_ray(address: str | None = None, *, quiet: bool = False) -> bool:
    """Connect to ``address`` / ``$RAY_ADDRESS`` (set inside ``ray job submit``), else start a
    local Ray on this machine.  ``quiet`` keeps Ray's own output in Ray's log files
    (:func:`noah_ray.progress.quiet_ray`); run the stages inside :func:`noah_ray.progress.session`
    so that the workers' progress lines still reach the console.  True when this call started a
    local Ray (the caller shuts it down; one it attached to is left running)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict = {"include_dashboard": False} if address == "local" else {}
    kwargs.update(progress.quiet_ray() if quiet else {"log_to_driver": True})
    ray.init(address=address, **kwargs)
    return address == "local"


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class Trap:
    """SIGINT / SIGTERM for one command (:func:`interrupts`): ``signum`` is the first one caught."""

    main: bool
    signum: int | None = None

    def install(self) -> None:
        """(Re)install the handler: again after ``ray.init``, whose own SIGTERM handler dumps a
        native stack and aborts (exit 134)."""
        if self.main:
            for sig in _SIGNALS:
                signal.signal(sig, self._caught)

    def _caught(self, signum: int, frame: object) -> None:
        self.signum = signum
        for sig in _SIGNALS:              # once: the cleanup that follows (lease, Ray) runs to its end
            signal.signal(sig, signal.SIG_IGN)
        # KeyboardInterrupt, not our own error: a blocking ray.get turns only that into a clean raise
        raise KeyboardInterrupt

    def interrupted(self, err: BaseException) -> Interrupted:
        """The command's :class:`Interrupted` for ``err`` (a KeyboardInterrupt, or an Interrupted
        that :func:`run_stages` named the stage in), with the signal that was caught."""
        signum = self.signum or signal.SIGINT
        if isinstance(err, Interrupted):
            return Interrupted(signum, err.stage, err.saved)
        return Interrupted(signum)


@contextlib.contextmanager
def interrupts() -> Iterator[Trap]:
    """SIGINT and SIGTERM stop the stage for the ``with`` block: the main thread gets a
    ``KeyboardInterrupt`` (which Ray's blocking calls pass on), the ordinary error path releases
    the lease, and the caller turns it into :class:`Interrupted` (:meth:`Trap.interrupted`); later
    signals are ignored until the block ends.  Outside the main thread (a sweep's Ray task)
    nothing is installed."""
    trap = Trap(threading.current_thread() is threading.main_thread())
    saved = {sig: signal.getsignal(sig) for sig in _SIGNALS} if trap.main else {}
    trap.install()
    try:
        yield trap
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def retrain_subnet(job: JobConfig) -> SubnetConfig:
    """The subnet retraining uses: ``retrain.subnet`` if set, else the race's survivor (unless
    ``race.enabled: false``), else the search's winner."""
    from noah_ray.hpo.race import race_applies, raced_subnet
    from noah_ray.search.driver import load_best_subnet

    if job.retrain.subnet:
        return read_subnet(job.retrain.subnet)
    if race_applies(job):
        return raced_subnet(job)
    return load_best_subnet(job)


def noah_rows(job: JobConfig) -> dict[str, SubnetConfig]:
    """NOAH's result rows and the subnet each retrains: when the race applies, ``noah+`` (the
    race's survivor) and, with ``race.retrain_plain``, ``noah`` (the search's top-scored candidate,
    the paper's procedure); else ``noah`` (``retrain.subnet`` or the search's winner)."""
    from noah_ray.hpo.race import race_applies, raced_subnet, top_scored

    if not race_applies(job):
        return {"noah": retrain_subnet(job)}
    rows = {RACED_NOAH: raced_subnet(job)}
    if job.race.retrain_plain:
        rows["noah"] = top_scored(job)
    return rows


def _interrupt_main(lost: BaseException) -> None:
    """From the lease thread: stop the main thread's stage now.  A real SIGINT to the main thread
    wakes a blocking call (``time.sleep``, a wait in Ray); only when Python handles SIGINT (else
    the signal could end the process)."""
    if callable(signal.getsignal(signal.SIGINT)):
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)


def run_stages(job: JobConfig, stages: tuple[str, ...] = STAGES, *,
               start_ray: Callable[[], None] | None = None, wait_stale_lease: bool = False) -> dict:
    """Run the requested stages in order; returns a summary per stage.

    :func:`preflight` runs first; the job's lease (:mod:`noah_ray.store.lease`) is held throughout, so a
    second run of the same job fails at once.  ``start_ray`` is called only when a stage has work
    left (finished stages answer from storage); without it Ray must be initialised (or starts on
    first use).  A lease lost while a stage runs (another run took it over) interrupts the main
    thread and raises :class:`~noah_ray.store.lease.LeaseLost`; an interrupt (SIGINT, or a signal
    :func:`interrupts` caught) raises :class:`Interrupted` naming the stage and where its results are.
    ``wait_stale_lease`` (a sweep's pipeline re-run after its node died) waits out a lease that its
    dead holder no longer renews instead of failing at once."""
    from noah_ray.store import lease

    report = preflight(job, stages)
    main = threading.current_thread() is threading.main_thread()
    on_lost = _interrupt_main if main else None
    holder: lease.Holder | None = None
    try:
        with lease.hold(job.storage, job.storage_endpoint, job.name, on_lost=on_lost,
                        wait_stale=wait_stale_lease) as holder:
            return _run_held(dataclasses.replace(report.resolved, lease=holder.token), report.pending, stages,
                             start_ray)
    except (Interrupted, KeyboardInterrupt):
        if holder is not None and holder.lost is not None:      # the interrupt came from the lease thread
            raise holder.lost from None
        raise


def _run_held(rj: ResolvedJob, pending: tuple[str, ...], stages: tuple[str, ...],
              start_ray: Callable[[], None] | None) -> dict:
    job = rj.job
    if pending and start_ray is not None:
        start_ray()
    if pending:
        capacity.check(job, pending, capacity.node_types())
    prepare_data(job)
    uri = storage.resolve(job.storage, job.storage_endpoint).join(job.name).uri
    summary: dict = {"job": job.name, "uri": uri}
    t0 = time.time()
    for stage in (s for s in STAGES if s in stages):
        try:
            out = _RUNNERS[stage](rj)
        except (Interrupted, KeyboardInterrupt) as e:
            raise Interrupted(getattr(e, "signum", signal.SIGINT), stage, uri) from None
        if out is not None:
            summary[stage] = out
    summary["wall_time_s"] = time.time() - t0
    return summary


def _supernet(rj: ResolvedJob) -> dict:
    from noah_ray.train.runs import train_supernet

    job = rj.job
    progress.echo(f"== supernet: {job.supernet.epochs} epoch(s), {job.supernet.num_workers} worker(s)")
    res = train_supernet(rj)
    return {"epochs": res.epochs_done, "uri": res.final_uri,
            **{k: v for k, v in res.metrics.items() if k.startswith("val_acc")}}


def _search(rj: ResolvedJob) -> dict:
    from noah_ray.search.driver import run_search

    s = rj.job.search
    progress.echo(f"== search: {s.algorithm}, {s.generations} generation(s) x {s.population}, "
                  f"limit {s.param_limit} M")
    res = run_search(rj.job, limit=rj.limit, lease=rj.lease)
    return {"best": res.best.to_dict() if res.best else None, "val_acc": res.best_val_acc,
            "params": res.best_params, "evaluated": res.evaluated, "uri": res.uri,
            "best_subnet_uri": res.best_subnet_uri, "finished": res.finished, "selection": res.selection}


def _race(rj: ResolvedJob) -> dict | None:
    from noah_ray.hpo.race import race_applies, run_race

    job = rj.job
    if not race_applies(job):
        return None
    r = job.race
    progress.echo(f"== race: {r.finalists} search finalist(s)" + (" + the baselines" if r.baselines else "")
                  + f", {'ASHA' if r.scheduler == 'asha' else 'synchronous successive halving'} up to "
                  f"{r.epochs(job.retrain.epochs)} epoch(s)")
    res = run_race(rj)
    return None if res is None else dataclasses.asdict(res)


def _hpo(rj: ResolvedJob) -> dict | None:
    from noah_ray.hpo.driver import run_hpo

    job, methods = rj.job, _methods(rj.job)
    if job.hpo is None:
        return None
    progress.echo(f"== hpo: {', '.join(methods)}, {job.hpo.searcher} + {job.hpo.scheduler}")
    subnet = retrain_subnet(job) if "noah" in methods else None
    return {m: run_hpo(rj, m, subnet if m == "noah" else None).record() for m in methods}


def _retrain(rj: ResolvedJob) -> dict:
    from noah_ray.hpo.driver import tuned_retrain
    from noah_ray.hpo.race import raced_job
    from noah_ray.train.runs import retrain_methods

    job, methods = rj.job, _methods(rj.job)
    noah = noah_rows(job) if "noah" in methods else {}
    others = [m for m in methods if m != "noah"]
    progress.echo(f"== retrain: {', '.join([*noah, *others])} x seeds {list(job.retrain.seeds)}"
                  + (" with tuned hyper-parameters" if job.hpo else ""))
    if job.hpo is not None:
        out = {r: tuned_retrain(rj.with_job(raced_job(job)), s, "noah", label=r) for r, s in noah.items()}
        return {**out, **{m: tuned_retrain(rj, None, m) for m in others}}
    raced = raced_job(job)
    # the race chose NOAH's learning rate: its survivor in a session of its own; every other row and
    # seed in one session of reused workers
    apart = [RACED_NOAH] if RACED_NOAH in noah and raced is not job else []
    together = [*(r for r in noah if r not in apart), *others]
    out = retrain_methods(rj, {r: noah[r] for r in together if r in noah}, together) if together else {}
    if apart:
        out.update(retrain_methods(rj.with_job(raced), {RACED_NOAH: noah[RACED_NOAH]}, apart))
    return {r: out[r] for r in (*noah, *others)}


#: stage name -> what runs it on the resolved job (its summary; None: nothing to run)
_RUNNERS: dict[str, Callable[[ResolvedJob], dict | None]] = {
    "supernet": _supernet, "search": _search, "race": _race, "hpo": _hpo, "retrain": _retrain}


def format_summary(summary: dict) -> str:
    """Human-readable lines for a :func:`run_stages` summary."""
    lines = []
    if "supernet" in summary:
        s = summary["supernet"]
        accs = ", ".join(f"{k[len('val_acc_'):]} {v:.1f}%" for k, v in s.items() if k.startswith("val_acc_"))
        lines.append(f"supernet: {s['epochs']} epoch(s)" + (f", val {accs}" if accs else "") + f" -> {s['uri']}")
    if "search" in summary:
        s = summary["search"]
        if s["best"]:
            sel = s.get("selection") or {}
            tied = (f"; {sel['tied']} other(s) within {sel['tie_se']:g} s.e. ({sel['val_se']:.2f} points) of the top "
                    f"{sel['top_val_acc']:.2f}%, tie rule {sel['ties']}") if sel.get("val_se") is not None else ""
            lines.append(f"search: best val {s['val_acc']:.2f}% with {s['params'] / 1e6:.4f} M params "
                         f"({s['evaluated']} candidates scored{tied}) -> {s['best_subnet_uri'] or s['uri']}")
        else:
            lines.append(f"search: no finished result yet ({s['evaluated']} candidates scored); run it again to resume")
    if summary.get("race"):
        from noah_ray.hpo.race import tie_clause

        r = summary["race"]
        lr = f", lr {r['lr']:g}" if r["lr"] is not None else ""
        lines.append(f"race: survivor {r['source']} (finalist {r['finalist']} of {r['finalists']}{lr}): val "
                     f"{r['val_acc']:.2f}% after {r['epochs']} epoch(s), {r['params'] / 1e6:.4f} M params; "
                     f"{r['epochs_trained']} epochs trained{tie_clause(r)} -> {r['uri']}")
    for method, r in summary.get("hpo", {}).items():
        values = ", ".join(f"{k.partition('.')[2]} {v:.4g}" for k, v in r["values"].items())
        lines.append(f"hpo {method}: best {r['metric']} {r['best_val']:.4g} of {r['trials']} trials with {values}")
    for method, r in summary.get("retrain", {}).items():
        lines.append(f"retrain {method}: test {r['test_acc_mean']:.2f} +- {r['test_acc_std']:.2f} % "
                     f"over {len(r['runs'])} seed(s)")
    if "wall_time_s" in summary:
        lines.append(f"done in {summary['wall_time_s']:.0f} s; results under {summary['uri']}")
    return "\n".join(lines)
