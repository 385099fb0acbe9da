"""Is the metric a function of α·lr alone? The α-versus-learning-rate equivalence test, per model and rank.

The hypothesis, the two models compared, the α slope, the ridge spread and the verdict are stated in
methods.EQUIVALENCE_HYPOTHESIS, EQUIVALENCE_TEST and EQUIVALENCE_VERDICT (the texts report.md prints). Choices
made here: the fit window (α·lr within 2^WINDOW_DOUBLINGS of the best measured point's) keeps the cliff before
divergence from bending the fit; g is a cubic spline with a knot per doubling because a parabola in u, fitted to a
ridge that rises faster above its optimum than below, leaves residuals that the α terms pick up, and with many
seeds a test of a quadratic surface rejects every such ridge. The fit's own covariance enters the intervals as a
t interval for the slope and as normal draws of a, b, c for the spread.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from scipy import stats
from scipy.interpolate import BSpline

from scaling_lab.analysis.optimum import seed_means

MIN_AXIS_VALUES = 3
WINDOW_DOUBLINGS = 3.0
KNOT_SPACING_DOUBLINGS = 1.0
SPLINE_DEGREE = 3
ALPHA_TERMS = 3
MIN_POINTS = SPLINE_DEGREE + 1 + ALPHA_TERMS + 2  # a cubic ridge and the α terms, with two points to spare
RIDGE_SAMPLES = 65
VERDICTS = {
    "ridge": "a function of α·lr alone (α's own effect below tolerance)",
    "alpha_effect": "α has an effect of its own beyond α·lr",
    "undecided": "undecided: the interval of α's effect straddles the tolerance",
    "not_tested": "not tested",
}
VERDICT_LABELS = {
    "ridge": "α·lr ridge",
    "alpha_effect": "α effect",
    "undecided": "undecided",
    "not_tested": "not tested",
}


@dataclass(frozen=True)
class FittedSurface:
    """The full model of one cell, on the objective (the metric, negated when higher is better)."""

    knots: np.ndarray
    centre: tuple[float, float]  # the (u, v) the α terms are centred on
    coefficients: np.ndarray  # the spline's, then a, b, c
    log2_alphas: np.ndarray
    log2_learning_rates: np.ndarray
    fitted_points: np.ndarray  # α × learning rate: which grid points the fit used

    def objective(self, log2_alpha: np.ndarray, log2_learning_rate: np.ndarray) -> np.ndarray:
        """The fitted objective; nan where the nearest grid point was not fitted."""
        u, v = log2_alpha + log2_learning_rate, log2_alpha
        values = np.column_stack([ridge_basis(u.ravel(), self.knots), alpha_terms(u, v, self.centre).reshape(-1, 3)])
        fitted = (values @ self.coefficients).reshape(np.shape(u))
        return np.where(self.covers(log2_alpha, log2_learning_rate), fitted, np.nan)

    def covers(self, log2_alpha: np.ndarray, log2_learning_rate: np.ndarray) -> np.ndarray:
        nearest_alpha = np.abs(np.asarray(log2_alpha)[..., None] - self.log2_alphas).argmin(axis=-1)
        nearest_lr = np.abs(np.asarray(log2_learning_rate)[..., None] - self.log2_learning_rates).argmin(axis=-1)
        return self.fitted_points[nearest_alpha, nearest_lr]


@dataclass(frozen=True)
class AlphaLrEquivalence:
    """The equivalence test of one (model, rank) cell; α in the analysis's convention, metric in its own sign."""

    model: str
    rank: int
    verdict: str
    reason: str | None
    n_trials: int
    n_seeds: int
    alphas: tuple[float, ...]
    learning_rates: tuple[float, ...]
    mean_metric: np.ndarray = field(repr=False, compare=False)  # α × learning rate, nan: diverged or not measured
    diverged: np.ndarray = field(repr=False, compare=False)
    n_points_fitted: int = 0
    f_statistic: float | None = None
    f_dof: tuple[int, int] | None = None
    p_value: float | None = None
    best_alpha: float | None = None
    best_learning_rate: float | None = None
    best_metric: float | None = None
    ridge_alphas: tuple[float, float] | None = None
    alpha_slope: float | None = None
    alpha_slope_ci: tuple[float, float] | None = None
    ridge_spread: float | None = None
    ridge_spread_ci: tuple[float, float] | None = None
    tolerance: float | None = None
    surface: FittedSurface | None = field(default=None, repr=False, compare=False)

    def label(self) -> str:
        return f"{self.model} r={self.rank}"

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "rank": self.rank,
            "verdict": self.verdict,
            "verdict_text": VERDICTS[self.verdict],
            "reason": self.reason,
            "n_trials": self.n_trials,
            "n_seeds": self.n_seeds,
            "grid": {"alphas": list(self.alphas), "learning_rates": list(self.learning_rates)},
            "points_fitted": self.n_points_fitted,
            "points_diverged": int(self.diverged.sum()),
            "f_statistic": self.f_statistic,
            "f_dof": list(self.f_dof) if self.f_dof else None,
            "p_value": self.p_value,
            "best": {
                "alpha": self.best_alpha,
                "learning_rate": self.best_learning_rate,
                "alpha_times_learning_rate": (
                    self.best_alpha * self.best_learning_rate if self.best_alpha is not None else None
                ),
                "metric": self.best_metric,
            },
            "ridge_alpha_range": list(self.ridge_alphas) if self.ridge_alphas else None,
            "alpha_slope_per_doubling": self.alpha_slope,
            "alpha_slope_ci95": list(self.alpha_slope_ci) if self.alpha_slope_ci else None,
            "ridge_spread": self.ridge_spread,
            "ridge_spread_ci95": list(self.ridge_spread_ci) if self.ridge_spread_ci else None,
            "tolerance": self.tolerance,
        }


