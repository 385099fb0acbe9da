"""The adaptive search, asynchronous: every cell (one law group and rank) gets its next α values as soon as the
results of its last ones are all in, instead of every cell waiting for the slowest trial of a step. No ray.

Each cell's proposals are exactly those of the synchronous search (scaling_lab/search/proposals.py: next_step):
a cell's next α values depend only on its own points, except where a rank starts from the law fitted to the
optima of the smallest and largest ranks, and such a rank starts only once those two have none running, as the
synchronous search waits for them; and the edge check waits for every cell of its law group to be done, as it
asks `fit` about them all. The search's state is the results store: a study run again continues from the
rows it finds.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import pandas as pd

from scaling_lab.grid import TrialConfig
from scaling_lab.group import shape_of
from scaling_lab.search.proposals import Lattice, Points, SearchSettings, group_optima, next_step
from scaling_lab.search.space import GroupKey, SearchSpace, group_label


def cell_steps(cells: Mapping[int, Points], running: set[int], lattice: Lattice, settings: SearchSettings,
               incomplete: Mapping[int, Collection[float]] | None = None,
               near_edges: Mapping[int, Collection[int]] | None = None) -> dict[int, list[float]]:
    """The next α values of the ranks of one law group that have no trial running (rank → measured points);
    a rank not started yet waits while the smallest or largest rank, whose optima it starts from, runs."""
    ranks = sorted(cells)
    first = {ranks[0], ranks[-1]}
    started = {rank for rank in ranks if cells[rank] or rank in running}
    return {rank: alphas for rank, alphas in next_step(cells, lattice, settings, incomplete, near_edges).items()
            if rank not in running and (rank in started or rank in first or not running & first)}


class AsyncSearch:
    """A trial source for the study's queue (scaling_lab/study/feeder.py): `poll` says which proposed trials are
    still to run and for which worker-group shapes the search may still propose more."""

    def __init__(self, space: SearchSpace, rows: Callable[[], pd.DataFrame], note: Callable[[str], None] = print):
        """`rows` reads the trial rows as they are now (read_rows of the results store)."""
        self.space, self.rows, self.note = space, rows, note
        self.proposed: dict[tuple[GroupKey, int], list[TrialConfig]] = {}  # each cell's latest proposal
        self.steps: dict[tuple[GroupKey, int], int] = {}  # each cell's proposals in a row, counting those it waited for
        self.finished: set[GroupKey] = set()
        self.shapes = {key: shape_of(next(iter(next(iter(by_rank.values())).values())))
                       for key, by_rank in space.templates.items()}
        self._seen: set[str] | None = None

    def poll(self, done: set[str]) -> tuple[list[TrialConfig], set[str]]:
        if done != self._seen:
            self._seen = set(done)
            self._advance(done)
        wanted = [t for trials in self.proposed.values() for t in trials if t.trial_id not in done]
        return wanted, {self.shapes[key] for key in self.space.groups if key not in self.finished}

    def _running(self, key: GroupKey, done: set[str]) -> set[int]:
        return {rank for (group, rank), trials in self.proposed.items()
                if group == key and any(t.trial_id not in done for t in trials)}

    def _advance(self, done: set[str]) -> None:
        rows = self.rows()
        cells, incomplete = self.space.measured_seeds(rows)
        near_edges = None
        for key in self.space.groups:
            if key in self.finished:
                continue
            running = self._running(key, done)
            ranks = sorted(cells[key])
            steps = cell_steps(cells[key], running, self.space.lattice, self.space.settings, incomplete[key])
            if not steps and not running:  # every cell done: the edge check (proposals.py)
                near_edges = near_edges or self.space.near_edges(rows)
                steps = cell_steps(cells[key], running, self.space.lattice, self.space.settings, incomplete[key],
                                   near_edges[key])
            for rank, alphas in steps.items():
                todo = [config for alpha in alphas for config in self.space.configs(key, rank, alpha, cells[key][rank])
                        if config.trial_id not in done]
                if not todo:
                    continue
                first = (ranks[0], ranks[-1])
                after = [rank] if rank in first or (key, rank) in self.steps else first  # whose steps this one follows
                before = max(self.steps.get((key, r), 0) for r in after)
                self.steps[key, rank] = before + 1
                self.proposed[key, rank] = todo
                running.add(rank)
                self.note(f"{group_label(key)}: r={rank} step {before + 1}, α {', '.join(f'{a:g}' for a in alphas)} "
                          f"({len(todo)} trials)")
            if not running:
                self.finished.add(key)
                steps = max((n for (group, _), n in self.steps.items() if group == key), default=0)
                self.note(f"{group_label(key)}: search done after {steps} steps; " + _optima(cells[key]))


def _optima(cells: dict) -> str:
    found = dict(sorted(group_optima(cells).items()))  # as `fit` finds them
    return "α* " + ", ".join(f"r={r}: {2**x:.4g}" if x is not None else f"r={r}: at an edge" for r, x in found.items())
