"""The Parquet store of one search run: :class:`SearchStore` writes the ``trials`` /
``generations`` / ``pareto`` tables, the winner's ``best_subnet.yaml`` and the searcher state
(:mod:`noah_ray.store.statelog`) under ``<storage>/<job>/search/`` (layout: :mod:`noah_ray.search`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from noah_ray.evolution import DONE, FAILED, Candidate, GenerationRecord, SearchEngine, apply_deltas
from noah_ray.evolution.ties import Selection
from noah_ray.space import MODULES
from noah_ray.store import storage
from noah_ray.store.lease import Fence
from noah_ray.store.statelog import StateLog


def _rows(cands: Sequence[Candidate], extra: dict[str, Any]) -> dict[str, list]:
    cols: dict[str, list] = {k: [] for k in ("trial_id", "config_json", "params", "params_head", "val_acc")}
    for m in MODULES:
        cols[f"{m}_depth"], cols[f"{m}_widths"] = [], []
    for c in cands:
        cols["trial_id"].append(c.cid)
        cols["config_json"].append(c.config.to_json())
        cols["params"].append(c.params)
        cols["params_head"].append(c.info.get("params_head"))
        cols["val_acc"].append(c.score)
        for m in MODULES:
            cols[f"{m}_depth"].append(c.config.depth(m))
            cols[f"{m}_widths"].append(list(c.config.layer_widths(m)))
    n = len(cands)
    cols.update({k: [v] * n for k, v in extra.items()})
    return cols


def _attempts(c: Candidate) -> list[Candidate]:
    """Rows of one candidate: each earlier failed attempt, then the last one."""
    old = [dataclasses.replace(c, status=FAILED, score=None, info={**a, "attempt": i})
           for i, a in enumerate(c.info.get("attempts", []))]
    return old + [dataclasses.replace(c, info={**c.info, "attempt": len(old)})]


def _error_text(err: Any) -> str | None:
    return err if isinstance(err, str) else None


def _utc(t: float | None = None) -> datetime:
    return datetime.fromtimestamp(time.time() if t is None else t, tz=timezone.utc)


@dataclass
class SearchStore:
    """Where one search run keeps its tables, state and winner (``uri`` = the search folder).
    ``fence``: the job's lease, checked before every write (:class:`~noah_ray.store.lease.Fence`;
    None: unfenced, for tests and tools that hold no lease)."""

    uri: str
    endpoint: str | None
    run_id: str
    job: str
    dataset: str
    algorithm: str
    fence: Fence | None = None

    @functools.cached_property
    def base(self) -> storage.Location:
        return storage.resolve(self.uri, self.endpoint)

    @property
    def state_loc(self) -> storage.Location:
        return self.base.join("state", self.run_id)

    @functools.cached_property
    def state_log(self) -> StateLog:
        return StateLog(self.state_loc, legacy=self.base.join("state", f"{self.run_id}.json"), fence=self.fence)

    def _check(self) -> None:
        """Before a write: :class:`~noah_ray.store.lease.LeaseLost` once another run took the lease over."""
        if self.fence is not None:
            self.fence.check()

    def load_state(self) -> dict | None:
        """The searcher state: the snapshot with every logged result replayed (or the older
        single-file format)."""
        got = self.state_log.load()
        if got is None:
            return None
        state, deltas = got
        for d in deltas:
            state.update(d.get("searcher", {}))
        apply_deltas(state["engine"], [d["engine"] for d in deltas])
        return state

    def save_state(self, state: dict) -> None:
        """A full snapshot (run start, resume)."""
        self.state_log.snapshot(state)

    def append_state(self, delta: dict, full: Callable[[], dict]) -> None:
        """One result's changes; ``full()`` gives the whole state when the log is compacted."""
        self.state_log.append(delta, full)

    def _ids(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "job": self.job, "dataset": self.dataset, "algorithm": self.algorithm}

    def write_generation(self, rec: GenerationRecord, engine: SearchEngine) -> None:
        """The generation's trial rows and its summary row (fixed part names: idempotent)."""
        ms = [c for c in engine.members(rec.generation) if c.status in (DONE, FAILED)]
        ms = [a for c in ms for a in _attempts(c)]
        cols = _rows(ms, self._ids())
        cols["error"] = [_error_text(c.info.get("error")) for c in ms]
        cols["attempt"] = [c.info.get("attempt", 0) for c in ms]
        cols["config_key"] = [c.config.key() for c in ms]
        cols["generation"] = [c.generation for c in ms]
        cols["origin"] = [c.origin for c in ms]
        cols["parent_ids"] = [list(c.parents) for c in ms]
        cols["status"] = [c.status for c in ms]
        cols["wall_time_s"] = [c.info.get("eval_time_s") for c in ms]
        cols["worker"] = [c.info.get("worker") for c in ms]
        cols["timestamp"] = [_utc(c.info.get("t")) for c in ms]
        part = f"{self.run_id}-g{rec.generation:04d}"
        self._check()
        storage.append_table(self.base, "trials", pa.table(cols), part=part)
        best = engine.candidates.get(rec.best_cid) if rec.best_cid else None
        gen = {**{k: [v] for k, v in self._ids().items()}, "generation": [rec.generation],
               "evaluated": [rec.evaluated], "failed": [rec.failed], "best_val_acc": [rec.best_score],
               "best_params": [rec.best_params], "best_config_json": [best.config.to_json() if best else None],
               "timestamp": [_utc()]}
        self._check()
        storage.append_table(self.base, "generations", pa.table(gen), part=part)

    def write_final(self, front: Sequence[Candidate], best: Candidate | None,
                    selection: Selection | None = None) -> str | None:
        """The Pareto table and the winner's subnet file (its header says how the winner was
        picked among the statistically tied candidates, ``selection``); returns the winner's URI."""
        cols = _rows(front, self._ids())
        cols["timestamp"] = [_utc(c.info.get("t")) for c in front]      # when it was scored, as in trials
        self._check()
        storage.append_table(self.base, "pareto", pa.table(cols), part=self.run_id)
        if best is None:
            return None
        head = (f"# noah-ray search winner: job {self.job}, run {self.run_id}, val_acc {best.score:.4f}, "
                f"{best.params} module parameters (head excluded)\n"
                + (f"# selection: {selection.line()}\n" if selection is not None else "")
                + "# retraining reads this file directly (retrain.subnet)\n")
        text = head + best.config.to_yaml()
        self._check()
        storage.write_text(self.base.join("runs", self.run_id, "best_subnet.yaml"), text)
        loc = self.base.join("best_subnet.yaml")
        self._check()
        storage.write_text(loc, text)
        return loc.uri

