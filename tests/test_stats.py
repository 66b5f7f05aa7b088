"""Benchmark statistics (noah_ray.store.stats) checked against numbers worked out by hand or
from the formulas: VTAB's two averages, per-task wins and losses, and the paired bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from noah_ray.errors import ConfigError
from noah_ray.store import results, stats


def _runs(rows):
    return pd.DataFrame(rows, columns=["dataset", "method", "seed", "test_acc"])


# x: digits 60/70 (mean 65), photos 80 (one seed), ihc 50/50, count 30/30
# y: digits 65/65, photos 90, ihc 40/40, count 30/30
HAND = _runs([
    ("mv_digits", "x", 0, 60.0), ("mv_digits", "x", 1, 70.0), ("mv_photos", "x", 0, 80.0),
    ("mv_ihc_stain", "x", 0, 50.0), ("mv_ihc_stain", "x", 1, 50.0), ("mv_count", "x", 0, 30.0),
    ("mv_count", "x", 1, 30.0),
    ("mv_digits", "y", 0, 65.0), ("mv_digits", "y", 1, 65.0), ("mv_photos", "y", 0, 90.0),
    ("mv_ihc_stain", "y", 0, 40.0), ("mv_ihc_stain", "y", 1, 40.0), ("mv_count", "y", 0, 30.0),
    ("mv_count", "y", 1, 30.0),
])


def test_both_vtab_averages_by_hand():
    a = {r.method: r for r in stats.averages(HAND)}
    x = a["x"]
    # groups: Natural (65 + 80) / 2 = 72.5, Specialized 50, Structured 30
    assert x.groups == pytest.approx({"Natural": 72.5, "Specialized": 50.0, "Structured": 30.0})
    assert x.group_mean == pytest.approx((72.5 + 50 + 30) / 3)          # 50.833
    assert x.task_mean == pytest.approx((65 + 80 + 50 + 30) / 4)        # 56.25
    assert x.run_mean == pytest.approx((60 + 70 + 80 + 50 + 50 + 30 + 30) / 7)
    assert (x.tasks, x.runs) == (4, 7)
    y = a["y"]                                                          # Natural (65 + 90) / 2 = 77.5
    assert y.group_mean == pytest.approx((77.5 + 40 + 30) / 3) and y.task_mean == pytest.approx(56.25)


def test_vtab_table_prints_both_averages():
    df = HAND.assign(job="j", val_acc=0.0, params=0)
    t = results.vtab_table_of(df).set_index("method")
    assert t.loc["x", "Mean"] == pytest.approx((72.5 + 50 + 30) / 3)
    assert t.loc["x", "Mean_tasks"] == pytest.approx(56.25)
    assert t.loc["y", "Natural"] == pytest.approx(77.5)


def test_wins_and_losses_per_task_by_hand():
    got = {(w.method, w.other): (w.wins, w.losses, w.ties) for w in stats.wins_losses(HAND)}
    # x vs y per task mean: digits 65 = 65, photos 80 < 90, ihc 50 > 40, count 30 = 30
    assert got[("x", "y")] == (1, 1, 2) and got[("y", "x")] == (1, 1, 2)
    assert stats.wins_losses(HAND, ["x"], ["y", "missing"]) == [stats.WinLoss("x", "y", 1, 1, 2)]


def test_bootstrap_of_constant_differences_is_that_constant():
    lo, hi = stats.bootstrap_interval(np.full(27, 2.5))
    assert lo == pytest.approx(2.5) and hi == pytest.approx(2.5)


def test_paired_bootstrap_removes_task_variation():
    # B varies by 60 points across tasks; A is B + 3 on every (task, seed): the paired interval is [3, 3]
    rows = [(t, m, s, base + s + (3.0 if m == "a" else 0.0))
            for t, base in (("mv_digits", 20.0), ("mv_count", 80.0), ("mv_photos", 50.0))
            for s in range(3) for m in ("a", "b")]
    iv = stats.paired_bootstrap(_runs(rows), "a", "b")
    assert (iv.mean, iv.low, iv.high, iv.pairs) == (pytest.approx(3.0), pytest.approx(3.0), pytest.approx(3.0), 9)
    back = stats.paired_bootstrap(_runs(rows), "b", "a")
    assert back.mean == pytest.approx(-3.0) and back.low == pytest.approx(-3.0)


def test_bootstrap_of_a_symmetric_sample_matches_the_normal_interval():
    # 50 x (-1) and 50 x (+1): mean 0, population sd 1, so the mean's sd is 1 / sqrt(100) = 0.1 and
    # the 95 % interval is about 0 +- 1.96 * 0.1 (the bootstrap distribution of the mean is symmetric)
    d = np.array([-1.0, 1.0] * 50)
    lo, hi = stats.bootstrap_interval(d, resamples=20_000, seed=3)
    half = 1.96 * 1.0 / math.sqrt(d.size)
    assert lo == pytest.approx(-half, abs=0.03) and hi == pytest.approx(half, abs=0.03)
    assert abs(lo + hi) < 0.03
    lo80, hi80 = stats.bootstrap_interval(d, resamples=20_000, level=0.8, seed=3)
    assert lo < lo80 < 0 < hi80 < hi                                    # a lower level: a narrower interval


def test_bootstrap_is_seeded():
    d = np.random.default_rng(0).normal(1.0, 2.0, size=30)
    assert stats.bootstrap_interval(d, seed=5) == stats.bootstrap_interval(d, seed=5)
    assert stats.bootstrap_interval(d, seed=5) != stats.bootstrap_interval(d, seed=6)


def test_bad_inputs_fail_with_one_line():
    with pytest.raises(ConfigError, match="share no"):
        stats.paired_bootstrap(HAND, "x", "nobody")
    with pytest.raises(ConfigError, match="level"):
        stats.bootstrap_interval(np.ones(3), level=1.5)
    with pytest.raises(ConfigError, match="lack column"):
        stats.averages(pd.DataFrame({"method": ["x"]}))
