"""Sweeps: one job file naming many datasets (few-shot: shots and list seeds too), whose
pipelines run concurrently as Ray tasks sharing the cluster, into one storage root.

A sweep file is a job config (every section is the base of each job) plus a ``sweep`` section::

    name: vtab                         # each job is <name>-<dataset>[-<k>shot][-seed<s>]
    storage: s3://my-bucket/noah       # one root: results.vtab_table(storage) is the paper's table
    data: {root: /data/vtab-1k, format: vtab}
    ...
    sweep:
      job: vtab_cifar100.yaml          # optional: a job file as the base (relative to this file);
                                       # the sections above are merged over it, key by key
      datasets: [cifar100, caltech101, dtd]
      shots: [1, 2, 4, 8, 16]          # few-shot: one job per dataset x shots x seed (data.shots)
      seeds: [0, 1, 2]                 # few-shot list seeds (data.seed)
      max_concurrent: 4                # pipelines running at once
      task_retries: 2                  # a pipeline whose process or node died runs again (resumes)
      stages: [supernet, search, retrain]

Each job's pipeline (:func:`noah_ray.run.pipeline.run_stages`) is independent and resumes from
what storage holds, so running a sweep again only runs what is missing.  A job that fails
(bad data, a crash) is reported at the end and does not stop the others.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from noah_ray import progress
from noah_ray.config import STAGES, JobConfig
from noah_ray.config.sections import section_from_dict
from noah_ray.errors import ConfigError
from noah_ray.run import capacity


@dataclass(frozen=True)
class SweepSection:
    datasets: tuple[str, ...] = ()
    job: str | None = None                # base job file (relative to the sweep file)
    shots: tuple[int, ...] = ()           # few-shot K values (empty: data.shots of the base)
    seeds: tuple[int, ...] = ()           # few-shot list seeds (empty: data.seed of the base)
    max_concurrent: int = 4
    stages: tuple[str, ...] = STAGES
    task_retries: int = 2                 # re-runs of a pipeline whose process or node died (not its errors)

    def check(self, where: str) -> None:
        if not self.datasets or not all(isinstance(d, str) and d for d in self.datasets):
            raise ConfigError(f"{where}.datasets: {list(self.datasets)!r} must name at least one dataset, "
                              f"e.g. [cifar100, dtd]")
        if len(set(self.datasets)) != len(self.datasets):
            raise ConfigError(f"{where}.datasets: {list(self.datasets)!r} names a dataset twice; list each once")
        if not all(isinstance(k, int) and k > 0 for k in self.shots):
            raise ConfigError(f"{where}.shots: {list(self.shots)!r} must be positive integers, e.g. [1, 2, 4, 8, 16]")
        if not all(isinstance(s, int) and s >= 0 for s in self.seeds):
            raise ConfigError(f"{where}.seeds: {list(self.seeds)!r} must be integers >= 0")
        if self.max_concurrent < 1:
            raise ConfigError(f"{where}.max_concurrent: {self.max_concurrent} must be >= 1")
        if not isinstance(self.task_retries, int) or self.task_retries < 0:
            raise ConfigError(f"{where}.task_retries: {self.task_retries!r} must be an integer >= 0 (0: a pipeline "
                              f"whose node dies is reported failed)")
        bad = [s for s in self.stages if s not in STAGES]
        if bad or not self.stages:
            raise ConfigError(f"{where}.stages: {list(self.stages)!r}: use some of {', '.join(STAGES)}")


@dataclass
class SweepConfig:
    """A base job and the sweep over it; :meth:`jobs` expands it (each job validated as one)."""

    base: dict[str, Any]
    sweep: SweepSection
    where: str = "sweep"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "sweep") -> SweepConfig:
        data = dict(data or {})
        if "sweep" not in data:
            raise ConfigError(f"{where}: no 'sweep' section; add sweep: {{datasets: [...]}} "
                              f"(a single job runs with noah-ray pipeline)")
        section = section_from_dict(SweepSection, data.pop("sweep"), f"{where}.sweep")
        out = cls(data, section, where)
        out.jobs()                          # every expanded job is checked now, before anything runs
        return out

    @classmethod
    def load(cls, path: str | Path, edit: Callable[[dict], dict] | None = None) -> SweepConfig:
        """The sweep file at ``path``; ``edit`` changes the parsed dict first (``--set``)."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"sweep file {str(p)!r} does not exist; check the path")
        data = (edit or (lambda d: d))(_read_yaml(p))
        base_file = (data.get("sweep") or {}).get("job") if isinstance(data.get("sweep"), Mapping) else None
        if base_file:
            base_path = p.parent / base_file
            if not base_path.is_file():
                raise ConfigError(f"{p}: sweep.job {base_file!r} does not exist (looked at {base_path}); fix the path")
            data = _merge(_read_yaml(base_path), data)
        return cls.from_dict(data, where=str(p))

    def jobs(self) -> list[JobConfig]:
        base = JobConfig.from_dict(self.base, where=self.where)
        s = self.sweep
        out = []
        for dataset, shots, seed in itertools.product(s.datasets, s.shots or (None,), s.seeds or (None,)):
            d = base.to_dict()
            d["data"]["dataset"] = dataset
            name = f"{base.name}-{dataset}"
            if shots is not None:
                d["data"]["shots"], name = shots, f"{name}-{shots}shot"
            if seed is not None:
                d["data"]["seed"], name = seed, f"{name}-seed{seed}"
            d["name"] = name
            out.append(d)
        names = [d["name"] for d in out]
        for d in out:                 # warm start from the other tasks' winners (search.warm_start: [sweep])
            if "sweep" in d["search"]["warm_start"]:
                d["search"]["warm_jobs"] = [n for n in names if n != d["name"]]
        return [JobConfig.from_dict(d, where=f"{self.where} ({d['name']})") for d in out]


