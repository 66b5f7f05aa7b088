"""Where everything of a job lives under ``<storage>/<job>/``: the one place that knows the layout.

:class:`JobPaths` names every location (local path, ``file://`` or ``s3://`` alike, as
:class:`~noah_ray.store.storage.Location`); the stages, the queries and the import/export code ask it
instead of joining folder names themselves.  :data:`TABLE_STAGES` says which stage folder holds
each result table (schemas: :mod:`noah_ray.store.tables`).  Every table is a folder of Parquet parts,
``<stage>/<table>/<part>.parquet``, one per ``storage.append_table`` call::

    <storage>/<job>/
      lease.json                       the holder of the running command        JobPaths.lease
      backbone.safetensors             only when model.checkpoint is unset      JobPaths.backbone
      supernet/                        Ray Train run "supernet"                 JobPaths.supernet()
        named/<name>/                  a named supernet run, same layout        JobPaths.supernet(name)
        spec.json, checkpoint_e*/, final/ (model.safetensors + meta.json)      JobPaths.supernet_final()
        train_metrics/<run>-e00005.parquet
      search/                                                                   JobPaths.search
        trials/, generations/, pareto/ tables
        best_subnet.yaml               winner of the last finished run          JobPaths.best_subnet()
        runs/<run>/best_subnet.yaml    winner of each run                       JobPaths.best_subnet(run)
        state/<run>/                   searcher state (noah_ray.store.statelog)       JobPaths.search_state(run)
        state/<run>.json               format 1 (older), still read             JobPaths.search_state_v1(run)
        tune/<run>-a<attempt>/         Ray Tune experiments                     JobPaths.search_tune
      hpo/                                                                      JobPaths.hpo
        hpo_trials/, hpo_curves/ tables
        <method>/settings.json, <method>/best.json                             JobPaths.hpo_method(m)
        tune/<method>/                                                          JobPaths.hpo_tune
      retrain/                                                                  JobPaths.retrain
        runs/, train_metrics/ tables
        <run>/best/, <run>/final/      run = <method>-seed<k>: latest finished  JobPaths.retrain_run(run)
        <run>/<fp>/                    one Ray Train run per config fingerprint JobPaths.retrain_config(run, fp)

``meta.json`` (next to ``model.safetensors`` in every ``final/`` and ``best/``) records the run's
``method`` and whether it trained the backbone (``backbone_trained``); :func:`backbone_trained`
reads that, and for files from before the key existed falls back to the run name.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from noah_ray.security import safe_name
from noah_ray.store import storage

if TYPE_CHECKING:
    from noah_ray.config import JobConfig

#: the name of the default supernet run (``supernet/``); other names live under ``supernet/named/``
SUPERNET_RUN = "supernet"
LEASE_FILE = "lease.json"
BACKBONE_FILE = "backbone.safetensors"
BEST_SUBNET_FILE = "best_subnet.yaml"
#: the job's stage folders, in pipeline order
STAGE_DIRS: tuple[str, ...] = ("supernet", "search", "hpo", "retrain")
#: which stage folders hold each result table (``<job>/<stage>/<table>/``)
TABLE_STAGES: dict[str, tuple[str, ...]] = {
    "trials": ("search",), "generations": ("search",), "pareto": ("search",),
    "runs": ("retrain",), "train_metrics": ("supernet", "retrain"),
    "hpo_trials": ("hpo",), "hpo_curves": ("hpo",)}


def retrain_run_id(method: str, seed: int) -> str:
    """The name of the retraining run of ``method`` with ``seed``: ``<method>-seed<k>``."""
    return f"{method}-seed{seed}"


def backbone_trained(meta: Mapping[str, Any], run_id: str) -> bool:
    """Whether the run whose ``meta.json`` is ``meta`` trained the backbone (method ``full``).
    Files written before ``backbone_trained`` was recorded: from their ``method``, else from the
    run name (``full-seed<k>``)."""
    if "backbone_trained" in meta:
        return bool(meta["backbone_trained"])
    if "method" in meta:
        return cast(bool, meta["method"] == "full")
    return run_id.startswith("full-")


@dataclass(frozen=True)
class JobPaths:
    """Every location of one job; ``root`` is ``<storage>/<job>``."""

    root: storage.Location

    @classmethod
    def at(cls, storage_uri: str, job_name: str, endpoint: str | None = None) -> JobPaths:
        return cls(storage.resolve(storage_uri, endpoint).join(job_name))

    @classmethod
    def of(cls, job: JobConfig) -> JobPaths:
        return cls.at(job.storage, job.name, job.storage_endpoint)

    # ------------------------------------------------------------ job level
    @property
    def lease(self) -> storage.Location:
        return self.root.join(LEASE_FILE)

    @property
    def backbone(self) -> storage.Location:
        return self.root.join(BACKBONE_FILE)

    def stage(self, name: str) -> storage.Location:
        """``<job>/<stage>``: the folder one stage writes (and its tables live in)."""
        if name not in STAGE_DIRS:
            raise ValueError(f"unknown stage folder {name!r}; use one of {', '.join(STAGE_DIRS)}")
        return self.root.join(name)

    def table(self, table: str, stage: str | None = None) -> storage.Location:
        """The folder of Parquet parts of ``table`` (``stage`` where two stages write it)."""
        stages = TABLE_STAGES[table]
        if stage is None and len(stages) > 1:
            raise ValueError(f"table {table!r} lives in {' and '.join(stages)}; name the stage")
        if stage is not None and stage not in stages:
            raise ValueError(f"table {table!r} does not live in {stage!r}; it lives in {', '.join(stages)}")
        return self.stage(stage or stages[0]).join(table)

    # ------------------------------------------------------------ supernet
    def supernet(self, run_name: str | None = None) -> storage.Location:
        """``supernet/`` (the default run) or ``supernet/named/<run_name>/``."""
        if run_name in (None, SUPERNET_RUN):
            return self.stage("supernet")
        return self.stage("supernet").join("named", safe_name(run_name, "supernet run name"))

    def relative(self, loc: storage.Location) -> str:
        """``loc``'s path under the job root (a Ray Train run's ``run_dir``)."""
        return posixpath.relpath(loc.path, self.root.path)

    def supernet_final(self, run_name: str | None = None) -> storage.Location:
        return self.supernet(run_name).join("final")

    # ------------------------------------------------------------ search
    @property
    def search(self) -> storage.Location:
        return self.stage("search")

    def best_subnet(self, run_id: str | None = None) -> storage.Location:
        """The winner of the last finished search, or of search run ``run_id``."""
        if run_id is None:
            return self.search.join(BEST_SUBNET_FILE)
        return self.search.join("runs", run_id, BEST_SUBNET_FILE)

    def search_state(self, run_id: str) -> storage.Location:
        return self.search.join("state", run_id)

    def search_state_v1(self, run_id: str) -> storage.Location:
        return self.search.join("state", f"{run_id}.json")

    @property
    def search_tune(self) -> storage.Location:
        return self.search.join("tune")

    # ------------------------------------------------------------ hpo
    @property
    def hpo(self) -> storage.Location:
        return self.stage("hpo")

    def hpo_method(self, method: str) -> storage.Location:
        return self.hpo.join(method)

    @property
    def hpo_tune(self) -> storage.Location:
        return self.hpo.join("tune")

    # ------------------------------------------------------------ retrain
    @property
    def retrain(self) -> storage.Location:
        return self.stage("retrain")

    def retrain_run(self, run_id: str) -> storage.Location:
        """``retrain/<run_id>``: ``best/`` and ``final/`` of the latest finished config of the run."""
        return self.retrain.join(run_id)

    def retrain_config(self, run_id: str, fingerprint: str) -> storage.Location:
        """``retrain/<run_id>/<fingerprint>``: the Ray Train run of one config of the run."""
        return self.retrain_run(run_id).join(fingerprint)
