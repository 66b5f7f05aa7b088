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


@pytest.mark.slow                     # about 90 s cold on 2 cores; the fast tier leaves it to CI
def test_mypy_finds_nothing(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    # a fresh cache: the result never depends on what an earlier run left behind (~1.5 min cold)
    r = _run(["mypy", "--cache-dir", str(tmp_path / "mypy_cache")])
    assert r.returncode == 0, f"mypy found problems:\n{r.stdout}{r.stderr}"


def test_ruff_finds_nothing() -> None:
    ruff = pytest.importorskip("ruff")
    if not hasattr(ruff, "find_ruff_bin"):
        pytest.skip("the ruff module has no find_ruff_bin (not the ruff package)")
    r = _run(["ruff", "check", "--no-cache", "noah_ray", "tests", "bench", "jobs"])
    assert r.returncode == 0, f"ruff found problems:\n{r.stdout}{r.stderr}"
