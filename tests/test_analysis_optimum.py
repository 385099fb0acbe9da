"""Optimum per cell: parabola refinement, diverged trials, flags, and the uncertainty from seeds."""

import math

import numpy as np
import pandas as pd
import pytest

from scaling_lab.analysis.optimum import find_optima, locate_optima


def cell_trials(alphas, losses_by_seed, rank=4):
    """Trials of one cell: losses_by_seed[s][j] is seed s at alphas[j] (inf = diverged, nan = not run)."""
    rows = []
    for seed, losses in enumerate(losses_by_seed):
        for alpha, loss in zip(alphas, losses):
            if not np.isnan(loss):
                rows.append({"model": "m", "rank": rank, "alpha": alpha, "seed": seed, "objective": loss})
    frame = pd.DataFrame(rows)
    frame["model_params"] = 1e6
    frame["trainable_params"] = np.nan
    return frame


def optimum_of(alphas, losses_by_seed, n_bootstrap=200):
    (cell,) = find_optima(
        cell_trials(alphas, losses_by_seed),
        "alpha",
        (),
        maximize=False,
        n_bootstrap=n_bootstrap,
        rng=np.random.default_rng(0),
        tolerance=0.0025,
    )
    return cell


@pytest.mark.parametrize("offset", [0.0, 0.13, 0.5, 0.81])
def test_parabola_recovers_the_vertex_of_a_parabolic_loss_on_a_nonuniform_grid(offset):
    log_grid = np.log(np.array([1, 2, 3, 8, 16, 40, 64, 128.0]))
    truth = math.log(16) + offset
    means = 1.0 + 0.05 * (log_grid - truth) ** 2
    log_optimum, _, refined, value = locate_optima(log_grid, means[None, :])
    assert refined[0]
    assert log_optimum[0] == pytest.approx(truth, abs=1e-9)
    assert value[0] == pytest.approx(1.0, abs=1e-12)


def test_a_tie_with_a_neighbour_refines_to_the_midpoint():
    log_grid = np.log([1.0, 2.0, 4.0, 8.0])
    log_optimum, best, refined, _ = locate_optima(log_grid, np.array([[2.0, 1.0, 1.0, 2.0]]))
    assert refined[0] and best[0] == 1
    assert log_optimum[0] == pytest.approx(math.log(2.0 * math.sqrt(2.0)))


def test_missing_or_diverged_neighbour_keeps_the_grid_point():
    log_grid = np.log([1.0, 2.0, 4.0, 8.0])
    log_optimum, _, refined, _ = locate_optima(log_grid, np.array([[2.0, 1.0, np.inf, 2.0], [2.0, 1.0, np.nan, 2.0]]))
    assert not refined.any()
    assert log_optimum == pytest.approx([math.log(2.0)] * 2)


def test_parabola_bias_on_an_asymmetric_loss_is_nearly_constant():
    """A loss four times steeper above the optimum than below (like real α sweeps): the 3-point parabola is
    biased low by about 0.28 grid steps wherever the optimum falls, and its spread about that bias stays under
    0.07 steps, so it shifts c and hardly moves k."""
    step = math.log(2.0)
    log_grid = np.arange(-6, 7) * step
    errors = []
    for position in np.linspace(0.0, 1.0, 21)[:-1]:
        distance = log_grid - position * step
        means = np.where(distance < 0, distance**2, 4 * distance**2)
        errors.append(locate_optima(log_grid, means[None, :])[0][0] - position * step)
    errors = np.array(errors) / step
    assert -0.35 < errors.mean() < -0.2
    assert errors.std() < 0.07


def test_a_diverged_seed_makes_its_alpha_worse_than_any_finite_one():
    alphas = [1.0, 2.0, 4.0, 8.0, 16.0]
    seeds = [[3.0, 2.0, 1.5, 0.1, 2.5], [3.0, 2.0, 1.5, math.inf, 2.5], [3.0, 2.0, 1.5, 0.1, 2.5]]
    cell = optimum_of(alphas, seeds)
    assert cell.diverged == (False, False, False, True, False)
    assert cell.optimum == pytest.approx(4.0)
    assert "not_refined" in cell.flags and "some_diverged" in cell.flags
    assert cell.n_diverged == 1


def test_edge_optimum_is_flagged_and_excluded():
    alphas = [1.0, 2.0, 4.0, 8.0]
    cell = optimum_of(alphas, [[1.0, 1.1, 1.2, 1.3], [1.01, 1.12, 1.19, 1.31]])
    assert "edge_low" in cell.flags
    assert cell.exclusion() == "edge"
    assert cell.exclusion(keep_edge=True) is None


def test_all_diverged_and_too_few_points():
    alphas = [1.0, 2.0, 4.0]
    everything_diverged = optimum_of(alphas, [[math.inf] * 3])
    assert everything_diverged.flags == ("all_diverged",)
    assert everything_diverged.optimum is None and everything_diverged.exclusion() == "all_diverged"
    two_finite = optimum_of(alphas, [[1.2, 1.0, math.inf]])
    assert "too_few_points" in two_finite.flags and two_finite.exclusion() == "too_few_points"