def alpha_lr_equivalence(
    trials: pd.DataFrame, *, maximize: bool, tolerance: float, n_bootstrap: int, rng: np.random.Generator
) -> list[AlphaLrEquivalence]:
    """One test per (model, rank) cell whose trials span at least 3 α and 3 learning rates.

    `trials` needs model, rank, alpha, learning_rate, seed and objective (to minimize, +inf when diverged)."""
    # Codes computed once for all cells: sorting each cell's values again costs more than the fits on large studies.
    alpha_code, log2_alphas = pd.factorize(np.round(np.log2(trials["alpha"].to_numpy(dtype=float)), 9), sort=True)
    rate_code, log2_rates = pd.factorize(np.round(np.log2(trials["learning_rate"].to_numpy(dtype=float)), 9), sort=True)
    seed_code, _ = pd.factorize(trials["seed"].to_numpy())
    cell_code = trials.groupby(["model", "rank"], sort=True, observed=True).ngroup().to_numpy()
    order = np.argsort(cell_code, kind="stable")
    bounds = np.searchsorted(cell_code[order], np.arange(cell_code.max() + 2))
    alpha_code, rate_code, seed_code = alpha_code[order], rate_code[order], seed_code[order]
    objective = trials["objective"].to_numpy(dtype=float)[order]
    tests = []
    for start, stop in itertools.pairwise(bounds):
        cell = slice(start, stop)
        grid = _Grid.from_codes(
            (alpha_code[cell], log2_alphas), (rate_code[cell], log2_rates), seed_code[cell], objective[cell]
        )
        if min(grid.values.shape[1:]) >= MIN_AXIS_VALUES:
            first = trials.iloc[order[start]]
            tests.append(
                _test_cell(str(first["model"]), int(first["rank"]), grid, maximize, tolerance, n_bootstrap, rng)
            )
    return tests


