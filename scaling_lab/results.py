"""Typed trial results: the Parquet schema, atomic writes, and loading a study.

Layout of a results directory:
    <dir>/spec.yaml                  the study spec the results were produced under
    <dir>/trials/<trial_id>.parquet  one row per finished trial (written last: it marks completion)
    <dir>/curves/<trial_id>.parquet  the trial's loss curve, one row per logged step
    <dir>/claims/<trial_id>.json     a running trial's claim (owner, heartbeat); removed when it ends

This module imports only pyarrow and pandas so that the analysis can use it without ray or torch.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
STATUSES = ("ok", "diverged", "oom", "error")

TRIAL_SCHEMA = pa.schema(
    [
        ("schema_version", pa.int32()),
        ("trial_id", pa.string()),
        ("study", pa.string()),
        # the axes
        ("model", pa.string()),
        ("rank", pa.int32()),
        ("alpha", pa.float64()),
        ("learning_rate", pa.float64()),
        ("seed", pa.int32()),
        # how alpha became the multiplier applied to B·A
        ("scaling_rule", pa.string()),
        ("effective_scale", pa.float64()),
        ("peft_lora_alpha", pa.float64()),
        ("use_rslora", pa.bool_()),
        # what was trained
        ("model_source", pa.string()),
        ("model_params", pa.int64()),
        ("trainable_params", pa.int64()),
        ("task", pa.string()),
        ("target_modules", pa.string()),
        ("lora_init", pa.string()),
        ("optimizer", pa.string()),
        ("schedule", pa.string()),
        ("batch_size", pa.int32()),
        ("seq_len", pa.int32()),
        ("steps_planned", pa.int32()),
        # outcome
        ("status", pa.string()),
        ("error", pa.string()),
        ("final_eval_loss", pa.float64()),
        ("best_eval_loss", pa.float64()),
        ("final_eval_accuracy", pa.float64()),
        ("best_eval_accuracy", pa.float64()),
        ("initial_eval_loss", pa.float64()),
        ("final_train_loss", pa.float64()),
        ("last_finite_train_loss", pa.float64()),
        ("steps", pa.int32()),
        ("tokens", pa.int64()),
        ("wall_time_s", pa.float64()),
        ("train_time_s", pa.float64()),
        ("tokens_per_s", pa.float64()),
        ("peak_memory_mb", pa.float64()),
        ("attempts", pa.int32()),
        # provenance
        ("zero_stage", pa.int32()),
        ("precision", pa.string()),
        ("num_workers", pa.int32()),
        ("node", pa.string()),
        ("device", pa.string()),
        ("git_commit", pa.string()),
        ("versions", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        ("config", pa.string()),
    ]
)

CURVE_SCHEMA = pa.schema(
    [
        ("trial_id", pa.string()),
        ("step", pa.int32()),
        ("tokens", pa.int64()),
        ("learning_rate", pa.float64()),
        ("train_loss", pa.float64()),
        ("eval_loss", pa.float64()),
        ("eval_accuracy", pa.float64()),
    ]
)


class ResultsError(ValueError):
    """A results file or directory that cannot be read as study results."""


def trials_dir(root: str | os.PathLike) -> Path:
    return Path(root) / "trials"


def curves_dir(root: str | os.PathLike) -> Path:
    return Path(root) / "curves"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, then rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def trial_table(row: dict) -> pa.Table:
    """One trial row as a table of TRIAL_SCHEMA; missing fields become nulls, unknown ones are an error."""
    unknown = set(row) - set(TRIAL_SCHEMA.names)
    if unknown:
        raise KeyError(f"fields not in the trial schema: {sorted(unknown)}")
    if row.get("status") not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {row.get('status')!r}")
    full = {"schema_version": SCHEMA_VERSION, **row}
    return pa.Table.from_pylist([{name: full.get(name) for name in TRIAL_SCHEMA.names}], schema=TRIAL_SCHEMA)


def curve_table(trial_id: str, points: list[dict]) -> pa.Table:
    rows = [{name: {"trial_id": trial_id, **p}.get(name) for name in CURVE_SCHEMA.names} for p in points]
    return pa.Table.from_pylist(rows, schema=CURVE_SCHEMA)


def write_trial(root: str | os.PathLike, row: dict, curve: list[dict]) -> Path:
    """Write a trial's curve, then its row; the row's presence marks the trial complete."""
    trial_id = row["trial_id"]
    table = trial_table(row)
    atomic_write_bytes(curves_dir(root) / f"{trial_id}.parquet", _table_bytes(curve_table(trial_id, curve)))
    path = trials_dir(root) / f"{trial_id}.parquet"
    atomic_write_bytes(path, _table_bytes(table))
    return path


def claims_dir(root: str | os.PathLike) -> Path:
    return Path(root) / "claims"


def completed_ids(root: str | os.PathLike) -> set[str]:
    folder = trials_dir(root)
    if not folder.is_dir():
        return set()
    return {p.stem for p in folder.glob("*.parquet")}


def _read_table(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ResultsError(f"{path}: not a readable Parquet file ({exc})") from None


def _check_trial_table(path: Path, table: pa.Table) -> pa.Table:
    version = table.column("schema_version")[0].as_py() if "schema_version" in table.column_names else None
    if version != SCHEMA_VERSION:
        raise ResultsError(
            f"{path}: written with results schema version {version}, this scaling_lab reads version {SCHEMA_VERSION}"
        )
    return table.select(TRIAL_SCHEMA.names).cast(TRIAL_SCHEMA)


def read_trials(root: str | os.PathLike) -> pa.Table:
    """All trial rows of a results directory as one table (empty with the schema if none)."""
    files = sorted(trials_dir(root).glob("*.parquet"))
    tables = [_check_trial_table(p, _read_table(p)) for p in files]
    return pa.concat_tables(tables) if tables else TRIAL_SCHEMA.empty_table()


def load(root: str | os.PathLike) -> pd.DataFrame:
    """The trial rows of a study as one DataFrame, one row per finished trial."""
    root = Path(root)
    if not root.is_dir():
        raise ResultsError(f"{root}: no such results directory")
    return read_trials(root).to_pandas()


def load_curves(root: str | os.PathLike, trial_ids: list[str] | None = None) -> pd.DataFrame:
    folder = curves_dir(root)
    files = sorted(folder.glob("*.parquet")) if trial_ids is None else [folder / f"{t}.parquet" for t in trial_ids]
    tables = [_read_table(p) for p in files if p.exists()]
    table = pa.concat_tables([t.cast(CURVE_SCHEMA) for t in tables]) if tables else CURVE_SCHEMA.empty_table()
    return table.to_pandas()


def versions_json(packages: list[str]) -> str:
    from importlib import metadata

    found = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return json.dumps(found, sort_keys=True)
