"""Typed trial results: the Parquet schema, atomic writes, and loading a study.

Layout of a results directory:
    <dir>/spec.yaml                  the study spec the results were produced under
    <dir>/trials/<trial_id>.parquet  one row per finished trial (written last: it marks completion)
    <dir>/curves/<trial_id>.parquet  the trial's loss curve, one row per logged step
    <dir>/claims/<trial_id>.json     a running trial's claim (owner, heartbeat); removed when it ends
    <dir>/checkpoints/<trial_id>/    in-trial checkpoints of a running trial; removed when its row is written
    <dir>/failed/<trial_id>.<time>.parquet  rows of failed trials set aside by `run --retry-failed`

File names under the directory derive from trial ids (hashes) only, never from strings in a spec.

The directory may also be a URI (s3://bucket/prefix, gs://..., file://...), read and written through pyarrow's
filesystems, so that trials on any node write where the driver and the analysis read.

This module imports only pyarrow and pandas so that the analysis can use it without ray or torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
STATUSES = ("ok", "diverged", "oom", "error", "pruned")  # pruned: stopped early by training.early_stop

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
        ("model_revision", pa.string()),  # as the spec asked (null: the hub's default branch)
        ("model_commit", pa.string()),  # the hub commit the weights came from
        ("model_params", pa.int64()),
        ("trainable_params", pa.int64()),
        ("task", pa.string()),
        ("data_revision", pa.string()),
        ("target_modules", pa.string()),
        ("lora_init", pa.string()),
        ("optimizer", pa.string()),
        ("schedule", pa.string()),
        ("batch_size", pa.int32()),
        ("micro_batch_size", pa.int32()),  # per worker and forward pass
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
        ("spectral_ratio_mean", pa.float64()),
        ("spectral_ratio_max", pa.float64()),
        ("final_train_loss", pa.float64()),
        ("last_finite_train_loss", pa.float64()),
        ("steps", pa.int32()),
        ("tokens", pa.int64()),
        ("wall_time_s", pa.float64()),
        ("train_time_s", pa.float64()),
        ("setup_time_s", pa.float64()),
        ("data_time_s", pa.float64()),
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
        # diagnostics every training.diagnostics_every steps (definitions in scaling_lab/diagnostics.py)
        ("lora_a_norm", pa.float64()),
        ("lora_b_norm", pa.float64()),
        ("update_norm", pa.float64()),
        ("grad_a_norm", pa.float64()),
        ("grad_b_norm", pa.float64()),
        ("probe_loss", pa.float64()),
        ("signal", pa.float64()),
        ("drift", pa.float64()),
        ("drift_ratio", pa.float64()),
    ]
)


TRIALS, CURVES, CLAIMS = "trials", "curves", "claims"
CHECKPOINTS, FAILED = "checkpoints", "failed"


class ResultsError(ValueError):
    """A results file or directory that cannot be read or written as study results."""


class Store:
    """A results directory on the local filesystem or at a URI (s3://, gs://, file://) via pyarrow filesystems.

    Writes are atomic for readers: locally a temporary sibling is fsynced and renamed into place; object stores
    make an object visible only once its upload completes.
    """

    def __init__(self, root: str | os.PathLike):
        root = str(root)
        if "://" in root:
            self.fs, self.root = pafs.FileSystem.from_uri(root)
            self.uri = root.split("?")[0]
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(root).expanduser().resolve())
            self.uri = self.root
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def __str__(self) -> str:
        return self.uri

    def path(self, relative: str) -> str:
        return f"{self.root.rstrip('/')}/{relative}"

    def is_dir(self) -> bool:
        return self.fs.get_file_info(self.root).type == pafs.FileType.Directory

    def exists(self, relative: str) -> bool:
        return self.fs.get_file_info(self.path(relative)).type == pafs.FileType.File

    def list(self, folder: str, suffix: str) -> list[str]:
        """File names (not paths) in `folder` ending in `suffix`, sorted; hidden temporaries are skipped."""
        selector = pafs.FileSelector(self.path(folder), allow_not_found=True)
        names = (info.base_name for info in self.fs.get_file_info(selector) if info.type == pafs.FileType.File)
        return sorted(n for n in names if n.endswith(suffix) and not n.startswith("."))

    def write(self, relative: str, data: bytes) -> None:
        """Write a whole file; a failure (disk full, no permission) raises ResultsError and leaves no partial file."""
        self._put(relative, data, exclusive=False)

    def create_exclusive(self, relative: str, data: bytes) -> bool:
        """Create a file only if none exists by that name; False if one does.

        Locally this is atomic: a complete temporary file is hard-linked into place, which fails if the name is
        taken. Object stores can only check, then write: two creators in the same instant may both succeed.
        """
        return self._put(relative, data, exclusive=True)

    def _put(self, relative: str, data: bytes, exclusive: bool) -> bool:
        target = self.path(relative)
        try:
            if not self.local:
                if exclusive and self.exists(relative):
                    return False
                with self.fs.open_output_stream(target) as out:
                    out.write(data)
                return True
            path = Path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                if not exclusive:
                    os.replace(tmp, path)
                    return True
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
                return True
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            reason = exc.strerror or str(exc).splitlines()[0]
            raise ResultsError(f"{target}: cannot write ({reason})") from None

    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open_input_stream(self.path(relative)) as stream:
            return stream.read()

    def read_table(self, relative: str) -> pa.Table:
        try:
            return pq.read_table(self.path(relative), filesystem=self.fs)
        except (pa.ArrowInvalid, OSError) as exc:
            reason = str(exc).replace(f"Could not open Parquet input source '{self.path(relative)}': ", "")
            raise ResultsError(f"{self.path(relative)}: not a readable Parquet file ({reason})") from None

    def delete(self, relative: str) -> None:
        try:
            self.fs.delete_file(self.path(relative))
        except FileNotFoundError:
            pass

    def delete_folder(self, relative: str) -> None:
        try:
            self.fs.delete_dir(self.path(relative))
        except FileNotFoundError:
            pass

    def remove_stale_temporaries(self, older_than_s: float) -> int:
        """Delete temporaries that writers killed mid-write left behind (hidden, never read); returns how many."""
        if not self.local:
            return 0
        removed = 0
        for folder in (TRIALS, CURVES, CLAIMS):
            for tmp in Path(self.path(folder)).glob(".*.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - tmp.stat().st_mtime > older_than_s:
                        tmp.unlink()
                        removed += 1
        return removed


def _table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def as_store(root: str | os.PathLike | Store) -> Store:
    return root if isinstance(root, Store) else Store(root)


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


def write_trial(root: str | os.PathLike | Store, row: dict, curve: list[dict]) -> None:
    """Write a trial's curve, then its row; the row's presence marks the trial complete."""
    store = as_store(root)
    trial_id = row["trial_id"]
    table = trial_table(row)
    store.write(f"{CURVES}/{trial_id}.parquet", _table_bytes(curve_table(trial_id, curve)))
    store.write(f"{TRIALS}/{trial_id}.parquet", _table_bytes(table))


def completed_ids(root: str | os.PathLike | Store) -> set[str]:
    return {name.removesuffix(".parquet") for name in as_store(root).list(TRIALS, ".parquet")}


def set_aside_failed(root: str | os.PathLike | Store, trial_id: str, stamp: str) -> None:
    """Move a trial's row and curve to failed/<id>.<stamp>[.curve].parquet, so that the trial runs again."""
    store = as_store(root)
    for relative, kept in [(f"{TRIALS}/{trial_id}.parquet", f"{FAILED}/{trial_id}.{stamp}.parquet"),
                           (f"{CURVES}/{trial_id}.parquet", f"{FAILED}/{trial_id}.{stamp}.curve.parquet")]:
        if store.exists(relative):
            store.write(kept, store.read_bytes(relative))
            store.delete(relative)


def _check_trial_table(path: str, table: pa.Table) -> pa.Table:
    version = table.column("schema_version")[0].as_py() if "schema_version" in table.column_names else None
    if version != SCHEMA_VERSION:
        raise ResultsError(
            f"{path}: written with results schema version {version}, this scaling_lab reads version {SCHEMA_VERSION}"
        )
    return _conform(table, TRIAL_SCHEMA)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """The table in `schema`; columns added to a schema later read as nulls in files written before."""
    for field in schema:
        if field.name not in table.column_names:
            table = table.append_column(field.name, pa.nulls(table.num_rows, field.type))
    return table.select(schema.names).cast(schema)


def read_trials(root: str | os.PathLike | Store) -> pa.Table:
    """All trial rows of a results directory as one table (empty with the schema if none)."""
    store = as_store(root)
    tables = []
    for name in store.list(TRIALS, ".parquet"):
        relative = f"{TRIALS}/{name}"
        tables.append(_check_trial_table(store.path(relative), store.read_table(relative)))
    return pa.concat_tables(tables) if tables else TRIAL_SCHEMA.empty_table()


def load(root: str | os.PathLike | Store) -> pd.DataFrame:
    """The trial rows of a study as one DataFrame, one row per finished trial."""
    store = as_store(root)
    if not store.is_dir():
        raise ResultsError(f"{store}: no such results directory")
    return read_trials(store).to_pandas()


def load_curves(root: str | os.PathLike | Store, trial_ids: list[str] | None = None) -> pd.DataFrame:
    store = as_store(root)
    # curves of finished trials only: a curve without its row was left by an attempt that did not finish
    names = [f"{t}.parquet" for t in (sorted(completed_ids(store)) if trial_ids is None else trial_ids)]
    tables = [_conform(store.read_table(f"{CURVES}/{n}"), CURVE_SCHEMA) for n in names if store.exists(f"{CURVES}/{n}")]
    return (pa.concat_tables(tables) if tables else CURVE_SCHEMA.empty_table()).to_pandas()


def versions_json(packages: list[str]) -> str:
    """The installed versions of `packages` (those installed) and of Python (builtin text tasks depend on it)."""
    import platform
    from importlib import metadata

    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return json.dumps(found, sort_keys=True)

