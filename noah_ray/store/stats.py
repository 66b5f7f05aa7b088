"""Statistics of a benchmark's retraining runs: VTAB's two averages, per-task wins and losses,
and paired bootstrap intervals of one method minus another.

Every function takes the rows of :func:`noah_ray.store.results.runs` (or any DataFrame with
``dataset``, ``method``, ``seed`` and ``test_acc`` columns), one row per (dataset, method, seed).

- :func:`task_means`: methods x datasets, the mean test accuracy over seeds.
- :func:`averages`: per method the mean of the VTAB group means (the VPT / NOAH papers' average),
  the mean over all tasks (each task weighted the same) and the mean over every (task, seed) run.
- :func:`wins_losses`: per pair of methods the number of tasks where the first's mean over seeds
  is above / below / equal to the second's.
- :func:`paired_bootstrap`: the mean of ``A - B`` over the (task, seed) pairs both ran and its
  percentile bootstrap interval (the pairs resampled with replacement, a seeded generator).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from noah_ray.config import datasets as registry
from noah_ray.errors import ConfigError

RUN_COLUMNS = ("dataset", "method", "seed", "test_acc")


def _check(runs: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in RUN_COLUMNS if c not in runs.columns]
    if missing:
        raise ConfigError(f"run rows lack column(s) {missing}; pass results.runs(uri) or a frame with "
                          f"{', '.join(RUN_COLUMNS)}")
    return runs.dropna(subset=["test_acc"])


def task_means(runs: pd.DataFrame) -> pd.DataFrame:
    """Methods (index) x datasets (columns): test accuracy averaged over seeds."""
    df = _check(runs)
    wide = df.pivot_table(index="method", columns="dataset", values="test_acc", aggfunc="mean")
    wide.columns.name = None
    return wide


@dataclass(frozen=True)
class Averages:
    """One method's averages (%): ``groups`` maps each VTAB group it ran to the mean over that
    group's tasks; ``group_mean`` is the mean of those (NaN if no task has a group)."""

    method: str
    group_mean: float          # mean of the group means (VPT / NOAH papers)
    task_mean: float           # mean over tasks (each task once)
    run_mean: float            # mean over every (task, seed) run
    tasks: int
    runs: int
    groups: dict[str, float]


def averages(runs: pd.DataFrame) -> list[Averages]:
    """Per method (sorted by name) its :class:`Averages`; groups from the dataset registry."""
    df = _check(runs)
    means = task_means(df)
    out = []
    for method, row in means.iterrows():
        row = row.dropna()
        groups = {}
        for group in registry.VTAB_GROUPS:
            members = [t for t in row.index if registry.vtab_group(str(t)) == group]
            if members:
                groups[group] = float(row[members].mean())
        mine = df[df["method"] == method]
        out.append(Averages(str(method), float(np.mean(list(groups.values()))) if groups else float("nan"),
                            float(row.mean()), float(mine["test_acc"].mean()), len(row), len(mine), groups))
    return out


@dataclass(frozen=True)
class WinLoss:
    """Tasks where ``method``'s mean over seeds is above (``wins``), below (``losses``) or equal
    to (``ties``) ``other``'s, over the tasks both ran."""

    method: str
    other: str
    wins: int
    losses: int
    ties: int


def wins_losses(runs: pd.DataFrame, methods: list[str] | None = None,
                others: list[str] | None = None) -> list[WinLoss]:
    """A :class:`WinLoss` for every ``method`` against every other method in ``others`` (default:
    all methods in the rows)."""
    means = task_means(runs)
    names = [str(m) for m in means.index]
    out = []
    for a in methods or names:
        for b in others or names:
            if a == b or a not in names or b not in names:
                continue
            both = means.loc[[a, b]].dropna(axis=1)
            d = both.loc[a] - both.loc[b]
            out.append(WinLoss(a, b, int((d > 0).sum()), int((d < 0).sum()), int((d == 0).sum())))
    return out


@dataclass(frozen=True)
class Interval:
    """``method`` minus ``other``: the mean difference over ``pairs`` (task, seed) pairs and its
    ``level`` bootstrap interval [``low``, ``high``] (percentage points)."""

    method: str
    other: str
    mean: float
    low: float
    high: float
    pairs: int
    level: float
    resamples: int


def paired_differences(runs: pd.DataFrame, method: str, other: str) -> pd.Series:
    """``test_acc`` of ``method`` minus ``other`` per (dataset, seed) both ran."""
    df = _check(runs)
    wide = df[df["method"].isin([method, other])].pivot_table(
        index=["dataset", "seed"], columns="method", values="test_acc", aggfunc="mean")
    if method not in wide.columns or other not in wide.columns:
        return pd.Series(dtype=float)
    return (wide[method] - wide[other]).dropna()


def bootstrap_interval(diffs: np.ndarray, *, resamples: int = 10_000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``diffs``: ``resamples`` means of
    ``len(diffs)`` values drawn with replacement (``numpy.random.default_rng(seed)``)."""
    x = np.asarray(diffs, dtype=np.float64)
    if x.size == 0:
        raise ConfigError("no paired runs to bootstrap; the two methods share no (task, seed)")
    if not 0 < level < 1 or resamples < 1:
        raise ConfigError(f"bootstrap level {level!r} must be in (0, 1) and resamples {resamples!r} >= 1")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def paired_bootstrap(runs: pd.DataFrame, method: str, other: str, *, resamples: int = 10_000,
                     level: float = 0.95, seed: int = 0) -> Interval:
    """``method`` minus ``other`` over the (task, seed) pairs both ran, with the
    :func:`bootstrap_interval` of its mean (the pairs resampled as units)."""
    d = paired_differences(runs, method, other).to_numpy()
    if d.size == 0:
        raise ConfigError(f"methods {method!r} and {other!r} share no (task, seed) run to compare")
    low, high = bootstrap_interval(d, resamples=resamples, level=level, seed=seed)
    return Interval(method, other, float(d.mean()), low, high, int(d.size), level, resamples)
