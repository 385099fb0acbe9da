"""How a run's trials are grouped onto worker groups: pure arithmetic on trial configs and the cluster's size."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Protocol

from scaling_lab.grid import TrialConfig
from scaling_lab.group import GroupSpec, shape_of
from scaling_lab.spec import StudySpec


def group_counts(trials: list[TrialConfig], per_group: int, slots: int) -> dict[str, int]:
    """How many worker groups run the trials of each shape: enough that none runs more than `per_group`, and at
    least `slots` in all where there are enough trials."""
    sizes = Counter(shape_of(t) for t in trials)
    counts = {shape: math.ceil(size / per_group) for shape, size in sizes.items()}
    while sum(counts.values()) < slots and any(counts[k] < sizes[k] for k in counts):
        shape = max((k for k in counts if counts[k] < sizes[k]), key=lambda k: sizes[k] / counts[k])
        counts[shape] += 1
    return counts


def longest_first(trials: list[TrialConfig]) -> list[TrialConfig]:
    """The order the queue hands trials out: higher ranks, the longer trials, first, so that a run ends on short
    trials instead of one slot finishing a long one while the others wait; otherwise the grid's order."""
    return sorted(trials, key=lambda trial: -trial.rank)


def trials_by_shape(trials: list[TrialConfig]) -> dict[str, list[TrialConfig]]:
    by_shape: dict[str, list[TrialConfig]] = defaultdict(list)
    for trial in trials:
        by_shape[shape_of(trial)].append(trial)
    return by_shape


def concurrency(spec: StudySpec, cluster: dict[str, float]) -> int:
    """How many groups can run at once on the cluster as it is now (the spec's max_concurrent wins)."""
    if spec.execution.max_concurrent:
        return spec.execution.max_concurrent
    fits = []
    for model in spec.models:
        resources = model.resources or spec.execution.resources
        per_worker = {"CPU": resources.cpus_per_worker, "GPU": resources.gpus_per_worker, **resources.custom}
        need = {k: v * resources.workers for k, v in per_worker.items()}
        fits.append(min(int(cluster.get(k, 0) // v) for k, v in need.items() if v > 0))
    return max(1, max(fits))


def group_settings(spec: StudySpec, base_dir: Path, cache_dir: Path | None, results_dir: str, commit: str | None,
                   run_id: str) -> GroupSpec:
    """What every group of a run is told, besides its trials or its lane."""
    return GroupSpec(
        results_dir=str(results_dir),
        cache_dir=str(cache_dir or Path(spec.cache_dir).expanduser()),
        base_dir=str(base_dir),
        backend=spec.execution.backend,
        study=spec.name,
        git_commit=commit,
        step_time_s=spec.execution.simulated_step_time_s,
        max_retries=spec.execution.max_retries,
        run_id=run_id,
        claim_timeout_s=spec.execution.claim_timeout_s,
        checkpoint_every=spec.execution.checkpoint_every,
        inject_faults=spec.execution.inject_faults,
    )


def lanes(settings: GroupSpec, trials: list[TrialConfig], slots: int, per_group: int, queue: str,
          round_number: int) -> list[GroupSpec]:
    """One lane per slot (at least one per shape, and none with no trial of its shape to run): each takes trials
    of its shape from the queue, `per_group` at most in one worker group, until the queue has none left."""
    resources = {shape_of(t): t.resources for t in trials}
    shapes = [shape for shape, count in group_counts(trials, len(trials), slots).items() for _ in range(count)]
    return [dataclasses.replace(settings, resources=resources[shape], queue=queue, shape=shape,
                                lane=(round_number, index), max_trials=per_group)
            for index, shape in enumerate(shapes)]


class TrialSource(Protocol):
    def poll(self, done: set[str]) -> tuple[list[TrialConfig], set[str]]:
        """The trials to run now (none of them in `done`), and the shapes to which more may still come."""
        ...


class GridTrials:
    """A fixed list of trials: the grid's, or those `study verify` adds."""

    def __init__(self, trials: list[TrialConfig]):
        self.trials = trials

    def poll(self, done: set[str]) -> tuple[list[TrialConfig], set[str]]:
        return [t for t in self.trials if t.trial_id not in done], set()
