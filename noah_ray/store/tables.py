"""The result tables: the fixed Parquet schema of each (:data:`TABLES`), its version
(:data:`SCHEMA_VERSION`, stored in every file) and the upgrades of older files on read
(:data:`MIGRATIONS`).  Which stage folder of a job holds each table: :mod:`noah_ray.store.layout`.
Reading and writing the files: :func:`noah_ray.store.storage.append_table` / ``read_table``."""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

from noah_ray.errors import ConfigError
from noah_ray.space.kinds import MODULES

#: version of the result-table schemas, stored in every Parquet file's metadata.
#: 2: ``pareto`` has a ``timestamp``; epochs count from 1 (``train_metrics.epoch``, ``runs.best_epoch``),
#: as the progress lines do.  Older files are upgraded when read (:data:`MIGRATIONS`).
SCHEMA_VERSION = 2

#: per prompt-module kind (:data:`~noah_ray.space.kinds.MODULES`, in its order): ``<kind>_depth``, ``<kind>_widths``
_widths = [(f"{m}_{k}", t) for m in MODULES for k, t in (("depth", pa.int16()), ("widths", pa.list_(pa.int16())))]

#: the fixed schema of every result table (one Parquet dataset per table under the job's URI)
TABLES: dict[str, pa.Schema] = {
    # one row per evaluated search candidate
    "trials": pa.schema([
        ("run_id", pa.string()), ("job", pa.string()), ("dataset", pa.string()),
        ("algorithm", pa.string()), ("trial_id", pa.string()), ("config_key", pa.string()),
        ("config_json", pa.string()), *_widths,
        ("params", pa.int64()), ("params_head", pa.int64()), ("val_acc", pa.float64()),
        ("generation", pa.int32()), ("origin", pa.string()), ("parent_ids", pa.list_(pa.string())),
        ("status", pa.string()), ("wall_time_s", pa.float64()), ("worker", pa.string()),
        ("timestamp", pa.timestamp("ms", tz="UTC")),
        # one row per attempt of a candidate: failed attempts keep their error
        ("attempt", pa.int32()), ("error", pa.string()),
    ]),
    # one row per generation of a search
    "generations": pa.schema([
        ("run_id", pa.string()), ("job", pa.string()), ("dataset", pa.string()), ("algorithm", pa.string()),
        ("generation", pa.int32()), ("evaluated", pa.int32()), ("failed", pa.int32()),
        ("best_val_acc", pa.float64()), ("best_params", pa.int64()), ("best_config_json", pa.string()),
        ("timestamp", pa.timestamp("ms", tz="UTC")),
    ]),
    # non-dominated candidates (val accuracy vs params) of a finished search; timestamp: when scored
    "pareto": pa.schema([
        ("run_id", pa.string()), ("job", pa.string()), ("dataset", pa.string()), ("algorithm", pa.string()),
        ("trial_id", pa.string()), ("config_json", pa.string()), *_widths,
        ("params", pa.int64()), ("params_head", pa.int64()), ("val_acc", pa.float64()),
        ("timestamp", pa.timestamp("ms", tz="UTC")),
    ]),
    # per-epoch supernet / retrain metrics; `subnet` names the evaluated subnet
    # ("smallest", "largest", "random_0", ..., or "model" for retraining).  Epochs count from 1
    # (epoch k = after k passes over the training split), as in the progress lines and runs.best_epoch
    "train_metrics": pa.schema([
        ("run_id", pa.string()), ("job", pa.string()), ("dataset", pa.string()), ("stage", pa.string()),
        ("method", pa.string()), ("seed", pa.int32()), ("epoch", pa.int32()), ("subnet", pa.string()),
        ("train_loss", pa.float64()), ("val_acc", pa.float64()), ("lr", pa.float64()),
        ("images_per_s", pa.float64()), ("timestamp", pa.timestamp("ms", tz="UTC")),
    ]),
    # one row per finished retraining run (test accuracy reported once, on the weights of the
    # val-selected epoch best_epoch, 1..epochs)
    "runs": pa.schema([
        ("run_id", pa.string()), ("job", pa.string()), ("dataset", pa.string()), ("method", pa.string()),
        ("seed", pa.int32()), ("config_json", pa.string()), ("params", pa.int64()),
        ("params_head", pa.int64()), ("val_acc", pa.float64()), ("test_acc", pa.float64()),
        ("best_epoch", pa.int32()), ("epochs", pa.int32()), ("wall_time_s", pa.float64()),
        ("checkpoint_uri", pa.string()), ("timestamp", pa.timestamp("ms", tz="UTC")),
        ("hpo_json", pa.string()),          # the tuned values the run trained with (noah_ray.hpo), else null
    ]),
    # one row per hyper-parameter trial (noah_ray.hpo); plus one float64 column per tuned setting,
    # named hp_<path with dots as underscores> (hp_retrain_lr, hp_model_drop_path_rate, ...)
    "hpo_trials": pa.schema([
        ("run_id", pa.string()), ("job", pa.string()), ("dataset", pa.string()), ("method", pa.string()),
        ("searcher", pa.string()), ("scheduler", pa.string()), ("trial_id", pa.string()),
        ("config_json", pa.string()), ("metric", pa.string()), ("status", pa.string()),
        ("epochs_run", pa.int32()), ("max_epochs", pa.int32()), ("stopped_early", pa.bool_()),
        ("best_val", pa.float64()), ("best_epoch", pa.int32()), ("last_val", pa.float64()),
        ("wall_time_s", pa.float64()), ("worker", pa.string()), ("error", pa.string()),
        ("chosen", pa.bool_()), ("timestamp", pa.timestamp("ms", tz="UTC")),
    ]),
    # per-epoch curve of every hyper-parameter trial (what ASHA saw)
    "hpo_curves": pa.schema([
        ("run_id", pa.string()), ("job", pa.string()), ("dataset", pa.string()), ("method", pa.string()),
        ("trial_id", pa.string()), ("epoch", pa.int32()), ("train_loss", pa.float64()),
        ("val_acc", pa.float64()), ("val_loss", pa.float64()), ("lr", pa.float64()),
        ("images_per_s", pa.float64()), ("timestamp", pa.timestamp("ms", tz="UTC")),
    ]),
    # one row per trial of a finalist race (noah_ray.hpo.race): a finalist (with a learning rate when
    # race.lrs races them), where it came from (search: its rank; baseline:<kind>), its val_acc at each
    # rung it reached (rungs: the epochs, from 1), whether ASHA stopped it, and the survivor (chosen)
    "finalists": pa.schema([
        ("run_id", pa.string()), ("job", pa.string()), ("dataset", pa.string()), ("trial_id", pa.string()),
        ("finalist", pa.int32()), ("source", pa.string()), ("search_rank", pa.int32()),
        ("search_val_acc", pa.float64()), ("config_key", pa.string()), ("config_json", pa.string()), *_widths,
        ("params", pa.int64()), ("lr", pa.float64()), ("rungs", pa.list_(pa.int32())),
        ("rung_scores", pa.list_(pa.float64())), ("epochs_run", pa.int32()), ("max_epochs", pa.int32()),
        ("last_val_acc", pa.float64()), ("last_val_loss", pa.float64()), ("stopped", pa.bool_()),
        ("status", pa.string()), ("chosen", pa.bool_()), ("timestamp", pa.timestamp("ms", tz="UTC")),
    ]),
}

