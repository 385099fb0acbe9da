"""Read study results (a results directory, a Parquet file or a CSV file) into one validated table of trials.

Only `rank`, `alpha` and the metric column are required; every other column has a default, so hand-made
files work. Rows with status "error" or "oom" are dropped and counted; "diverged" and "pruned" (stopped early,
see scaling_lab/early_stop.py) rows, and rows whose metric is not finite, stay in as trials worse than any
finite one. A results directory's curves can add each trial's training diagnostics (training_diagnostics.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from scaling_lab import results
from scaling_lab.analysis.training_diagnostics import SPECTRAL_RATIO, read_trial_diagnostics
from scaling_lab.objective import (
    DROPPED_STATUSES,
    RULE_EXPONENTS,
    SPEC_METRIC_COLUMNS,
    WORSE_THAN_ANY_STATUSES,
    effective_scale,
    metric_is_maximized,
    objectives,
)
from scaling_lab.results import ResultsError

REQUIRED_COLUMNS = ("rank", "alpha")
OPTIONAL_COLUMNS = (
    "model",
    "seed",
    "scaling_rule",
    "learning_rate",
    "status",
    "model_params",
    "trainable_params",
    "effective_scale",
)
# Columns that change what a trial measures without being an axis of the analysis: several values get a warning.
POOLED_COLUMNS = (
    "task",
    "lora_init",
    "optimizer",
    "schedule",
    "target_modules",
    "batch_size",
    "seq_len",
    "steps_planned",
    "precision",
)
PROVENANCE_COLUMNS = ("study", "git_commit")
# Kept as they are when present: the trial id joins the curve table's diagnostics, the spectral ratio is one.
PASSED_THROUGH_COLUMNS = ("trial_id", SPECTRAL_RATIO)
DEFAULT_METRIC = "final_eval_loss"


@dataclass(frozen=True)
class MetricChoice:
    """The column to optimize, its direction, and where each came from (for the report and law.json)."""

    column: str
    maximize: bool
    origin: str

    def to_dict(self) -> dict:
        return {"column": self.column, "goal": "maximize" if self.maximize else "minimize", "origin": self.origin}


def choose_metric(source: str | Path, metric: str | None = None, maximize: bool | None = None) -> MetricChoice:
    """The metric a fit of `source` optimizes: --metric / --maximize when given, else the study's `metric` from
    the results directory's spec.yaml, else (a bare file, or a directory without a spec) final_eval_loss."""
    if metric is not None:
        origin = "--metric"
        column = metric
    else:
        spec_metric = read_spec_metric(source)
        if spec_metric is None:
            column, origin = DEFAULT_METRIC, "default (no study spec beside the results)"
        else:
            column = SPEC_METRIC_COLUMNS[spec_metric]
            origin = f"the study spec ({spec_path(source)}: metric: {spec_metric})"
    if maximize is None:
        maximize = metric_is_maximized(column)
    else:
        origin += f"; goal from --{'maximize' if maximize else 'minimize'}"
    return MetricChoice(column, maximize, origin)


def spec_path(source: str | Path) -> str:
    """The results directory's spec.yaml, named as the user named the directory (so reports do not depend on
    where they were made)."""
    return f"{str(source).rstrip('/')}/spec.yaml"


def read_study_spec(source: str | Path) -> dict | None:
    """The study spec in a results directory (its spec.yaml, as plain data), or None for a file or a directory
    without one. A spec.yaml that is not a YAML mapping is an error naming it."""
    if not is_results_directory(source):
        return None
    store = results.as_store(str(source))
    if not store.exists("spec.yaml"):
        return None
    try:
        spec = yaml.safe_load(store.read_bytes("spec.yaml"))
    except yaml.YAMLError:
        spec = None
    if not isinstance(spec, dict):
        raise ResultsError(f"{spec_path(source)}: not a study spec (expected a YAML mapping)")
    return spec


def read_spec_metric(source: str | Path) -> str | None:
    """The `metric` of the study spec in a results directory (eval_loss when the spec leaves it out), or None."""
    spec = read_study_spec(source)
    if spec is None:
        return None
    value = spec.get("metric", "eval_loss")
    if value not in SPEC_METRIC_COLUMNS:
        raise ResultsError(f"{spec_path(source)}: metric: expected one of {list(SPEC_METRIC_COLUMNS)}, got {value!r}")
    return value


