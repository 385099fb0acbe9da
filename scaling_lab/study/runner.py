"""Running a study: the grid's unfinished trials, grouped, scheduled by Ray Tune on local Ray or a cluster."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import itertools
import json
import math
import os
import subprocess
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import yaml

from scaling_lab import claims, results, spec as spec_lib
from scaling_lab.grid import TrialConfig, expand
from scaling_lab.spec import Resources, StudySpec, to_dict
from scaling_lab.study import progress, trial_queue
from scaling_lab.study.ray_storage import ray_storage

GROUP_DRIVER_MEMORY = 32 * 2**20  # what a Tune trial that only starts a TorchTrainer reserves, instead of a CPU
WAIT_POLL_S = 2.0  # how often a driver looks again at trials that another driver is running


class GroupsFailed(RuntimeError):
    """Groups of trials that crashed past their retries (a failing trial alone is recorded as a row instead)."""


class TrialsFailed(RuntimeError):
    """The study ended with trials whose rows say error or oom."""


@dataclass(frozen=True)
class RunOptions:
    base_dir: Path
    address: str | None = None
    cache_dir: Path | None = None
    step_time_s: float = 0.0
    verbose: bool = False
    retry_failed: bool = False


def git_commit(base_dir: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=base_dir, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def shape_of(trial: TrialConfig) -> str:
    """The worker-group shape a trial runs on: its resources, as text."""
    return json.dumps(to_dict(trial.resources), sort_keys=True)


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
    """The order a round's queue hands trials out: higher ranks, the longer trials, first, so that a round ends
    on short trials instead of one slot finishing a long one while the others wait; otherwise the grid's order."""
    return sorted(trials, key=lambda trial: -trial.rank)


def trials_by_shape(trials: list[TrialConfig]) -> dict[str, list[TrialConfig]]:
    by_shape: dict[str, list[TrialConfig]] = defaultdict(list)
    for trial in trials:
        by_shape[shape_of(trial)].append(trial)
    return by_shape


def group_trials(trials: list[TrialConfig], per_group: int, slots: int) -> list[list[TrialConfig]]:
    """Fixed groups of trials of one shape (see group_counts), dealt round-robin so that groups take alike time."""
    counts = group_counts(trials, per_group, slots)
    return [members[i :: counts[shape]] for shape, members in trials_by_shape(trials).items()
            for i in range(counts[shape])]


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


def group_settings(spec: StudySpec, options: RunOptions, results_dir: str, commit, run_id: str) -> dict:
    """What every group of a run is told, besides its trials."""
    return {
        "results_dir": str(results_dir),
        "cache_dir": str(options.cache_dir or Path(spec.cache_dir).expanduser()),
        "base_dir": str(options.base_dir),
        "backend": spec.execution.backend,
        "study": spec.name,
        "git_commit": commit,
        "step_time_s": options.step_time_s or spec.execution.simulated_step_time_s,
        "max_retries": spec.execution.max_retries,
        "run_id": run_id,
        "claim_timeout_s": spec.execution.claim_timeout_s,
        "checkpoint_every": spec.execution.checkpoint_every,
        "inject_faults": to_dict(spec.execution.inject_faults),
    }


def _shaped(settings: dict, resources: Resources) -> dict:
    return {**settings, "resources": to_dict(resources), "cpus_per_worker": resources.cpus_per_worker}


def group_dict(settings: dict, trials: list[TrialConfig]) -> dict:
    """A group that runs the given trials."""
    return {**_shaped(settings, trials[0].resources), "trials": [t.to_dict() for t in trials]}


def lane_dicts(settings: dict, trials: list[TrialConfig], per_group: int, slots: int, queue: str,
               round_number: int) -> list[dict]:
    """The groups of a round that take their trials, at most `per_group` each, from the round's queue."""
    resources = {shape_of(t): t.resources for t in trials}
    shapes = [shape for shape, count in group_counts(trials, per_group, slots).items() for _ in range(count)]
    return [{**_shaped(settings, resources[shape]), "trials": [], "queue": queue, "shape": shape,
             "lane": [round_number, index], "max_trials": per_group} for index, shape in enumerate(shapes)]