#: tables that also keep extra float64 columns with this prefix (one per tuned hyper-parameter)
DYNAMIC_COLUMNS: dict[str, str] = {"hpo_trials": "hp_"}



def conform(table_name: str, table: pa.Table) -> pa.Table:
    """Cast ``table`` to the fixed schema of ``table_name`` (missing nullable columns -> null)."""
    schema = TABLES[table_name]
    prefix = DYNAMIC_COLUMNS.get(table_name)
    dynamic = sorted(c for c in table.column_names if prefix and c.startswith(prefix) and c not in schema.names)
    extra = set(table.column_names) - set(schema.names) - set(dynamic)
    if extra:
        raise ConfigError(f"table {table_name!r}: unknown column(s) {sorted(extra)}; "
                          f"the schema has {', '.join(schema.names)}")
    schema = pa.schema([*schema, *(pa.field(c, pa.float64()) for c in dynamic)])
    cols = [table.column(f.name).cast(f.type, safe=not pa.types.is_timestamp(f.type)) if f.name in table.column_names
            else pa.nulls(table.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def _shift(column: str, by: int) -> Callable[[pa.Table], pa.Table]:
    def upgrade(t: pa.Table) -> pa.Table:
        if column not in t.column_names:
            return t
        i = t.column_names.index(column)
        return t.set_column(i, column, pc.add(t.column(column), pa.scalar(by, t.schema.field(i).type)))
    return upgrade


#: (table, version it upgrades from) -> the change to the next version, applied in order on read
MIGRATIONS: dict[tuple[str, int], Callable[[pa.Table], pa.Table]] = {
    ("train_metrics", 1): _shift("epoch", 1),        # v1 counted epochs from 0
    ("runs", 1): _shift("best_epoch", 1),
    # ("pareto", 1): no timestamp in v1; conform() adds it as null
}


def upgrade(table_name: str, table: pa.Table, version: int) -> pa.Table:
    """Rows of a file written with schema ``version`` as the current schema has them."""
    for v in range(max(version, 1), SCHEMA_VERSION):
        step = MIGRATIONS.get((table_name, v))
        if step is not None:
            table = step(table)
    return conform(table_name, table) if table_name in TABLES else table
