"""What the driver tells a worker group: a frozen, typed contract that both sides build and read through the study
spec's own `build` and `to_dict` (Ray Tune and Ray Train carry it as the plain data `to_dict` makes).

A group either runs a fixed list of trials (`trials`), or is a lane: it takes its trials one at a time from the
study's queue (`queue`, `shape`, `lane`; scaling_lab/trial_queue.py), at most `max_trials` in one worker group.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from scaling_lab.claims import DEFAULT_TIMEOUT_S
from scaling_lab.grid import TrialConfig
from scaling_lab.spec import FaultInjection, Resources, build, to_dict


@dataclass(frozen=True)
class GroupSpec:
    results_dir: str
    cache_dir: str
    base_dir: str
    study: str
    backend: Literal["ray_train", "simulated"] = "ray_train"
    resources: Resources = Resources()
    trials: tuple[dict[str, Any], ...] = ()  # trial configs as TrialConfig.to_dict makes them
    git_commit: str | None = None
    step_time_s: float = 0.0  # the simulated backend sleeps this long per step
    max_retries: int = 2
    run_id: str | None = None
    claim_timeout_s: float = DEFAULT_TIMEOUT_S
    checkpoint_every: int | None = None
    inject_faults: tuple[FaultInjection, ...] = ()
    queue: str | None = None  # the name of the study's trial queue actor; None: run `trials`
    shape: str = ""  # the worker-group shape whose trials the lane takes (shape_of)
    lane: tuple[int, int] | None = None  # (round, index): which lane of which Tune run
    max_trials: int | None = None  # trials one worker group runs at most; a lane then starts a fresh one

    @classmethod
    def from_dict(cls, data: dict) -> GroupSpec:
        return build(cls, data, "group")

    def to_dict(self) -> dict:
        return to_dict(self)

    def configs(self) -> list[TrialConfig]:
        return [TrialConfig.from_dict(trial) for trial in self.trials]


def shape_of(trial: TrialConfig) -> str:
    """The worker-group shape a trial runs on: its resources, as text."""
    return json.dumps(to_dict(trial.resources), sort_keys=True)
