"""Scale conventions: conversions are exact, and trials under different scaling rules pool through their scale."""

import math

import numpy as np
import pandas as pd
import pytest

from scaling_lab.analysis import FitSettings, fit_study, from_frame
from scaling_lab.analysis.conventions import (
    alpha_in_convention,
    convert_exponent,
    effective_scale,
)
from scaling_lab.analysis.planted import planted_trials, power_law


def test_effective_scale_follows_peft():
    scale = effective_scale(
        np.array([16.0, 16.0, 16.0]), np.array([4, 4, 4]), np.array(["standard", "rslora", "fixed"])
    )
    assert scale == pytest.approx([4.0, 8.0, 16.0])


def test_alpha_in_each_convention_applies_the_same_scale():
    rank = np.array([1, 4, 64])
    scale = np.array([2.0, 0.5, 0.125])
    assert alpha_in_convention(scale, rank, "standard") == pytest.approx(scale * rank)
    assert alpha_in_convention(scale, rank, "rslora") == pytest.approx(scale * np.sqrt(rank))
    assert alpha_in_convention(scale, rank, "scale") == pytest.approx(scale)


def test_exponent_conversion_round_trips():
    assert convert_exponent(0.5, "standard", "rslora") == 0.0
    assert convert_exponent(0.5, "standard", "scale") == -0.5
    assert convert_exponent(convert_exponent(0.37, "scale", "rslora"), "rslora", "scale") == pytest.approx(0.37)


@pytest.fixture(scope="module")
def planted():
    frame = planted_trials(power_law(16.0, 0.5), ranks=(1, 4, 16, 64, 256), seeds=3, noise=0.01, missing_fraction=0.1)
    return from_frame(frame)


@pytest.mark.parametrize("convention", ["rslora", "scale"])
def test_fitting_in_a_convention_equals_converting_the_standard_law(planted, convention):
    standard = fit_study(planted, FitSettings(n_bootstrap=200)).alpha_laws[0].law
    direct = fit_study(planted, FitSettings(n_bootstrap=200, convention=convention)).alpha_laws[0].law
    converted = standard.in_convention(convention)
    # The bowl fit's vertex comes from a lattice search: a grid shifted in log α reproduces it to about 1e-10.
    assert direct.c == pytest.approx(converted.c, rel=1e-8)
    assert direct.k == pytest.approx(converted.k, abs=1e-8)
    assert direct.k_ci == pytest.approx(converted.k_ci, abs=1e-8)
    assert direct.c_ci == pytest.approx(converted.c_ci, rel=1e-8)
    assert direct.r_squared == pytest.approx(converted.r_squared, abs=1e-9)
    assert direct.k == pytest.approx(standard.k + {"rslora": -0.5, "scale": -1.0}[convention], abs=1e-8)
    prediction, expected = direct.predict(32), converted.predict(32)
    assert prediction.value == pytest.approx(expected.value, rel=1e-8)
    assert prediction.low == pytest.approx(expected.low, rel=1e-8)


def test_trials_under_other_rules_pool_through_their_effective_scale(planted):
    """Rewrite half the trials as rsLoRA or fixed-scale runs of the same multiplier: the analysis sees one study."""
    frame = planted.trials.copy()
    rewritten = frame.sample(frac=0.5, random_state=0).index
    rules = np.where(np.arange(len(rewritten)) % 2 == 0, "rslora", "fixed")
    frame["scaling_rule"] = frame["scaling_rule"].astype(str)
    frame.loc[rewritten, "scaling_rule"] = rules
    exponents = pd.Series(rules).map({"rslora": 0.5, "fixed": 0.0}).to_numpy()
    frame.loc[rewritten, "alpha"] = frame.loc[rewritten, "effective_scale"] * frame.loc[rewritten, "rank"] ** exponents
    frame = frame.drop(columns=["effective_scale", "objective"]).rename(columns={"metric": "final_eval_loss"})

    mixed = from_frame(frame)
    assert mixed.scaling_rules == ("fixed", "rslora", "standard")
    original = fit_study(planted, FitSettings(n_bootstrap=200)).alpha_cells
    pooled = fit_study(mixed, FitSettings(n_bootstrap=200)).alpha_cells
    assert [c.optimum for c in pooled] == pytest.approx([c.optimum for c in original], rel=1e-9)
    assert [c.grid for c in pooled] == [pytest.approx(c.grid, rel=1e-12) for c in original]
    assert all(math.isfinite(c.optimum) for c in pooled)