def _worker_resources(resources: Resources) -> dict[str, float]:
    return {"CPU": resources.cpus_per_worker, "GPU": resources.gpus_per_worker, **resources.custom}


def run_group_trainable(config: dict) -> None:
    """The Tune trainable: one Tune trial runs one group, in a Ray Train worker group or, simulated, in-process."""
    group = config["group"]
    if "queue" in group and not trial_queue.left(group):
        return  # the groups before this one took every trial: no worker group to start
    if group["backend"] == "simulated":
        from scaling_lab.trial import run_group

        run_group(group)
        return

    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    from scaling_lab.trial import record_cut_short, train_worker_loop

    resources = spec_lib.build(Resources, group["resources"])
    identity = group.get("lane") or [TrialConfig.from_dict(t).trial_id for t in group["trials"]]
    for start in itertools.count():
        name = hashlib.sha256(json.dumps([group["run_id"], identity, start]).encode()).hexdigest()[:16]
        trainer = TorchTrainer(
            train_worker_loop,
            train_loop_config=group,
            scaling_config=ScalingConfig(
                num_workers=resources.workers,
                use_gpu=resources.gpus_per_worker > 0,
                resources_per_worker=_worker_resources(resources),
            ),
            run_config=RunConfig(
                name=f"group-{name}",
                **ray_storage(results.Store(group["results_dir"])),
                # Ray Train retries a worker group that fails to start (a controller failure) without end unless
                # told otherwise: a node short of memory then restarts it forever.
                failure_config=FailureConfig(max_failures=group["max_retries"],
                                             controller_failure_limit=group["max_retries"]),
            ),
        )
        try:
            trainer.fit()
            return
        except TrainingFailedError as exc:
            # Past its retries: the trials the worker group was running become rows (oom or error), and a
            # fresh worker group goes on with the rest; a failure no trial can be blamed for fails the group.
            if not record_cut_short(group, str(exc)):
                raise
            if not _trials_left(group):
                return


def _trials_left(group: dict) -> bool:
    if "queue" in group:
        return trial_queue.pending(group) > 0
    done = results.completed_ids(group["results_dir"])
    return any(TrialConfig.from_dict(t).trial_id not in done for t in group["trials"])


def _group_request(config: dict):
    from ray import tune

    group = config["group"]
    if group["backend"] == "simulated":
        return tune.PlacementGroupFactory([_worker_resources(spec_lib.build(Resources, group["resources"]))])
    return tune.PlacementGroupFactory([{"memory": GROUP_DRIVER_MEMORY}])


def _tune_dirname(trial) -> str:
    """Tune's own id: Tune would otherwise name the folder after the group's values, strings from the spec."""
    return trial.trial_id


def pending_trials(spec: StudySpec, results_dir: str) -> tuple[list[TrialConfig], list[TrialConfig]]:
    trials = expand(spec)
    done = results.completed_ids(results_dir)
    return trials, [t for t in trials if t.trial_id not in done]


def changed_fields(old, new, path: str = "") -> list[str]:
    """Dotted paths of the fields that differ between two plain spec mappings."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [path]
    return [changed for key in sorted(set(old) | set(new), key=str)
            for changed in changed_fields(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))]


def check_results_dir(spec: StudySpec, store: results.Store) -> list[str]:
    """Refuse, before any compute, a results directory this study must not add to: another study's, or one
    holding rows that cannot be read (corrupt, or another results schema). Returns the spec fields changed
    since the last run there."""
    changed = []
    if store.exists("spec.yaml"):
        try:
            previous = yaml.safe_load(store.read_bytes("spec.yaml"))
        except yaml.YAMLError:
            previous = None
        if not isinstance(previous, dict):
            raise results.ResultsError(f"{store.path('spec.yaml')}: not a study spec; move it away or choose "
                                       f"another output_dir")
        with contextlib.suppress(spec_lib.SpecError):  # with today's defaults, so that new settings read as unchanged
            previous = to_dict(spec_lib.build(StudySpec, previous))
        if previous.get("name") != spec.name:
            raise results.ResultsError(f"{store}: holds the results of study {previous.get('name')!r}, not "
                                       f"{spec.name!r}; choose another output_dir")
        changed = changed_fields(previous, to_dict(spec))
    try:
        results.read_trials(store)
    except results.ResultsError as exc:
        raise results.ResultsError(f"{exc}; nothing was run: move or delete that file (its trial then runs again) "
                                   f"or choose another output_dir") from None
    return changed


def set_aside_failures(spec: StudySpec, results_dir: str) -> list[str]:
    """Move the rows of the study's failed trials (error, oom) to failed/, so that they run again."""
    from scaling_lab.search.space import study_trial_ids

    store = results.Store(results_dir)
    wanted = set(study_trial_ids(spec, results_dir))
    rows = results.read_trials(store).select(["trial_id", "status"]).to_pylist()
    failed = [r["trial_id"] for r in rows if r["status"] in ("error", "oom") and r["trial_id"] in wanted]
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for trial_id in failed:
        results.set_aside_failed(store, trial_id, stamp)
    return failed


