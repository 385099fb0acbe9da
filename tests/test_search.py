"""Tier 1: the adaptive α search as pure functions, on the simulated loss surface."""

import dataclasses
import math

import pandas as pd
import pytest

from scaling_lab import simulated, spec as spec_lib
from scaling_lab.analysis import FitSettings, fit_study, from_frame
from scaling_lab.objective import point_value, trial_objective
from scaling_lab.search.proposals import (
    Lattice,
    SearchSettings,
    Start,
    cell_optimum,
    edge_alphas,
    group_optima,
    law_start,
    next_alphas,
    next_step,
)
from scaling_lab.search.space import SearchSpace

RANKS = [2**i for i in range(9)]
SETTINGS = SearchSettings(method="adaptive", resolution=1.0)
LATTICE = Lattice.between(1, 65536, SETTINGS.resolution)
GRID_POINTS = 17 * len(RANKS)  # α = 2^0 … 2^16, an octave apart


def surface(rank: int, noise: float = 0.0):
    """The simulated trial's final loss (parabola in log α around 16·√r, diverging far above it)."""
    optimum = math.log(simulated.optimal_alpha(rank))

    def loss(alpha: float) -> float:
        distance = math.log(alpha) - optimum
        wobble = noise * math.sin(1000 * alpha)  # deterministic stand-in for seed noise
        return math.inf if distance > simulated.DIVERGE_ABOVE else 1 + simulated.CURVATURE * distance**2 + wobble

    return loss


def search(noise: float = 0.0) -> tuple[dict[int, dict[float, float]], int]:
    cells: dict[int, dict[float, float]] = {rank: {} for rank in RANKS}
    losses = {rank: surface(rank, noise) for rank in RANKS}
    rounds = 0
    while step := next_step(cells, LATTICE, SETTINGS):
        rounds += 1
        assert rounds < 20
        for rank, alphas in step.items():
            assert not set(alphas) & set(cells[rank]), "a measured α proposed again"
            cells[rank].update({alpha: losses[rank](alpha) for alpha in alphas})
    return cells, rounds


@pytest.mark.parametrize("noise", [0.0, 0.002])
def test_search_finds_the_planted_optimum_with_far_fewer_points_than_the_grid(noise):
    cells, rounds = search(noise)
    points = sum(len(points) for points in cells.values())
    assert points * 3 <= GRID_POINTS
    assert rounds <= 4
    for rank, points in cells.items():
        assert abs(cell_optimum(points) - math.log2(simulated.optimal_alpha(rank))) < 0.1
        assert next_alphas(points, LATTICE, SETTINGS) == []


def test_first_and_last_ranks_start_from_a_coarse_design_the_others_from_the_law():
    cells: dict[int, dict[float, float]] = {rank: {} for rank in RANKS}
    first = next_step(cells, LATTICE, SETTINGS)
    assert set(first) == {1, 256} and first[1] == [1.0, 16.0, 256.0, 4096.0, 65536.0]
    cells, _ = search()
    for rank in RANKS[1:-1]:
        assert len(cells[rank]) == 3, "an exact law should need only the optimum and its two confirmation points"


def test_stopping_rule_is_the_spacing_around_the_best_point():
    loss = surface(16)
    assert next_alphas({a: loss(a) for a in (32.0, 64.0, 128.0)}, LATTICE, SETTINGS) == []
    wide = next_alphas({a: loss(a) for a in (16.0, 64.0, 256.0)}, LATTICE, SETTINGS)
    assert wide == [32.0, 128.0]


def test_unbracketed_optimum_expands_and_optimum_at_the_bound_stops():
    loss = surface(16)  # α* = 64
    assert next_alphas({a: loss(a) for a in (256.0, 512.0, 1024.0)}, LATTICE, SETTINGS) == [64.0]  # span doubled
    at_bound = Lattice.between(128, 65536, 1.0)
    assert next_alphas({a: loss(a) for a in (128.0, 256.0)}, at_bound, SETTINGS) == []
    all_diverged = {a: math.inf for a in (4096.0, 65536.0)}
    assert next_alphas(all_diverged, LATTICE, SETTINGS) == [256.0]


def test_neighbour_that_diverged_is_approached_by_golden_section():
    points = {16.0: 1.2, 256.0: 1.0, 65536.0: math.inf}
    assert next_alphas(points, LATTICE, SETTINGS) == [90.5097, 2048.0]  # 0.38 of each gap, on the lattice


