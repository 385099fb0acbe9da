"""An adaptive study's trials (search: {method: adaptive}): its law groups and cells, the trial config of any α,
each cell's measured points read from the results store, which of its edges `fit` would flag as near the
optimum on them (for the search's edge check), and what `plan` and `status` say about it. No ray.

Every α the search measures is an ordinary trial: the grid's config for that cell and seed with only α changed,
so its id, row and curve are those a grid with that α would have produced.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np
import pandas as pd

from scaling_lab import results
from scaling_lab.analysis.fit import FitSettings
from scaling_lab.analysis.optimum import find_optima
from scaling_lab.grid import TrialConfig, expand
from scaling_lab.objective import metric_column, point_value, trial_objective
from scaling_lab.search.proposals import Lattice, Points, expected_trials, seeded_ranks
from scaling_lab.spec import StudySpec

GroupKey = tuple[str, str, float]  # model, scaling rule, learning rate: the cells one law is fitted across
ROW_COLUMNS = ["trial_id", "model", "scaling_rule", "learning_rate", "rank", "seed", "alpha", "status"]


def group_label(key: GroupKey) -> str:
    model, rule, learning_rate = key
    return f"{model} {rule} lr={learning_rate:g}"


class SearchSpace:
    """The spec's cells, one trial template per seed, and the α lattice of the search."""

    def __init__(self, spec: StudySpec):
        self.spec = spec
        self.settings = spec.search
        alphas = spec.grid.alpha_values()
        self.lattice = Lattice.between(min(alphas), max(alphas), spec.search.resolution)
        self.column, self.maximize = metric_column(spec.metric)
        self.templates: dict[GroupKey, dict[int, dict[int, TrialConfig]]] = defaultdict(lambda: defaultdict(dict))
        for config in expand(spec):
            if config.alpha == alphas[0]:
                key = (config.model.name, config.scaling_rule, config.learning_rate)
                self.templates[key][config.rank][config.seed] = config
        for by_rank in self.templates.values():
            for rank in set(by_rank) - seeded_ranks(by_rank, self.settings):
                first_seed = next(iter(by_rank[rank]))
                by_rank[rank] = {first_seed: by_rank[rank][first_seed]}
        self._members: dict[str, bool] = {}  # trial id → whether it is a trial of this study

    @property
    def groups(self) -> list[GroupKey]:
        return list(self.templates)

    def configs(self, key: GroupKey, rank: int, alpha: float, points: Points | None = None) -> list[TrialConfig]:
        """The trials that measure `alpha` in one cell: one per seed; with other_seeds: best_alpha, an α not among
        the cell's measured `points` at the first seed only (a measured one proposed again: at every seed)."""
        templates = list(self.templates[key][rank].values())
        if self.settings.other_seeds == "best_alpha" and points is not None and alpha not in points:
            templates = templates[:1]
        return [dataclasses.replace(t, alpha=alpha) for t in templates]

    def _is_member(self, row: dict) -> bool:
        """Whether the row is this study's trial at its α (and not, say, one run under another spec)."""
        trial_id = row["trial_id"]
        if trial_id not in self._members:
            by_seed = self.templates.get((row["model"], row["scaling_rule"], row["learning_rate"]), {})
            template = by_seed.get(row["rank"], {}).get(row["seed"])
            self._members[trial_id] = (
                template is not None and dataclasses.replace(template, alpha=row["alpha"]).trial_id == trial_id
            )
        return self._members[trial_id]

    @property
    def columns(self) -> list[str]:
        """The result columns the search reads."""
        return ROW_COLUMNS + [self.column]

    def rows(self, frame: pd.DataFrame) -> list[dict]:
        """The rows of `frame` (trial rows of the results store) that are trials of this study."""
        return [row for row in frame[self.columns].to_dict("records") if self._is_member(row)]

    def measured(self, frame: pd.DataFrame) -> dict[GroupKey, dict[int, Points]]:
        """Every cell's points (α → seed-averaged objective) from the α values all of whose seeds finished (with
        other_seeds: best_alpha, whose first seed finished: the mean of the seeds finished)."""
        return self.measured_seeds(frame)[0]

    def measured_seeds(self, frame: pd.DataFrame) -> tuple[dict[GroupKey, dict[int, Points]],
                                                          dict[GroupKey, dict[int, set[float]]]]:
        """measured's points, and every cell's measured α values that some seeds have not run."""
        objectives: dict[tuple[GroupKey, int, float], dict[int, float | None]] = defaultdict(dict)
        for row in self.rows(frame):
            key = (row["model"], row["scaling_rule"], row["learning_rate"])
            objectives[key, row["rank"], row["alpha"]][row["seed"]] = trial_objective(
                row["status"], row[self.column], self.maximize
            )
        cells = {key: {rank: {} for rank in by_rank} for key, by_rank in self.templates.items()}
        incomplete = {key: {rank: set() for rank in by_rank} for key, by_rank in self.templates.items()}
        for (key, rank, alpha), by_seed in objectives.items():
            seeds = list(self.templates[key][rank])
            complete = set(by_seed) == set(seeds)
            if complete or (self.settings.other_seeds == "best_alpha" and seeds[0] in by_seed):
                cells[key][rank][alpha] = point_value(list(by_seed.values()))
                if not complete:
                    incomplete[key][rank].add(alpha)
        return cells, incomplete

    def near_edges(self, frame: pd.DataFrame) -> dict[GroupKey, dict[int, set[int]]]:
        """Every cell's sides (-1: its lowest measured α, +1: its highest) that `fit` would flag near_edge_low or
        near_edge_high on these rows: the analysis's own find_optima over each law group's rows, with fit's
        bootstrap (the seed spread pooled over the group's replicated points, seed_noise.py) from a fixed seed."""
        settings = FitSettings()
        sides = {key: {} for key in self.templates}
        rows = pd.DataFrame(self.rows(frame), columns=self.columns)
        rows["objective"] = [trial_objective(status, value, self.maximize)
                             for status, value in zip(rows["status"], rows[self.column])]
        rows = rows[rows["objective"].notna()].assign(model_params=np.nan, trainable_params=np.nan)
        for key, group in rows.groupby(["model", "scaling_rule", "learning_rate"]):
            cells = find_optima(group.assign(objective=group["objective"].astype(float)), "alpha", (),
                                maximize=False, n_bootstrap=settings.n_bootstrap,
                                rng=np.random.default_rng(settings.seed), tolerance=settings.tolerance)
            for cell in cells:
                near = {side for side, flag in ((-1, "near_edge_low"), (1, "near_edge_high")) if flag in cell.flags}
                if near:
                    sides[key][cell.rank] = near
        return sides


