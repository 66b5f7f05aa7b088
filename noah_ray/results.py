"""Result queries as pandas DataFrames, and plots.

Every function takes a URI: one job (``<storage>/<job>``) or a whole storage root holding many
jobs (one per dataset, say); the Parquet tables under it are found recursively.  The same
tables can be read with plain pandas/pyarrow, e.g.
``pandas.read_parquet("s3://bucket/noah/cifar100/search/trials")``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from noah_ray import storage
from noah_ray.data import registry
from noah_ray.space import MODULES, SubnetConfig

#: which stage folder holds each table
TABLE_STAGES = {"trials": ("search",), "generations": ("search",), "pareto": ("search",),
                "runs": ("retrain",), "train_metrics": ("supernet", "retrain")}


def load_table(uri: str, table: str, *, endpoint: str | None = None) -> pd.DataFrame:
    """All rows of ``table`` below ``uri`` (empty DataFrame with the table's columns if none)."""
    if table not in storage.TABLES:
        from noah_ray.space import ConfigError

        raise ConfigError(f"unknown table {table!r}; use one of {', '.join(storage.TABLES)}")
    loc = storage.resolve(uri, endpoint)
    parts = []
    for f in storage.list_files(loc, ".parquet"):
        segs = f.path.split("/")
        if len(segs) >= 3 and segs[-2] == table and segs[-3] in TABLE_STAGES[table]:
            parts.append(pq.read_table(io.BytesIO(storage.read_bytes(f))).replace_schema_metadata(None))
    if not parts:
        return storage.TABLES[table].empty_table().to_pandas()
    return pa.concat_tables(parts, promote_options="default").to_pandas()


def load_trials(uri: str, *, endpoint: str | None = None) -> pd.DataFrame:
    return load_table(uri, "trials", endpoint=endpoint)


def pareto(uri: str, *, endpoint: str | None = None) -> pd.DataFrame:
    """The non-dominated candidates (val accuracy vs params), smallest first."""
    return load_table(uri, "pareto", endpoint=endpoint).sort_values("params").reset_index(drop=True)


def runs(uri: str, *, endpoint: str | None = None) -> pd.DataFrame:
    return load_table(uri, "runs", endpoint=endpoint)


def leaderboard(uri: str, *, endpoint: str | None = None) -> pd.DataFrame:
    """Per dataset and method: test accuracy mean and std over seeds, val accuracy, params."""
    df = runs(uri, endpoint=endpoint)
    cols = ["dataset", "method", "seeds", "test_acc_mean", "test_acc_std", "val_acc_mean", "params_m"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    df = df.sort_values("timestamp").drop_duplicates(["job", "method", "seed"], keep="last")
    g = df.groupby(["dataset", "method"])
    out = pd.DataFrame({
        "seeds": g["seed"].nunique(),
        "test_acc_mean": g["test_acc"].mean(),
        "test_acc_std": g["test_acc"].std(ddof=0).fillna(0.0),
        "val_acc_mean": g["val_acc"].mean(),
        "params_m": g["params"].mean() / 1e6,
    }).reset_index()
    return out.sort_values(["dataset", "test_acc_mean"], ascending=[True, False]).reset_index(drop=True)[cols]


def vtab_table(uri: str, *, endpoint: str | None = None) -> pd.DataFrame:
    """Datasets x methods (mean test accuracy), VTAB order, with the group means
    (Natural / Specialized / Structured) and their mean, as in the papers' tables."""
    lb = leaderboard(uri, endpoint=endpoint)
    if lb.empty:
        return pd.DataFrame()
    wide = lb.pivot(index="method", columns="dataset", values="test_acc_mean")
    order = [n for n in registry.names() if n in wide.columns]
    order += [c for c in wide.columns if c not in order]
    wide = wide[order]
    for group in registry.VTAB_GROUPS:
        members = [c for c in order if (info := registry.lookup(c)) and info.group == group]
        if members:
            wide[f"{group} mean"] = wide[members].mean(axis=1)
    group_cols = [c for c in wide.columns if c.endswith(" mean")]
    if group_cols:
        wide["Mean"] = wide[group_cols].mean(axis=1)
    return wide.reset_index()


def supernet_curves(uri: str, *, endpoint: str | None = None) -> pd.DataFrame:
    """Supernet training metrics: one row per (job, epoch, evaluated subnet)."""
    df = load_table(uri, "train_metrics", endpoint=endpoint)
    return df[df["stage"] == "supernet"].sort_values(["job", "epoch", "subnet"]).reset_index(drop=True)


# ------------------------------------------------------------------------------ plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(uri: str, path: str | Path, *, endpoint: str | None = None) -> Path:
    """All evaluated candidates (grey) and the Pareto front (line): val accuracy vs params."""
    plt = _pyplot()
    trials, front = load_trials(uri, endpoint=endpoint), pareto(uri, endpoint=endpoint)
    fig, ax = plt.subplots(figsize=(6, 4))
    ok = trials[trials["status"].fillna("ok") != "error"] if "status" in trials else trials
    ax.scatter(ok["params"] / 1e6, ok["val_acc"], s=10, c="0.6", label="candidates")
    ax.plot(front["params"] / 1e6, front["val_acc"], "o-", c="C3", label="Pareto front")
    ax.set_xlabel("trainable module parameters (M)")
    ax.set_ylabel("val accuracy (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_architecture(subnet: SubnetConfig, path: str | Path, title: str = "") -> Path:
    """Per-layer widths of every module as a heat-map (cf. NOAH Fig. 5)."""
    plt = _pyplot()
    mods = [m for m in MODULES if m in subnet.widths]
    grid = [list(subnet.layer_widths(m)) for m in mods]
    fig, ax = plt.subplots(figsize=(0.6 * subnet.num_layers + 2, 0.6 * len(mods) + 1.2))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    for i, row in enumerate(grid):
        for j, w in enumerate(row):
            ax.text(j, i, str(w), ha="center", va="center", color="w" if w < max(max(grid)) / 2 else "k", fontsize=8)
    ax.set_yticks(range(len(mods)), mods)
    ax.set_xticks(range(subnet.num_layers), [str(i + 1) for i in range(subnet.num_layers)])
    ax.set_xlabel("layer")
    ax.set_title(title or "searched subnet: width per layer")
    fig.colorbar(im, ax=ax, fraction=0.03)
    return _save(fig, path)


def plot_supernet_curves(uri: str, path: str | Path, *, endpoint: str | None = None) -> Path:
    """Supernet loss and val accuracy of the fixed evaluation subnets per epoch."""
    plt = _pyplot()
    df = supernet_curves(uri, endpoint=endpoint)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    loss = df.drop_duplicates(["job", "epoch"])
    for job, d in loss.groupby("job"):
        a.plot(d["epoch"] + 1, d["train_loss"], label=job)
    a.set_xlabel("epoch")
    a.set_ylabel("train loss")
    a.legend(fontsize=7)
    for (job, sub), d in df.dropna(subset=["val_acc"]).groupby(["job", "subnet"]):
        b.plot(d["epoch"] + 1, d["val_acc"], label=f"{job}: {sub}")
    b.set_xlabel("epoch")
    b.set_ylabel("val accuracy (%)")
    b.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=120)
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return p


def config_of(row: pd.Series) -> SubnetConfig:
    """The SubnetConfig of a trials / pareto / runs row."""
    return SubnetConfig.from_dict(json.loads(row["config_json"]))
