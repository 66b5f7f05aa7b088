"""The engine protocol and its bookkeeping: :class:`SearchEngine` (``ask`` / ``tell``, generations,
JSON state, deltas) and :func:`apply_deltas`.  Subclasses propose the candidates.
"""

from __future__ import annotations

import base64
import math
import random
import struct
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

from noah_ray.errors import ConfigError
from noah_ray.evolution.candidate import (
    ATTEMPT_KEYS,
    DONE,
    FAILED,
    QUEUED,
    RUNNING,
    Candidate,
    GenerationRecord,
    rank_key,
)
from noah_ray.space import SearchSpace, SubnetConfig
from noah_ray.space.budget import ParamLimit

if TYPE_CHECKING:
    from noah_ray.config import SearchConfig


STATE_VERSION = 1


class SearchEngine:
    """Bookkeeping shared by all engines; subclasses propose candidates.

    ``batch`` engines propose a whole generation at once (``_propose``) and wait until it is
    evaluated; the others create candidates one at a time (``_create_one``), the i-th created
    candidate belonging to generation ``i // population``.
    """

    algorithm = "base"
    batch = False

    def __init__(self, space: SearchSpace, limit: ParamLimit, *, population: int = 50,
                 generations: int = 20, seed: int = 0, max_attempts: int = 200) -> None:
        if population < 1 or generations < 1:
            raise ConfigError(f"population {population} and generations {generations} must be >= 1")
        limit.check(space)
        self.space, self.limit = space, limit
        self.population, self.generations, self.seed = population, generations, seed
        self.max_attempts = max_attempts
        self.rng = random.Random(seed)
        self.candidates: dict[str, Candidate] = {}
        self._by_key: dict[str, str] = {}
        self._by_gen: dict[int, list[str]] = {}
        self.queue: list[str] = []
        self.running: dict[str, str] = {}          # ticket (Tune trial id) -> cid
        self.generation = 0                         # the oldest generation not yet closed
        self.history: list[GenerationRecord] = []
        self.exhausted = False                      # no new feasible config could be found
        self.started = False
        self._dirty: dict[str, None] = {}           # candidates changed since the last take_delta
        self._delta_history = 0
        self._delta_rng: tuple[Any, ...] | None = None
        self.warm: list[SubnetConfig] = []          # generation 0 starts with these (warm start)

    @classmethod
    def from_config(cls, search: SearchConfig, space: SearchSpace, limit: ParamLimit,
                    warm: Sequence[SubnetConfig] = ()) -> SearchEngine:
        """The engine the ``search`` section describes (each engine takes the keys it knows);
        ``warm``: configs generation 0 holds before its random ones (``search.warm_start``)."""
        engine = cls(space, limit, **cls.config_kwargs(search))
        engine.warm = list(warm)
        return engine

    @classmethod
    def config_kwargs(cls, s: SearchConfig) -> dict[str, Any]:
        """The constructor arguments this engine reads from a ``search`` section."""
        return {"population": s.population, "generations": s.generations, "seed": s.seed}

    # ------------------------------------------------------------------ public
    @property
    def finished(self) -> bool:
        return self.started and not self.queue and not self.running and (
            self.generation >= self.generations or self.exhausted)

    def ask(self, ticket: str) -> Candidate | None:
        """The next candidate to evaluate, or None (wait for results, or ``finished``)."""
        if ticket in self.running:
            raise ValueError(f"ticket {ticket!r} already has a candidate")
        if not self.started:
            self.started = True
            self._open_generation()
        if self.queue:
            cid = self.queue.pop(0)
        elif not self.batch and not self.exhausted and len(self.candidates) < self.generations * self.population:
            c = self._create_one(len(self.candidates) // self.population)
            if c is None:
                self.exhausted = True
                self._advance()
                return None
            cid = self._add(c).cid
        else:
            return None
        c = self.candidates[cid]
        c.status = RUNNING
        self.running[ticket] = cid
        self._dirty[cid] = None
        return c

    def tell(self, ticket: str, score: float | None = None, *, failed: bool = False,
             info: dict[str, Any] | None = None) -> list[GenerationRecord]:
        """Record a result (``failed`` or a score; a non-finite score counts as failed).  Neither
        means the evaluation was cancelled: the candidate goes back to the front of the queue.
        Returns the generations this closed."""
        cid = self.running.pop(ticket, None)
        if cid is None:
            return []
        self._dirty[cid] = None
        c = self.candidates[cid]
        if not failed and score is None:
            c.status = QUEUED
            self.queue.insert(0, cid)
            return []
        c.info.update(info or {})
        c.info.setdefault("t", time.time())
        if failed or not math.isfinite(cast(float, score)):   # not failed: score is set (None returned above)
            c.status, c.score = FAILED, None
        else:
            c.status, c.score = DONE, float(cast(float, score))
        self._on_result(c)
        return self._advance()

    def scored(self) -> list[Candidate]:
        return [c for c in self.candidates.values() if c.status == DONE]

    def best(self) -> Candidate | None:
        s = self.scored()
        return min(s, key=rank_key) if s else None

    def members(self, generation: int) -> list[Candidate]:
        return [self.candidates[cid] for cid in self._by_gen.get(generation, ())]

    # ------------------------------------------------------------- generations
    def _open_generation(self) -> None:
        if self.batch and self.generation < self.generations and not self.exhausted \
                and not self._by_gen.get(self.generation):
            new = self._propose(self.generation)
            if not new:
                self.exhausted = True
            for c in new:
                self.queue.append(self._add(c).cid)

    def _generation_complete(self) -> bool:
        if self.generation >= self.generations:
            return False
        ms = self.members(self.generation)
        if not ms or any(c.status in (QUEUED, RUNNING) for c in ms):
            return False
        return self.batch or self.exhausted or len(ms) >= self.population

    def _advance(self) -> list[GenerationRecord]:
        closed = []
        while self._generation_complete():
            closed.append(self._close(self.generation))
            self.generation += 1
            self._open_generation()
        return closed

    def _close(self, g: int) -> GenerationRecord:
        ms = self.members(g)
        best = self.best()
        rec = GenerationRecord(g, sum(c.status == DONE for c in ms), sum(c.status == FAILED for c in ms),
                               best.cid if best else None, best.score if best else None,
                               best.params if best else None)
        self.history.append(rec)
        return rec

    # -------------------------------------------------------------- proposals
    def _new(self, cfg: SubnetConfig, generation: int, origin: str, parents: tuple[str, ...] = (),
             taken: set[str] | None = None) -> Candidate | None:
        """A candidate for ``cfg`` if it is feasible and unseen (also not in ``taken``), else None."""
        key = cfg.key()
        if key in self._by_key or (taken is not None and key in taken):
            return None
        params = self.limit.count(cfg)
        if self.limit.violation(params) > 0:
            return None
        if taken is not None:
            taken.add(key)
        return Candidate("", cfg, params, generation, origin, parents)

    def _add(self, c: Candidate) -> Candidate:
        ids = self._by_gen.setdefault(c.generation, [])
        c.cid = f"g{c.generation:03d}-{len(ids):03d}"
        ids.append(c.cid)
        self.candidates[c.cid] = c
        self._by_key[c.config.key()] = c.cid
        self._dirty[c.cid] = None
        return c

    def _warm(self, generation: int, n: int, taken: set[str]) -> list[Candidate]:
        """Up to ``n`` of the warm-start configs not proposed yet (generation 0 only); those outside
        the space (modules may be absent: ``SearchSpace.validate(absent_ok=True)``) or the limit
        are skipped."""
        out: list[Candidate] = []
        for cfg in self.warm if generation == 0 else ():
            if len(out) >= n:
                break
            c = self._new(cfg, generation, "warm", taken=taken) if self.space.contains(cfg, absent_ok=True) else None
            if c is not None:
                out.append(c)
        return out

    def _random(self, generation: int, n: int, taken: set[str]) -> list[Candidate]:
        """``n`` new feasible configs: the warm-start ones first (generation 0), then random ones."""
        out = self._warm(generation, n, taken)
        for _ in range(max(n, 1) * self.max_attempts):
            if len(out) >= n:
                break
            c = self._new(self.space.sample(self.rng), generation, "random", taken=taken)
            if c is not None:
                out.append(c)
        return out

    def _propose(self, generation: int) -> list[Candidate]:
        raise NotImplementedError

    def _create_one(self, generation: int) -> Candidate | None:
        got = self._random(generation, 1, set())
        return got[0] if got else None

    def _on_result(self, c: Candidate) -> None:
        pass

    # ------------------------------------------------------------------ state
    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state; running candidates are stored with their tickets."""
        version, internal, gauss = self.rng.getstate()
        return {"version": STATE_VERSION, "algorithm": self.algorithm,
                "candidates": [c.to_dict() for c in self.candidates.values()],
                "queue": list(self.queue), "running": dict(self.running), "generation": self.generation,
                "history": [vars(r) for r in self.history], "exhausted": self.exhausted,
                "started": self.started, "rng": [version, list(internal), gauss]}

    def take_delta(self) -> dict[str, Any]:
        """What changed since the previous call: the candidates created or changed (in creation
        order), the small fields (queue, running, generation, ...), the generation records added,
        and the random state if it moved.  Its size does not grow with the number of candidates;
        :func:`apply_deltas` replays deltas onto a :meth:`get_state` (idempotent)."""
        rng = self.rng.getstate()
        out = {"candidates": [self.candidates[cid].to_dict() for cid in self._dirty],
               "queue": list(self.queue), "running": dict(self.running), "generation": self.generation,
               "exhausted": self.exhausted, "started": self.started, "history_from": self._delta_history,
               "history": [vars(r) for r in self.history[self._delta_history:]]}
        if rng != self._delta_rng:
            out["rng"] = _pack_rng(rng)
        self._dirty, self._delta_history, self._delta_rng = {}, len(self.history), rng
        return out

    def touch(self, cid: str) -> None:
        """Mark a candidate changed outside ``ask`` / ``tell`` (e.g. its error noted), for ``take_delta``."""
        self._dirty[cid] = None

    def set_state(self, state: dict[str, Any], *, requeue_running: bool = False,
                  requeue_failed: bool = False) -> None:
        """Restore ``get_state``.  ``requeue_running`` puts candidates that were being evaluated
        back in front of the queue (their evaluations are lost, e.g. in a new Tune experiment);
        without it they stay running under their tickets (Tune's experiment restore resumes
        those trials).  ``requeue_failed`` gives failed candidates another attempt (a re-run after
        the cause was fixed): each keeps its earlier attempts in ``info["attempts"]`` and the
        generations it belongs to are reopened.  ``generations`` may have been raised to extend
        a finished search."""
        if state.get("version") != STATE_VERSION or state.get("algorithm") != self.algorithm:
            raise ConfigError(f"search state is for {state.get('algorithm')!r} v{state.get('version')}, "
                              f"this is {self.algorithm!r} v{STATE_VERSION}; resume with the same algorithm")
        self.candidates = {d["cid"]: Candidate.from_dict(d) for d in state["candidates"]}
        self._by_key = {c.config.key(): c.cid for c in self.candidates.values()}
        self._by_gen = {}
        for c in self.candidates.values():
            self._by_gen.setdefault(c.generation, []).append(c.cid)
        self.queue = list(state["queue"])
        self.running = dict(state["running"])
        self.generation = int(state["generation"])
        self.history = [GenerationRecord(**r) for r in state["history"]]
        self._delta_history = 0                     # the next delta carries the whole (short) history
        self.exhausted = bool(state["exhausted"])
        self.started = bool(state["started"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        if requeue_running:
            back = sorted(self.running.values())
            for cid in back:
                self.candidates[cid].status = QUEUED
            self.queue = back + self.queue
            self.running = {}
            self._dirty.update(dict.fromkeys(back))
        if requeue_failed:
            self._requeue_failed()
        self._restored()
        if self.started:
            self._open_generation()
            self._advance()

    def _requeue_failed(self) -> None:
        failed = sorted((c for c in self.candidates.values() if c.status == FAILED), key=lambda c: c.cid)
        for c in failed:
            c.info.setdefault("attempts", []).append({k: c.info.pop(k) for k in ATTEMPT_KEYS if k in c.info})
            c.status, c.score = QUEUED, None
            self._dirty[c.cid] = None
        if failed and failed[0].generation < self.generation:
            reopened = min(c.generation for c in failed)
            self.generation = reopened
            self.history = [r for r in self.history if r.generation < reopened]
        self.queue = [c.cid for c in failed] + self.queue

    def _restored(self) -> None:
        pass


def _pack_rng(state: tuple[Any, ...]) -> dict[str, Any]:
    """``random.Random.getstate()`` in 3.4 kB of JSON (the plain list takes twice that)."""
    version, internal, gauss = state
    return {"v": version, "mt": base64.b64encode(struct.pack(f"<{len(internal)}I", *internal)).decode(),
            "gauss": gauss}


def _unpack_rng(packed: dict[str, Any]) -> list[Any]:
    raw = base64.b64decode(packed["mt"])
    return [packed["v"], list(struct.unpack(f"<{len(raw) // 4}I", raw)), packed["gauss"]]


def apply_deltas(state: dict[str, Any], deltas: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Replay :meth:`SearchEngine.take_delta` results, oldest first, onto ``state`` (a
    :meth:`SearchEngine.get_state`, changed in place and returned).  Replaying a delta twice
    gives the same state."""
    cands = state["candidates"]
    pos = {d["cid"]: i for i, d in enumerate(cands)}
    for d in deltas:
        for c in d["candidates"]:
            i = pos.setdefault(c["cid"], len(cands))
            if i == len(cands):
                cands.append(c)
            else:
                cands[i] = c
        for k in ("queue", "running", "generation", "exhausted", "started"):
            state[k] = d[k]
        state["history"][d["history_from"]:] = d["history"]
        if "rng" in d:
            state["rng"] = _unpack_rng(d["rng"])
    return state
