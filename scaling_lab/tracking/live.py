"""Live logging from inside the trials: a group's worker logs each trial to the spec's trackers once its row is
written, in the layout `results export` uses (so a later export finds those runs and leaves them alone).

A tracker that fails costs a warning on the worker's stderr, never the trial: the row is already written, and
`python -m scaling_lab.results export` can log it later.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from scaling_lab import results
from scaling_lab.spec_base import build
from scaling_lab.tracking.layout import StudyRecord, trial_record
from scaling_lab.tracking.settings import TrackingSettings


class TrialLogger:
    def __init__(self, settings: TrackingSettings, study: str, source: str, base_dir: Path):
        from scaling_lab.tracking import open_tracker

        self.trackers = []
        for name in settings.to:
            try:
                tracker = open_tracker(name, study, tracking_uri=settings.mlflow_tracking_uri,
                                       logdir=settings.tensorboard_logdir, project=settings.wandb_project,
                                       wandb_dir=settings.wandb_dir, base_dir=base_dir)
                tracker.start_study(StudyRecord(study, source, 0, {}))
                self.trackers.append(tracker)
            except Exception as exc:
                _warn(name, "cannot be opened", exc)

    @classmethod
    def for_group(cls, group, store: results.Store) -> TrialLogger | None:
        """The logger the study's spec.yaml asks for (the driver writes it before any trial), or None."""
        if not store.exists("spec.yaml"):
            return None
        try:
            data = yaml.safe_load(store.read_bytes("spec.yaml")) or {}
            settings = build(TrackingSettings, data.get("tracking") or {}, "tracking")
        except Exception as exc:  # a spec.yaml from before tracking existed reads as no tracking
            _warn("tracking", "settings unreadable", exc)
            return None
        if not settings.to:
            return None
        return cls(settings, group.study, str(store), Path(group.base_dir))

    def log(self, row: dict, curve: list[dict]) -> None:
        record = trial_record(row, curve)
        for tracker in self.trackers:
            try:
                tracker.log_trial(record)
            except Exception as exc:
                _warn(tracker.name, f"could not log trial {record.trial_id}", exc)


def _warn(name: str, what: str, exc: BaseException) -> None:
    reason = " ".join(str(exc).split())[:300]
    print(f"warning: tracking: {name} {what} ({type(exc).__name__}: {reason}); `python -m scaling_lab.results "
          f"export` logs the trial later", file=sys.stderr)
