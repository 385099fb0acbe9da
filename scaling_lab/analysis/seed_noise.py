"""The seed noise of points measured by fewer seeds than the rest of their cell (an adaptive search's
`other_seeds: best_alpha` runs each α at one seed and only the cell's best α at every seed).

A bootstrap over seeds cannot move a point that one seed measured, so such points would carry no noise into a
cell's optimum. Their noise is taken instead from the seed-to-seed spread of the points that two seeds or more
measured, pooled over every cell of the same model (and held-fixed values): one cell may hold a single replicated
point. The spread is absolute, in the objective's units: on the published default grid the loss varies by 14%
from the best point to the worst while the seeds' spread varies 2× with no proportion to it, so scaling it with the
loss level would change nothing measurable.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def seed_spread_of_rows(
    keys: pd.DataFrame, trials: pd.DataFrame, axis: str, fixed_columns: tuple[str, ...]
) -> np.ndarray:
    """For each trial, pooled_seed_spread of its model and held-fixed values (`keys`: the trials' cell columns,
    model, fixed columns and rank, with numeric fixed values as rounded logs)."""
    group = keys.groupby(["model", *fixed_columns], sort=True, observed=True).ngroup().to_numpy()
    point = keys.assign(point=np.round(np.log(trials[axis].to_numpy(dtype=float)), 9)).groupby(
        list(keys.columns) + ["point"], sort=False, observed=True
    ).ngroup().to_numpy()
    spread = pooled_seed_spread(group, point, trials["seed"].to_numpy(), trials["objective"].to_numpy(dtype=float))
    return spread[group]


def pooled_seed_spread(group: np.ndarray, point: np.ndarray, seed: np.ndarray, objective: np.ndarray) -> np.ndarray:
    """For each group code 0..max(group): the standard deviation of one seed's objective about its point's seed
    mean, pooled over the group's points that two seeds or more measured (Σ squared deviations / Σ (seeds − 1));
    nan where no point has two. `point` codes a (cell, axis value); a point where any seed diverged (objective
    +inf) is left out, and a seed with several trials at a point counts as their mean."""
    rows = pd.DataFrame({"group": group, "point": point, "seed": seed, "objective": objective})
    diverged_points = rows.loc[~np.isfinite(rows["objective"]), "point"].unique()
    finite = rows[~rows["point"].isin(diverged_points)]
    per_seed = finite.groupby(["group", "point", "seed"], sort=False)["objective"].mean().reset_index()
    by_point = per_seed.groupby(["group", "point"], sort=False)["objective"]
    per_seed["deviation"] = per_seed["objective"] - by_point.transform("mean")
    points = per_seed.assign(squared=per_seed["deviation"] ** 2).groupby(["group", "point"], sort=False).agg(
        squared=("squared", "sum"), seeds=("seed", "size")
    )
    points = points[points["seeds"] >= 2].assign(freedom=lambda p: p["seeds"] - 1)
    groups = points.groupby(level="group").agg(squared=("squared", "sum"), freedom=("freedom", "sum"))
    spread = np.full(int(group.max()) + 1 if len(group) else 0, np.nan)
    spread[groups.index.to_numpy(dtype=int)] = np.sqrt(groups["squared"] / groups["freedom"]).to_numpy()
    return spread


def draw_underreplicated(
    resampled: np.ndarray,
    means: np.ndarray,
    seeds_at_point: np.ndarray,
    n_seeds: int,
    seed_spread: float | None,
    rng: np.random.Generator,
) -> np.ndarray:
    """`resampled` (resamples × points) with each finite point that fewer than `n_seeds` seeds measured drawn
    afresh about its seed mean with standard deviation seed_spread/√(its seeds): a parametric bootstrap for the
    points a bootstrap over seeds cannot move. Unchanged (and `rng` untouched) when every finite point has every
    seed, the cell has one seed, or no spread is known; `rng`'s own state is never advanced."""
    under = np.flatnonzero(underreplicated(seeds_at_point, n_seeds, means, seed_spread))
    if under.size == 0:
        return resampled
    # a child generator: the draws of every later bootstrap over seeds stay what they were without these points
    noise = rng.spawn(1)[0].standard_normal((resampled.shape[0], under.size))
    noise *= seed_spread / np.sqrt(seeds_at_point[under])
    drawn = resampled.copy()
    drawn[:, under] = means[under] + noise
    return drawn


def underreplicated(
    seeds_at_point: np.ndarray, n_seeds: int, means: np.ndarray, seed_spread: float | None
) -> np.ndarray:
    """Which points draw_underreplicated draws afresh (a boolean per point)."""
    known = n_seeds > 1 and seed_spread is not None and np.isfinite(seed_spread) and seed_spread > 0
    return (seeds_at_point < n_seeds) & np.isfinite(means) & known