def test_law_start_measures_three_points_unless_its_window_spans_the_range():
    settings = SearchSettings(method="adaptive", resolution=1.5, initial_points=4)
    lattice = Lattice.between(2**7.5, 2**15, settings.resolution)  # coarse design 2.5 octaves apart
    near = [math.log2(a) for a in next_alphas({}, lattice, settings, Start(10.0, 0.5))]
    assert len(near) == 3 and near[1] - near[0] == pytest.approx(1.5) and near[2] - near[1] == pytest.approx(1.5)
    assert len(next_alphas({}, lattice, settings, Start(10.0, 4.0))) == 4  # the law knows too little: coarse


def test_other_seeds_at_the_best_alpha_once_the_cell_is_done():
    settings = SearchSettings(method="adaptive", resolution=1.0, other_seeds="best_alpha")
    loss = surface(16)  # α* = 64
    done = {a: loss(a) for a in (32.0, 64.0, 128.0)}
    assert next_alphas(done, LATTICE, settings, incomplete={32.0, 64.0, 128.0}) == [64.0]
    assert next_alphas(done, LATTICE, settings, incomplete={32.0, 128.0}) == []
    wide = {a: loss(a) for a in (16.0, 64.0, 256.0)}
    assert next_alphas(wide, LATTICE, settings, incomplete=set(wide)) == [32.0, 128.0]  # not done: search first


def test_other_seeds_run_new_alphas_at_the_first_seed_and_complete_measured_ones():
    data = {"name": "s", "models": [{"name": "xs", "source": "tiny:xs"}],
            "grid": {"ranks": [1, 4], "alphas": {"min": 1, "max": 4096, "num": 7}, "seeds": [0, 1, 2]},
            "search": {"method": "adaptive", "other_seeds": "best_alpha"}}
    space = SearchSpace(spec_lib.parse(data))
    (key,) = space.groups
    assert [c.seed for c in space.configs(key, 4, 64.0, {})] == [0]
    assert [c.seed for c in space.configs(key, 4, 64.0, {64.0: 1.0})] == [0, 1, 2]
    rows = [{"trial_id": c.trial_id, "model": "xs", "scaling_rule": c.scaling_rule, "learning_rate": c.learning_rate,
             "rank": 4, "seed": c.seed, "alpha": c.alpha, "status": "ok", "final_eval_loss": loss}
            for c, loss in zip(space.configs(key, 4, 64.0) + space.configs(key, 4, 16.0)[:1], [1.0, 1.2, 1.1, 2.0])]
    cells, incomplete = space.measured_seeds(pd.DataFrame(rows, columns=space.columns))
    assert cells[key][4] == {64.0: pytest.approx(1.1), 16.0: 2.0} and incomplete[key][4] == {16.0}
    every = SearchSpace(spec_lib.parse({**data, "search": {"method": "adaptive"}}))
    assert every.measured(pd.DataFrame(rows, columns=space.columns))[key][4] == {64.0: pytest.approx(1.1)}


def test_with_end_ranks_only_the_smallest_and_largest_rank_run_the_other_seeds():
    data = {"name": "s", "models": [{"name": "xs", "source": "tiny:xs"}],
            "grid": {"ranks": [1, 4, 16], "alphas": {"min": 1, "max": 4096, "num": 7}, "seeds": [3, 1]},
            "search": {"method": "adaptive", "other_seeds": "best_alpha", "other_seed_ranks": "end_ranks"}}
    space = SearchSpace(spec_lib.parse(data))
    (key,) = space.groups
    assert {rank: [c.seed for c in space.configs(key, rank, 64.0, {64.0: 1.0})] for rank in (1, 4, 16)} == {
        1: [3, 1], 4: [3], 16: [3, 1]}
    rows = [{"trial_id": c.trial_id, "model": "xs", "scaling_rule": c.scaling_rule, "learning_rate": c.learning_rate,
             "rank": c.rank, "seed": c.seed, "alpha": c.alpha, "status": "ok", "final_eval_loss": 1.0}
            for rank in (1, 4) for c in space.configs(key, rank, 64.0)[:1]]
    cells, incomplete = space.measured_seeds(pd.DataFrame(rows, columns=space.columns))
    assert cells[key][4] == {64.0: 1.0} and incomplete[key][4] == set()  # rank 4 done at its one seed
    assert incomplete[key][1] == {64.0}  # rank 1 still owes seed 1
    seed_1_at_rank_4 = dataclasses.replace(space.configs(key, 1, 64.0)[1], rank=4)  # not a trial of this search
    assert not space.rows(pd.DataFrame([{**rows[0], "trial_id": seed_1_at_rank_4.trial_id, "rank": 4, "seed": 1}]))


