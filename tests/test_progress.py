"""noah_ray.progress: plain lines off a terminal, a live bar on one, worker lines relayed to the
driver's console in order, and (slow) --verbose bringing Ray's own output back."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

import pytest
import yaml

from noah_ray import progress
from noah_ray.progress import Console, Event


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    c = Console(out)
    assert not c.live
    c.show(Event("[supernet s] epoch 1/3", "supernet s", 1, 3))
    c.show(Event("[supernet s] epoch 2/3", "supernet s", 2, 3))
    c.close()
    assert out.getvalue() == "[supernet s] epoch 1/3\n[supernet s] epoch 2/3\n"


def test_live_bar_on_a_terminal():
    out = FakeTTY()
    c = Console(out)
    assert c.live
    c.show(Event("epoch 1/4", "supernet s", 1, 4))
    c.show(Event("epoch 2/4", "supernet s", 2, 4))
    c.close()
    text = out.getvalue()
    bar1 = "supernet s [" + "#" * 6 + "." * 18 + "] 1/4"
    bar2 = "supernet s [" + "#" * 12 + "." * 12 + "] 2/4"
    assert text == f"epoch 1/4\n{bar1}\r\x1b[Kepoch 2/4\n{bar2}\r\x1b[K"
    # what stays on the screen: the two lines, the bar erased
    assert text.split("\r\x1b[K")[-1] == ""


def test_echo_outside_a_session_goes_to_stdout_or_the_logger(capsys, caplog):
    progress.echo("hello")
    assert capsys.readouterr().out == "hello\n"
    with caplog.at_level(logging.INFO, logger="noah_ray.search"):
        progress.echo("generation 1/2", logger=logging.getLogger("noah_ray.search"))
    assert capsys.readouterr().out == "" and "generation 1/2" in caplog.text


def test_worker_lines_reach_the_driver_console_in_order(ray_session):
    import ray

    def _worker_lines(sink, n):       # defined here: shipped to the worker by value
        from noah_ray import progress

        for i in range(n):
            progress.say(sink, f"[retrain r] epoch {i + 1}/{n}", tag="retrain r", done=i + 1, total=n)
        return os.getpid()

    out = io.StringIO()
    with progress.session(quiet=True, stream=out) as s:
        assert progress.sink_name() == s.sink_name and s.sink_name
        progress.echo("== retrain")
        pid = ray.get(ray.remote(_worker_lines).remote(progress.sink_name(), 5))
        assert pid != os.getpid()                               # a Ray worker process
        progress.echo("done")                                   # drains first: worker lines come before it
    lines = out.getvalue().splitlines()
    assert lines == ["== retrain", *[f"[retrain r] epoch {i}/5" for i in range(1, 6)], "done"]
    assert progress.sink_name() is None
    with pytest.raises(ValueError):                             # the sink actor is gone
        ray.get_actor(s.sink_name)


def test_quiet_ray_keeps_workers_output_in_the_log_files(monkeypatch):
    for k in progress.QUIET_ENV:
        monkeypatch.delenv(k, raising=False)
    levels = {n: logging.getLogger(n).level for n in progress.QUIET_LOGGERS}
    try:
        kwargs = progress.quiet_ray()
        assert kwargs["log_to_driver"] is False and kwargs["logging_level"] == logging.ERROR
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
        assert logging.getLogger("ray.tune").level == logging.ERROR
    finally:
        for n, lvl in levels.items():
            logging.getLogger(n).setLevel(lvl)


def test_verbose_flag_reaches_ray_init_and_the_session(tmp_path, monkeypatch, capsys):
    from noah_ray.cli import main as cli
    from noah_ray.run import pipeline

    seen = []

    def run_stages(job, stages=None, start_ray=None):
        start_ray()
        seen.append(("run", progress.current().sink_name))
        return {}

    monkeypatch.setattr(pipeline, "init_ray", lambda address, quiet=False: seen.append(("init", quiet)))
    monkeypatch.setattr(pipeline, "run_stages", run_stages)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({"storage": str(tmp_path / "r")}))
    for extra, quiet in (([], True), (["--verbose"], False)):
        seen.clear()
        assert cli.main(["supernet", "--config", str(tmp_path / "job.yaml"), *extra]) == 0
        assert seen[0] == ("init", quiet) and (seen[1][1] is not None) == quiet


_SCRIPT = """
import sys, time, ray
from noah_ray.run import pipeline
pipeline.init_ray(quiet=sys.argv[1] == "quiet")
ray.get(ray.remote(lambda: print("a line printed by a ray worker", flush=True)).remote())
time.sleep(1.5)              # the driver's log monitor polls
"""


@pytest.mark.slow
def test_verbose_brings_ray_worker_output_back(tmp_path):
    """Quiet (the default) is checked on the whole demo (test_cli); verbose here: a worker's print
    reaches the console, with Ray's prefix."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    p = subprocess.run([sys.executable, "-c", _SCRIPT, "verbose"], capture_output=True, text=True, timeout=300,
                       env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    both = p.stdout + p.stderr
    assert "a line printed by a ray worker" in both and "pid=" in both
