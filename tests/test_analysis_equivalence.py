"""The α-versus-learning-rate equivalence test: planted ridges in α·lr and planted effects of α of its own are
told apart, in both directions, with noise, for several noise draws; and `fit` reports it."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from scaling_lab.analysis import from_frame
from scaling_lab.analysis.__main__ import main
from scaling_lab.analysis.equivalence import alpha_lr_equivalence
from scaling_lab.analysis.planted import (
    planted_surface_trials,
    planted_trials,
    power_law,
    ridge_surface,
    separate_surface,
)

ALPHAS = tuple(2.0 ** np.arange(0, 13))
RATES = tuple(np.geomspace(1e-5, 1e-2, 7))
BEST_PRODUCT = 2.0**6 * 3e-4
TOLERANCE = 0.0025
DRAWS = range(4)


def planted(surface, draw: int, seeds: int = 4, noise: float = 0.001):
    return planted_surface_trials(
        surface, alphas=ALPHAS, learning_rates=RATES, seeds=seeds, noise=noise, rng=np.random.default_rng(draw)
    )


def equivalence_of(frame, draw: int, metric: str = "final_eval_loss"):
    (test,) = alpha_lr_equivalence(
        from_frame(frame, metric).trials,
        maximize=metric.endswith("accuracy"),
        tolerance=TOLERANCE,
        n_bootstrap=200,
        rng=np.random.default_rng(draw),
    )
    return test


@pytest.mark.parametrize("draw", DRAWS)
@pytest.mark.parametrize("steeper_above", [1.0, 4.0])
def test_a_ridge_in_alpha_times_learning_rate_is_recognised(draw, steeper_above):
    test = equivalence_of(planted(ridge_surface(BEST_PRODUCT, steeper_above=steeper_above), draw), draw)
    assert test.verdict == "ridge", test
    assert test.tolerance == pytest.approx(TOLERANCE, rel=0.01) and test.ridge_spread_ci[1] < test.tolerance
    assert test.alpha_slope_ci[0] < 0.0 < test.alpha_slope_ci[1]
    assert abs(math.log2(test.best_alpha * test.best_learning_rate / BEST_PRODUCT)) < 1.0


@pytest.mark.parametrize("draw", DRAWS)
def test_alpha_with_an_optimum_of_its_own_is_an_alpha_effect(draw):
    alpha_dominant = separate_surface(64.0, 3e-4, alpha_curvature=0.05, learning_rate_curvature=0.01)
    test = equivalence_of(planted(alpha_dominant, draw), draw)
    assert test.verdict == "alpha_effect" and test.p_value < 1e-10
    assert test.ridge_spread_ci[0] > 10 * test.tolerance
    assert test.best_alpha == pytest.approx(64.0, rel=0.3)


@pytest.mark.parametrize("draw", DRAWS)
def test_a_planted_alpha_slope_at_fixed_product_is_measured(draw):
    per_e_fold = -0.002  # larger α better at the same α·lr, as LoRA-α claims
    test = equivalence_of(planted(ridge_surface(BEST_PRODUCT, alpha_slope=per_e_fold), draw), draw)
    assert test.verdict == "alpha_effect"
    low, high = test.alpha_slope_ci
    assert low < per_e_fold * math.log(2) < high < 0.0
    # Along the ridge the α terms are linear here: the spread is the slope across the ridge's α range.
    doublings = math.log2(test.ridge_alphas[1] / test.ridge_alphas[0])
    assert test.ridge_spread == pytest.approx(-per_e_fold * math.log(2) * doublings, rel=0.15)


@pytest.mark.parametrize("draw", range(2))
def test_many_seeds_on_a_ridge_with_a_cliff_never_make_an_alpha_effect(draw):
    """A ridge ten times steeper above its optimum than below: no spline fits it exactly, and with 30 seeds any
    misfit is significant; the verdict must still not claim an effect of α."""
    test = equivalence_of(planted(ridge_surface(BEST_PRODUCT, steeper_above=10.0), draw, seeds=30, noise=0.002), draw)
    assert test.verdict != "alpha_effect"


def test_a_maximized_metric_keeps_its_sign():
    frame = planted(ridge_surface(BEST_PRODUCT, alpha_slope=-0.002), 0)
    loss_test = equivalence_of(frame, 0)
    accuracy_test = equivalence_of(
        frame.assign(final_eval_accuracy=2.0 - frame["final_eval_loss"]), 0, "final_eval_accuracy"
    )
    assert accuracy_test.verdict == "alpha_effect" and accuracy_test.alpha_slope > 0
    assert accuracy_test.alpha_slope == pytest.approx(-loss_test.alpha_slope, rel=0.05)
    assert accuracy_test.best_metric == pytest.approx(2.0 - loss_test.best_metric, rel=1e-3)


def test_only_cells_with_three_values_of_each_axis_are_tested():
    one_rate = planted(ridge_surface(BEST_PRODUCT), 0).query("learning_rate == @RATES[3]")
    assert (
        alpha_lr_equivalence(
            from_frame(one_rate).trials,
            maximize=False,
            tolerance=TOLERANCE,
            n_bootstrap=20,
            rng=np.random.default_rng(0),
        )
        == []
    )
    tiny_grid = planted_surface_trials(
        ridge_surface(1.0), alphas=(1.0, 2.0, 4.0), learning_rates=(0.25, 0.5, 1.0), diverge_above=0.01
    )
    test = equivalence_of(tiny_grid, 0)
    assert test.verdict == "not_tested" and "fewer than" in test.reason


@pytest.fixture(scope="module")
def two_kinds_csv(tmp_path_factory):
    ridge = planted(ridge_surface(BEST_PRODUCT), 0).assign(model="ridge")
    alpha_dominant = planted(separate_surface(64.0, 3e-4, 0.05, 0.01), 0).assign(model="alpha-dominant")
    path = tmp_path_factory.mktemp("equivalence") / "grid.csv"
    pd.concat([ridge, alpha_dominant]).to_csv(path, index=False)
    return path


def test_fit_reports_the_equivalence_in_the_terminal_law_json_and_report(two_kinds_csv, tmp_path, capsys):
    assert main(["fit", str(two_kinds_csv), "--bootstrap", "100", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "is the metric a function of α·lr alone? 2 cells: α effect 1; α·lr ridge 1" in printed
    block = json.loads((tmp_path / "law.json").read_text())["alpha_learning_rate_equivalence"]
    verdicts = {cell["model"]: cell["verdict"] for cell in block["cells"]}
    assert verdicts == {"ridge": "ridge", "alpha-dominant": "alpha_effect"}
    assert block["test"]["tolerance_relative"] == TOLERANCE and "F-test: is any α effect" in block["test"]["method"]
    report = (tmp_path / "report.md").read_text()
    assert "## α and learning rate: one knob or two?" in report and "](alpha_lr_surface.png)" in report
    assert (tmp_path / "alpha_lr_surface.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_equivalence_command(two_kinds_csv, tmp_path, capsys):
    assert main(["equivalence", str(two_kinds_csv), "--bootstrap", "100"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["ridge", "8", "α·lr", "ridge"] in [row[:4] for row in rows]
    assert ["Verdict,", "an", "equivalence", "test"] in [row[:4] for row in rows]  # methods.EQUIVALENCE_VERDICT
    no_grid = tmp_path / "no_grid.csv"
    planted_trials(power_law(16.0, 0.5), ranks=(1, 4, 16), seeds=1).to_csv(no_grid, index=False)
    assert main(["equivalence", str(no_grid)]) == 2
    assert "no α × learning-rate grid" in capsys.readouterr().err
