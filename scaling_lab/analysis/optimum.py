"""The optimum of one axis (α, or the learning rate) in each cell of the other axes, with its uncertainty and flags.

Within a cell the metric is averaged over seeds at each grid point; a point where any seed diverged counts as
worse than every finite one. The best point is refined by a parabola in log(axis) through it and its two
neighbours (kept local because wider parabola fits are biased by the grid's width); when a neighbour is missing
or diverged the grid point stands. The uncertainty comes from a bootstrap over seeds within the cell, plus the
grid's resolution: a grid-point optimum is only known to within ±Δ/2 of a grid step Δ (standard deviation
Δ/√12). A refined one is credited with a fifth of that: on a loss four times steeper above the optimum than
below, the parabola's error varies by about 0.06 Δ with where the optimum falls between grid points.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

MIN_FINITE_POINTS = 3
REFINED_RESOLUTION = 0.2  # a refined optimum's grid error as a share of an unrefined one's (module docstring)
Z95 = 1.959963984540054

NEAR_EDGE_FRACTION = 0.1  # an optimum is "near the edge" when this share of bootstrap resamples puts it there
EDGE_FLAGS = ("edge_low", "edge_high", "near_edge_low", "near_edge_high")


@dataclass(frozen=True)
class CellOptimum:
    """The best value of `axis` in one cell (model × rank × what is held fixed), in the analysis's convention."""

    axis: str
    model: str
    rank: int
    held_fixed: tuple[tuple[str, float | str], ...]
    model_params: float | None
    trainable_params: float | None
    grid: tuple[float, ...]
    mean_metric: tuple[float, ...]
    diverged: tuple[bool, ...]
    n_trials: int
    n_seeds: int
    n_diverged: int
    optimum: float | None
    optimum_low: float | None
    optimum_high: float | None
    log_sigma: float | None
    optimum_metric: float | None
    refined: bool
    near_optimal: tuple[float, float] | None
    flags: tuple[str, ...]
    bootstrap_log_optimum: np.ndarray = field(repr=False, compare=False)

    def exclusion(self, keep_edge: bool = False) -> str | None:
        """Why this optimum does not enter a law fit, or None when it does."""
        if "all_diverged" in self.flags:
            return "all_diverged"
        if "too_few_points" in self.flags:
            return "too_few_points"
        if not keep_edge and any(flag in self.flags for flag in EDGE_FLAGS):
            return "edge"
        return None

    def label(self) -> str:
        fixed = " ".join(f"{name}={value if isinstance(value, str) else format(value, 'g')}"
                         for name, value in self.held_fixed)
        return " ".join(part for part in (self.model, f"r={self.rank}", fixed) if part)

    def objective_curve(self, maximize: bool) -> np.ndarray:
        """The seed-averaged metric as a quantity to minimize, +inf where a seed diverged."""
        values = -np.array(self.mean_metric) if maximize else np.array(self.mean_metric)
        return np.where(self.diverged, np.inf, values)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "rank": self.rank,
            **{name: value for name, value in self.held_fixed},
            "model_params": self.model_params,
            "trainable_params": self.trainable_params,
            "axis": self.axis,
            "optimum": self.optimum,
            "optimum_ci95": [self.optimum_low, self.optimum_high],
            "log_sigma": self.log_sigma,
            "optimum_metric": self.optimum_metric,
            "refined_by_parabola": self.refined,
            "near_optimal_range": list(self.near_optimal) if self.near_optimal else None,
            "flags": list(self.flags),
            "n_trials": self.n_trials,
            "n_seeds": self.n_seeds,
            "n_diverged": self.n_diverged,
            "grid": list(self.grid),
            "mean_metric": [None if d else m for m, d in zip(self.mean_metric, self.diverged)],
        }