def edge_rows(space: SearchSpace, measured: list[tuple[int, float, list[float]]]) -> pd.DataFrame:
    (key,) = space.groups
    trials = [(c, loss) for rank, alpha, losses in measured for c, loss in zip(space.configs(key, rank, alpha), losses)]
    return pd.DataFrame([{"trial_id": c.trial_id, "model": "xs", "scaling_rule": c.scaling_rule,
                          "learning_rate": c.learning_rate, "rank": c.rank, "seed": c.seed, "alpha": c.alpha,
                          "status": "ok", "final_eval_loss": loss} for c, loss in trials], columns=space.columns)


def test_the_space_asks_fit_which_edges_are_within_the_seed_noise_of_the_best():
    data = {"name": "s", "models": [{"name": "xs", "source": "tiny:xs"}],
            "grid": {"ranks": [1, 4], "alphas": {"min": 1, "max": 4096, "num": 7}, "seeds": [0, 1]},
            "search": {"method": "adaptive", "other_seeds": "best_alpha"}}
    space = SearchSpace(spec_lib.parse(data))
    (key,) = space.groups
    # the best α at two seeds (spread 0.0028), the others at one; rank 1 clearly bracketed
    rank_1 = [(1, 4.0, [1.1]), (1, 8.0, [1.0, 1.0]), (1, 16.0, [1.1])]
    near = edge_rows(space, [*rank_1, (4, 16.0, [1.05]), (4, 32.0, [0.998, 1.002]), (4, 64.0, [1.003])])
    assert space.near_edges(near)[key] == {4: {1}}
    fitted = fit_study(from_frame(near.assign(wall_time_s=1.0)), FitSettings(n_bootstrap=200)).alpha_cells
    assert [cell.exclusion() for cell in fitted] == [None, "edge"]  # the cell `fit` leaves out of the law
    clear = edge_rows(space, [*rank_1, (4, 16.0, [1.05]), (4, 32.0, [0.998, 1.002]), (4, 64.0, [1.02])])
    assert space.near_edges(clear)[key] == {}
    both = edge_rows(space, [*rank_1, (4, 16.0, [1.0005]), (4, 32.0, [0.998, 1.002]), (4, 64.0, [1.001])])
    assert space.near_edges(both)[key] == {4: {-1, 1}}
    assert space.near_edges(both) == space.near_edges(both.iloc[::-1])  # the same on the same rows


NEAR = {16.0: 1.05, 32.0: 1.0, 64.0: 1.003}  # done at resolution 1: the best's neighbours an octave away


def test_a_near_edge_runs_at_every_seed_then_gets_one_more_alpha_beyond_it_up_to_the_bound():
    assert edge_alphas(NEAR, {1}, LATTICE, SETTINGS, incomplete={16.0, 64.0}) == [64.0]  # its other seeds first
    assert edge_alphas(NEAR, {-1, 1}, LATTICE, SETTINGS, incomplete={64.0}) == [8.0, 64.0]
    assert edge_alphas(NEAR, {1}, LATTICE, SETTINGS, incomplete={16.0}) == [128.0]  # every seed ran it: beyond
    assert edge_alphas(NEAR, {-1, 1}, LATTICE, SETTINGS) == [8.0, 128.0]
    assert edge_alphas(NEAR, (), LATTICE, SETTINGS) == []  # edges clearly worse than the best: the cell is done
    crowded = SearchSettings(method="adaptive", resolution=1.0, max_points=4)
    assert edge_alphas(NEAR, {-1, 1}, LATTICE, crowded) == [8.0]
    assert edge_alphas(NEAR, {-1}, Lattice.between(16, 65536, 1.0), SETTINGS) == []  # the edge is the bound
    assert edge_alphas(NEAR, {-1}, Lattice.between(16, 65536, 1.0), SETTINGS, incomplete={16.0}) == [16.0]
    assert edge_alphas(NEAR, {-1}, Lattice.between(12, 65536, 1.0), SETTINGS) == [12.0]  # up to the bound
    assert edge_alphas(NEAR, {1}, Lattice.between(1, 64, 1.0), SETTINGS) == []


def test_the_edge_check_is_the_groups_last_step():
    cells = {1: {4.0: 1.1, 8.0: 1.0, 16.0: 1.1}, 4: dict(NEAR)}
    assert next_step(cells, LATTICE, SETTINGS) == {}
    assert next_step(cells, LATTICE, SETTINGS, near_edges={4: {1}}) == {4: [128.0]}
    assert next_step(cells, LATTICE, SETTINGS, {4: {64.0}}, near_edges={4: {1}}) == {4: [64.0]}
    waiting = {**cells, 1: {4.0: 1.1, 16.0: 1.0, 64.0: 1.1}}  # rank 1 not done: no edge check yet
    assert next_step(waiting, LATTICE, SETTINGS, near_edges={4: {1}}) == {1: [8.0, 32.0]}