def read_rows(store: results.Store) -> pd.DataFrame:
    return results.read_trials(store).to_pandas()


def study_trial_ids(spec: StudySpec, results_dir: str) -> list[str]:
    """The trials of the study: the grid's; for an adaptive search, those it has run so far and those running."""
    if spec.search.method != "adaptive":
        return [t.trial_id for t in expand(spec)]
    store = results.Store(results_dir)
    finished = [row["trial_id"] for row in SearchSpace(spec).rows(read_rows(store))] if store.is_dir() else []
    running = [name.removesuffix(".json") for name in store.list(results.CLAIMS, ".json")]
    return sorted(set(finished) | set(running))


def search_note(spec: StudySpec) -> str:
    """What `status` adds for an adaptive search, whose number of trials is not known in advance."""
    if spec.search.method != "adaptive":
        return ""
    return f"; adaptive search: trials are chosen as results come in (the full grid has {len(expand(spec))})"


def plan_line(spec: StudySpec) -> str:
    """What `plan` says about an adaptive search: the grid's count and the data-dependent range of its own."""
    grid_trials = len(expand(spec))
    groups = len(SearchSpace(spec).groups)
    seeds = len(spec.grid.seeds)
    fewest, most = expected_trials(spec.grid.ranks, seeds, spec.search)
    alphas = spec.grid.alpha_values()
    search = spec.search
    if seeds == 1 or (search.other_seeds, search.other_seed_ranks) == ("every_alpha", "every_rank"):
        seeds_note = f"{seeds} seed(s) at every α"
    else:
        where = {"every_alpha": "every α", "best_alpha": "each cell's best α"}[search.other_seeds]
        ranks = {"every_rank": "", "end_ranks": " of the smallest and largest rank"}[search.other_seed_ranks]
        seeds_note = f"the first seed at every α, the others at {where}{ranks}"
    return (
        f"  search: adaptive, α between {min(alphas):g} and {max(alphas):g} to {spec.search.resolution:g} octave; "
        f"the full grid would need {grid_trials} trials, the adaptive count depends on the results: expected "
        f"{fewest * groups}–{most * groups} trials ({fewest}–{most} per law group × {groups} group(s); "
        f"{seeds_note}); costs below are for the full grid"
    )
