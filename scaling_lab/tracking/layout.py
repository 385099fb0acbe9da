"""What an experiment tracker receives from a study, the same for every tracker and for export and live logging.

One run per trial: its axes and settings as parameters, its curve as metrics by step, its final metrics, its
status and id as tags. One study-level run: the study's counts, and its analysis (law.json, report, plots) and
spec as artifacts. A trial's `finished_at` tells whether a tracker already holds the trial as it is now.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

PARAMETERS = (
    "model", "rank", "alpha", "learning_rate", "seed", "scaling_rule", "effective_scale", "peft_lora_alpha",
    "use_rslora", "model_source", "model_params", "trainable_params", "task", "target_modules", "lora_init",
    "optimizer", "schedule", "batch_size", "seq_len", "steps_planned", "zero_stage", "precision", "num_workers",
)
FINAL_METRICS = (
    "initial_eval_loss", "final_eval_loss", "best_eval_loss", "final_eval_accuracy", "best_eval_accuracy",
    "final_train_loss", "last_finite_train_loss", "spectral_ratio_mean", "spectral_ratio_max", "steps", "tokens",
    "wall_time_s", "train_time_s", "tokens_per_s", "peak_memory_mb", "attempts",
)
CURVE_METRICS = (
    "train_loss", "eval_loss", "eval_accuracy", "learning_rate", "lora_a_norm", "lora_b_norm", "update_norm",
    "grad_a_norm", "grad_b_norm", "probe_loss", "signal", "drift", "drift_ratio",
)
TAG_PREFIX = "scaling_lab."
MAX_ERROR_TAG_CHARS = 500


@dataclass(frozen=True)
class TrialRecord:
    trial_id: str
    study: str
    run_name: str
    status: str
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    parameters: dict[str, Any]
    tags: dict[str, str]
    final_metrics: dict[str, float]
    steps: tuple[tuple[int, dict[str, float]], ...]  # (step, {metric: value}) in step order

    @property
    def finished_key(self) -> str:
        """What tells two exports of the same trial apart: a trial run again (--retry-failed) finishes later."""
        return self.finished_at.isoformat() if self.finished_at else ""

    @property
    def last_step(self) -> int:
        return self.steps[-1][0] if self.steps else int(self.final_metrics.get("steps", 0))


@dataclass(frozen=True)
class StudyRecord:
    name: str
    source: str  # the results directory or URI
    trials: int
    statuses: dict[str, int]
    artifacts: dict[str, bytes] = field(default_factory=dict)  # file name -> content


def _plain(value: Any) -> Any:
    """numpy scalars as Python ones (rows and curves otherwise hold Python values: pyarrow's to_pylist)."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value


def _metric_value(value: Any) -> float | None:
    value = _plain(value)
    if value is None or isinstance(value, (str, bytes, dt.datetime)):
        return None
    return float(value)


def _timestamp(value: Any) -> dt.datetime | None:
    value = _plain(value)
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    return None


def run_name(row: Mapping[str, Any]) -> str:
    return (f"{row.get('model')} r={_plain(row.get('rank'))} α={_plain(row.get('alpha')):.4g} "
            f"lr={_plain(row.get('learning_rate')):.3g} seed={_plain(row.get('seed'))}")


def trial_record(row: Mapping[str, Any], curve: list[Mapping[str, Any]]) -> TrialRecord:
    """A trial's row (a results row as a mapping) and its curve points (mappings with `step`) as a record."""
    parameters = {name: _plain(row.get(name)) for name in PARAMETERS if _plain(row.get(name)) is not None}
    final = {name: _metric_value(row.get(name)) for name in FINAL_METRICS}
    final = {name: value for name, value in final.items() if value is not None}
    steps = []
    for point in sorted(curve, key=lambda p: int(_plain(p["step"]))):
        values = {name: _metric_value(point.get(name)) for name in CURVE_METRICS}
        values = {name: value for name, value in values.items() if value is not None and not math.isnan(value)}
        if values:
            steps.append((int(_plain(point["step"])), values))
    error = (_plain(row.get("error")) or "").strip()
    tags = {
        "trial_id": str(row["trial_id"]),
        "status": str(row["status"]),
        "study": str(row.get("study")),
        "device": str(_plain(row.get("device")) or ""),
        "git_commit": str(_plain(row.get("git_commit")) or ""),
    }
    if error:
        tags["error"] = error.splitlines()[0][:MAX_ERROR_TAG_CHARS]
    return TrialRecord(
        trial_id=str(row["trial_id"]),
        study=str(row.get("study")),
        run_name=run_name(row),
        status=str(row["status"]),
        started_at=_timestamp(row.get("started_at")),
        finished_at=_timestamp(row.get("finished_at")),
        parameters=parameters,
        tags={name: value for name, value in tags.items() if value},
        final_metrics=final,
        steps=tuple(steps),
    )