def test_law_start_interpolates_and_widens_with_scatter():
    start = law_start({1: 4.0, 256: 8.0}, 16, SETTINGS.resolution)
    assert start.centre == pytest.approx(6.0) and start.half_width == SETTINGS.resolution
    scattered = law_start({1: 4.0, 16: 7.5, 256: 8.0}, 4, SETTINGS.resolution)
    assert scattered.half_width > SETTINGS.resolution
    assert law_start({}, 4, 1.0) is None
    assert law_start({4: 5.0}, 16, 1.0) == Start(5.0, 3.0)


def test_proposals_are_reproducible_lattice_points():
    loss = surface(4)
    points = {a: loss(a) for a in (1.0, 16.0, 256.0, 4096.0, 65536.0)}
    first, again = next_alphas(points, LATTICE, SETTINGS), next_alphas(dict(points), LATTICE, SETTINGS)
    assert first == again
    assert all((math.log2(a) * 4) == pytest.approx(round(math.log2(a) * 4), abs=1e-5) for a in first)


@pytest.mark.parametrize(
    "search_spec, message",
    [
        ({"method": "adaptve"}, "search.method: expected one of"),
        ({"method": "adaptive", "resolution": 0}, "search.resolution: expected a number of octaves > 0"),
        ({"method": "adaptive", "initial_points": 2}, "search.initial_points: expected an integer >= 3"),
        ({"method": "adaptive", "resolution": 8}, "grid.alphas: an adaptive search needs a range of at least"),
        ({"method": "adaptive", "other_seeds": "best"}, "search.other_seeds: expected one of"),
    ],
)
def test_search_spec_errors_name_the_field(search_spec, message):
    data = {"name": "s", "models": [{"name": "xs", "source": "tiny:xs"}],
            "grid": {"ranks": [1, 4], "alphas": {"min": 1, "max": 4096, "num": 7}}, "search": search_spec}
    with pytest.raises(spec_lib.SpecError, match=message.replace("[", r"\[")):
        spec_lib.parse(data)


def bowl_loss(rank: int, alpha: float, seed: int) -> float:
    """A bowl in log2 α around 2^(4 + log2(r)/2), rising four times faster above its optimum than below it,
    diverging 5 octaves above it, with seed noise."""
    distance = math.log2(alpha) - (4 + math.log2(rank) / 2)
    if distance > 5:
        return math.nan
    rise = 0.02 * distance**2 if distance < 0 else 0.08 * distance**2
    return 1 + rise + 0.003 * math.sin(1000 * alpha + 7 * seed + rank)


def test_the_search_and_fit_find_the_same_optimum_on_the_same_rows():
    seeds, ranks = (0, 1, 2), [1, 4, 16, 64, 256]
    rows = []
    cells: dict[int, dict[float, float]] = {rank: {} for rank in ranks}

    def measure(rank: int, alpha: float) -> None:
        losses = [bowl_loss(rank, alpha, seed) for seed in seeds]
        statuses = ["diverged" if math.isnan(loss) else "ok" for loss in losses]
        rows.extend({"model": "m", "rank": rank, "alpha": alpha, "seed": seed, "status": status,
                     "final_eval_loss": loss} for seed, status, loss in zip(seeds, statuses, losses))
        cells[rank][alpha] = point_value([trial_objective(s, v, False) for s, v in zip(statuses, losses)])

    while step := next_step(cells, LATTICE, SETTINGS):
        for rank, alphas in step.items():
            for alpha in alphas:
                measure(rank, alpha)
    # one more α two octaves above a cell's best: a fourth point, so that its bowl takes the group's shape
    middle = cells[16]
    best = min(middle, key=middle.get)
    measure(16, max(a for a in middle if a > best) * 4)

    searched = group_optima(cells)
    fitted = fit_study(from_frame(pd.DataFrame(rows)), FitSettings(n_bootstrap=20))
    assert {cell.rank for cell in fitted.alpha_cells} == set(ranks)
    for cell in fitted.alpha_cells:  # every cell bracketed, none at an edge
        assert searched[cell.rank] is not None and not cell.flags.count("edge_low") + cell.flags.count("edge_high")
        assert math.isclose(2 ** searched[cell.rank], cell.optimum, rel_tol=1e-9), cell.label()
        if not cell.estimator_reason.startswith("4 points"):  # a cell of four needs the group for its shape
            assert cell_optimum(cells[cell.rank]) == searched[cell.rank]
    reasons = [cell.estimator_reason for cell in fitted.alpha_cells]
    assert any(r.startswith("4 points") and "the shape most cells" in r for r in reasons), reasons
    assert any("best of four bowl shapes" in r for r in reasons), reasons
    assert any("symmetry assumed" in r for r in reasons), reasons