def locate_optima(log_grid: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each row of `means` (objective over `log_grid`; +inf diverged, nan not measured): the log optimum,
    the index of the best grid point, whether a parabola refined it, and the objective at the optimum.
    Rows without any finite point give nan."""
    scores = np.where(np.isnan(means), np.inf, means)
    rows = np.arange(scores.shape[0])
    last = scores.shape[1] - 1
    best = scores.argmin(axis=1)
    left, right = np.maximum(best - 1, 0), np.minimum(best + 1, last)
    y_best, y_left, y_right = scores[rows, best], scores[rows, left], scores[rows, right]
    h_left, h_right = log_grid[left] - log_grid[best], log_grid[right] - log_grid[best]
    with np.errstate(divide="ignore", invalid="ignore"):
        rise_left, rise_right = y_left - y_best, y_right - y_best
        denominator = h_left * h_right * (h_left - h_right)
        curvature = (rise_left * h_right - rise_right * h_left) / denominator
        slope = (rise_right * h_left**2 - rise_left * h_right**2) / denominator
        refined = (best > 0) & (best < last) & np.isfinite(y_left) & np.isfinite(y_right) & (curvature > 0)
        shift = np.where(refined, -slope / (2 * curvature), 0.0)
        value = np.where(refined, y_best - slope**2 / (4 * curvature), y_best)
    has_optimum = np.isfinite(y_best)
    log_optimum = np.where(has_optimum, log_grid[best] + shift, np.nan)
    return log_optimum, best, refined & has_optimum, np.where(has_optimum, value, np.nan)


def seed_means(weights: np.ndarray, finite_values: np.ndarray, present: np.ndarray, diverged: np.ndarray) -> np.ndarray:
    """Seed-weighted means over the grid (weights: replicates × seeds; the rest seeds × grid points).
    Any diverged seed with weight makes the point +inf; a point no weighted seed measured is nan."""
    counted = weights.sum(axis=1, keepdims=True) if present.all() else _blocked_matmul(weights, present)
    with np.errstate(divide="ignore", invalid="ignore"):
        means = _blocked_matmul(weights, finite_values) / counted
    return np.where(_blocked_matmul(weights, diverged) > 0, np.inf, means) if diverged.any() else means


def _blocked_matmul(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """left @ right in blocks of rows of at most 2^18 multiply-adds each. BLAS libraries start threads above
    about that size, and for products this small the threads cost 10-100× the arithmetic on a busy machine."""
    rows = max(1, 2**18 // max(1, left.shape[1] * right.shape[1]))
    if left.shape[0] <= rows:
        return left @ right
    return np.concatenate([left[start : start + rows] @ right for start in range(0, left.shape[0], rows)])


def find_optima(
    trials: pd.DataFrame,
    axis: str,
    fixed_columns: tuple[str, ...],
    *,
    maximize: bool,
    n_bootstrap: int,
    rng: np.random.Generator,
    tolerance: float,
) -> list[CellOptimum]:
    """One CellOptimum per (model, *fixed_columns, rank) cell of `trials`, optimizing `axis`.

    `trials` needs model, rank, seed, objective (to minimize, +inf when diverged), model_params,
    trainable_params, `axis` and the fixed columns; cells are returned sorted by model, fixed values, rank."""
    cell_columns = ["model", *fixed_columns, "rank"]
    keys = trials[cell_columns].copy()
    for name in fixed_columns:
        if pd.api.types.is_numeric_dtype(trials[name]):
            keys[name] = np.round(np.log(trials[name].to_numpy()), 9)
    cell_code = keys.groupby(cell_columns, sort=True, observed=True).ngroup().to_numpy()
    order = np.argsort(cell_code, kind="stable")
    bounds = np.searchsorted(cell_code[order], np.arange(cell_code.max() + 2))

    model = pd.Categorical(trials["model"])
    columns = {
        name: trials[name].to_numpy()[order]
        for name in {"rank", "seed", "objective", "model_params", "trainable_params", axis, *fixed_columns}
    }
    columns["model"] = model.codes[order]
    optima = []
    for start, stop in itertools.pairwise(bounds):
        cell = {name: values[start:stop] for name, values in columns.items()}
        model_name = str(model.categories[cell["model"][0]])
        optima.append(_cell_optimum(cell, model_name, axis, fixed_columns, maximize, n_bootstrap, rng, tolerance))
    return optima


def _cell_optimum(
    cell: dict[str, np.ndarray],
    model_name: str,
    axis: str,
    fixed_columns: tuple[str, ...],
    maximize: bool,
    n_bootstrap: int,
    rng: np.random.Generator,
    tolerance: float,
) -> CellOptimum:
    _, first_index, point_index = np.unique(np.round(np.log(cell[axis]), 9), return_index=True, return_inverse=True)
    grid = cell[axis][first_index].astype(float)
    log_grid = np.log(grid)
    seeds, seed_index = np.unique(cell["seed"], return_inverse=True)
    shape = (len(seeds), len(grid))
    objective = cell["objective"]
    finite = np.isfinite(objective)
    sums, counts, diverged = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    np.add.at(sums, (seed_index, point_index), np.where(finite, objective, 0.0))
    np.add.at(counts, (seed_index, point_index), finite)
    np.add.at(diverged, (seed_index, point_index), ~finite)
    with np.errstate(invalid="ignore"):
        per_seed = np.where(counts > 0, sums / counts, 0.0)
    present = ((counts + diverged) > 0).astype(float)
    any_diverged = (diverged > 0).astype(float)
    per_seed = np.where(any_diverged > 0, 0.0, per_seed)

    means = seed_means(np.ones((1, len(seeds))), per_seed, present, any_diverged)[0]
    log_optimum, best, refined, value = (a[0] for a in locate_optima(log_grid, means[None, :]))
    resampled = _resampled_means(per_seed, present, any_diverged, means, n_bootstrap, rng)
    bootstrap, bootstrap_best, _, _ = locate_optima(log_grid, resampled)

    point_diverged = np.isinf(means)
    n_finite = int(np.isfinite(means).sum())
    flags = []
    if n_finite == 0:
        flags.append("all_diverged")
    elif n_finite < MIN_FINITE_POINTS:
        flags.append("too_few_points")
    near_optimal = None
    if n_finite:
        last = len(grid) - 1
        if best == 0 and last > 0:
            flags.append("edge_low")
        elif np.mean(bootstrap_best == 0) > NEAR_EDGE_FRACTION:
            flags.append("near_edge_low")
        if best == last and last > 0:
            flags.append("edge_high")
        elif np.mean(bootstrap_best == last) > NEAR_EDGE_FRACTION:
            flags.append("near_edge_high")
        if not refined:
            flags.append("not_refined")
        within = np.flatnonzero(means <= means[best] + tolerance * abs(means[best]))
        near_optimal = (float(grid[within.min()]), float(grid[within.max()]))
        if 0 < best < last and (within.min() == 0 or within.max() == last):
            flags.append("flat_to_edge")
    if point_diverged.any() and n_finite:
        flags.append("some_diverged")

    optimum = optimum_low = optimum_high = log_sigma = optimum_metric = None
    if n_finite:
        resolution = _grid_step(log_grid, best) / math.sqrt(12) * (REFINED_RESOLUTION if refined else 1.0)
        spread = bootstrap[np.isfinite(bootstrap)]
        low_q, high_q = np.percentile(spread, [2.5, 97.5]) if spread.size else (log_optimum, log_optimum)
        below = math.hypot(max(log_optimum - low_q, 0.0), Z95 * resolution)
        above = math.hypot(max(high_q - log_optimum, 0.0), Z95 * resolution)
        optimum = math.exp(log_optimum)
        optimum_low, optimum_high = math.exp(log_optimum - below), math.exp(log_optimum + above)
        log_sigma = math.sqrt((float(spread.var()) if spread.size > 1 else 0.0) + resolution**2)
        optimum_metric = float(-value if maximize else value)

    mean_metric = np.where(point_diverged, np.nan, -means if maximize else means)
    return CellOptimum(
        axis=axis,
        model=model_name,
        rank=int(cell["rank"][0]),
        held_fixed=tuple((name, _fixed_value(cell[name][0])) for name in fixed_columns),
        model_params=_optional_float(cell["model_params"][0]),
        trainable_params=_optional_float(cell["trainable_params"][0]),
        grid=tuple(float(g) for g in grid),
        mean_metric=tuple(float(m) for m in mean_metric),
        diverged=tuple(bool(d) for d in point_diverged),
        n_trials=len(objective),
        n_seeds=len(seeds),
        n_diverged=int((~finite).sum()),
        optimum=optimum,
        optimum_low=optimum_low,
        optimum_high=optimum_high,
        log_sigma=log_sigma,
        optimum_metric=optimum_metric,
        refined=bool(refined),
        near_optimal=near_optimal,
        flags=tuple(flags),
        bootstrap_log_optimum=bootstrap,
    )


def _resampled_means(
    per_seed: np.ndarray,
    present: np.ndarray,
    diverged: np.ndarray,
    means: np.ndarray,
    n_bootstrap: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Seed means over the grid for `n_bootstrap` resamples of the seeds (replicates × grid points).

    Only points that can be the best in some resample, and their neighbours, are computed; the others are +inf,
    which changes no resample's optimum. A point can be the best only if its lowest possible resampled mean is
    below the highest possible resampled mean of every other point."""
    n_seeds = per_seed.shape[0]
    draws = rng.integers(0, n_seeds, size=(n_bootstrap, n_seeds)) + n_seeds * np.arange(n_bootstrap)[:, None]
    weights = np.bincount(draws.ravel(), minlength=n_bootstrap * n_seeds).reshape(n_bootstrap, n_seeds).astype(float)
    # A resampled mean of S seeds varies (S-1)/S as much as the mean itself: undo that small-sample shrinkage.
    inflation = math.sqrt(n_seeds / (n_seeds - 1)) if n_seeds > 1 else 1.0

    finite_seed = (present > 0) & (diverged == 0)
    lowest = np.where(finite_seed, per_seed, np.inf).min(axis=0)
    highest = np.where(diverged.any(axis=0), np.inf, np.where(finite_seed, per_seed, -np.inf).max(axis=0))
    with np.errstate(invalid="ignore"):
        stretched = np.isfinite(means)
        lowest = np.where(stretched, means + inflation * (lowest - means), lowest)
        highest = np.where(stretched, means + inflation * (highest - means), highest)
    reachable = lowest <= highest.min()
    candidates = (
        reachable
        | np.roll(reachable, 1) & (np.arange(len(means)) > 0)
        | np.roll(reachable, -1) & (np.arange(len(means)) < len(means) - 1)
    )

    resampled = np.full((n_bootstrap, len(means)), np.inf)
    columns = np.flatnonzero(candidates)
    chosen = seed_means(weights, per_seed[:, columns], present[:, columns], diverged[:, columns])
    # A point that none of the resampled seeds measured keeps its mean over all seeds.
    chosen = np.where(np.isnan(chosen), means[columns], chosen)
    with np.errstate(invalid="ignore"):
        inflated = means[columns] + inflation * (chosen - means[columns])
    resampled[:, columns] = np.where(np.isfinite(chosen) & np.isfinite(means[columns]), inflated, chosen)
    return resampled


def _grid_step(log_grid: np.ndarray, index: int) -> float:
    if len(log_grid) < 2:
        return math.log(2.0)
    neighbours = [i for i in (index - 1, index + 1) if 0 <= i < len(log_grid)]
    return float(np.mean([abs(log_grid[i] - log_grid[index]) for i in neighbours]))


def _fixed_value(value: object) -> float | str:
    return value if isinstance(value, str) else float(value)


def _optional_float(value: float | None) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None
