"""Incremental persistence of a search's state: a snapshot plus an append-only log of changes.

Rewriting the whole state after every result costs O(n) bytes per result after n candidates
(O(n^2) over a search, one object PUT each on S3).  Here every result appends one small record
(what changed, e.g. :meth:`noah_ray.evolution.SearchEngine.take_delta`), and the log is
compacted into a new snapshot once it holds as many bytes as the last snapshot (and at least
``min_compact_bytes``).  So the bytes written per result stay bounded (amortised at most about
twice a record) and a resume reads at most about twice a snapshot.

Layout of one run's folder (``<search>/state/<run>/``)::

    snapshot.json        {"format": 2, "seq": N, "state": {...}}: the state including record N
    log.jsonl            local storage: one JSON line per record, {"seq": i, "delta": {...}}
    log/<i:012d>.json    S3 (objects cannot be appended to): one small object per record

Every write is atomic per record (an appended line, one object PUT, a snapshot moved or PUT
into place), and a result's record is written before the searcher returns from it, so a
SIGKILL loses nothing that was told.  Records with ``seq <= N`` are already in the snapshot
and skipped (a crash between writing a snapshot and removing the old log loses nothing).  A
torn last line (killed while appending) was never acknowledged and is dropped; the next write
is then a snapshot, so the log never continues after a torn line.

Format 1 (before this module): ``<search>/state/<run>.json`` holding the whole state, rewritten
after every result.  It is still read when the run has no snapshot yet.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from noah_ray.errors import ConfigError
from noah_ray.store import storage
from noah_ray.store.lease import Fence

FORMAT = 2
SNAPSHOT, LOCAL_LOG, SEGMENTS = "snapshot.json", "log.jsonl", "log"


@dataclass
class IOStats:
    """What the writer asked of storage: requests (writes and deletes) and bytes written."""

    calls: int = 0
    bytes: int = 0


class StateLog:
    """Snapshot + append-only log in ``folder``; ``legacy`` is the format-1 file of the run;
    ``fence``: the job's lease, checked before every write (None: unfenced)."""

    def __init__(self, folder: storage.Location, legacy: storage.Location | None = None,
                 min_compact_bytes: int = 1 << 20, fence: Fence | None = None) -> None:
        self.folder, self.legacy, self.min_compact_bytes = folder, legacy, min_compact_bytes
        self.fence = fence
        self.stats = IOStats()
        self._reset_position()

    def _reset_position(self) -> None:
        self.seq: int | None = None          # last record written or read (None: not read in this process)
        self._since = 0                       # log bytes since the snapshot
        self._snapshot_bytes = 0
        self._torn = False
        self._has_base = False                # a snapshot (or a format-1 file) exists

    def __getstate__(self) -> dict[str, Any]:
        # a pickled copy (Tune ships searchers around) re-reads its position before writing
        out = dict(self.__dict__)
        out.update(seq=None, _since=0, _snapshot_bytes=0, _torn=False, _has_base=False, stats=IOStats())
        return out

        # ------------------------------------------------------------------ reading
    def load(self) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """``(state at the snapshot, deltas after it, oldest first)``, or None for a new run."""
        snap = self.folder.join(SNAPSHOT)
        if storage.exists(snap):
            text, doc = _read_json(snap)
            if doc.get("format", 0) > FORMAT:
                raise ConfigError(f"{snap.uri}: state format {doc.get('format')} is newer than this noah_ray "
                                  f"({FORMAT}); upgrade noah_ray")
            state, base = doc["state"], int(doc["seq"])
        elif self.legacy is not None and storage.exists(self.legacy):
            (text, state), base = _read_json(self.legacy), 0
        else:
            text, state, base = "", None, 0
        self._has_base = state is not None
        records = [r for r in self._records() if r[0] > base]
        for want, (seq, _, _) in enumerate(records, start=base + 1):
            if seq != want:
                raise ConfigError(f"{self.folder.uri}: state log record {want} is missing (found {seq}); "
                                  f"the state folder was changed by hand or by two searches at once")
        if state is None and records:
            raise ConfigError(f"{self.folder.uri}: state log without a snapshot; remove the folder to restart")
        self.seq = records[-1][0] if records else base
        self._since, self._snapshot_bytes = sum(n for _, _, n in records), len(text)
        return None if state is None else (state, [d for _, d, _ in records])

    def _records(self) -> list[tuple[int, dict[str, Any], int]]:
        """``(seq, delta, bytes)`` of every log record, in order."""
        if self.folder.is_s3:
            out = []
            for f in storage.list_files(self.folder.join(SEGMENTS), ".json"):
                text = storage.read_text(f)
                doc = json.loads(text)
                out.append((int(doc["seq"]), doc["delta"], len(text)))
            return sorted(out, key=lambda r: r[0])
        loc = self.folder.join(LOCAL_LOG)
        if not storage.exists(loc):
            return []
        lines = storage.read_bytes(loc).split(b"\n")
        out = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                if i < len(lines) - 1:
                    raise ConfigError(f"{loc.uri}: line {i + 1} is not a complete record; the log is corrupt "
                                      f"(restore the state folder from a copy)") from None
                self._torn = True              # killed mid-append: that result was never acknowledged
                continue
            out.append((int(doc["seq"]), doc["delta"], len(line) + 1))
        return out

    # ------------------------------------------------------------------ writing
    def _position(self) -> None:
        if self.seq is None:
            self.load()

    def _check(self) -> None:
        if self.fence is not None:
            self.fence.check()

    def snapshot(self, state: dict[str, Any]) -> None:
        """Write the whole ``state`` (it includes every record so far), then drop the old log."""
        self._position()
        self._check()
        self._write_snapshot(state)

    def _write_snapshot(self, state: dict[str, Any]) -> None:
        text = json.dumps({"format": FORMAT, "seq": self.seq, "state": state})
        storage.write_text(self.folder.join(SNAPSHOT), text)
        storage.delete(self.folder.join(SEGMENTS if self.folder.is_s3 else LOCAL_LOG))
        self.stats.calls += 2
        self.stats.bytes += len(text)
        self._since, self._snapshot_bytes, self._torn, self._has_base = 0, len(text), False, True

    def append(self, delta: dict[str, Any], full: Callable[[], dict[str, Any]]) -> None:
        """Record ``delta`` (what changed since the previous record); ``full()`` is the whole
        current state, asked for only when the log is compacted into a snapshot."""
        self._position()
        self._check()
        assert self.seq is not None           # _position() read it
        self.seq += 1
        if self._torn or not self._has_base:  # never continue a log after a torn line; a log needs a base
            self._write_snapshot(full())
            return
        text = json.dumps({"seq": self.seq, "delta": delta}) + "\n"
        if self.folder.is_s3:
            storage.write_text(self.folder.join(SEGMENTS, f"{self.seq:012d}.json"), text)
        else:
            storage.append_bytes(self.folder.join(LOCAL_LOG), text.encode())
        self.stats.calls += 1
        self.stats.bytes += len(text)
        self._since += len(text)
        if self._since >= max(self.min_compact_bytes, self._snapshot_bytes):
            self._write_snapshot(full())      # the fence was checked for this record just now


def _read_json(loc: storage.Location) -> tuple[str, Any]:
    """``(text, parsed)`` of a state file; a truncated or corrupt one is a one-line error."""
    text = storage.read_text(loc)
    try:
        return text, json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"search state {loc.uri} is truncated or corrupt ({type(e).__name__}); restore it from a "
                          f"backup, or delete it to start the search run again from scratch") from None