def _read_yaml(p: Path) -> dict:
    import yaml

    from noah_ray.config.sections import load_yaml

    try:
        data = load_yaml(p.read_text(), str(p))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: cannot parse ({str(e).splitlines()[0]}); fix the file") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of sections, got {type(data).__name__}")
    return data or {}


def _merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: sections are merged key by key, other values replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


@dataclass
class SweepOutcome:
    job: str
    ok: bool
    summary: dict = field(default_factory=dict)
    error: str = ""


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1][:300] if lines else ''}"


def run_pipeline(job_dict: dict, stages: Sequence[str]) -> SweepOutcome:
    """One job's pipeline; any error becomes a failed outcome (the sweep reports it)."""
    from noah_ray.run.pipeline import run_stages

    job = JobConfig.from_dict(job_dict)
    try:
        return SweepOutcome(job.name, True, run_stages(job, tuple(stages), wait_stale_lease=True))
    except Exception as e:                  # isolated: one dataset's failure never stops the others
        return SweepOutcome(job.name, False, error=_one_line(e))


def _absolute(job: JobConfig) -> JobConfig:
    """Relative local paths made absolute here: the tasks may run in another working directory."""
    import os
    from urllib.parse import urlparse

    def fix(p: str | None) -> str | None:
        return os.path.abspath(os.path.expanduser(p)) if p and not urlparse(p).scheme else p

    d = job.to_dict()
    d["storage"], d["data"]["root"] = fix(d["storage"]), fix(d["data"]["root"])
    d["model"]["checkpoint"], d["retrain"]["subnet"] = fix(d["model"]["checkpoint"]), fix(d["retrain"]["subnet"])
    return JobConfig.from_dict(d, where=job.name)


def run_sweep(sweep: SweepConfig, max_concurrent: int | None = None) -> list[SweepOutcome]:
    """Every job's pipeline as a Ray task (at most ``max_concurrent`` at once, default the
    sweep's); Ray must be initialised.  Returns the outcomes in the sweep's order.  One line per
    pipeline started / ended (:func:`noah_ray.progress.echo`); the pipelines' own lines stay in
    their tasks' Ray logs unless Ray was started verbose.  Interrupted (a KeyboardInterrupt from
    the command's signal handler), it cancels the pipelines still running and raises on."""
    import ray

    # the orchestrating task itself holds no CPU: the stages it starts (Ray Train, Tune) do.  A
    # system failure (its worker process or node died) re-runs it, resuming from storage; its own
    # errors never reach Ray (run_pipeline returns them as a failed outcome), so they are not retried
    task = ray.remote(num_cpus=0, max_retries=sweep.sweep.task_retries, retry_exceptions=False)(run_pipeline)
    jobs = sweep.jobs()
    nodes = capacity.node_types()     # here, on the driver: inside a task a local Ray looks attached
    limit = max_concurrent or sweep.sweep.max_concurrent
    pending = list(jobs)
    running: dict = {}
    outcomes: dict[str, SweepOutcome] = {}
    try:
        while pending or running:
            while pending and len(running) < limit:
                job = pending.pop(0)
                try:
                    capacity.check(job, tuple(sweep.sweep.stages), nodes)
                except ConfigError as e:        # no node can ever run it: its outcome, the others go on
                    outcomes[job.name] = SweepOutcome(job.name, False, error=str(e))
                    progress.echo(f"== sweep: {job.name} FAILED: {e}", tag="sweep", done=len(outcomes),
                                  total=len(jobs))
                    continue
                progress.echo(f"== sweep: starting {job.name} ({len(outcomes) + len(running) + 1}/{len(jobs)})")
                running[task.remote(_absolute(job).to_dict(), sweep.sweep.stages)] = job.name
            if not running:
                break
            ready, _ = ray.wait(list(running), num_returns=1)
            name = running.pop(ready[0])
            try:
                outcomes[name] = ray.get(ready[0])
            except Exception as e:              # the task's process died (OOM, node lost)
                outcomes[name] = SweepOutcome(name, False, error=_one_line(e))
            o = outcomes[name]
            progress.echo(f"== sweep: {name} {'finished' if o.ok else 'FAILED: ' + o.error}", tag="sweep",
                          done=len(outcomes), total=len(jobs))
    except BaseException:                       # interrupted: stop the pipelines (their leases are released)
        for ref in running:
            with contextlib.suppress(Exception):   # best effort: a Ray already gone has nothing to cancel
                ray.cancel(ref)
        raise
    return [outcomes[j.name] for j in jobs]


def format_outcomes(outcomes: Sequence[SweepOutcome], root: str) -> str:
    lines = [f"sweep: {sum(o.ok for o in outcomes)}/{len(outcomes)} pipeline(s) finished; results under {root}"]
    for o in outcomes:
        if o.ok:
            search = o.summary.get("search") or {}
            best = f", search best val {search['val_acc']:.2f}%" if search.get("val_acc") is not None else ""
            lines.append(f"  ok      {o.job}{best}")
        else:
            lines.append(f"  FAILED  {o.job}: {o.error}")
    lines.append(f"table: noah-ray results {root} --table vtab   (results.vtab_table({root!r}))")
    return "\n".join(lines)
