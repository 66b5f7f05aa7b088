"""One run per job: a lease file ``<storage>/<job>/lease.json`` (local or S3).

A run takes the lease before Ray starts and renews it every ``timeout_s / 4`` seconds from a
background thread; a clean exit deletes it.  A second run of the same job finds a fresh lease and
fails at once with one line naming the holder (host, pid, since).  A lease whose holder stopped
renewing for ``timeout_s`` (the run was killed) - or whose holder process on this host is gone -
is taken over.

Object stores have no atomic create-if-absent here, so taking a lease writes it and reads it back
after a short settle time: of two runs racing, the one whose token is not read back gives up.

The lease is also a fence. A holder that paused for longer than the timeout (a stopped process, a
long GC or network stall) may find its lease taken over. :func:`renew` compares the token in the
file with its own first and raises :class:`LeaseLost` instead of writing; :func:`hold` records the
loss (:attr:`Holder.lost`) and tells its caller (``on_lost``), who stops the stage. Every write of
checkpoints and tables calls :func:`check` with the token first (the Ray Train workers carry it in
their run spec; the search and hpo stores a :class:`Fence`), so a stale holder's workers stop
instead of writing into a run folder that the new holder owns.

That fence is check-then-write on storage without conditional writes, so it is not atomic: a
write that starts right after its check passed can still land after a takeover.  The window is one
read of ``lease.json`` plus one write; with a takeover only after ``timeout_s`` of silence it needs
a pause of the writer exactly there.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from noah_ray import progress
from noah_ray.errors import ConfigError, RunError
from noah_ray.store import storage
from noah_ray.store.layout import JobPaths

if TYPE_CHECKING:
    from noah_ray.config import JobConfig

#: seconds without renewal after which a lease counts as abandoned (``$NOAH_RAY_LEASE_TIMEOUT_S``)
DEFAULT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Lease:
    token: str
    host: str
    pid: int
    since: float
    renewed: float

    @property
    def since_utc(self) -> str:
        return datetime.fromtimestamp(self.since, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


#: the range ``$NOAH_RAY_LEASE_TIMEOUT_S`` may take: below it the renew loop spins and a second run
#: takes over a live lease; above it (or inf) a killed run's lease is never taken over
TIMEOUT_RANGE_S = (1.0, 86_400.0)


class LeaseLost(RunError):
    """This run's lease was taken over by another run (or could not be renewed for the timeout):
    the stage stops and writes nothing more."""


def _lost(loc: storage.Location, current: Lease | None) -> LeaseLost:
    who = (f"taken over by host {current.host}, pid {current.pid} at {current.since_utc}" if current is not None
           else "deleted")
    return LeaseLost(f"this run lost the job's lease {loc.uri}: it was {who} after this run did not renew it in "
                     f"time (was this process paused?); the stage stopped and wrote nothing more; the other run "
                     f"owns the job now - once it has finished or died, resume with")


def check(loc: storage.Location, token: str) -> None:
    """The fence every checkpoint and table write calls first: raise :class:`LeaseLost` unless the
    lease at ``loc`` still carries ``token`` (check-then-write, not atomic: see the module doc)."""
    current = read(loc)
    if current is None or current.token != token:
        raise _lost(loc, current)


@dataclass(frozen=True)
class Fence:
    """A writer's fence: the job's lease (``lease.json`` at ``uri`` on ``endpoint``) and the token
    the command took.  Plain data, so it travels to Tune trials and pickled searchers without a
    filesystem object (or credentials)."""

    uri: str
    endpoint: str | None
    token: str

    @classmethod
    def of(cls, job: JobConfig, token: str | None) -> Fence | None:
        """The fence of ``job``'s lease for ``token`` (None without a token: an unfenced writer, e.g. a
        test or a tool that holds no lease)."""
        return None if token is None else cls(JobPaths.of(job).lease.uri, job.storage_endpoint, token)

    def check(self) -> None:
        """:func:`check` before a write: :class:`LeaseLost` once another run took the lease over."""
        check(storage.resolve(self.uri, self.endpoint), self.token)


def fence(job: JobConfig, token: str | None) -> None:
    """:func:`check` ``job``'s lease for ``token`` before a write; nothing without a token (an
    unfenced writer: a test or a tool that holds no lease)."""
    if token is not None:
        check(JobPaths.of(job).lease, token)


def _timeout() -> float:
    """``$NOAH_RAY_LEASE_TIMEOUT_S`` (default :data:`DEFAULT_TIMEOUT_S`), validated like a config value."""
    raw = os.environ.get("NOAH_RAY_LEASE_TIMEOUT_S")
    if not raw:
        return DEFAULT_TIMEOUT_S
    lo, hi = TIMEOUT_RANGE_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not lo <= value <= hi:        # nan and inf fail here too
        raise ConfigError(f"NOAH_RAY_LEASE_TIMEOUT_S={raw!r} must be a number of seconds in [{lo:g}, {hi:g}]; "
                          f"unset it for the default {DEFAULT_TIMEOUT_S:g}")
    return value


def read(loc: storage.Location) -> Lease | None:
    """The lease at ``loc`` (None if absent or unreadable, e.g. half-written by a killed run)."""
    if not storage.exists(loc):
        return None
    try:
        return Lease(**json.loads(storage.read_text(loc)))
    except (ValueError, TypeError, ConfigError):
        return None


def _alive_here(lease: Lease) -> bool:
    """False only when the holder ran on this host and its process is gone."""
    if lease.host != socket.gethostname():
        return True
    try:
        os.kill(lease.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _held_by_other(current: Lease | None, token: str, timeout_s: float, now: float) -> bool:
    return (current is not None and current.token != token and now - current.renewed < timeout_s
            and _alive_here(current))


def _busy(job: str, loc: storage.Location, held: Lease, now: float, timeout_s: float) -> ConfigError:
    return ConfigError(f"job {job!r} is already running: host {held.host}, pid {held.pid}, since {held.since_utc} "
                       f"(lease {loc.uri}, renewed {now - held.renewed:.0f} s ago); wait for it to finish, or, if "
                       f"that run is dead, run again after {timeout_s:.0f} s without renewal (it is then taken over)")


def _wait_out(loc: storage.Location, job: str, held: Lease, timeout_s: float) -> None:
    """Wait for a lease whose holder stopped renewing (its node died) to go stale; a holder that
    renews within one renewal period (``timeout_s / 4``) is alive: :class:`ConfigError` at once."""
    time.sleep(timeout_s / 4 + 1.0)
    while True:
        now, current = time.time(), read(loc)
        if not _held_by_other(current, "", timeout_s, now):
            return
        assert current is not None
        if current.token != held.token or current.renewed > held.renewed:
            raise _busy(job, loc, current, now, timeout_s)
        progress.echo(f"job {job!r}: waiting {timeout_s - (now - current.renewed):.0f} s for the lease of a "
                      f"stopped run (host {current.host}, pid {current.pid}) to expire")
        time.sleep(min(max(timeout_s - (now - current.renewed), 0.1), timeout_s / 4))


def acquire(loc: storage.Location, job: str, *, timeout_s: float | None = None, settle_s: float = 0.2,
            wait_stale: bool = False) -> Lease:
    """Take the lease at ``loc`` or raise :class:`ConfigError` naming its live holder.  With
    ``wait_stale`` (a re-run after a node died), a lease nobody renews is waited out first."""
    timeout_s = _timeout() if timeout_s is None else timeout_s
    now = time.time()
    current = read(loc)
    if _held_by_other(current, "", timeout_s, now):
        assert current is not None            # held: there is a lease
        if not wait_stale:
            raise _busy(job, loc, current, now, timeout_s)
        _wait_out(loc, job, current, timeout_s)
        now = time.time()
    mine = Lease(uuid.uuid4().hex, socket.gethostname(), os.getpid(), now, now)
    storage.write_text(loc, json.dumps(asdict(mine)))
    time.sleep(settle_s)
    back = read(loc)
    if back is None or back.token != mine.token:
        if back is not None:
            raise _busy(job, loc, back, time.time(), timeout_s)
        raise ConfigError(f"job {job!r}: the lease {loc.uri} could not be written; check the storage")
    return mine


def renew(loc: storage.Location, lease: Lease) -> Lease:
    """Write ``lease`` back with a new renewal time, after :func:`check`: a lease another run took
    over raises :class:`LeaseLost` and is left as it is."""
    check(loc, lease.token)
    renewed = Lease(lease.token, lease.host, lease.pid, lease.since, time.time())
    storage.write_text(loc, json.dumps(asdict(renewed)))
    return renewed


def release(loc: storage.Location, lease: Lease) -> None:
    """Delete the lease if it is still ours."""
    current = read(loc)
    if current is not None and current.token == lease.token:
        loc.fs.delete_file(loc.path)


@dataclass
class Holder:
    """The lease a :func:`hold` block holds, as its renewal thread keeps it: ``lost`` is set when
    it was taken over or could not be renewed for ``timeout_s``."""

    loc: storage.Location
    lease: Lease
    timeout_s: float
    lost: LeaseLost | None = None
    failures: list[str] = field(default_factory=list)     # renewal errors since the last success

    @property
    def token(self) -> str:
        return self.lease.token

    def renew_once(self) -> bool:
        """One renewal; False once the lease is lost (then :attr:`lost` says why)."""
        try:
            self.lease = renew(self.loc, self.lease)
            self.failures.clear()
            return True
        except LeaseLost as e:
            self.lost = e
        except OSError as e:             # a storage hiccup: said, and retried until the timeout
            self.failures.append(f"{type(e).__name__}: {e}")
            progress.echo(f"warning: renewing the lease {self.loc.uri} failed ({self.failures[-1]}); retrying")
            if time.time() - self.lease.renewed < self.timeout_s:
                return True
            self.lost = LeaseLost(f"this run could not renew the job's lease {self.loc.uri} for "
                                  f"{self.timeout_s:.0f} s (last error: {self.failures[-1]}), so another run may "
                                  f"have taken the job over; the stage stopped; fix the storage, then resume with")
        return False


@contextlib.contextmanager
def hold(storage_uri: str, endpoint: str | None, job: str, *, timeout_s: float | None = None,
         on_lost: Callable[[LeaseLost], None] | None = None, wait_stale: bool = False) -> Iterator[Holder]:
    """Hold the job's lease for the ``with`` block, renewing it in the background.

    When the lease is lost (:meth:`Holder.renew_once`) renewal stops and ``on_lost`` is called
    from the renewal thread; the caller stops its stage (the workers stop on their own fence
    :func:`check`).  A lost lease is not released: it belongs to the other run."""
    timeout_s = _timeout() if timeout_s is None else timeout_s
    loc = JobPaths.at(storage_uri, job, endpoint).lease
    holder = Holder(loc, acquire(loc, job, timeout_s=timeout_s, wait_stale=wait_stale), timeout_s)
    stop = threading.Event()

    def keep() -> None:
        while not stop.wait(timeout_s / 4):
            if not holder.renew_once():
                assert holder.lost is not None
                if on_lost is not None and not stop.is_set():
                    on_lost(holder.lost)
                return

    thread = threading.Thread(target=keep, name=f"noah-lease-{job}", daemon=True)
    thread.start()
    try:
        yield holder
    finally:
        stop.set()
        thread.join()
        release(loc, holder.lease)
