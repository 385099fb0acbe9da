"""The asynchronous adaptive search (scaling_lab/search/async_search.py) against the synchronous one it replaces,
on the simulated trial, without Ray: same trials, same optima, over many noise seeds and completion orders."""

from __future__ import annotations

import math
import random

import pandas as pd
import pytest

from scaling_lab import simulated, spec as spec_lib
from scaling_lab.search.async_search import AsyncSearch
from scaling_lab.search.proposals import cell_optimum, next_step
from scaling_lab.search.space import SearchSpace

SPEC = {
    "name": "adaptive",
    "models": [{"name": "xs", "source": "tiny:xs"}],
    "grid": {"ranks": [1, 2, 4, 16, 64], "alphas": {"min": 1, "max": 65536, "num": 17}, "seeds": [0, 1]},
    "training": {"steps": 20, "eval_every": 5},
    "execution": {"backend": "simulated"},
    "search": {"method": "adaptive"},
}
NOISE_SD = 0.02  # ten times the simulated default, so that noise moves the search's points


def row(config, noise_seed: int) -> dict:
    outcome = simulated.simulate(config, noise_seed=noise_seed, noise_sd=NOISE_SD)
    return {"trial_id": config.trial_id, "model": config.model.name, "scaling_rule": config.scaling_rule,
            "learning_rate": config.learning_rate, "rank": config.rank, "seed": config.seed, "alpha": config.alpha,
            "status": outcome.status, "final_eval_loss": outcome.final_eval_loss}


def frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=[*SearchSpace(spec_lib.parse(SPEC)).columns])


def synchronous(space: SearchSpace, noise_seed: int, durations: Durations,
                edge_checks: list[int] | None = None) -> tuple[dict[str, dict], float]:
    """The search as it ran before: every step of the law group waits for all of the last step's trials.
    `edge_checks` gets the number of α values each edge check proposed (proposals.edge_alphas)."""
    rows: dict[str, dict] = {}
    elapsed = 0.0
    (key,) = space.groups
    while True:
        measured = frame(list(rows.values()))
        cells, incomplete = space.measured_seeds(measured)
        step = next_step(cells[key], space.lattice, space.settings, incomplete[key])
        if not step:
            near_edges = space.near_edges(measured)[key]
            step = next_step(cells[key], space.lattice, space.settings, incomplete[key], near_edges)
            if edge_checks is not None and step:
                edge_checks.append(sum(map(len, step.values())))
        todo = [c for rank, alphas in step.items() for a in alphas
                for c in space.configs(key, rank, a, cells[key][rank]) if c.trial_id not in rows]
        if not todo:
            break
        elapsed += makespan([durations[c.trial_id] for c in todo], slots=3)
        rows.update({c.trial_id: row(c, noise_seed) for c in todo})
    return rows, elapsed


def makespan(lengths: list[float], slots: int) -> float:
    free = [0.0] * slots
    for length in lengths:
        free[free.index(min(free))] += length
    return max(free)


def asynchronous(space: SearchSpace, noise_seed: int, durations: Durations) -> tuple[dict[str, dict], float]:
    """Three slots take the search's trials in the order proposed; each trial ends after its own duration, so
    that results come back in an order the durations choose."""
    rows: dict[str, dict] = {}
    search = AsyncSearch(space, lambda: frame(list(rows.values())), note=lambda text: None)
    queue, running, clock, slots = [], [], 0.0, 3  # running: (end time, config)
    while True:
        wanted, open_shapes = search.poll(set(rows))
        busy = {c.trial_id for c in queue} | {c.trial_id for _, c in running}
        queue += [c for c in wanted if c.trial_id not in busy]
        while queue and len(running) < slots:
            config = queue.pop(0)
            running.append((clock + durations[config.trial_id], config))
        if not running:
            assert not wanted and not open_shapes, "the search waits while nothing runs"
            return rows, clock
        running.sort(key=lambda item: item[0])
        clock, config = running.pop(0)
        rows[config.trial_id] = row(config, noise_seed)


class Durations(dict):
    """A trial's duration, drawn once from the noise seed and its id."""

    def __init__(self, noise_seed: int):
        super().__init__()
        self.noise_seed = noise_seed

    def __missing__(self, trial_id: str) -> float:
        self[trial_id] = random.Random(f"{self.noise_seed}:{trial_id}").uniform(1, 6)
        return self[trial_id]


@pytest.mark.parametrize("other_seeds, other_seed_ranks", [("every_alpha", "every_rank"),
                                                            ("best_alpha", "every_rank"), ("best_alpha", "end_ranks")])
def test_asynchronous_search_measures_what_the_synchronous_one_does_and_finishes_sooner(other_seeds, other_seed_ranks):
    space = SearchSpace(spec_lib.parse({**SPEC, "search": {**SPEC["search"], "other_seeds": other_seeds,
                                                           "other_seed_ranks": other_seed_ranks}}))
    (key,) = space.groups
    sync_time = async_time = 0.0
    edge_checks: list[int] = []
    for noise_seed in range(8):
        durations = Durations(noise_seed)
        sync_rows, sync_elapsed = synchronous(space, noise_seed, durations, edge_checks)
        async_rows, async_elapsed = asynchronous(space, noise_seed, durations)
        assert set(async_rows) == set(sync_rows), f"noise seed {noise_seed}"
        sync_cells, incomplete = (found[key] for found in space.measured_seeds(frame(list(sync_rows.values()))))
        async_cells = space.measured(frame(list(async_rows.values())))[key]
        for rank, points in sync_cells.items():
            best = min(points, key=points.__getitem__)
            assert best not in incomplete[rank], "every seed runs at a cell's best α"
            seeded = other_seed_ranks == "every_rank" or rank in (min(sync_cells), max(sync_cells))
            assert bool(incomplete[rank]) == (other_seeds == "best_alpha" and seeded)  # other α: the first seed only
            found, expected = cell_optimum(async_cells[rank]), cell_optimum(points)
            assert found is not None and math.isclose(found, expected, rel_tol=1e-9, abs_tol=1e-9)
            assert abs(found - math.log2(simulated.optimal_alpha(rank))) < 1.0  # and near the true optimum
        sync_time, async_time = sync_time + sync_elapsed, async_time + async_elapsed
    assert async_time < sync_time
    if other_seed_ranks == "every_rank":  # with end_ranks no cell of these 8 seeds is near an edge
        assert edge_checks, "no edge check proposed an α: the asynchronous search's wait for it went untested"