def _write_problem(store: results.Store, failure: BaseException) -> str | None:
    """Why the results directory has no room to work in (a full disk, say), or None if it has."""
    chain = []
    while failure is not None and len(chain) < 20:
        chain.append(str(failure))
        failure = failure.__cause__ or failure.__context__
    if any(os.strerror(errno.ENOSPC) in text for text in chain):
        return f"{store}: cannot write ({os.strerror(errno.ENOSPC)})"
    try:
        store.write(".write-probe", bytes(2**20))  # a MiB: a few freed blocks are not room to work in
    except results.ResultsError as exc:
        return str(exc)
    store.delete(".write-probe")
    return None


@contextlib.contextmanager
def full_disk_named(store: results.Store):
    """Ray fails in obscure ways (an EOFError while unpickling, a failed group) once the results disk is full:
    any failure while the results directory cannot be written becomes one line that names the cause."""
    try:
        yield
    except Exception as exc:
        if problem := _write_problem(store, exc):
            raise GroupsFailed(f"{problem}; the study stopped: run it again once there is room") from None
        raise


def connect_ray(options: RunOptions) -> None:
    """The cluster at --address or RAY_ADDRESS, else a fresh local instance: left to itself, ray.init would join
    whatever cluster was last started on this machine."""
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Ctrl-C stops the study: Tune would otherwise catch it, end the round, and the next round would start.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    ray.init(address=options.address or os.environ.get("RAY_ADDRESS") or "local", log_to_driver=options.verbose,
             include_dashboard=False, configure_logging=False)


def run(spec: StudySpec, options: RunOptions) -> str:
    """Run every unfinished trial of the study; finished trials (by content hash) are never run again, and
    trials that another driver is running are waited for, not run twice."""
    results_dir = spec.results_dir(options.base_dir)
    store = results.Store(results_dir)
    changed = check_results_dir(spec, store)
    if options.retry_failed:
        retried = set_aside_failures(spec, results_dir)
        print(f"failed trials to run again: {len(retried)}; their rows are kept in {store.path(results.FAILED)}")
    trials, todo = pending_trials(spec, results_dir)
    if changed and spec.search.method == "adaptive":
        print(f"the spec changed since the last run in {results_dir}: {', '.join(changed)}; finished rows are kept, "
              f"and the search goes on from those that fit the current spec")
    elif changed:
        outside = len(results.completed_ids(store) - {t.trial_id for t in trials})
        print(f"the spec changed since the last run in {results_dir}: {', '.join(changed)}; finished rows are kept "
              f"({outside} not in the current grid); {len(todo)} of {len(trials)} trials to run")
    store.write("spec.yaml", spec_lib.dump(spec).encode())
    store.remove_stale_temporaries(older_than_s=spec.execution.claim_timeout_s)
    with full_disk_named(store):
        if spec.search.method == "adaptive":  # α chosen as results come in: scaling_lab/search/tune_searcher.py
            from scaling_lab.search.tune_searcher import run_adaptive

            run_adaptive(spec, options, results_dir)
        elif not todo:
            print(f"all {len(trials)} trials of {spec.name!r} are finished in {results_dir}; nothing to run")
        else:
            _run_rounds(spec, options, results_dir, trials)
    return results_dir


