"""Where everything of a job lives under ``<storage>/<job>/``: the one place that knows the layout,
and the one full description of it (other modules and docs/architecture.md point here).

:class:`JobPaths` names every location (local path, ``file://`` or ``s3://`` alike, as
:class:`~noah_ray.store.storage.Location`; ``JobPaths.of(job)`` or ``JobPaths.at(storage, name,
endpoint)``); the stages, the queries and the import/export code ask it instead of joining folder
names themselves.  :data:`TABLE_STAGES` says which stage folder holds each result table (schemas:
:mod:`noah_ray.store.tables`).  Every table is a folder of Parquet parts,
``<stage>/<table>/<part>.parquet``, one per ``storage.append_table`` call, never rewritten::

    <storage>/<job>/
      lease.json                       the holder of the running command (host, pid,   JobPaths.lease
                                       since); deleted on a clean exit (store.lease)
      backbone.safetensors             only when model.checkpoint is unset             JobPaths.backbone
                                       (nn.models.ensure_backbone, fixed seed)
      supernet/                        Ray Train run "supernet"                        JobPaths.supernet()
        spec.json                      what the run trains; a re-run with other settings fails fast
        checkpoint_e00004/             after the 5th epoch: trainable.safetensors, optimizer.safetensors,
                                       rng_rank<k>.safetensors, state.json (nn.optim; newest kept),
                                       checksums.json / checksums_rank<k>.json (sha256 per file)
        corrupt_checkpoint_e00004/     a bad newest checkpoint set aside before a resume (kept to inspect)
        final/                         model.safetensors + meta.json (what           JobPaths.supernet_final()
                                       nn.models.load_supernet reads)
        error.json                     a worker's non-retryable error, for the driver (train.worker)
        train_metrics/<run>-e00005.parquet   one part per epoch (numbered from 1), a row per evaluated subnet
        named/<name>/                  a named supernet run, same layout but its   JobPaths.supernet(name)
                                       train_metrics parts go to supernet/train_metrics/<name>-e*.parquet
      search/                                                                          JobPaths.search
        trials/<run>-g0000.parquet     one part per closed generation (rewritten idempotently)
        generations/<run>-g0000.parquet
        pareto/<run>.parquet           the accuracy-vs-params front of a finished run
        best_subnet.yaml               winner of the last finished run (what         JobPaths.best_subnet()
                                       retraining reads)
        runs/<run>/best_subnet.yaml    winner of each run                            JobPaths.best_subnet(run)
        state/<run>/                   searcher state (noah_ray.store.statelog)      JobPaths.search_state(run)
          snapshot.json                {"format": 2, "seq": N, "state": {...}}
          log.jsonl                    local storage: one delta per line
          log/<i:012d>.json            object stores: one delta per object
        state/<run>.json               format 1 (older), read when no snapshot exists JobPaths.search_state_v1(run)
        tune/<run>-a<attempt>/         Ray Tune experiment directories               JobPaths.search_tune
      race/                            finalist racing (hpo.race)                      JobPaths.race
        finalists/race.parquet         one row per (finalist, lr) trial: source, params, rung scores,
                                       stopped, chosen (written once the race ended)
        hpo_trials/race-<trial>.parquet, hpo_curves/race-<trial>-e00003.parquet   as under hpo/
        settings.json                  the finalists and settings the race started   JobPaths.race_settings
                                       with (a re-run must match)
        chosen.json                    the survivor: what retraining trains (its     JobPaths.race_chosen
                                       subnet, lr, source); a re-run only reads it
        tune/race/                     Ray Tune's experiment and the trials'         JobPaths.race_tune
                                       checkpoints
      hpo/                                                                             JobPaths.hpo
        hpo_trials/<method>-<trial>.parquet         one row per ended trial
        hpo_curves/<method>-<trial>-e00003.parquet  one row per trial epoch (what ASHA saw)
        <method>/settings.json         what the search started with (a re-run must   JobPaths.hpo_method(m)
                                       match)
        <method>/best.json             the chosen values, once every trial has ended
        tune/<method>/                 Ray Tune's experiment and the trials'         JobPaths.hpo_tune
                                       checkpoints
      retrain/                                                                         JobPaths.retrain
        runs/<run>-<fp>.parquet        one row per finished run (config_json, val/test accuracy, hpo_json)
        train_metrics/<run>-<fp>-e00005.parquet
        <run>/best/, <run>/final/      run = <method>-seed<k>: copies of the latest  JobPaths.retrain_run(run)
                                       finished config (train.runs._publish)
        <run>/<fp>/                    one Ray Train run per config fingerprint:     JobPaths.retrain_config(run, fp)
                                       spec.json, checkpoint_e*/, best/ (best-on-val weights), final/, error.json

Ray Train and Tune add their own bookkeeping files inside their run folders.  On S3,
``storage.tidy`` removes the directory markers pyarrow and Ray leave behind after each stage.
MLflow runs (``store.tracking``) go to the MLflow server, not into this tree.

There is no job-level ``meta.json``.  ``meta.json`` sits next to ``model.safetensors`` in every
``final/`` and ``best/`` (and in exported artifacts; ``storage.save_state``), followed by
``checksums.json`` (the sha256 of both, ``storage.MANIFEST``): a folder without ``meta.json`` counts
as incomplete, one whose files fail their checksum as damaged (a stage with such a ``final/`` is not
done); folders from before checksums load unverified.  It records the run's ``method``, whether it trained
the backbone (``backbone_trained``; :func:`backbone_trained` reads it, and for files from before the
key existed falls back to the method, then to the run name) and its ``subnet`` as
``SubnetConfig.to_dict()``.  A sweep (``run.sweep``) puts each job at
``<storage>/<name>-<dataset>[-<k>shot][-seed<s>]/`` with this same layout.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from noah_ray.config.job import STAGES
from noah_ray.errors import ConfigError
from noah_ray.security import safe_name
from noah_ray.store import storage
from noah_ray.store.records import MetaRecord

if TYPE_CHECKING:
    from noah_ray.config import JobConfig

#: the name of the default supernet run (``supernet/``); other names live under ``supernet/named/``
SUPERNET_RUN = "supernet"
LEASE_FILE = "lease.json"
BACKBONE_FILE = "backbone.safetensors"
BEST_SUBNET_FILE = "best_subnet.yaml"
#: which stage folders hold each result table (``<job>/<stage>/<table>/``)
TABLE_STAGES: dict[str, tuple[str, ...]] = {
    "trials": ("search",), "generations": ("search",), "pareto": ("search",),
    "runs": ("retrain",), "train_metrics": ("supernet", "retrain"),
    "hpo_trials": ("hpo", "race"), "hpo_curves": ("hpo", "race"), "finalists": ("race",)}


def retrain_run_id(method: str, seed: int) -> str:
    """The name of the retraining run of ``method`` (a result row's label) with ``seed``:
    ``<method>-seed<k>``, one path segment, ``+`` spelled ``plus`` (``noah+`` -> ``noahplus-seed0``);
    a seed that is not an integer, e.g. ``'0/../x'``, is refused, never joined."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"retrain seed {seed!r} must be an integer, e.g. retrain.seeds: [0, 1, 2]")
    return safe_name(f"{method.replace('+', 'plus')}-seed{seed}", "retrain run")


def backbone_trained(meta: Mapping[str, Any], run_id: str) -> bool:
    """Whether the run whose ``meta.json`` is ``meta`` trained the backbone (method ``full``).
    Files written before ``backbone_trained`` was recorded: from their ``method``, else from the
    run name (``full-seed<k>``); :meth:`MetaRecord.trains_backbone`."""
    return MetaRecord.from_dict(meta).trains_backbone(run_id)


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
        if name not in STAGES:
            raise ValueError(f"unknown stage folder {name!r}; use one of {', '.join(STAGES)}")
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

    # ------------------------------------------------------------ race
    @property
    def race(self) -> storage.Location:
        return self.stage("race")

    @property
    def race_settings(self) -> storage.Location:
        return self.race.join("settings.json")

    @property
    def race_chosen(self) -> storage.Location:
        return self.race.join("chosen.json")

    @property
    def race_tune(self) -> storage.Location:
        return self.race.join("tune")

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
