"""The field's rules side by side: which ones the interval excludes, and what following them costs."""

import math

import numpy as np
import pytest

from scaling_lab.analysis import FitSettings, fit_study, from_frame
from scaling_lab.analysis.hypotheses import objective_at
from scaling_lab.analysis.planted import planted_trials, power_law


def rules(k: float, convention: str = "standard"):
    frame = planted_trials(
        power_law(16.0, k), ranks=(1, 4, 16, 64, 256), seeds=3, noise=0.005, rng=np.random.default_rng(7)
    )
    (tested,) = fit_study(from_frame(frame), FitSettings(n_bootstrap=200, convention=convention)).alpha_laws
    return {test.name: test for test in tested.tests}


def test_square_root_data_reject_fixed_alpha_and_alpha_proportional_to_rank():
    tests = rules(0.5)
    assert tests["√r law"].excluded is False
    assert tests["fixed α"].excluded is True and tests["α ∝ r"].excluded is True
    assert tests["fitted law"].excluded is None
    assert tests["√r law"].fitted_c == pytest.approx(16.0, rel=0.05)
    # Following the right rule costs about what the free fit costs; the wrong ones cost far more.
    assert tests["√r law"].penalty_mean < 2 * tests["fitted law"].penalty_mean + 1e-3
    assert tests["fixed α"].penalty_mean > 10 * tests["√r law"].penalty_mean
    assert tests["α ∝ r"].penalty_mean > 10 * tests["√r law"].penalty_mean
    assert all(test.penalty_mean >= 0 and test.cells_scored == 5 for test in tests.values())


def test_proportional_data_accept_alpha_proportional_to_rank():
    tests = rules(1.0)
    assert tests["α ∝ r"].excluded is False
    assert tests["√r law"].excluded is True and tests["fixed α"].excluded is True


def test_rules_are_restated_in_the_reported_convention():
    tests = rules(0.5, convention="rslora")
    assert tests["√r law"].exponent == 0.0 and tests["fixed α"].exponent == -0.5 and tests["α ∝ r"].exponent == 0.5
    assert tests["√r law"].excluded is False


def test_metric_between_grid_points_is_interpolated_in_log_alpha():
    log_grid = np.log([1.0, 2.0, 4.0, 8.0])
    objective = np.array([3.0, 2.0, 1.0, math.inf])
    assert objective_at(log_grid, objective, math.log(2.0 * math.sqrt(2.0))) == (pytest.approx(1.5), False)
    assert objective_at(log_grid, objective, math.log(5.0)) == (1.0, False)  # nearer the finite neighbour
    assert objective_at(log_grid, objective, math.log(7.0)) == (math.inf, False)  # nearer the diverged one
    assert objective_at(log_grid, objective, math.log(0.5)) == (3.0, True)
