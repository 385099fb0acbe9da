"""The noise of points fewer seeds measured than the rest of their cell (seed_noise.py): pooled from the
replicated points, drawn in the bootstrap, and nothing changed where every point has every seed."""

import math

import numpy as np
import pandas as pd
import pytest

from scaling_lab.analysis import optimum
from scaling_lab.analysis.optimum import find_optima
from scaling_lab.analysis.seed_noise import pooled_seed_spread

ALPHAS = 2.0 ** np.arange(7)
CURVATURE = 0.01  # loss rise per octave² away from the optimum
NOISE = 0.003  # one trial's standard deviation


def planted_study(rng, n_seeds, every_seed_everywhere, ranks=(1, 2, 4, 8)):
    """Cells of a parabola in log2 α with Gaussian seed noise, the optimum off the grid: seed 0 at every α and the
    other seeds at seed 0's best α only (an adaptive `best_alpha` search), or every seed at every α. Returns the
    trials and each rank's true optimum."""
    rows, truths = [], {}
    for rank in ranks:
        log2_optimum = 2.3 + rng.uniform(0, 1)
        truths[rank] = 2**log2_optimum
        clean = 2.0 + CURVATURE * (np.log2(ALPHAS) - log2_optimum) ** 2
        first = clean + NOISE * rng.standard_normal(len(ALPHAS))
        best = int(np.argmin(first))
        for index, alpha in enumerate(ALPHAS):
            rows.append({"model": "m", "rank": rank, "alpha": alpha, "seed": 0, "objective": first[index]})
            if every_seed_everywhere or index == best:
                for seed in range(1, n_seeds):
                    loss = clean[index] + NOISE * rng.standard_normal()
                    rows.append({"model": "m", "rank": rank, "alpha": alpha, "seed": seed, "objective": loss})
    return pd.DataFrame(rows).assign(model_params=1e6, trainable_params=np.nan), truths


def optima(trials, n_bootstrap=100):
    return find_optima(trials, "alpha", (), maximize=False, n_bootstrap=n_bootstrap, rng=np.random.default_rng(1),
                       tolerance=0.0025)


@pytest.fixture
def without_correction(monkeypatch):
    """find_optima as before seed_noise.py: no pooled spread, so every point is resampled over its own seeds."""
    def run(trials, **options):
        with monkeypatch.context() as patch:
            patch.setattr(optimum, "seed_spread_of_rows", lambda keys, *_: np.full(len(keys), np.nan))
            return optima(trials, **options)
    return run


def test_pooled_spread_recovers_the_planted_noise_and_skips_diverged_and_single_seed_points():
    rng = np.random.default_rng(3)
    n_points, n_seeds = 200, 3
    point = np.repeat(np.arange(n_points), n_seeds)
    seed = np.tile(np.arange(n_seeds), n_points)
    objective = 2.0 + rng.uniform(0, 0.3, n_points)[point] + NOISE * rng.standard_normal(point.size)
    objective[:n_seeds] = [2.0, 9.0, np.inf]  # a diverged point: its finite seeds say nothing
    group = np.where(point < 150, 0, 1)
    single = np.array([2, 2]), np.array([n_points, n_points + 1]), np.array([0, 0]), np.array([2.1, 2.2])
    spread = pooled_seed_spread(*(np.concatenate([a, b]) for a, b in zip((group, point, seed, objective), single)))
    assert spread[0] == pytest.approx(NOISE, rel=0.15)
    assert spread[1] == pytest.approx(NOISE, rel=0.15)
    assert np.isnan(spread[2])  # one seed at each of its points


def test_single_seed_points_widen_a_cells_interval(without_correction):
    trials, _ = planted_study(np.random.default_rng(5), n_seeds=3, every_seed_everywhere=False)
    corrected, before = optima(trials), without_correction(trials)
    widths = [math.log(c.optimum_high / c.optimum_low) for c in corrected]
    widths_before = [math.log(c.optimum_high / c.optimum_low) for c in before]
    assert np.mean(widths) > 1.15 * np.mean(widths_before)
    assert [c.optimum for c in corrected] == pytest.approx([c.optimum for c in before], rel=1e-12)


def test_intervals_of_best_alpha_cells_cover_the_planted_optimum_near_nominally(without_correction):
    """200 cell intervals, each from its own noise draw; 95% nominal. Without the correction about 0.75 cover."""
    rng = np.random.default_rng(7)
    covered = []
    for _ in range(50):
        trials, truths = planted_study(rng, n_seeds=3, every_seed_everywhere=False)
        covered += [c.optimum_low <= truths[c.rank] <= c.optimum_high for c in optima(trials)]
    assert len(covered) == 200
    assert np.mean(covered) >= 0.85


def test_fully_replicated_cells_are_resampled_as_before(without_correction):
    rng = np.random.default_rng(11)
    full, _ = planted_study(rng, n_seeds=2, every_seed_everywhere=True)
    sparse, _ = planted_study(rng, n_seeds=2, every_seed_everywhere=False, ranks=(16,))
    one_seed = full[full["seed"] == 0]
    # a fully replicated cell after an under-replicated one of another model: the draws for the latter must not
    # shift the former's resamples
    mixed = pd.concat([sparse.assign(model="a"), full.assign(model="b")], ignore_index=True)
    for trials, replicated in ((full, full), (one_seed, one_seed), (mixed, mixed[mixed["model"] == "b"])):
        corrected = [c for c in optima(trials) if c.model in set(replicated["model"])]
        before = [c for c in without_correction(trials) if c.model in set(replicated["model"])]
        assert len(corrected) == len(before) > 0
        for new, old in zip(corrected, before):
            assert (new.optimum, new.optimum_low, new.optimum_high, new.log_sigma) == pytest.approx(
                (old.optimum, old.optimum_low, old.optimum_high, old.log_sigma), rel=1e-12
            )
            assert new.flags == old.flags
            np.testing.assert_allclose(new.bootstrap_log_optimum, old.bootstrap_log_optimum, rtol=1e-12)


def test_the_method_section_describes_the_draws_only_where_some_point_lacks_a_seed():
    from types import SimpleNamespace

    from scaling_lab.analysis import FitSettings, methods
    from scaling_lab.analysis.markdown_report import _method

    rng = np.random.default_rng(13)
    for every_seed_everywhere in (True, False):
        trials, _ = planted_study(rng, n_seeds=2, every_seed_everywhere=every_seed_everywhere)
        fit = SimpleNamespace(settings=FitSettings(), alpha_cells=tuple(optima(trials)), learning_rate_cells=())
        text = "\n".join(_method(fit))
        assert (methods.SEED_NOISE in text) is not every_seed_everywhere
        assert methods.UNCERTAINTY.format(n_bootstrap=FitSettings().n_bootstrap) in text
