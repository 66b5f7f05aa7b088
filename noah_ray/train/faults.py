"""Injected failures for the reliability tests: a :class:`FaultPlan` travels to the workers beside
the :class:`~noah_ray.train.worker.RunSpec` (``train_loop_config["faults"]``), never inside it, and
only when a test passes ``_faults`` to :func:`~noah_ray.train.runs.train_supernet` or
:func:`~noah_ray.train.runs.retrain`."""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from noah_ray.errors import ConfigError

MODES = ("raise", "kill")


@dataclass(frozen=True)
class FaultPlan:
    """Fail once after each listed epoch (0-based) on rank 0: ``raise`` an error or ``kill`` the
    worker process.  ``marker_dir`` remembers the faults already triggered across restarts."""

    faults: tuple[tuple[int, str], ...]
    marker_dir: str

    @classmethod
    def of(cls, faults: Sequence[tuple[int, str]] | None) -> FaultPlan | None:
        """A plan for ``[(epoch, mode), ...]`` with a fresh marker directory (None: no faults)."""
        if not faults:
            return None
        bad = next((m for _, m in faults if m not in MODES), None)
        if bad is not None:
            raise ConfigError(f"fault mode {bad!r}: use one of {', '.join(MODES)}")
        return cls(tuple((int(e), str(m)) for e, m in faults), tempfile.mkdtemp(prefix="noah-faults-"))

    def to_dict(self) -> dict[str, Any]:
        return {"faults": [list(f) for f in self.faults], "marker_dir": self.marker_dir}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaultPlan:
        return cls(tuple((int(e), str(m)) for e, m in data["faults"]), str(data["marker_dir"]))

    def maybe_fail(self, epoch: int, rank: int) -> None:
        """Fail once after ``epoch`` as planned (rank 0 only)."""
        for i, (at, mode) in enumerate(self.faults):
            marker = os.path.join(self.marker_dir, f"fault-{i}")
            if at == epoch and rank == 0 and not os.path.exists(marker):
                open(marker, "w").close()
                if mode == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"injected failure after epoch {epoch}")