def test_seed_bootstrap_gives_a_wider_interval_for_noisier_seeds():
    rng = np.random.default_rng(1)
    alphas = 2.0 ** np.arange(10)
    clean = 1.0 + 0.05 * (np.log(alphas) - math.log(20.0)) ** 2

    def interval_width(noise):
        cell = optimum_of(alphas, [clean + rng.normal(0, noise, alphas.size) for _ in range(5)])
        assert cell.optimum_low < cell.optimum < cell.optimum_high
        return math.log(cell.optimum_high / cell.optimum_low)

    assert interval_width(0.02) > 2 * interval_width(0.001)


def test_single_seed_still_gets_the_grid_resolution_as_uncertainty():
    alphas = 2.0 ** np.arange(8)
    cell = optimum_of(alphas, [1.0 + 0.05 * (np.log(alphas) - math.log(10.0)) ** 2])
    assert cell.n_seeds == 1
    assert cell.log_sigma > 0
    assert cell.optimum_low < cell.optimum < cell.optimum_high


def test_missing_trials_are_tolerated():
    alphas = 2.0 ** np.arange(8)
    clean = 1.0 + 0.05 * (np.log(alphas) - math.log(10.0)) ** 2
    seeds = [clean.copy() for _ in range(3)]
    seeds[0][3] = np.nan
    seeds[1][4] = np.nan
    cell = optimum_of(alphas, seeds)
    assert cell.optimum == pytest.approx(10.0, rel=1e-6)
    assert np.all(np.isfinite(cell.bootstrap_log_optimum))


ASYMMETRIC_BOWLS = {
    "4x steeper above": lambda d: np.where(d < 0, 0.05, 0.2) * d**2,
    "4x steeper below": lambda d: np.where(d < 0, 0.2, 0.05) * d**2,
    "exponential wall": lambda d: np.where(d < 0, 0.05 * d**2, 0.1 * (np.expm1(1.5 * d) - 1.5 * d) / 1.5**2),
}


@pytest.mark.parametrize("shape", list(ASYMMETRIC_BOWLS), ids=list(ASYMMETRIC_BOWLS))
@pytest.mark.parametrize("offset", [0.1, 0.45, 0.8])
def test_bowl_fit_recovers_the_optimum_of_an_asymmetric_bowl(shape, offset):
    """Noise-free, on the embedded default's ×√8 spacing: the parabola is off by a quarter step or more, the bowl
    fit (five points around the best) by under 1% of a step."""
    step = math.log(math.sqrt(8))
    alphas = np.exp((np.arange(-3, 4) + offset) * step) * 1000
    losses = 1.0 + ASYMMETRIC_BOWLS[shape](np.log(alphas / 1000))
    cell = optimum_of(alphas, [losses, losses])
    assert cell.estimator != "parabola" and "points" in cell.estimator_reason
    assert abs(math.log(cell.optimum / 1000)) < 0.01 * step
    assert cell.optimum_low < 1000 < cell.optimum_high
    if shape != "exponential wall":
        assert abs(math.log(cell.parabola_optimum / 1000)) > 0.1 * step


def test_parabola_stands_with_three_points_and_more_alpha_is_suggested():
    alphas = np.array([4.0, 8.0, 16.0, 32.0])
    losses = 1.0 + np.where(np.log(alphas / 10) < 0, 0.05, 0.2) * np.log(alphas / 10) ** 2
    losses[-1] = np.inf  # one finite point on each side of the best (8)
    cell = optimum_of(alphas, [losses, losses])
    assert cell.estimator == "parabola" and "1 finite point below the best, 1 above" in cell.estimator_reason
    assert len(cell.suggested) == 2 and cell.suggested[0] < cell.optimum < cell.suggested[1]


def test_four_points_with_one_on_a_side_fit_two_half_parabolas():
    alphas = 2.0 ** np.arange(6)
    losses = 1.0 + np.where(np.log(alphas / 12) < 0, 0.05, 0.2) * np.log(alphas / 12) ** 2
    losses[-1] = np.inf  # one finite point above the best (8), three below
    cell = optimum_of(alphas, [losses, losses])
    assert cell.estimator == "two half-parabolas" and "4 points" in cell.estimator_reason
    assert cell.optimum == pytest.approx(12.0, rel=1e-4)


def test_an_asymmetry_that_moves_the_optimum_beyond_its_interval_is_flagged():
    rng = np.random.default_rng(3)
    alphas = 2.0 ** np.arange(10)
    distance = np.log(alphas / 20)
    flagged = {}
    for name, ratio in (("symmetric", 1.0), ("asymmetric", 6.0)):
        clean = 1.0 + 0.05 * np.where(distance < 0, 1.0, ratio) * distance**2
        cell = optimum_of(alphas, [clean + rng.normal(0, 0.001, alphas.size) for _ in range(3)])
        flagged[name] = "asymmetric" in cell.flags
        assert cell.optimum_low < 20 < cell.optimum_high
    assert flagged == {"symmetric": False, "asymmetric": True}
