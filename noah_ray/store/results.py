"""Result queries as pandas DataFrames, and plots.

Every query takes a URI: one job (``<storage>/<job>``), a whole storage root holding many jobs
(one per VTAB task, say), or a single stage folder; the Parquet tables below it are found
recursively.  Tables and their stage folders (:data:`noah_ray.store.layout.TABLE_STAGES`; schemas in
:data:`noah_ray.store.tables.TABLES`)::

    <job>/supernet/train_metrics   per epoch and evaluated subnet (smallest, largest, random_i)
    <job>/search/trials            one row per scored candidate (widths, params, val_acc, ...)
    <job>/search/generations       one row per generation
    <job>/search/pareto            the non-dominated candidates of each finished search
    <job>/race/finalists           one row per finalist trial of the race: source, params, rung scores,
                                   stopped, chosen (the race's trials also fill race/hpo_trials and
                                   race/hpo_curves, with method "race")
    <job>/retrain/runs             one row per retraining run (val-selected epoch, test once)
    <job>/retrain/train_metrics    per retraining epoch
    <job>/hpo/hpo_trials           one row per hyper-parameter trial (values as hp_* columns)
    <job>/hpo/hpo_curves           per trial epoch: the validation curve ASHA judged

The same files read with plain pandas / pyarrow, e.g.
``pandas.read_parquet("s3://bucket/noah/cifar100-noah/search/trials")`` (pass
``storage_options={"client_kwargs": {"endpoint_url": ...}}`` or ``filesystem=`` for a
non-AWS endpoint).
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa

from noah_ray.config import datasets as registry
from noah_ray.errors import ConfigError
from noah_ray.space import MODULES, SubnetConfig
from noah_ray.space.methods import RACED_NOAH
from noah_ray.store import storage
from noah_ray.store.layout import TABLE_STAGES
from noah_ray.store.tables import TABLES

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _stage_dirs(loc: storage.Location, table: str) -> list[storage.Location]:
    """The ``<stage>`` folders under ``loc`` holding ``<stage>/<table>/*.parquet``."""
    seen: dict[str, storage.Location] = {}
    for f in storage.list_files(loc, ".parquet"):
        segs = f.path.split("/")
        if len(segs) >= 3 and segs[-2] == table and segs[-3] in TABLE_STAGES[table]:
            stage_path = posixpath.dirname(posixpath.dirname(f.path))
            if stage_path not in seen:
                rel = posixpath.relpath(stage_path, loc.path)
                seen[stage_path] = loc if rel == "." else loc.join(rel)
    return list(seen.values())


def load_table(uri: str, table: str, endpoint: str | None = None) -> pd.DataFrame:
    """All rows of ``table`` below ``uri`` (an empty DataFrame with the table's columns if none)."""
    if table not in TABLES:
        raise ConfigError(f"unknown table {table!r}; use one of {', '.join(TABLES)}")
    loc = storage.resolve(uri, endpoint)
    try:
        if not storage.exists(loc):
            raise ConfigError(f"{loc.uri!r} does not exist; give a job (<storage>/<name>) or storage URI")
        # a URI pointing at the table folder itself (<job>/search/trials)
        if posixpath.basename(loc.path) == table:
            parent = posixpath.dirname(loc.path)
            loc = storage.Location(posixpath.dirname(loc.uri), loc.fs, parent, loc.endpoint)
        parts = [t for d in _stage_dirs(loc, table) if (t := storage.read_table(d, table)) is not None]
    except OSError as e:
        raise ConfigError(f"cannot read {loc.uri!r}: {str(e).splitlines()[0][:200]}; "
                          f"check the URI, endpoint and credentials") from None
    if not parts:
        return TABLES[table].empty_table().to_pandas()
    return pa.concat_tables(parts, promote_options="default").to_pandas()


def load_trials(uri: str, endpoint: str | None = None) -> pd.DataFrame:
    """Every scored search candidate (one row each), in the order they were written."""
    return load_table(uri, "trials", endpoint)


def generations(uri: str, endpoint: str | None = None) -> pd.DataFrame:
    """One row per search generation (best val accuracy so far, evaluated / failed counts)."""
    df = load_table(uri, "generations", endpoint)
    return df.sort_values(["job", "run_id", "generation"]).reset_index(drop=True)


def pareto(uri: str, endpoint: str | None = None) -> pd.DataFrame:
    """The non-dominated candidates (val accuracy vs module params) of each search, smallest first."""
    df = load_table(uri, "pareto", endpoint)
    return df.sort_values(["job", "run_id", "params"]).reset_index(drop=True)


def finalists(uri: str, endpoint: str | None = None) -> pd.DataFrame:
    """One row per trial of each finalist race (:mod:`noah_ray.hpo.race`): the finalist, its
    ``source`` (``search`` or ``baseline:<kind>``), params, learning rate, the epochs of the rungs it
    reached (``rungs``) and its val accuracy there (``rung_scores``), ``stopped`` (by ASHA) and
    ``chosen`` (the survivor retraining trains); best last score first."""
    df = load_table(uri, "finalists", endpoint)
    if df.empty:
        return df
    df = df.sort_values("timestamp").drop_duplicates(["job", "trial_id"], keep="last")
    return df.sort_values(["job", "epochs_run", "last_val_acc"], ascending=[True, False, False]).reset_index(drop=True)


def runs(uri: str, endpoint: str | None = None) -> pd.DataFrame:
    """One row per retraining run; a re-run of the same (job, method, seed) replaces the older row."""
    df = load_table(uri, "runs", endpoint)
    if df.empty:
        return df
    df = df.sort_values("timestamp").drop_duplicates(["job", "method", "seed"], keep="last")
    return df.sort_values(["dataset", "job", "method", "seed"]).reset_index(drop=True)


LEADERBOARD_COLUMNS = ["dataset", "job", "method", "seeds", "test_acc_mean", "test_acc_std",
                       "val_acc_mean", "params_m"]


def leaderboard(uri: str, endpoint: str | None = None) -> pd.DataFrame:
    """Per dataset, job and method: test accuracy mean and std (population, over seeds), val
    accuracy, trainable module parameters in millions (head excluded); best first."""
    return leaderboard_of(runs(uri, endpoint))


def leaderboard_of(df: pd.DataFrame) -> pd.DataFrame:
    """:func:`leaderboard` of run rows (:func:`runs`, or rows added to them such as a floor)."""
    if df.empty:
        return pd.DataFrame(columns=LEADERBOARD_COLUMNS)
    g = df.groupby(["dataset", "job", "method"])
    out = pd.DataFrame({
        "seeds": g["seed"].nunique(),
        "test_acc_mean": g["test_acc"].mean(),
        "test_acc_std": g["test_acc"].std(ddof=0).fillna(0.0),
        "val_acc_mean": g["val_acc"].mean(),
        "params_m": g["params"].mean() / 1e6,
    }).reset_index()
    out = out.sort_values(["dataset", "test_acc_mean"], ascending=[True, False]).reset_index(drop=True)
    return out[LEADERBOARD_COLUMNS]


def vtab_table(uri: str, endpoint: str | None = None) -> pd.DataFrame:
    """Methods x datasets (mean test accuracy over seeds) in VTAB order, with the group means
    (``Natural``, ``Specialized``, ``Structured``), VTAB's two averages: ``Mean`` (the mean of the
    group means, as the VPT / NOAH tables report it) and ``Mean_tasks`` (the mean over all tasks),
    and the mean module parameters (``params_m``).  Datasets outside VTAB-1k get columns but no
    group.  Intervals, wins and losses of these numbers: :mod:`noah_ray.store.stats`."""
    return vtab_table_of(runs(uri, endpoint))


def vtab_table_of(df: pd.DataFrame) -> pd.DataFrame:
    """:func:`vtab_table` of run rows (:func:`runs`, or rows added to them such as a floor)."""
    lb = leaderboard_of(df)
    if lb.empty:
        return pd.DataFrame(columns=["method"])
    wide = lb.pivot_table(index="method", columns="dataset", values="test_acc_mean", aggfunc="mean")
    order = [n for n in registry.names() if n in wide.columns]
    order += sorted(c for c in wide.columns if c not in order)
    wide = wide[order]
    groups = []
    for group in registry.VTAB_GROUPS:
        members = [c for c in order if registry.vtab_group(c) == group]
        if members:
            wide[group] = wide[members].mean(axis=1)
            groups.append(group)
    if groups:
        wide["Mean"] = wide[groups].mean(axis=1)
        wide["Mean_tasks"] = wide[order].mean(axis=1)
    wide["params_m"] = lb.groupby("method")["params_m"].mean()
    wide.columns.name = None
    return wide.reset_index()


def supernet_curves(uri: str, endpoint: str | None = None) -> pd.DataFrame:
    """Supernet training metrics: one row per (job, epoch, evaluated subnet)."""
    df = load_table(uri, "train_metrics", endpoint)
    df = df[df["stage"] == "supernet"]
    return df.sort_values(["job", "epoch", "subnet"], na_position="first").reset_index(drop=True)


def hpo(uri: str, endpoint: str | None = None) -> pd.DataFrame:
    """One row per hyper-parameter trial: job, method, trial id, one ``hp_*`` column per tuned
    setting, epochs run, stopped early, best and last val, wall time, worker, and ``chosen``: the
    trial whose values the final runs used."""
    df = load_table(uri, "hpo_trials", endpoint)
    df = df[df["method"] != "race"]             # the race's trials: finalists()
    if df.empty:
        return df.reset_index(drop=True)
    df = df.sort_values("timestamp").drop_duplicates(["job", "method", "trial_id"], keep="last")
    return df.sort_values(["job", "method", "trial_id"]).reset_index(drop=True)


def hpo_curves(uri: str, endpoint: str | None = None) -> pd.DataFrame:
    """Per hyper-parameter trial and epoch: train loss, val accuracy and loss, learning rate."""
    df = load_table(uri, "hpo_curves", endpoint)
    df = df[df["method"] != "race"]             # the race's curves: plot_finalists
    return df.sort_values(["job", "method", "trial_id", "epoch"]).reset_index(drop=True)


def config_of(row: pd.Series) -> SubnetConfig:
    """The SubnetConfig of a trials / pareto / runs / generations row."""
    text = row["config_json"] if "config_json" in row else row["best_config_json"]
    return SubnetConfig.from_dict(json.loads(text))


def searched_subnets(uri: str, endpoint: str | None = None) -> dict[str, SubnetConfig]:
    """Per job: the retrained NOAH subnet (the race's survivor ``noah+`` before the plain ``noah``),
    else the best scored search candidate."""
    out: dict[str, SubnetConfig] = {}
    trials = load_trials(uri, endpoint)
    trials = trials[(trials["status"].fillna("done") == "done") & trials["val_acc"].notna()]
    for job, d in trials.groupby("job"):
        out[job] = config_of(d.sort_values(["val_acc", "params"], ascending=[False, True]).iloc[0])
    r = runs(uri, endpoint)
    if not r.empty:
        noah = r[r["method"].isin(["noah", RACED_NOAH])]
        for job, d in noah.groupby("job"):
            raced = d[d["method"] == RACED_NOAH]
            out[job] = config_of((raced if not raced.empty else d).iloc[-1])
    return out


# ------------------------------------------------------------------------------ plots
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(uri: str, path: str | Path, endpoint: str | None = None) -> Path:
    """All scored candidates (grey) and each search's Pareto front: val accuracy vs params."""
    trials = load_trials(uri, endpoint)
    if trials.empty:
        raise ConfigError(f"no search trials under {uri!r}; run the search stage first")
    front = pareto(uri, endpoint)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ok = trials[(trials["status"].fillna("done") == "done") & trials["val_acc"].notna()]
    ax.scatter(ok["params"] / 1e6, ok["val_acc"], s=12, c="0.65", label=f"candidates ({len(ok)})")
    for i, ((job, run), d) in enumerate(front.groupby(["job", "run_id"])):
        ax.plot(d["params"] / 1e6, d["val_acc"], "o-", drawstyle="steps-post", c=f"C{(i + 3) % 10}",
                label=f"Pareto front: {job} {run}")
    ax.set_xlabel("trainable module parameters (M, head excluded)")
    ax.set_ylabel("val accuracy (%)")
    ax.set_title("search: accuracy vs size")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_architecture(subnet: SubnetConfig, path: str | Path, title: str = "") -> Path:
    """Per-layer widths of every module as a heat-map (modules x layers, cf. NOAH Fig. 5);
    0 means the module is absent from that layer."""
    mods = [m for m in MODULES if m in subnet.widths]
    grid = [list(subnet.layer_widths(m)) for m in mods]
    if not any(any(row) for row in grid):
        raise ConfigError("the subnet has no modules (a linear probe); nothing to draw")
    top = max(max(row) for row in grid)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(0.55 * subnet.num_layers + 2.5, 0.55 * len(mods) + 1.4))
    im = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=0, vmax=top)
    for i, row in enumerate(grid):
        for j, w in enumerate(row):
            ax.text(j, i, str(w), ha="center", va="center", fontsize=8, color="w" if w < top / 2 else "k")
    ax.set_yticks(range(len(mods)), mods)
    ax.set_xticks(range(subnet.num_layers), [str(i + 1) for i in range(subnet.num_layers)])
    ax.set_xlabel("transformer layer")
    ax.set_title(title or "searched subnet: width per layer")
    fig.colorbar(im, ax=ax, fraction=0.03, label="tokens / rank / width")
    return _save(fig, path)


def plot_supernet_curves(uri: str, path: str | Path, endpoint: str | None = None) -> Path:
    """Supernet train loss and the val accuracy of the fixed evaluation subnets per epoch."""
    df = supernet_curves(uri, endpoint)
    if df.empty:
        raise ConfigError(f"no supernet metrics under {uri!r}; run the supernet stage first")
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for job, d in df.drop_duplicates(["job", "run_id", "epoch"]).groupby("job"):
        a.plot(d["epoch"], d["train_loss"], ".-", label=job)
    a.set_xlabel("epoch")
    a.set_ylabel("train loss (random subnet per step)")
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    for (job, sub), d in df.dropna(subset=["val_acc"]).groupby(["job", "subnet"]):
        b.plot(d["epoch"], d["val_acc"], ".-", label=f"{job}: {sub}")
    b.set_xlabel("epoch")
    b.set_ylabel("val accuracy (%)")
    b.legend(fontsize=7)
    b.grid(alpha=0.3)
    return _save(fig, path)


def plot_hpo(uri: str, path: str | Path, endpoint: str | None = None) -> Path:
    """Best val of every hyper-parameter trial against each tuned setting (log axes for ranges
    spanning a decade or more), one colour per method; the chosen trials ringed."""
    df = hpo(uri, endpoint)
    df = df[df["status"] == "done"] if not df.empty else df
    cols = [c for c in df.columns if c.startswith("hp_") and df[c].notna().any()]
    if not cols:
        raise ConfigError(f"no hyper-parameter trials under {uri!r}; run the hpo stage first")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(cols), figsize=(3.6 * len(cols) + 0.6, 3.4), squeeze=False)
    for ax, col in zip(axes[0], cols):
        for i, (method, d) in enumerate(df.dropna(subset=[col]).groupby("method")):
            ax.scatter(d[col], d["best_val"], s=14, c=f"C{i}", label=method)
            chosen = d[d["chosen"]]
            ax.scatter(chosen[col], chosen["best_val"], s=80, facecolors="none", edgecolors="k")
        positive = df[col].dropna()
        if (positive > 0).all() and positive.max() >= 10 * positive.min():
            ax.set_xscale("log")
        ax.set_xlabel(col[3:])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"best {df['metric'].iloc[0].replace('_', ' ')} of the trial")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("hyper-parameter search: val vs each setting (ringed: chosen)", fontsize=9)
    return _save(fig, path)


def plot_asha_curves(uri: str, path: str | Path, endpoint: str | None = None) -> Path:
    """The val accuracy per epoch of every trial, one panel per method: trials ASHA stopped end
    early (grey), trials that ran every epoch in colour."""
    curves, trials = hpo_curves(uri, endpoint), hpo(uri, endpoint)
    if curves.empty:
        raise ConfigError(f"no hyper-parameter curves under {uri!r}; run the hpo stage first")
    stopped = set(trials.loc[trials["stopped_early"].fillna(False).astype(bool), "trial_id"])
    methods = sorted(curves["method"].unique())
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(methods), figsize=(4.4 * len(methods) + 0.6, 3.4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        for i, (tid, d) in enumerate(curves[curves["method"] == method].groupby("trial_id")):
            early = tid in stopped
            ax.plot(d["epoch"], d["val_acc"], ".-", c="0.65" if early else f"C{i % 10}",
                    lw=0.8 if early else 1.4, alpha=0.8)
        ax.set_title(f"{method}: {len(set(curves.loc[curves['method'] == method, 'trial_id']))} trials "
                     f"(grey: stopped early)", fontsize=8)
        ax.set_xlabel("epoch")
        ax.set_ylabel("val accuracy (%)")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_finalists(uri: str, path: str | Path, endpoint: str | None = None) -> Path:
    """The race of each job: every finalist's val accuracy at the rungs it reached (search finalists
    solid, baselines dashed; grey once ASHA stopped it), the survivor thick and black."""
    df = finalists(uri, endpoint)
    if df.empty:
        raise ConfigError(f"no finalist race under {uri!r}; run the race stage first")
    jobs = sorted(df["job"].unique())
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(jobs), figsize=(4.8 * len(jobs) + 0.6, 3.6), squeeze=False)
    for ax, job in zip(axes[0], jobs):
        for i, row in enumerate(df[df["job"] == job].itertuples()):
            style = "--" if str(row.source).startswith("baseline") else "-"
            colour = "k" if row.chosen else ("0.65" if row.stopped else f"C{i % 10}")
            lr = f" lr {row.lr:g}" if row.lr == row.lr and row.lr is not None else ""
            ax.plot(list(row.rungs), list(row.rung_scores), "o" + style, c=colour, lw=2.4 if row.chosen else 1.0,
                    label=f"{row.source} #{row.finalist}{lr} ({row.params / 1e6:.3g} M)")
        ax.set_title(f"{job}: finalist race (black: survivor, grey: stopped)", fontsize=8)
        ax.set_xlabel("epoch (rung)")
        ax.set_ylabel("val accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p
