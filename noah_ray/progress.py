"""What a user sees: our progress lines and the summary; Ray's own output stays in Ray's logs.

The CLI (and the ``jobs/`` entrypoints) run the stages inside :func:`session`:

* quiet (the default): Ray is started / joined with ``log_to_driver=False`` (workers' and actors'
  output goes to Ray's log files, ``/tmp/ray/session_latest/logs``), Ray's driver-side loggers at
  ERROR, Ray Tune's console reporter off.  Ray Train workers send their progress lines to a
  small actor (the *sink*) that the driver drains and prints, in order.
* verbose (``--verbose``): Ray prints everything as it does by default, our worker lines
  included (prefixed by Ray with the worker's name).

One line per epoch and per search generation.  On a terminal a live bar under the lines shows
where the current stage is; without one (a pipe, a file, a ``ray job submit`` log) only the
plain lines are written.  Outside a session (``train_supernet`` called from Python) worker lines
go to the worker's stdout and the search's generation lines to the ``noah_ray.search`` logger.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

#: the session of this driver (set by :func:`session`)
_CURRENT: contextvars.ContextVar[Session | None] = contextvars.ContextVar("noah_ray_progress", default=None)

#: Ray's driver-side settings for a quiet console (environment variables read by Ray Tune / Train)
#: (Tune's automatic JSON/CSV result loggers stay on: they only write files, the search and its tests
#: read ``result.json``, and users read them with Tune's ExperimentAnalysis)
QUIET_ENV = {"RAY_AIR_NEW_OUTPUT": "0"}                   # Tune's legacy reporter: silent at verbose=0
#: Ray's driver-side loggers quieted to ERROR
QUIET_LOGGERS = ("ray", "ray.train", "ray.tune", "ray.air", "ray.data")


@dataclass(frozen=True)
class Event:
    """One progress line; ``done`` / ``total`` (optional) move the live bar of ``tag``."""

    text: str
    tag: str = ""
    done: int | None = None
    total: int | None = None


class Console:
    """Prints events: plain lines, and on a terminal a live bar redrawn under them."""

    WIDTH = 24

    def __init__(self, stream: IO[str] | None = None, live: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self._bar = ""
        self._lock = threading.Lock()

    def show(self, event: Event) -> None:
        with self._lock:
            self._clear()
            self.stream.write(event.text + "\n")
            if self.live and event.total:
                k = round(self.WIDTH * (event.done or 0) / event.total)
                self._bar = f"{event.tag} [{'#' * k}{'.' * (self.WIDTH - k)}] {event.done}/{event.total}"
            if self._bar:
                self.stream.write(self._bar)
            self.stream.flush()

    def close(self) -> None:
        with self._lock:
            self._clear()
            self._bar = ""
            self.stream.flush()

    def _clear(self) -> None:
        if self._bar:
            self.stream.write("\r\x1b[K")


class _Sink:
    """The Ray actor worker lines go through (a list; the driver takes what arrived)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def put(self, event: Event) -> None:
        self.events.append(event)

    def take(self) -> list[Event]:
        out, self.events = self.events, []
        return out


class Session:
    """The console of one driver and, when quiet, the sink its Ray workers write to."""

    def __init__(self, console: Console, sink_name: str | None) -> None:
        self.console, self.sink_name = console, sink_name
        self._sink: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def worker_sink(self) -> str | None:
        """The sink's name for Ray workers; the sink is started on first use (Ray must be up:
        stages that only read storage never start Ray, nor a sink)."""
        if self.sink_name is None:
            return None
        import ray

        if self._sink is None:
            if not ray.is_initialized():
                return None
            self._sink = ray.remote(num_cpus=0)(_Sink).options(name=self.sink_name).remote()
            ray.get(self._sink.take.remote())                 # it is up before any worker looks for it
            self._thread = threading.Thread(target=self._pump, name="noah-ray-progress", daemon=True)
            self._thread.start()
        return self.sink_name

    def drain(self) -> None:
        """Print every worker line that arrived (the stages call it when a Ray run returns)."""
        if self._sink is None:
            return
        import ray

        with self._lock:
            for event in ray.get(self._sink.take.remote()):
                self.console.show(event)

    def _pump(self) -> None:
        while not self._stop.wait(0.3):
            try:
                self.drain()
            except Exception:       # Ray going down under us: the final drain reports what is left
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sink is not None:
            import ray

            with contextlib.suppress(Exception):
                self.drain()
                ray.kill(self._sink)
            self._sink = None
        self.console.close()


def quiet_ray() -> dict:
    """Quiet Ray's driver side (environment for Tune / Train, logger levels); returns the
    ``ray.init`` arguments that keep workers' output in Ray's log files."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    return {"log_to_driver": False, "logging_level": logging.ERROR}


@contextlib.contextmanager
def session(*, quiet: bool = True, stream: IO[str] | None = None) -> Iterator[Session]:
    """The console for the stages run inside (Ray may start inside, see :meth:`Session.worker_sink`)."""
    live = None if quiet else False               # Ray's own lines would tear a live bar
    s = Session(Console(stream, live), f"noah-ray-progress-{uuid.uuid4().hex[:12]}" if quiet else None)
    token = _CURRENT.set(s)
    try:
        yield s
    finally:
        _CURRENT.reset(token)
        s.stop()


def current() -> Session | None:
    return _CURRENT.get()


def sink_name() -> str | None:
    """What the driver passes to its Ray workers so that their lines reach its console."""
    s = current()
    return s.worker_sink() if s is not None else None


def echo(text: str, *, tag: str = "", done: int | None = None, total: int | None = None,
         logger: logging.Logger | None = None) -> None:
    """A line from the driver: on the session's console, else to ``logger`` (INFO) or stdout."""
    s = current()
    if s is not None:
        s.drain()
        s.console.show(Event(text, tag, done, total))
    elif logger is not None:
        logger.info(text)
    else:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def drain() -> None:
    """Print what workers sent so far (call after a Ray Train run, before the next line)."""
    s = current()
    if s is not None:
        s.drain()


def say(sink: str | None, text: str, *, tag: str = "", done: int | None = None, total: int | None = None) -> None:
    """A line from a Ray worker: to the driver's console through ``sink`` (delivered before this
    returns, so lines keep their order), else on this process's stdout."""
    if sink:
        import ray

        try:
            ray.get(ray.get_actor(sink).put.remote(Event(text, tag, done, total)), timeout=10)
            return
        except Exception:          # the driver's console went away: keep the line in the worker's log
            pass
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
