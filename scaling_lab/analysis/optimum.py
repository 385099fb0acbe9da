"""The optimum of one axis (α, or the learning rate) in each cell of the other axes, with its uncertainty and flags.

Within a cell the metric is averaged over seeds at each grid point; a point where any seed diverged counts as
worse than every finite one. Where the best point and its finite neighbours up to two grid points away make four
points or more, one on each side at least, the optimum is the vertex of an asymmetric bowl fitted to them
(bowl.py: separate shapes below and above the optimum); otherwise the best point is refined by a parabola in
log(axis) through it and its two neighbours, which assumes a symmetric bowl; when a neighbour is missing or
diverged the grid point stands. The uncertainty comes from a bootstrap over seeds within the cell through the
same estimator (a point that fewer seeds measured than the cell's others is drawn with the seed spread pooled over
the model's replicated points: seed_noise.py), plus the grid's resolution: a grid-point optimum is only known to
within ±Δ/2 of a grid step Δ (standard deviation Δ/√12). A parabola's optimum keeps that whole term (on a loss
four times steeper above the optimum than below it is off by about 0.28 Δ); a bowl fit's keeps a third of it
(shapes outside its families leave errors of up to about 0.2 Δ, benchmarks/asymmetric_optimum.py).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from scaling_lab.analysis.bowl import POINTS_PER_SIDE, BowlFit, bowl_window, fit_bowl, refit_bowls
from scaling_lab.analysis.seed_noise import draw_underreplicated, seed_spread_of_rows, underreplicated
from scaling_lab.objective import parabola_vertex, seed_means

MIN_FINITE_POINTS = 3
BOWL_RESOLUTION = 1 / 3  # a bowl fit's grid error as a share of a grid point's (module docstring)
Z95 = 1.959963984540054

NEAR_EDGE_FRACTION = 0.1  # an optimum is "near the edge" when this share of bootstrap resamples puts it there
EDGE_FLAGS = ("edge_low", "edge_high", "near_edge_low", "near_edge_high")
FOUR_POINTS = "4 points"  # how a four-point bowl fit's reason starts


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
    estimator: str
    estimator_reason: str
    parabola_optimum: float | None
    suggested: tuple[float, ...]
    near_optimal: tuple[float, float] | None
    flags: tuple[str, ...]
    bootstrap_log_optimum: np.ndarray = field(repr=False, compare=False)
    bowl_shape: tuple[int, float] | None = field(default=None, repr=False, compare=False)  # family, λ × grid step

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
            "refined": self.refined,
            "estimator": self.estimator,
            "estimator_reason": self.estimator_reason,
            "parabola_optimum": self.parabola_optimum,
            "suggested_values": list(self.suggested),
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
    with np.errstate(invalid="ignore"):
        shift, rise, curvature = parabola_vertex(h_left, h_right, y_left - y_best, y_right - y_best)
        refined = (best > 0) & (best < last) & np.isfinite(y_left) & np.isfinite(y_right) & (curvature > 0)
        shift = np.where(refined, shift, 0.0)
        value = np.where(refined, y_best + rise, y_best)
    has_optimum = np.isfinite(y_best)
    log_optimum = np.where(has_optimum, log_grid[best] + shift, np.nan)
    return log_optimum, best, refined & has_optimum, np.where(has_optimum, value, np.nan)


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
    row_spread = seed_spread_of_rows(keys, trials, axis, fixed_columns)[order]
    bounds = np.searchsorted(cell_code[order], np.arange(cell_code.max() + 2))

    model = pd.Categorical(trials["model"])
    columns = {
        name: trials[name].to_numpy()[order]
        for name in {"rank", "seed", "objective", "model_params", "trainable_params", axis, *fixed_columns}
    }
    columns["model"] = model.codes[order]
    optima = []
    cells = []
    for start, stop in itertools.pairwise(bounds):
        cell = {name: values[start:stop] for name, values in columns.items()}
        model_name = str(model.categories[cell["model"][0]])
        spread = float(row_spread[start])
        cells.append((cell, model_name, spread))
        optima.append(
            _cell_optimum(cell, model_name, axis, fixed_columns, maximize, n_bootstrap, rng, tolerance, spread)
        )
    # Four points cannot choose a bowl's shape: cells with four take the shape most cells of their model (at the
    # same fixed values) chose from five or more, with its steepness; the two half-parabolas when none chose.
    shapes: dict[tuple, list[tuple[int, float]]] = {}
    for optimum in optima:
        if optimum.bowl_shape is not None:
            shapes.setdefault((optimum.model, optimum.held_fixed), []).append(optimum.bowl_shape)
    for index, optimum in enumerate(optima):
        chosen = shared_shape(shapes.get((optimum.model, optimum.held_fixed), []))
        if optimum.estimator_reason.startswith(FOUR_POINTS) and chosen:
            cell, model_name, spread = cells[index]
            optima[index] = _cell_optimum(
                cell, model_name, axis, fixed_columns, maximize, n_bootstrap, rng, tolerance, spread, chosen
            )
    return optima


def shared_shape(shapes: list[tuple[int, float]]) -> tuple[int, float] | None:
    """The bowl shape a four-point cell takes from the shapes (family, λ × grid step) that cells of five points or
    more chose: the most common family (the first of FAMILIES on a tie) with its median steepness; None if none."""
    if not shapes:
        return None
    families = [family for family, _ in shapes]
    family = max(set(families), key=lambda f: (families.count(f), -f))
    return family, float(np.median([s for f, s in shapes if f == family]))


def _cell_optimum(
    cell: dict[str, np.ndarray],
    model_name: str,
    axis: str,
    fixed_columns: tuple[str, ...],
    maximize: bool,
    n_bootstrap: int,
    rng: np.random.Generator,
    tolerance: float,
    seed_spread: float | None = None,
    assumed_shape: tuple[int, float] | None = None,
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
    curve = curve_optimum(log_grid, means, assumed_shape)
    log_optimum, value, best, refined = curve.log_optimum, curve.value, curve.best, curve.refined
    resampled = _resampled_means(per_seed, present, any_diverged, means, n_bootstrap, rng, seed_spread)
    bootstrap, bootstrap_best, _, _ = locate_optima(log_grid, resampled)
    fitted_bowl = curve.bowl is not None
    if fitted_bowl:
        (start, stop), (points, low, high, origin) = curve.window, _bowl_frame(log_grid, best, curve.window)
        refitted = refit_bowls(points, resampled[:, start:stop], low, high, curve.bowl)[0] + origin
        bootstrap = np.where(np.isfinite(refitted), refitted, bootstrap)

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
        if not refined and not fitted_bowl:
            flags.append("not_refined")
        within = np.flatnonzero(means <= means[best] + tolerance * abs(means[best]))
        near_optimal = (float(grid[within.min()]), float(grid[within.max()]))
        if 0 < best < last and (within.min() == 0 or within.max() == last):
            flags.append("flat_to_edge")
    if point_diverged.any() and n_finite:
        flags.append("some_diverged")

    optimum = optimum_low = optimum_high = log_sigma = optimum_metric = None
    suggested: tuple[float, ...] = ()
    if n_finite:
        step = _grid_step(log_grid, best)
        resolution = step / math.sqrt(12) * (BOWL_RESOLUTION if fitted_bowl else 1.0)
        spread = bootstrap[np.isfinite(bootstrap)]
        low_q, high_q = np.percentile(spread, [2.5, 97.5]) if spread.size else (log_optimum, log_optimum)
        below = math.hypot(max(log_optimum - low_q, 0.0), Z95 * resolution)
        above = math.hypot(max(high_q - log_optimum, 0.0), Z95 * resolution)
        if fitted_bowl and refined:
            moved = log_optimum - curve.parabola_log_optimum
            if (moved > 0 and moved > below) or (moved < 0 and -moved > above):
                flags.append("asymmetric")  # the symmetric parabola's optimum lies outside this one's interval
        if refined or fitted_bowl:
            # half a grid step either side of the optimum: where the bowl's shape decides the optimum
            suggested = tuple(float(math.exp(log_optimum + side * step / 2)) for side in (-1, 1))
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
        refined=refined or fitted_bowl,
        estimator=curve.estimator,
        estimator_reason=curve.reason,
        parabola_optimum=float(math.exp(curve.parabola_log_optimum)) if refined else None,
        suggested=suggested if ("asymmetric" in flags or not fitted_bowl) else (),
        near_optimal=near_optimal,
        flags=tuple(flags),
        bootstrap_log_optimum=bootstrap,
        bowl_shape=curve.shape,
    )


@dataclass(frozen=True)
class CurveOptimum:
    """The optimum of one seed-averaged curve as `fit` estimates it, before the bootstrap: the asymmetric bowl fit
    around the best point, else the parabola through it and its neighbours, else the best grid point."""

    estimator: str
    reason: str
    log_optimum: float  # nan when no point is finite
    value: float
    best: int
    refined: bool  # the parabola through the best point and its two neighbours curves upwards
    parabola_log_optimum: float
    bowl: BowlFit | None = None  # the bowl fit, its vertex relative to the best point
    window: tuple[int, int] | None = None  # the points it was fitted to
    shape: tuple[int, float] | None = None  # family and λ × grid step, where five points or more chose them

    @property
    def needs_shape(self) -> bool:
        """Whether four points made the fit take its shape from other cells (shared_shape)."""
        return self.reason.startswith(FOUR_POINTS)


def curve_optimum(log_grid: np.ndarray, means: np.ndarray, shape: tuple[int, float] | None = None) -> CurveOptimum:
    """The optimum of `means` (the objective to minimize over `log_grid`; +inf diverged, nan not measured).
    `shape` (family, λ × grid step) is the one a four-point bowl fit takes (shared_shape of the other cells)."""
    log_optimum, best, refined, value = (a[0] for a in locate_optima(log_grid, means[None, :]))
    best, refined = int(best), bool(refined)
    parabola = {"best": best, "refined": refined, "parabola_log_optimum": float(log_optimum)}
    stands = CurveOptimum(
        "parabola" if refined else "grid point", "", float(log_optimum), float(value), **parabola
    )
    if not np.isfinite(means[best]):
        return replace(stands, estimator="none", reason="no finite point")
    window = bowl_window(means, best)
    if window is None:
        finite = np.isfinite(means)
        below = 0
        while best - below - 1 >= 0 and finite[best - below - 1] and below < POINTS_PER_SIDE:
            below += 1
        above = 0
        while best + above + 1 < len(means) and finite[best + above + 1] and above < POINTS_PER_SIDE:
            above += 1
        missing = f"{below} finite point{'s' if below != 1 else ''} below the best, {above} above"
        if refined:
            return replace(stands, reason=f"{missing} (a bowl fit needs 4 with one on each side): symmetry assumed")
        return replace(stands, reason=f"{missing}: the best grid point stands")
    start, stop = window
    points, low, high, origin = _bowl_frame(log_grid, best, window)
    step = _grid_step(log_grid, best)
    fit = fit_bowl(points, means[start:stop], low, high, step, shape)
    if fit is None:
        return replace(stands, reason="no bowl with positive curvatures fits")
    fitted = CurveOptimum(fit.label, "", fit.log_optimum + origin, fit.value, **parabola, bowl=fit, window=window)
    if stop - start >= 5:
        reason = f"{stop - start} points, best of four bowl shapes by least squares"
        return replace(fitted, reason=reason, shape=(fit.family, fit.steepness * step))
    source = "the shape most cells of this model chose" if shape else "no cell of this model chose a shape"
    return replace(fitted, reason=f"{FOUR_POINTS}, one on a side: too few to choose a shape ({source})")


def _bowl_frame(log_grid: np.ndarray, best: int, window: tuple[int, int]) -> tuple[np.ndarray, float, float, float]:
    """The window's points and the vertex's bounds (the best point's neighbours) relative to the best point, so
    that a grid shifted in log α (another convention) gives the same fit, shifted; and that origin."""
    origin = log_grid[best]
    start, stop = window
    return log_grid[start:stop] - origin, log_grid[best - 1] - origin, log_grid[best + 1] - origin, origin


def _resampled_means(
    per_seed: np.ndarray,
    present: np.ndarray,
    diverged: np.ndarray,
    means: np.ndarray,
    n_bootstrap: int,
    rng: np.random.Generator,
    seed_spread: float | None = None,
) -> np.ndarray:
    """Seed means over the grid for `n_bootstrap` resamples of the seeds (replicates × grid points); points fewer
    seeds measured than the cell's others are drawn with `seed_spread` instead (seed_noise.draw_underreplicated).

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
    seeds_at_point = present.sum(axis=0)
    drawn = underreplicated(seeds_at_point, n_seeds, means, seed_spread)
    lowest, highest = np.where(drawn, -np.inf, lowest), np.where(drawn, np.inf, highest)
    reachable = lowest <= highest.min()
    # the bowl fit reads up to POINTS_PER_SIDE neighbours on each side of any point that can be the best
    index = np.arange(len(means))
    reachable_index = np.flatnonzero(reachable)
    candidates = np.any(np.abs(index[:, None] - reachable_index[None, :]) <= POINTS_PER_SIDE, axis=1)

    resampled = np.full((n_bootstrap, len(means)), np.inf)
    columns = np.flatnonzero(candidates)
    chosen = seed_means(weights, per_seed[:, columns], present[:, columns], diverged[:, columns])
    # A point that none of the resampled seeds measured keeps its mean over all seeds.
    chosen = np.where(np.isnan(chosen), means[columns], chosen)
    with np.errstate(invalid="ignore"):
        inflated = means[columns] + inflation * (chosen - means[columns])
    resampled[:, columns] = np.where(np.isfinite(chosen) & np.isfinite(means[columns]), inflated, chosen)
    return draw_underreplicated(resampled, means, seeds_at_point, n_seeds, seed_spread, rng)


def _grid_step(log_grid: np.ndarray, index: int) -> float:
    if len(log_grid) < 2:
        return math.log(2.0)
    neighbours = [i for i in (index - 1, index + 1) if 0 <= i < len(log_grid)]
    return float(np.mean([abs(log_grid[i] - log_grid[index]) for i in neighbours]))


def _fixed_value(value: object) -> float | str:
    return value if isinstance(value, str) else float(value)


def _optional_float(value: float | None) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None
