"""Ray Tune's side of an adaptive study: a Searcher that proposes the α search one step at a time, and the run
that drives it.

A Tune trial here is a group of trials in one Ray Train worker group (scaling_lab/study/runner.py), so a step's
trials (every α of the next step for every active rank of a law group, all seeds) are packed into groups the way
the grid's are. The next step of a law group is planned once all of its previous step's groups have ended, from
the rows in the results store, never from Tune's reported metrics. The search's state is the results store:
a study run again continues from the rows it finds.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable

from ray import tune
from ray.tune.search import Searcher

from scaling_lab import results
from scaling_lab.grid import TrialConfig
from scaling_lab.search.proposals import group_optima, next_step
from scaling_lab.spec import StudySpec
from scaling_lab.study import runner
from scaling_lab.search.space import GroupKey, SearchSpace, group_label, read_rows
from scaling_lab.study.ray_storage import ray_storage


class AdaptiveSearcher(Searcher):
    """Suggests groups of trials; returns None while a law group's step is running, FINISHED when every law
    group's search is done (or has failed: its groups crashed past their retries)."""

    def __init__(
        self,
        space: SearchSpace,
        store: results.Store,
        make_groups: Callable[[list[TrialConfig]], list[dict]],
        note: Callable[[str], None] = print,
    ):
        super().__init__()
        self.space, self.store, self.make_groups, self.note = space, store, make_groups, note
        self.queue: list[tuple[GroupKey, dict]] = []
        self.running: dict[str, GroupKey] = {}  # Tune trial id → its law group
        self.steps: dict[GroupKey, int] = {key: 0 for key in space.groups}
        self.finished: set[GroupKey] = set()

    def suggest(self, trial_id: str) -> dict | str | None:
        if not self.queue:
            self._plan_next_steps()
        if self.queue:
            key, group = self.queue.pop(0)
            self.running[trial_id] = key
            return {"group": group}
        return Searcher.FINISHED if not self.running else None

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        key = self.running.pop(trial_id, None)
        if error and key is not None and key not in self.finished:
            self.finished.add(key)
            self.note(f"{group_label(key)}: a group of trials failed past its retries; its search stops here")

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: the search resumes from the results store."""

    def _plan_next_steps(self) -> None:
        busy = set(self.running.values())
        idle = [key for key in self.space.groups if key not in self.finished and key not in busy]
        if not idle:
            return
        cells = self.space.measured(read_rows(self.store))
        for key in idle:
            step = next_step(cells[key], self.space.lattice, self.space.settings)
            todo = [
                config
                for rank, alphas in step.items()
                for alpha in alphas
                for config in self.space.configs(key, rank, alpha)
                if not self.store.exists(f"{results.TRIALS}/{config.trial_id}.parquet")
            ]
            if not todo:
                self.finished.add(key)
                self.note(f"{group_label(key)}: search done after {self.steps[key]} steps; " + _optima(cells[key]))
                continue
            self.steps[key] += 1
            groups = self.make_groups(todo)
            self.queue.extend((key, group) for group in groups)
            proposed = "; ".join(f"r={rank} α {', '.join(f'{a:g}' for a in alphas)}" for rank, alphas in step.items())
            self.note(f"{group_label(key)}: step {self.steps[key]}, {len(todo)} trials in {len(groups)} groups: "
                      f"{proposed}")


def _optima(cells: dict) -> str:
    found = dict(sorted(group_optima(cells).items()))  # as `fit` finds them
    return "α* " + ", ".join(f"r={r}: {2**x:.4g}" if x is not None else f"r={r}: at an edge" for r, x in found.items())


def run_adaptive(spec: StudySpec, options: runner.RunOptions, results_dir: str) -> None:
    """Run the adaptive search of a study on local Ray or a cluster; like runner.run for the grid."""
    import ray

    store = results.Store(results_dir)
    runner.connect_ray(options)
    run_id = uuid.uuid4().hex
    started = time.monotonic()
    try:
        slots = runner.concurrency(spec, ray.cluster_resources())
        settings = runner.group_settings(spec, options, results_dir, runner.git_commit(options.base_dir), run_id)

        def make_groups(todo: list[TrialConfig]) -> list[dict]:
            groups = runner.group_trials(todo, spec.execution.trials_per_group, slots)
            return [runner.group_dict(settings, group) for group in groups]

        def note(text: str) -> None:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

        searcher = AdaptiveSearcher(SearchSpace(spec), store, make_groups, note)
        tuner = tune.Tuner(
            tune.with_resources(runner.run_group_trainable, runner._group_request),
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, max_concurrent_trials=slots),
            run_config=tune.RunConfig(
                name=f"tune-{run_id[:12]}-search",
                **ray_storage(store),
                failure_config=tune.FailureConfig(max_failures=spec.execution.max_retries),
                verbose=0,
            ),
        )
        outcome = tuner.fit()
        failed_groups = [r.error for r in outcome if r.error is not None]
        if failed_groups:
            raise runner.GroupsFailed(f"{len(failed_groups)} of {len(outcome)} trial groups failed after retries; "
                                      f"first error: {str(failed_groups[0]).strip().splitlines()[-1]}")
        note(f"adaptive search finished in {math.ceil(time.monotonic() - started)} s")
    finally:
        ray.shutdown()
