"""The static checks, run like CI runs them: mypy with the ``[tool.mypy]`` settings of
pyproject.toml (strict for ``space``, ``config``, ``evolution`` and ``store``) and ruff over the
code, the tests, the benchmark and the jobs.  Both must find nothing.  Each is skipped where its
tool is not installed (both are in the ``test`` extra)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.slow                     # about 1 min of CPU, started at collection (conftest.start_mypy)
def test_mypy_finds_nothing(mypy_run) -> None:
    pytest.importorskip("mypy")
    # a fresh cache: the result never depends on what an earlier run left behind
    code, out = mypy_run
    assert code == 0, f"mypy found problems:\n{out}"


def test_ruff_finds_nothing() -> None:
    ruff = pytest.importorskip("ruff")
    if not hasattr(ruff, "find_ruff_bin"):
        pytest.skip("the ruff module has no find_ruff_bin (not the ruff package)")
    r = _run(["ruff", "check", "--no-cache", "noah_ray", "tests", "bench", "jobs"])
    assert r.returncode == 0, f"ruff found problems:\n{r.stdout}{r.stderr}"
