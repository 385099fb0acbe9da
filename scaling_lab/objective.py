"""What a study optimizes, one rule each, for the search, early stopping, the analysis and the grid: the result
column a spec's metric reads and whether higher is better, a trial's status and value → the objective to
minimize, the seed mean of a grid point, the vertex of the parabola through three points, and the effective
scale of a LoRA α. Pure: numpy and pandas only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

# A study spec's `metric` names what its trials measure; the row column the analysis optimizes is its final value.
SPEC_METRIC_COLUMNS = {"eval_loss": "final_eval_loss", "eval_accuracy": "final_eval_accuracy"}
DROPPED_STATUSES = ("error", "oom")  # failed trials: they measured nothing and are left out
WORSE_THAN_ANY_STATUSES = ("diverged", "pruned")  # trials worse than any finite one (+inf)
RULE_EXPONENTS: dict[str, float] = {"standard": 1.0, "rslora": 0.5, "fixed": 0.0}  # s = α / r^q


def metric_is_maximized(column: str) -> bool:
    return "accuracy" in column


def metric_column(metric: str) -> tuple[str, bool]:
    """The result column read for a spec's metric, and whether higher is better."""
    column = SPEC_METRIC_COLUMNS[metric]
    return column, metric_is_maximized(column)


def objectives(status: Sequence[str] | pd.Series, value: Sequence[float] | np.ndarray, maximize: bool) -> np.ndarray:
    """Each trial's metric as a quantity to minimize: +inf when it diverged, was pruned or its value is not finite;
    nan for a failed trial (error, oom), which is left out."""
    status = pd.Series(np.asarray(status, dtype=object)) if not isinstance(status, pd.Series) else status
    value = np.asarray(value, dtype=float)
    worse = status.isin(WORSE_THAN_ANY_STATUSES).to_numpy() | ~np.isfinite(value)
    objective = np.where(worse, np.inf, -value if maximize else value)
    return np.where(status.isin(DROPPED_STATUSES).to_numpy(), np.nan, objective)


def trial_objective(status: str, value: float | None, maximize: bool) -> float | None:
    """One finished trial's objective (see `objectives`); None for a failed trial."""
    objective = float(objectives([status], [math.nan if value is None else value], maximize)[0])
    return None if math.isnan(objective) else objective


def seed_means(weights: np.ndarray, finite_values: np.ndarray, present: np.ndarray, diverged: np.ndarray) -> np.ndarray:
    """Seed-weighted means over the grid (weights: replicates × seeds; the rest seeds × grid points).
    Any diverged seed with weight makes the point +inf; a point no weighted seed measured is nan."""
    counted = weights.sum(axis=1, keepdims=True) if present.all() else _blocked_matmul(weights, present)
    with np.errstate(divide="ignore", invalid="ignore"):
        means = _blocked_matmul(weights, finite_values) / counted
    return np.where(_blocked_matmul(weights, diverged) > 0, np.inf, means) if diverged.any() else means


def point_value(objectives_of_seeds: Sequence[float | None]) -> float:
    """The seed mean of one grid point from its seeds' objectives (None: a failed seed, left out): +inf when any
    seed is +inf or none is usable."""
    usable = np.array([v for v in objectives_of_seeds if v is not None], dtype=float)
    if usable.size == 0:
        return math.inf
    diverged = ~np.isfinite(usable)
    mean = seed_means(
        np.ones((1, usable.size)), np.where(diverged, 0.0, usable)[:, None], np.ones((usable.size, 1)),
        diverged.astype(float)[:, None],
    )
    return float(mean[0, 0])


def _blocked_matmul(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """left @ right in blocks of rows of at most 2^18 multiply-adds each. BLAS libraries start threads above
    about that size, and for products this small the threads cost 10-100× the arithmetic on a busy machine."""
    rows = max(1, 2**18 // max(1, left.shape[1] * right.shape[1]))
    if left.shape[0] <= rows:
        return left @ right
    return np.concatenate([left[start : start + rows] @ right for start in range(0, left.shape[0], rows)])


def parabola_vertex(
    h_left: np.ndarray, h_right: np.ndarray, rise_left: np.ndarray, rise_right: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The parabola through a point and its two neighbours, given as offsets from the point (h < 0 on the left,
    h > 0 on the right) and rises of the objective over it: the vertex's offset, its rise (≤ 0 where it curves
    upwards) and the curvature (the vertex is a minimum only where it is > 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        denominator = h_left * h_right * (h_left - h_right)
        curvature = (rise_left * h_right - rise_right * h_left) / denominator
        slope = (rise_right * h_left**2 - rise_left * h_right**2) / denominator
        return -slope / (2 * curvature), -(slope**2) / (4 * curvature), curvature


def effective_scale(alpha, rank, rule):
    """The multiplier applied to B·A from the α a trial set, its rank and its scaling rule: α / r^q with q = 1
    ("standard", PEFT's default α/r), 0.5 ("rslora", α/√r) and 0 ("fixed": α is the scale). Scalars (a rule's
    name; an unknown one is a ValueError) or arrays (rules as a Series or array; an unknown one gives nan)."""
    if isinstance(rule, str):
        if rule not in RULE_EXPONENTS:
            raise ValueError(f"unknown scaling rule {rule!r}, expected one of {list(RULE_EXPONENTS)}")
        return alpha / rank ** RULE_EXPONENTS[rule]
    exponents = pd.Series(rule).map(RULE_EXPONENTS).to_numpy(dtype=float)
    return np.asarray(alpha, dtype=float) / np.asarray(rank, dtype=float) ** exponents
