"""Running a study: its unfinished trials (the grid's, or those the adaptive search proposes), taken from one
study-long queue by one lane per slot, scheduled by Ray Tune on local Ray or a cluster."""

from __future__ import annotations

import contextlib
import itertools
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from scaling_lab import claims, results, spec as spec_lib, trial_queue
from scaling_lab.grid import TrialConfig, expand
from scaling_lab.spec import StudySpec
from scaling_lab.study import progress, tune_wiring
from scaling_lab.study.grouping import GridTrials, TrialSource, concurrency, group_settings, lanes
from scaling_lab.study.results_checks import check_results_dir, full_disk_named, pending_trials, set_aside_failures
from scaling_lab.study.tune_wiring import GroupsFailed

WAIT_POLL_S = 2.0  # how often a driver looks again at trials that another driver is running


class TrialsFailed(RuntimeError):
    """The study ended with trials whose rows say error or oom."""


@dataclass(frozen=True)
class RunOptions:
    base_dir: Path
    address: str | None = None
    cache_dir: Path | None = None
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
        if spec.search.method == "adaptive":  # α chosen as results come in: scaling_lab/search/async_search.py
            from scaling_lab.search.async_search import AsyncSearch
            from scaling_lab.search.space import SearchSpace, read_rows

            search = AsyncSearch(SearchSpace(spec), lambda: read_rows(store), note=_note)
            started = time.monotonic()
            _run_lanes(spec, options, results_dir, trials, search, live_progress=False)
            _note(f"adaptive search finished in {time.monotonic() - started:.0f} s")
        elif not todo:
            print(f"all {len(trials)} trials of {spec.name!r} are finished in {results_dir}; nothing to run")
        else:
            _run_lanes(spec, options, results_dir, trials, GridTrials(trials))
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
        _run_lanes(spec, options, results_dir, trials, GridTrials(trials))
    return results_dir


def _note(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def _run_lanes(spec: StudySpec, options: RunOptions, results_dir: str, trials: list[TrialConfig],
               source: TrialSource, live_progress: bool = True) -> None:
    """One Tune run whose lanes take the source's trials from one queue until it has none left; again, for
    trials another driver held and abandoned meanwhile, until the source has nothing left to run."""
    import ray

    from scaling_lab.study.feeder import QueueFeeder  # imports Ray Tune

    store = results.Store(results_dir)
    tune_wiring.connect_ray(options.address, options.verbose)
    run_id = uuid.uuid4().hex
    try:
        slots = concurrency(spec, ray.cluster_resources())
        settings = group_settings(spec, options.base_dir, options.cache_dir, results_dir,
                                  git_commit(options.base_dir), run_id)
        watch = progress.LiveProgress(results_dir, [t.trial_id for t in trials], slots) if live_progress else None
        with watch or contextlib.nullcontext():
            elsewhere_noted = None
            for round_number in itertools.count():
                wanted, open_shapes = source.poll(results.completed_ids(store))
                if not wanted and not open_shapes:
                    break
                elsewhere = set(claims.held_elsewhere(store, [t.trial_id for t in wanted], run_id))
                if elsewhere and len(elsewhere) != elsewhere_noted:
                    _note(f"{len(elsewhere)} trials are running elsewhere (claimed by another driver); "
                          f"waiting for them")
                    elsewhere_noted = len(elsewhere)
                if len(elsewhere) == len(wanted) and not open_shapes:
                    time.sleep(WAIT_POLL_S)
                    continue
                queue_name = f"trial-queue-{run_id}-{round_number}"
                queue = trial_queue.start(queue_name)
                feeder = QueueFeeder(queue, source, store, run_id)
                feeder.feed()
                runnable = [t for t in wanted if t.trial_id not in elsewhere]
                # a search's lanes, one per slot, wait for its proposals: their shapes are those of the whole grid
                shaped = expand(spec) if open_shapes else runnable
                groups = lanes(settings, shaped, slots, spec.execution.trials_per_group, queue_name, round_number)
                if open_shapes:
                    _note(f"{len(groups)} lanes, {slots} at a time, take the search's trials as it proposes them")
                else:
                    _note(f"{len(runnable)} of {len(trials)} trials to run in {len(groups)} lanes, {slots} at a time")
                try:
                    tune_wiring.fit(tune_wiring.tuner(groups, slots, store, f"tune-{run_id[:12]}-{round_number}",
                                                      spec.execution.max_retries, [feeder]), len(groups))
                finally:
                    ray.kill(queue)
    finally:
        ray.shutdown()


__all__ = ["GroupsFailed", "RunOptions", "TrialsFailed", "run", "run_trials"]