def run_trials(spec: StudySpec, options: RunOptions, trials: list[TrialConfig]) -> str:
    """Run the given trials of `spec`'s study (not its grid) into its results directory, as `run` runs the grid:
    finished ones are skipped, running ones waited for. The directory's spec.yaml is left as it is, so that the
    study's own `run`, `status` and `fit` see the study they ran (`study verify` adds trials this way)."""
    results_dir = spec.results_dir(options.base_dir)
    store = results.Store(results_dir)
    check_results_dir(spec, store)
    done = results.completed_ids(store)
    todo = [t for t in trials if t.trial_id not in done]
    if not todo:
        print(f"all {len(trials)} trials are finished in {results_dir}; nothing to run")
        return results_dir
    print(f"{len(todo)} of {len(trials)} trials to run in {results_dir}")
    store.remove_stale_temporaries(older_than_s=spec.execution.claim_timeout_s)
    with full_disk_named(store):
        _run_rounds(spec, options, results_dir, trials)
    return results_dir


def _run_rounds(spec: StudySpec, options: RunOptions, results_dir: str, trials: list[TrialConfig]) -> None:
    """Tune runs over the unfinished trials, until none is left."""
    import ray
    from ray import tune

    store = results.Store(results_dir)
    connect_ray(options)
    run_id = uuid.uuid4().hex
    try:
        slots = concurrency(spec, ray.cluster_resources())
        settings = group_settings(spec, options, results_dir, git_commit(options.base_dir), run_id)
        with progress.LiveProgress(results_dir, [t.trial_id for t in trials], slots) as live:
            # Rounds: run the free trials; wait for those another driver runs, and run any it abandons.
            left_after_last_round = elsewhere_noted = None
            for round_number in itertools.count():
                done = results.completed_ids(results_dir)
                todo = [t for t in trials if t.trial_id not in done]
                if not todo:
                    break
                elsewhere = set(claims.held_elsewhere(store, [t.trial_id for t in todo], run_id))
                if elsewhere and len(elsewhere) != elsewhere_noted:
                    live.note(f"{len(elsewhere)} trials are running elsewhere (claimed by another driver); "
                              f"waiting for them")
                    elsewhere_noted = len(elsewhere)
                runnable = [t for t in todo if t.trial_id not in elsewhere]
                if not runnable or len(todo) == left_after_last_round:  # the last round's were all taken meanwhile
                    time.sleep(WAIT_POLL_S)
                    left_after_last_round = None
                    continue
                queue = f"trial-queue-{run_id}-{round_number}"
                ordered = trials_by_shape(longest_first(runnable))
                queue_actor = trial_queue.start(queue, {shape: [t.to_dict() for t in members]
                                                        for shape, members in ordered.items()})
                groups = lane_dicts(settings, runnable, spec.execution.trials_per_group, slots, queue, round_number)
                live.note(f"{len(runnable)} of {len(trials)} trials to run in {len(groups)} groups, {slots} at a time")
                tuner = tune.Tuner(
                    tune.with_resources(run_group_trainable, _group_request),
                    param_space={"group": tune.grid_search(groups)},
                    tune_config=tune.TuneConfig(max_concurrent_trials=slots, trial_dirname_creator=_tune_dirname),
                    run_config=tune.RunConfig(
                        name=f"tune-{run_id[:12]}-{round_number}",
                        **ray_storage(store),
                        failure_config=tune.FailureConfig(max_failures=spec.execution.max_retries),
                        verbose=0,
                    ),
                )
                try:
                    outcome = tuner.fit()
                finally:
                    ray.kill(queue_actor)
                failed_groups = [r.error for r in outcome if r.error is not None]
                if failed_groups:
                    raise GroupsFailed(f"{len(failed_groups)} of {len(groups)} trial groups failed after retries; "
                                       f"first error: {str(failed_groups[0]).strip().splitlines()[-1]}")
                left_after_last_round = len(todo)
    finally:
        ray.shutdown()