@dataclass(frozen=True)
class LoadedResults:
    """Usable trials (status ok, diverged or pruned) with the columns the analysis reads, and what was left out."""

    source: str
    trials: pd.DataFrame = field(repr=False)
    metric: str
    maximize: bool
    n_rows: int
    status_counts: dict[str, int]
    nonfinite_ok: int
    scaling_rules: tuple[str, ...]
    provenance: dict[str, list[str]]
    warnings: tuple[str, ...]
    metric_origin: str = "given by the caller"
    study_spec: dict | None = field(default=None, repr=False, compare=False)  # the results directory's spec.yaml

    @property
    def n_dropped(self) -> int:
        return self.status_counts.get("error", 0) + self.status_counts.get("oom", 0)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "metric": self.metric,
            "goal": "maximize" if self.maximize else "minimize",
            "metric_origin": self.metric_origin,
            "rows": self.n_rows,
            "status_counts": self.status_counts,
            "dropped_error_oom": self.n_dropped,
            "ok_with_nonfinite_metric_counted_diverged": self.nonfinite_ok,
            "scaling_rules": list(self.scaling_rules),
            **self.provenance,
        }


def load_results(
    source: str | Path, metric: str | None = None, maximize: bool | None = None, diagnostics: bool = False
) -> LoadedResults:
    """Read and validate `source` (a results directory, local or at a URI, or a .parquet / .csv file);
    raises ResultsError with a one-line message naming the file. The metric is `metric` when given, else the
    study's (choose_metric). With `diagnostics`, a results directory's curves add each trial's training
    diagnostics to its row (see training_diagnostics)."""
    choice = choose_metric(source, metric, maximize)
    loaded = from_frame(_read_source(str(source), choice.column), choice.column, choice.maximize, source=source)
    loaded = replace(loaded, metric_origin=choice.origin, study_spec=read_study_spec(source))
    if diagnostics and is_results_directory(source) and "trial_id" in loaded.trials:
        summary = read_trial_diagnostics(results.as_store(str(source)), loaded.trials["trial_id"])
        if summary is not None:
            loaded = replace(loaded, trials=loaded.trials.join(summary, on="trial_id"))
    return loaded


def from_frame(
    frame: pd.DataFrame, metric: str = DEFAULT_METRIC, maximize: bool | None = None, source: str | Path = "(table)"
) -> LoadedResults:
    """Validate trials already in memory (columns as in a results file)."""
    maximize = metric_is_maximized(metric) if maximize is None else maximize
    return _normalize(str(source), frame, metric, maximize)


def _read_source(source: str, metric: str) -> pd.DataFrame:
    if is_results_directory(source):
        store = results.as_store(source)
        if not store.list(results.TRIALS, ".parquet"):
            raise ResultsError(f"{source}: no results (expected {results.TRIALS}/*.parquet in it)")
        try:
            return results.load(store)
        except (KeyError, pa.ArrowException) as exc:
            raise ResultsError(
                f"{source}: trial files do not match this scaling_lab's results schema ({_first_line(exc)})"
            ) from None
    path = Path(source)
    if not path.exists():
        raise ResultsError(f"{source}: no such file or directory")
    if path.stat().st_size == 0:
        raise ResultsError(f"{source}: empty file")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return _read_parquet(path, metric)
    if suffix == ".csv":
        return _read_csv(path)
    raise ResultsError(f"{source}: expected a results directory, a .parquet or a .csv file")


def is_results_directory(source: str | Path) -> bool:
    """A local directory, or a URI (s3://, gs://, file://) that does not name a .parquet or .csv file."""
    text = str(source)
    if "://" in text:
        return not text.lower().endswith((".parquet", ".pq", ".csv"))
    return Path(text).is_dir()


