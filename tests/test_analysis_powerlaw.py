"""Planted laws are recovered with honest intervals; laws the data do not support are flagged."""

import math

import numpy as np
import pytest

from scaling_lab.analysis import (
    FitSettings,
    NoLaw,
    PowerLaw,
    fit_study,
    from_frame,
    predict,
)
from scaling_lab.analysis.hypotheses import mu_a_exponent
from scaling_lab.analysis.planted import exponential_wall, planted_trials, power_law, two_sided

C, K = 16.0, 0.5


def planted_law(rep: int, **options) -> PowerLaw:
    """One planted study: noise, 10% of trials missing, diverged trials, one optimum beyond the grid's top and
    one a fraction of a step inside it, the grid shifted at random against the optima."""
    rng = np.random.default_rng(rep)
    offset = rng.uniform(0.0, 1.0)
    settings = {
        "ranks": (1, 4, 16, 64, 256, 512, 1024),
        "alphas": tuple(2.0 ** (np.arange(10) + offset)),
        "seeds": 3,
        "noise": 0.01,
        "missing_fraction": 0.1,
        "rng": rng,
        **options,
    }
    frame = planted_trials(power_law(C, K), **settings)
    law = fit_study(from_frame(frame), FitSettings(n_bootstrap=200, seed=rep)).alpha_laws[0].law
    assert isinstance(law, PowerLaw)
    return law


def test_nominal_95_percent_intervals_cover_the_planted_law():
    """100 seeded repetitions with 200 resamples each. Accepted: the k interval holds the truth in 85-99% of
    them (measured: 97%), the c interval in 85-99% (96%); the mean k is within 0.01 of the truth (measured
    +0.003) and every single estimate within 0.12 (measured at most 0.11: at this noise the asymmetric bowl fit,
    unbiased where the parabola is not, scatters more than the parabola's 0.05)."""
    laws = [planted_law(rep) for rep in range(100)]
    k_hits = np.mean([law.k_ci[0] <= K <= law.k_ci[1] for law in laws])
    c_hits = np.mean([law.c_ci[0] <= C <= law.c_ci[1] for law in laws])
    estimates = np.array([law.k for law in laws])
    assert 0.85 <= k_hits <= 0.99
    assert 0.85 <= c_hits <= 0.99
    assert abs(estimates.mean() - K) < 0.01
    assert np.abs(estimates - K).max() < 0.12


def test_optima_beyond_the_grid_are_left_out_and_counted():
    law = planted_law(3)
    assert dict(law.dropped).get("edge", 0) >= 1
    assert 1024 not in law.ranks
    assert law.supported


@pytest.mark.parametrize(
    "shape",
    [
        lambda r, n: 16 * np.minimum(r, 16.0) ** 0.5,  # square root, then flat (what the design probe saw)
        lambda r, n: 64 * np.exp(-0.15 * (np.log(r) - np.log(16)) ** 2),  # rises then falls
    ],
    ids=["saturating", "hump"],
)
def test_a_law_that_is_not_a_power_law_is_flagged(shape):
    frame = planted_trials(
        shape, ranks=tuple(2**i for i in range(9)), seeds=3, noise=0.01, rng=np.random.default_rng(0)
    )
    law = fit_study(from_frame(frame), FitSettings(n_bootstrap=200)).alpha_laws[0].law
    assert not law.supported
    assert any("not a power law" in warning for warning in law.warnings)


def test_too_few_ranks_warn_instead_of_giving_a_confident_law():
    two = planted_trials(power_law(C, K), ranks=(4, 16), seeds=3, noise=0.01)
    law = fit_study(from_frame(two), FitSettings(n_bootstrap=200)).alpha_laws[0].law
    assert not law.supported
    assert any("only 2 ranks" in warning for warning in law.warnings)
    one = planted_trials(power_law(C, K), ranks=(8,), seeds=3, noise=0.01)
    assert isinstance(fit_study(from_frame(one), FitSettings(n_bootstrap=200)).alpha_laws[0].law, NoLaw)


def test_one_seed_per_cell_gives_intervals_from_the_residuals():
    frame = planted_trials(
        power_law(C, K), ranks=(1, 4, 16, 64, 256), seeds=1, noise=0.01, rng=np.random.default_rng(2)
    )
    law = fit_study(from_frame(frame), FitSettings(n_bootstrap=200)).alpha_laws[0].law
    assert law.interval_method == "residuals"
    assert law.k_ci[0] < K < law.k_ci[1]


def test_joint_law_recovers_the_model_size_exponent():
    frame = planted_trials(
        power_law(C, K, m=0.25),
        ranks=(1, 4, 16, 64),
        models={"s": 1e6, "m": 8e6, "l": 6.4e7},
        seeds=3,
        noise=0.005,
        rng=np.random.default_rng(4),
    )
    fit = fit_study(from_frame(frame), FitSettings(by_model=True, n_bootstrap=200))
    assert [dict(t.law.group)["model"] for t in fit.alpha_laws] == ["l", "m", "s"]
    (joint,) = [t.law for t in fit.joint_laws]
    assert joint.size_measure == "model_params"
    assert joint.m_ci[0] <= 0.25 <= joint.m_ci[1] and abs(joint.m - 0.25) < 0.05
    assert joint.k_ci[0] <= K <= joint.k_ci[1]
    ((_, _, at_unseen_size),) = predict(fit, [32], model_params=2e7)
    truth = C * 32**K * (2e7 / 1e6) ** 0.25
    assert at_unseen_size.low < truth < at_unseen_size.high
    assert not at_unseen_size.warnings


