"""Ray Tune's side of a run: the trainable that runs one group, what it reserves, and the one place that builds a
Tuner. A Tune trial here is a lane (or a fixed group of trials) in one Ray Train worker group."""

from __future__ import annotations

import hashlib
import itertools
import json
import os

from scaling_lab import results, trial_queue
from scaling_lab.group import GroupSpec
from scaling_lab.spec import Resources
from scaling_lab.study.ray_storage import ray_storage

GROUP_DRIVER_MEMORY = 32 * 2**20  # what a Tune trial that only starts a TorchTrainer reserves, instead of a CPU


class GroupsFailed(RuntimeError):
    """Groups of trials that crashed past their retries (a failing trial alone is recorded as a row instead)."""


def connect_ray(address: str | None, verbose: bool) -> None:
    """The cluster at --address or RAY_ADDRESS, else a fresh local instance: left to itself, ray.init would join
    whatever cluster was last started on this machine."""
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Ctrl-C stops the study: Tune would otherwise catch it and end the run as if it had finished.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", log_to_driver=verbose,
             include_dashboard=False, configure_logging=False)


def _worker_resources(resources: Resources) -> dict[str, float]:
    return {"CPU": resources.cpus_per_worker, "GPU": resources.gpus_per_worker, **resources.custom}


def _more_to_run(group: GroupSpec) -> bool:
    if group.queue:
        return trial_queue.start_worker_group(group)
    done = results.completed_ids(group.results_dir)
    return any(trial.trial_id not in done for trial in group.configs())


def run_group_trainable(config: dict) -> None:
    """The Tune trainable: one Tune trial runs one group (a GroupSpec's dict), in a Ray Train worker group or,
    simulated, in-process. A lane starts a fresh worker group after `max_trials` trials, until it has none left."""
    from scaling_lab.trial import run_group

    group = GroupSpec.from_dict(config["group"])
    if group.queue and not trial_queue.start_worker_group(group):
        return  # the lanes before this one took every trial, or will have run them before a worker group starts
    if group.backend == "simulated":
        run_group(group)
        while group.queue:
            trial_queue.release(group)
            if not _more_to_run(group):
                return
            run_group(group)
        return

    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    from scaling_lab.trial import record_cut_short, train_worker_loop

    identity = list(group.lane) if group.lane else [trial.trial_id for trial in group.configs()]
    for start in itertools.count():
        name = hashlib.sha256(json.dumps([group.run_id, identity, start]).encode()).hexdigest()[:16]
        trainer = TorchTrainer(
            train_worker_loop,
            train_loop_config=group.to_dict(),
            scaling_config=ScalingConfig(
                num_workers=group.resources.workers,
                use_gpu=group.resources.gpus_per_worker > 0,
                resources_per_worker=_worker_resources(group.resources),
            ),
            run_config=RunConfig(
                name=f"group-{name}",
                **ray_storage(results.Store(group.results_dir)),
                # Ray Train retries a worker group that fails to start (a controller failure) without end unless
                # told otherwise: a node short of memory then restarts it forever.
                failure_config=FailureConfig(max_failures=group.max_retries,
                                             controller_failure_limit=group.max_retries),
            ),
        )
        if group.queue:
            trial_queue.starting(group)
        try:
            trainer.fit()
            if not group.queue:
                return
        except TrainingFailedError as exc:
            # Past its retries: the trials the worker group was running become rows (oom or error), and a
            # fresh worker group goes on with the rest; a failure no trial can be blamed for fails the group.
            if not record_cut_short(group, str(exc)):
                raise
        if group.queue:
            trial_queue.release(group)  # its last trial has a row: a fresh worker group need not take it back
        if not _more_to_run(group):
            return


def _group_request(config: dict):
    from ray import tune

    group = GroupSpec.from_dict(config["group"])
    if group.backend == "simulated":
        return tune.PlacementGroupFactory([_worker_resources(group.resources)])
    return tune.PlacementGroupFactory([{"memory": GROUP_DRIVER_MEMORY}])


def _tune_dirname(trial) -> str:
    """Tune's own id: Tune would otherwise name the folder after the group's values, strings from the spec."""
    return trial.trial_id


def tuner(groups: list[GroupSpec], slots: int, store: results.Store, name: str, max_retries: int,
          callbacks: list | None = None):
    """The Tuner that runs the given groups (lanes), `slots` at a time."""
    from ray import tune

    return tune.Tuner(
        tune.with_resources(run_group_trainable, _group_request),
        param_space={"group": tune.grid_search([group.to_dict() for group in groups])},
        tune_config=tune.TuneConfig(max_concurrent_trials=slots, trial_dirname_creator=_tune_dirname),
        run_config=tune.RunConfig(
            name=name,
            **ray_storage(store),
            failure_config=tune.FailureConfig(max_failures=max_retries),
            callbacks=callbacks,
            verbose=0,
        ),
    )


def fit(tune_run, groups: int) -> None:
    """Run the Tuner; GroupsFailed names the first error of the groups that failed past their retries."""
    outcome = tune_run.fit()
    failed_groups = [r.error for r in outcome if r.error is not None]
    if failed_groups:
        raise GroupsFailed(f"{len(failed_groups)} of {groups} trial groups failed after retries; "
                           f"first error: {str(failed_groups[0]).strip().splitlines()[-1]}")

