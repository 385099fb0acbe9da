"""Running a study: the grid's unfinished trials, grouped, scheduled by Ray Tune on local Ray or a cluster."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from scaling_lab import results, spec as spec_lib
from scaling_lab.grid import TrialConfig, expand
from scaling_lab.spec import Resources, StudySpec, to_dict
from scaling_lab.study import progress

GROUP_DRIVER_MEMORY = 32 * 2**20  # what a Tune trial that only starts a TorchTrainer reserves, instead of a CPU


class GroupsFailed(RuntimeError):
    """Groups of trials that crashed past their retries (a failing trial alone is recorded as a row instead)."""


@dataclass(frozen=True)
class RunOptions:
    base_dir: Path
    address: str | None = None
    cache_dir: Path | None = None
    step_time_s: float = 0.0
    verbose: bool = False


def git_commit(base_dir: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=base_dir, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def group_trials(trials: list[TrialConfig], per_group: int, slots: int) -> list[list[TrialConfig]]:
    """Split trials into groups that share a model and resources, at most `per_group` each, and at least
    `slots` groups overall where there are enough trials; trials are dealt round-robin so groups take alike time."""
    by_key: dict[tuple, list[TrialConfig]] = defaultdict(list)
    for trial in trials:
        by_key[(trial.model.name, json.dumps(to_dict(trial.resources), sort_keys=True))].append(trial)
    counts = {key: math.ceil(len(members) / per_group) for key, members in by_key.items()}
    while sum(counts.values()) < slots and any(counts[k] < len(by_key[k]) for k in counts):
        key = max((k for k in counts if counts[k] < len(by_key[k])), key=lambda k: len(by_key[k]) / counts[k])
        counts[key] += 1
    groups = []
    for key, members in by_key.items():
        groups.extend(members[i :: counts[key]] for i in range(counts[key]))
    return groups


def concurrency(spec: StudySpec, cluster: dict[str, float]) -> int:
    """How many groups can run at once on the cluster as it is now (the spec's max_concurrent wins)."""
    if spec.execution.max_concurrent:
        return spec.execution.max_concurrent
    fits = []
    for model in spec.models:
        resources = model.resources or spec.execution.resources
        need = {"CPU": resources.workers * resources.cpus_per_worker, "GPU": resources.workers * resources.gpus_per_worker}
        need.update({k: v * resources.workers for k, v in resources.custom.items()})
        fits.append(min(int(cluster.get(k, 0) // v) for k, v in need.items() if v > 0))
    return max(1, max(fits))


def _group_dict(spec: StudySpec, group: list[TrialConfig], options: RunOptions, results_dir: str, commit) -> dict:
    return {
        "trials": [t.to_dict() for t in group],
        "results_dir": str(results_dir),
        "cache_dir": str(options.cache_dir or Path(spec.cache_dir).expanduser()),
        "base_dir": str(options.base_dir),
        "backend": spec.execution.backend,
        "study": spec.name,
        "git_commit": commit,
        "step_time_s": options.step_time_s,
        "cpus_per_worker": group[0].resources.cpus_per_worker,
        "max_retries": spec.execution.max_retries,
    }


def _worker_resources(resources: Resources) -> dict[str, float]:
    return {"CPU": resources.cpus_per_worker, "GPU": resources.gpus_per_worker, **resources.custom}


def run_group_trainable(config: dict) -> dict:
    """The Tune trainable: one Tune trial runs one group, in a Ray Train worker group or, simulated, in-process."""
    group = config["group"]
    if group["backend"] == "simulated":
        from scaling_lab.trial import run_group

        run_group(group)
        return {"trials": len(group["trials"])}

    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from scaling_lab.trial import train_worker_loop

    resources = TrialConfig.from_dict(group["trials"][0]).resources
    ids = "".join(t_id for t_id in (TrialConfig.from_dict(t).trial_id for t in group["trials"]))
    TorchTrainer(
        train_worker_loop,
        train_loop_config=group,
        scaling_config=ScalingConfig(
            num_workers=resources.workers,
            use_gpu=resources.gpus_per_worker > 0,
            resources_per_worker=_worker_resources(resources),
        ),
        run_config=RunConfig(
            name=f"group-{hashlib.sha256(ids.encode()).hexdigest()[:16]}",
            storage_path=f"{results.Store(group['results_dir']).uri}/ray",
            failure_config=FailureConfig(max_failures=group["max_retries"]),
        ),
    ).fit()
    return {"trials": len(group["trials"])}


def _group_request(config: dict):
    from ray import tune

    group = config["group"]
    if group["backend"] == "simulated":
        return tune.PlacementGroupFactory([_worker_resources(TrialConfig.from_dict(group["trials"][0]).resources)])
    return tune.PlacementGroupFactory([{"memory": GROUP_DRIVER_MEMORY}])


def pending_trials(spec: StudySpec, results_dir: str) -> tuple[list[TrialConfig], list[TrialConfig]]:
    trials = expand(spec)
    done = results.completed_ids(results_dir)
    return trials, [t for t in trials if t.trial_id not in done]


def run(spec: StudySpec, options: RunOptions) -> str:
    """Run every unfinished trial of the study; finished trials (by content hash) are never run again."""
    results_dir = spec.results_dir(options.base_dir)
    trials, todo = pending_trials(spec, results_dir)
    store = results.Store(results_dir)
    store.write("spec.yaml", spec_lib.dump(spec).encode())
    if not todo:
        print(f"all {len(trials)} trials of {spec.name!r} are finished in {results_dir}; nothing to run")
        return results_dir

    import ray
    from ray import tune

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    ray.init(address=options.address, log_to_driver=options.verbose, include_dashboard=False,
             configure_logging=False)
    try:
        slots = concurrency(spec, ray.cluster_resources())
        groups = group_trials(todo, spec.execution.trials_per_group, slots)
        commit = git_commit(options.base_dir)
        group_dicts = [_group_dict(spec, g, options, results_dir, commit) for g in groups]
        with progress.LiveProgress(results_dir, [t.trial_id for t in trials], slots) as live:
            live.note(f"{len(todo)} of {len(trials)} trials to run in {len(groups)} groups, {slots} at a time")
            tuner = tune.Tuner(
                tune.with_resources(run_group_trainable, _group_request),
                param_space={"group": tune.grid_search(group_dicts)},
                tune_config=tune.TuneConfig(max_concurrent_trials=slots),
                run_config=tune.RunConfig(
                    name="tune",
                    storage_path=f"{store.uri}/ray",
                    failure_config=tune.FailureConfig(max_failures=spec.execution.max_retries),
                    verbose=0,
                ),
            )
            outcome = tuner.fit()
        failed_groups = [r.error for r in outcome if r.error is not None]
        if failed_groups:
            raise GroupsFailed(f"{len(failed_groups)} of {len(groups)} trial groups failed after retries; "
                               f"first error: {str(failed_groups[0]).strip().splitlines()[-1]}")
    finally:
        ray.shutdown()
    return results_dir