@dataclass(frozen=True)
class _Grid:
    log2_alphas: np.ndarray
    log2_learning_rates: np.ndarray
    values: np.ndarray  # seeds × α × learning rate: objective (mean of repeats), nan not measured, +inf diverged

    @classmethod
    def from_codes(
        cls,
        alphas: tuple[np.ndarray, np.ndarray],
        rates: tuple[np.ndarray, np.ndarray],
        seed_code: np.ndarray,
        objective: np.ndarray,
    ) -> _Grid:
        """From each trial's codes into the study's axes (each axis: the codes, and the sorted values they index)."""
        (alpha_index, alpha_values), (rate_index, rate_values) = (_local(*axis) for axis in (alphas, rates))
        seed_index, _ = _local(seed_code, np.arange(seed_code.max() + 1))
        shape = (seed_index.max() + 1, len(alpha_values), len(rate_values))
        flat = np.ravel_multi_index((seed_index, alpha_index, rate_index), shape)
        finite = np.isfinite(objective)
        sums = np.bincount(flat, np.where(finite, objective, 0.0), minlength=math.prod(shape))
        counts = np.bincount(flat, finite, minlength=math.prod(shape))
        diverged = np.bincount(flat, ~finite, minlength=math.prod(shape))
        with np.errstate(invalid="ignore", divide="ignore"):
            values = np.where(diverged > 0, np.inf, sums / counts).reshape(shape)
        return cls(alpha_values, rate_values, values)

    def point_means(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per grid point (α × learning rate): the mean over seeds (nan where any diverged or none measured), the
        finite trials, and whether any diverged."""
        finite = np.isfinite(self.values)
        counts = finite.sum(axis=0)
        diverged = np.isinf(self.values).any(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(finite, self.values, 0.0).sum(axis=0) / counts
        return np.where(diverged | (counts == 0), np.nan, means), counts, diverged


def _local(codes: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes renumbered over the values that occur, and those values (in their order)."""
    present = np.bincount(codes, minlength=len(values)) > 0
    return (np.cumsum(present) - 1)[codes], values[present]


def ridge_basis(u: np.ndarray, knots: np.ndarray) -> np.ndarray:
    return BSpline.design_matrix(np.clip(u, knots[0], knots[-1]), knots, SPLINE_DEGREE).toarray()


def alpha_terms(u: np.ndarray, v: np.ndarray, centre: tuple[float, float]) -> np.ndarray:
    """The full model's α terms v, u·v and v², centred: (..., 3)."""
    du, dv = np.broadcast_arrays(np.asarray(u) - centre[0], np.asarray(v) - centre[1])
    return np.stack([dv, du * dv, dv**2], axis=-1)


def _knots(u: np.ndarray) -> np.ndarray:
    low, high = float(u.min()), float(u.max())
    interior = max(0, min(int((high - low) // KNOT_SPACING_DOUBLINGS), len(u) - MIN_POINTS))
    # at quantiles of the measured u, so that no knot interval is empty on a coarse grid
    inner = np.quantile(np.unique(u), np.linspace(0.0, 1.0, interior + 2)[1:-1])
    return np.concatenate([[low] * (SPLINE_DEGREE + 1), inner, [high] * (SPLINE_DEGREE + 1)])


@dataclass(frozen=True)
class _SurfaceFit:
    """Both models fitted to one cell's window of grid points (the arrays run over those points)."""

    surface: FittedSurface
    fitted: np.ndarray  # the full model at each point
    alpha_solve: np.ndarray  # 3 × points: the α coefficients are alpha_solve @ point means
    counts: np.ndarray  # trials per point
    rss_full: float  # over the trials, seed noise included
    rss_ridge: float
    dof: int  # trials minus the full model's parameters

    @property
    def alpha_coefficients(self) -> np.ndarray:
        return self.surface.coefficients[-ALPHA_TERMS:]

    def f_test(self) -> tuple[float, float] | None:
        if self.dof <= 0:
            return None
        variance = self.rss_full / self.dof
        gain = max(self.rss_ridge - self.rss_full, 0.0) / ALPHA_TERMS
        statistic = gain / variance if variance > 0 else (math.inf if gain > 0 else 0.0)
        return statistic, float(stats.f.sf(statistic, ALPHA_TERMS, self.dof))

    def alpha_covariance(self) -> np.ndarray | None:
        """Of the α coefficients, from the residual variance (seed noise and lack of fit alike)."""
        if self.dof <= 0:
            return None
        return (self.alpha_solve * (self.rss_full / self.dof / self.counts)) @ self.alpha_solve.T


def _fit_surface(grid: _Grid, window: np.ndarray, means: np.ndarray, counts: np.ndarray) -> _SurfaceFit | str:
    """Both models by least squares on the trials of the window's points; a reason when they cannot be told apart."""
    u = (grid.log2_alphas[:, None] + grid.log2_learning_rates[None, :])[window]
    v = np.broadcast_to(grid.log2_alphas[:, None], window.shape)[window]
    m, n = means[window], counts[window].astype(float)
    if np.ptp(u) < 1e-9:
        return "every fitted point has the same α·lr"
    knots, centre = _knots(u), (float(u.mean()), float(v.mean()))
    ridge = ridge_basis(u, knots)
    full = np.column_stack([ridge, alpha_terms(u, v, centre)])
    weight = np.sqrt(n)  # least squares on point means weighted by their trials = on the trials themselves
    rank_full = int(np.linalg.matrix_rank(full * weight[:, None]))
    if rank_full - np.linalg.matrix_rank(ridge * weight[:, None]) < ALPHA_TERMS:
        return "α and α·lr cannot be told apart on this grid"
    solve = np.linalg.pinv(full * weight[:, None]) * weight
    coefficients = solve @ m
    ridge_only = np.linalg.lstsq(ridge * weight[:, None], m * weight, rcond=None)[0]
    pure_error = float(np.nansum((grid.values[:, window] - m) ** 2))
    return _SurfaceFit(
        surface=FittedSurface(knots, centre, coefficients, grid.log2_alphas, grid.log2_learning_rates, window),
        fitted=full @ coefficients,
        alpha_solve=solve[-ALPHA_TERMS:],
        counts=n,
        rss_full=float(n @ (m - full @ coefficients) ** 2) + pure_error,
        rss_ridge=float(n @ (m - ridge @ ridge_only) ** 2) + pure_error,
        dof=int(n.sum()) - rank_full,
    )


def _ridge_line(grid: _Grid, surface: FittedSurface, product: float) -> np.ndarray:
    """log₂ α along the line log₂(α·lr) = `product`, where it crosses fitted grid points."""
    low = max(grid.log2_alphas[0], product - grid.log2_learning_rates[-1])
    high = min(grid.log2_alphas[-1], product - grid.log2_learning_rates[0])
    line = np.linspace(low, high, RIDGE_SAMPLES)
    return line[surface.covers(line, product - line)]


def _test_cell(
    model: str,
    rank: int,
    grid: _Grid,
    maximize: bool,
    tolerance: float,
    n_bootstrap: int,
    rng: np.random.Generator,
) -> AlphaLrEquivalence:
    sign = -1.0 if maximize else 1.0
    means, counts, diverged = grid.point_means()
    base = AlphaLrEquivalence(
        model=model,
        rank=rank,
        verdict="not_tested",
        reason=None,
        n_trials=int((~np.isnan(grid.values)).sum()),
        n_seeds=grid.values.shape[0],
        alphas=tuple(float(a) for a in 2.0**grid.log2_alphas),
        learning_rates=tuple(float(r) for r in 2.0**grid.log2_learning_rates),
        mean_metric=sign * means,
        diverged=diverged,
    )
    measured = np.isfinite(means)
    if not measured.any():
        return replace(base, reason="every grid point diverged")
    products = grid.log2_alphas[:, None] + grid.log2_learning_rates[None, :]
    window = measured & (np.abs(products - products.flat[np.nanargmin(means)]) <= WINDOW_DOUBLINGS)
    if window.sum() < MIN_POINTS:
        return replace(
            base,
            reason=f"{window.sum()} finite points within 2^{WINDOW_DOUBLINGS:g}× of the best α·lr, "
            f"fewer than {MIN_POINTS}",
        )
    fit = _fit_surface(grid, window, means, counts)
    if isinstance(fit, str):
        return replace(base, reason=fit)

    best = int(np.argmin(fit.fitted))
    best_alpha = float(grid.log2_alphas[np.nonzero(window)[0][best]])
    best_product = float(products[window][best])
    line = _ridge_line(grid, fit.surface, best_product)
    if np.ptp(line) < 1e-9:
        return replace(base, reason="the line α·lr = const through the optimum meets the fitted grid at one point only")
    along_ridge = alpha_terms(best_product, line, fit.surface.centre)  # samples × 3
    centre = fit.surface.centre
    slope_row = np.array([1.0, best_product - centre[0], 2.0 * ((line.min() + line.max()) / 2 - centre[1])])

    def spread(coefficients: np.ndarray) -> np.ndarray:
        return np.ptp(coefficients @ along_ridge.T, axis=-1)

    resampled = _bootstrap_alpha_coefficients(grid.values[:, window], means[window], fit, n_bootstrap, rng)
    covariance = fit.alpha_covariance()
    slope_intervals, spread_intervals = [], []
    if resampled is not None:
        slope_intervals.append(np.percentile(resampled @ slope_row, [2.5, 97.5]))
        spread_intervals.append(np.percentile(spread(resampled), [2.5, 97.5]))
    if covariance is not None:
        slope = slope_row @ fit.alpha_coefficients
        half = float(stats.t.ppf(0.975, fit.dof)) * math.sqrt(max(float(slope_row @ covariance @ slope_row), 0.0))
        slope_intervals.append((slope - half, slope + half))
        draws = rng.multivariate_normal(fit.alpha_coefficients, covariance, max(n_bootstrap, 200), method="eigh")
        spread_intervals.append(np.percentile(spread(draws), [2.5, 97.5]))
    if not spread_intervals:
        return replace(base, reason="one seed and no residual degrees of freedom: no interval")

    slope_low, slope_high = _widest(slope_intervals)
    spread_ci = _widest(spread_intervals)
    best_metric = float(sign * fit.fitted[best])
    threshold = tolerance * abs(best_metric)
    f_test = fit.f_test()
    return replace(
        base,
        verdict=_verdict(spread_ci, threshold),
        n_points_fitted=int(window.sum()),
        f_statistic=f_test[0] if f_test else None,
        f_dof=(ALPHA_TERMS, fit.dof) if f_test else None,
        p_value=f_test[1] if f_test else None,
        best_alpha=float(2.0**best_alpha),
        best_learning_rate=float(2.0 ** (best_product - best_alpha)),
        best_metric=best_metric,
        ridge_alphas=(float(2.0 ** line.min()), float(2.0 ** line.max())),
        alpha_slope=float(sign * slope_row @ fit.alpha_coefficients),
        alpha_slope_ci=(slope_low, slope_high) if sign > 0 else (-slope_high, -slope_low),
        ridge_spread=float(spread(fit.alpha_coefficients)),
        ridge_spread_ci=spread_ci,
        tolerance=threshold,
        surface=fit.surface,
    )


def _verdict(spread_ci: tuple[float, float], threshold: float) -> str:
    if spread_ci[1] <= threshold:
        return "ridge"
    if spread_ci[0] > threshold:
        return "alpha_effect"
    return "undecided"


def _bootstrap_alpha_coefficients(
    per_seed: np.ndarray, means: np.ndarray, fit: _SurfaceFit, n_bootstrap: int, rng: np.random.Generator
) -> np.ndarray | None:
    """The α coefficients refitted on `n_bootstrap` resamples of the seeds (resamples × 3); None for one seed.

    As in optimum.py, deviations are stretched by √(S/(S−1)): a resampled mean of S seeds varies (S−1)/S as much."""
    n_seeds = per_seed.shape[0]
    if n_seeds < 2:
        return None
    draws = rng.integers(0, n_seeds, size=(n_bootstrap, n_seeds)) + n_seeds * np.arange(n_bootstrap)[:, None]
    weights = np.bincount(draws.ravel(), minlength=n_bootstrap * n_seeds).reshape(n_bootstrap, n_seeds).astype(float)
    finite = np.isfinite(per_seed)
    if finite.all():  # the coefficients are linear in the means: refit each seed once, then average
        resampled = weights @ (per_seed @ fit.alpha_solve.T) / n_seeds
    else:
        point_means = seed_means(
            weights, np.where(finite, per_seed, 0.0), finite.astype(float), np.zeros(per_seed.shape)
        )
        # A point that none of the resampled seeds measured keeps its mean over all seeds.
        resampled = np.where(np.isnan(point_means), means, point_means) @ fit.alpha_solve.T
    return fit.alpha_coefficients + math.sqrt(n_seeds / (n_seeds - 1)) * (resampled - fit.alpha_coefficients)


def _widest(intervals: list) -> tuple[float, float]:
    return float(min(i[0] for i in intervals)), float(max(i[1] for i in intervals))
