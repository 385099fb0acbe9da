"""Tier 1: the adaptive α search as pure functions, on the simulated loss surface."""

import math

import pytest

from scaling_lab import simulated, spec as spec_lib
from scaling_lab.search.proposals import (
    Lattice,
    SearchSettings,
    Start,
    cell_optimum,
    law_start,
    next_alphas,
    next_step,
)

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
    ],
)
def test_search_spec_errors_name_the_field(search_spec, message):
    data = {"name": "s", "models": [{"name": "xs", "source": "tiny:xs"}],
            "grid": {"ranks": [1, 4], "alphas": {"min": 1, "max": 4096, "num": 7}}, "search": search_spec}
    with pytest.raises(spec_lib.SpecError, match=message.replace("[", r"\[")):
        spec_lib.parse(data)