def _read_parquet(path: Path, metric: str) -> pd.DataFrame:
    wanted = {*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS, *POOLED_COLUMNS, *PROVENANCE_COLUMNS, metric}
    try:
        names = pq.read_schema(path).names
        return pq.read_table(path, columns=[name for name in names if name in wanted]).to_pandas()
    except (pa.ArrowException, OSError) as exc:
        raise ResultsError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise ResultsError(f"{path}: empty file") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{path}: not a readable CSV file ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _normalize(path: str, raw: pd.DataFrame, metric: str, maximize: bool) -> LoadedResults:
    missing = [name for name in (*REQUIRED_COLUMNS, metric) if name not in raw.columns]
    if missing:
        raise ResultsError(
            f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"(required: {', '.join((*REQUIRED_COLUMNS, metric))}; optional: {', '.join(OPTIONAL_COLUMNS)})"
        )
    if raw.empty:
        raise ResultsError(f"{path}: no result rows")

    status = _text_column(raw, "status", "ok")
    unknown = sorted(set(status.cat.categories) - set(results.STATUSES))
    if unknown:
        raise ResultsError(f"{path}: column status has {unknown}, expected one of {list(results.STATUSES)}")
    status_counts = {name: int(n) for name, n in status.value_counts().items() if n > 0}
    usable = ~status.isin(DROPPED_STATUSES).to_numpy()
    if not usable.any():
        raise ResultsError(f"{path}: no usable trials (every row has status error or oom: {status_counts})")

    frame = raw.loc[usable].reset_index(drop=True)
    status = status[usable].reset_index(drop=True)
    rank = _numeric_column(path, frame, "rank")
    if not (np.isfinite(rank) & (rank >= 1) & (rank == np.round(rank))).all():
        raise ResultsError(f"{path}: column rank must hold positive integers")
    alpha = _numeric_column(path, frame, "alpha")
    if not (np.isfinite(alpha) & (alpha > 0)).all():
        raise ResultsError(f"{path}: column alpha must hold positive finite numbers")
    value = _numeric_column(path, frame, metric)
    learning_rate = (
        _numeric_column(path, frame, "learning_rate") if "learning_rate" in frame else np.full(len(frame), np.nan)
    )
    if (learning_rate <= 0).any():
        raise ResultsError(f"{path}: column learning_rate must hold positive numbers")
    rule = _text_column(frame, "scaling_rule", "standard")
    unknown_rules = sorted(set(rule.cat.categories) - set(RULE_EXPONENTS))
    if unknown_rules:
        raise ResultsError(f"{path}: column scaling_rule has {unknown_rules}, expected one of {list(RULE_EXPONENTS)}")

    warnings = []
    rank = rank.astype(np.int64)
    computed_scale = effective_scale(alpha, rank, rule)
    scale = computed_scale
    if "effective_scale" in frame:
        recorded = _numeric_column(path, frame, "effective_scale")
        scale = np.where(np.isfinite(recorded) & (recorded > 0), recorded, computed_scale)
        disagree = int((~np.isclose(scale, computed_scale, rtol=1e-6)).sum())
        if disagree:
            warnings.append(
                f"effective_scale differs from alpha under its scaling_rule in {disagree} rows; using effective_scale"
            )

    diverged = status.isin(WORSE_THAN_ANY_STATUSES).to_numpy()
    nonfinite_ok = int((~diverged & ~np.isfinite(value)).sum())
    objective = objectives(status, value, maximize)
    model = _text_column(frame, "model", "default")
    trials = pd.DataFrame(
        {
            "model": model.array,
            "model_params": _optional_numeric(path, frame, "model_params"),
            "trainable_params": _optional_numeric(path, frame, "trainable_params"),
            "rank": rank,
            "alpha": alpha,
            "learning_rate": learning_rate,
            "scaling_rule": rule.array,
            "effective_scale": scale,
            "status": status.array,
            "metric": value,
            "objective": objective,
        }
    )
    for name in PASSED_THROUGH_COLUMNS:
        if name in frame:
            trials[name] = frame[name].to_numpy()
    if "seed" in frame:
        trials["seed"] = pd.factorize(frame["seed"])[0]
    else:
        # Without a seed column, repeated trials of one setting count as separate replicates.
        trials["seed"] = trials.groupby(
            ["model", "rank", "alpha", "learning_rate", "scaling_rule"], dropna=False, observed=True
        ).cumcount()

    warnings += _pooled_warnings(frame)
    return LoadedResults(
        source=path,
        trials=trials,
        metric=metric,
        maximize=maximize,
        n_rows=len(raw),
        status_counts=status_counts,
        nonfinite_ok=nonfinite_ok,
        scaling_rules=tuple(sorted(set(rule.unique()))),
        provenance={
            f"{name}s": sorted(str(v) for v in frame[name].dropna().unique())
            for name in PROVENANCE_COLUMNS
            if name in frame
        },
        warnings=tuple(warnings),
    )


def _text_column(frame: pd.DataFrame, name: str, default: str) -> pd.Series:
    """The column as categorical text (fast on a million rows), missing values replaced by `default`."""
    if name not in frame:
        return pd.Series(pd.Categorical.from_codes(np.zeros(len(frame), dtype=int), [default]), index=frame.index)
    values = frame[name].astype("category")
    values = values.cat.rename_categories([str(c) for c in values.cat.categories])
    if values.isna().any():
        if default not in values.cat.categories:
            values = values.cat.add_categories([default])
        values = values.fillna(default)
    return values.cat.remove_unused_categories()


def _numeric_column(path: str, frame: pd.DataFrame, name: str) -> np.ndarray:
    values = pd.to_numeric(frame[name], errors="coerce")
    not_numbers = values.isna() & frame[name].notna()
    if not_numbers.any():
        example = frame[name][not_numbers].iloc[0]
        raise ResultsError(f"{path}: column {name} must be numeric (found {example!r})")
    return values.to_numpy(dtype=float)


def _optional_numeric(path: str, frame: pd.DataFrame, name: str) -> np.ndarray:
    return _numeric_column(path, frame, name) if name in frame else np.full(len(frame), math.nan)


def _pooled_warnings(frame: pd.DataFrame) -> list[str]:
    warnings = []
    for name in POOLED_COLUMNS:
        if name in frame:
            values = frame[name].dropna().unique()
            if len(values) > 1:
                shown = ", ".join(str(v) for v in values[:4]) + (", …" if len(values) > 4 else "")
                warnings.append(
                    f"column {name} has {len(values)} values ({shown}); they are pooled: filter the input to fit one"
                )
    return warnings