def test_predict_warns_beyond_four_times_the_largest_rank():
    frame = planted_trials(power_law(C, K), ranks=(1, 4, 16, 64), seeds=3, noise=0.005, rng=np.random.default_rng(5))
    fit = fit_study(from_frame(frame), FitSettings(n_bootstrap=200))
    (_, _, inside), (_, _, beyond) = predict(fit, [200, 300])
    assert inside.low < C * 200**K < inside.high and not inside.warnings
    assert "more than 4× the largest measured rank (64)" in beyond.warnings[0]
    assert beyond.high - beyond.low > inside.high - inside.low


def test_learning_rate_axis_gets_its_own_laws():
    frame = planted_trials(
        power_law(C, K),
        ranks=(1, 4, 16, 64),
        seeds=2,
        noise=0.002,
        learning_rates=tuple(np.geomspace(1e-5, 1e-2, 13)),
        optimal_learning_rate=lambda rank, size: 3e-4 * rank**-0.25,
        rng=np.random.default_rng(6),
    )
    fit = fit_study(from_frame(frame), FitSettings(n_bootstrap=100))
    assert fit.learning_rate_is_axis
    assert {name for name, _ in fit.alpha_laws[0].law.group} == {"learning_rate"}
    fitted = [t.law for t in fit.learning_rate_laws if isinstance(t.law, PowerLaw) and len(t.law.ranks) == 4]
    assert fitted
    assert all(abs(law.k - (-0.25)) < 0.05 for law in fitted)
    assert all(math.isclose(law.c, 3e-4, rel_tol=0.15) for law in fitted)


@pytest.mark.parametrize(
    "rule, alpha, exponent",
    [("standard", 64.0, 0.0), ("rslora", 8.0, -0.25), ("fixed", 2.0, -0.5)],  # μA's lr* exponents at a fixed α
)
def test_learning_rate_law_at_the_rule_and_alpha_as_run(rule, alpha, exponent):
    """lr*(r) = 1e-3 · r^exponent planted at one α under each scaling rule, ranks 2-64, 11 learning rates, 2 seeds:
    recovered with no flag whatever convention the α laws are stated in. Five planted draws: each law within 0.03
    of the truth, and its 95% interval holding the truth in at least four of them."""
    inside = 0
    for draw in range(5):
        frame = planted_trials(
            power_law(C, K),
            ranks=(2, 4, 8, 16, 32, 64),
            alphas=(alpha,),
            seeds=2,
            noise=0.002,
            learning_rates=tuple(np.geomspace(1e-5, 1e-1, 11)),
            optimal_learning_rate=lambda rank, size: 1e-3 * rank**exponent,
            scaling_rule=rule,
            rng=np.random.default_rng(7 + draw),
        )
        laws = []
        for convention in ("standard", "scale"):
            fit = fit_study(from_frame(frame), FitSettings(n_bootstrap=100, convention=convention))
            (tested,) = fit.learning_rate_laws
            law = tested.law
            assert isinstance(law, PowerLaw) and dict(law.group) == {"scaling_rule": rule, "alpha": alpha}
            assert abs(law.k - exponent) < 0.03 and math.isclose(law.c, 1e-3, rel_tol=0.1)
            assert mu_a_exponent(law) == exponent
            assert any(t.name == "μA prediction" and t.exponent == exponent for t in tested.tests) or exponent == 0.0
            laws.append(law)
        assert laws[0].k == pytest.approx(laws[1].k, rel=1e-9, abs=1e-12)  # the same law in either convention
        inside += laws[0].k_ci[0] <= exponent <= laws[0].k_ci[1]
    assert inside >= 4


ASYMMETRIC_BOWLS = {
    "4x steeper above": two_sided(0.05, 4.0),
    "steeper above at low rank": two_sided(0.05, lambda rank: 8.0 * rank ** (-1 / 3)),
    "exponential wall": exponential_wall(0.05, 1.5),
}


@pytest.mark.parametrize("bowl", list(ASYMMETRIC_BOWLS), ids=list(ASYMMETRIC_BOWLS))
def test_asymmetric_bowls_give_the_planted_law_with_honest_intervals(bowl):
    """α* = 900·r^0.25 on the embedded default's ×√8 spacing (six α, the grid shifted at random), two seeds, 20
    repeats. The three-point parabola put c 27% (4×) and 35% (rank-varying) low, its interval holding the truth in
    none of 20. Accepted: c within 15% and k within 0.05 in at least 18 of 20, and each interval holding the truth
    in at least 16 of 20 (nominal 19; measured 19 for the two-sided bowls); benchmarks/asymmetric_optimum.py
    measures it over 100 repeats and at ×2 spacing too."""
    laws = []
    for repeat in range(20):
        rng = np.random.default_rng(repeat)
        alphas = 181.0 * math.sqrt(8) ** (np.arange(6) + rng.uniform(0.0, 1.0))
        frame = planted_trials(
            power_law(900.0, 0.25), ranks=(1, 2, 4, 8, 16, 32, 64), alphas=tuple(alphas), seeds=2,
            bowl=ASYMMETRIC_BOWLS[bowl], noise=0.002, rng=rng,
        )
        laws.append(fit_study(from_frame(frame), FitSettings(n_bootstrap=100, seed=repeat)).alpha_laws[0].law)
    close = sum(abs(law.c / 900.0 - 1) <= 0.15 and abs(law.k - 0.25) <= 0.05 for law in laws)
    c_inside = sum(law.c_ci[0] <= 900.0 <= law.c_ci[1] for law in laws)
    k_inside = sum(law.k_ci[0] <= 0.25 <= law.k_ci[1] for law in laws)
    assert close >= 18
    assert c_inside >= 16 and k_inside >= 16
