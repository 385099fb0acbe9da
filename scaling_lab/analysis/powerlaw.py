"""The power law optimum = c · r^k (· N^m) fitted to cell optima by weighted least squares in log-log space.

Weights are 1/σ² from each optimum's uncertainty. A 95% interval is the wider, on each side, of two:
- bootstrap percentiles: each resample refits the law to optima recomputed from seeds resampled within every
  cell, which captures seed noise;
- a Student t interval from the residuals (ν = cells − parameters), which captures scatter the seeds do not
  show: few seeds underestimate their own noise, the grid limits how well an optimum is located, and a law may
  be only roughly a power law.
With one seed per cell (or noise-free results) only the second exists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import stats

from scaling_lab.analysis.conventions import CONVENTION_SYMBOLS, convert_exponent
from scaling_lab.analysis.optimum import CellOptimum

LACK_OF_FIT_P = 0.001
MIN_RANKS = 3
MIN_RANK_SPAN = 4.0
EXTRAPOLATION_FACTOR = 4.0
SIZE_MEASURES = {"base": "model_params", "trainable": "trainable_params"}


@dataclass(frozen=True)
class Residual:
    label: str
    rank: int
    model_params: float | None
    log_residual: float
    log_sigma: float

    def to_dict(self) -> dict:
        return {
            "cell": self.label,
            "rank": self.rank,
            "log_residual": self.log_residual,
            "log_sigma": self.log_sigma,
            "factor": math.exp(self.log_residual),
        }


@dataclass(frozen=True)
class Prediction:
    value: float
    low: float
    high: float
    warnings: tuple[str, ...]


def extrapolation_warnings(
    rank: float, ranks: Sequence[int], model_params: float | None = None, model_sizes: Sequence[float] = ()
) -> list[str]:
    """Warnings for a prediction more than EXTRAPOLATION_FACTOR outside the measured ranks (and model sizes)."""
    warnings = []
    largest, smallest = max(ranks), min(ranks)
    factor = f"{EXTRAPOLATION_FACTOR:g}×"
    if rank > EXTRAPOLATION_FACTOR * largest:
        warnings.append(f"rank {rank:g} is more than {factor} the largest measured rank ({largest}): extrapolated")
    if rank < smallest / EXTRAPOLATION_FACTOR:
        warnings.append(f"rank {rank:g} is less than 1/{factor} the smallest measured rank ({smallest}): extrapolated")
    if model_params is not None and model_sizes:
        smallest_size, largest_size = min(model_sizes), max(model_sizes)
        if not smallest_size / EXTRAPOLATION_FACTOR <= model_params <= EXTRAPOLATION_FACTOR * largest_size:
            warnings.append(
                f"model size {model_params:.3g} is more than {factor} outside the measured sizes "
                f"{smallest_size:.3g}–{largest_size:.3g}: extrapolated"
            )
    return warnings


def interval_band(
    parameters: np.ndarray, covariance: np.ndarray, replicates: np.ndarray, dof: int, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """exp of the estimate and its 95% interval at each design row (see _intervals)."""
    estimates = rows @ parameters
    residual_sd = np.sqrt(np.maximum(np.einsum("ni,ij,nj->n", rows, covariance, rows), 0.0))
    low, high = _intervals(estimates, replicates @ rows.T, residual_sd, dof)
    with np.errstate(over="ignore"):
        return np.exp(estimates), np.exp(low), np.exp(high)


@dataclass(frozen=True)
class PowerLaw:
    """optimum(r[, N]) = c · r^k [· N^m] for one group of cells, with 95% intervals and what the data support."""

    quantity: str
    convention: str
    group: tuple[tuple[str, object], ...]
    size_measure: str | None
    c: float
    c_ci: tuple[float, float]
    k: float
    k_ci: tuple[float, float]
    m: float | None
    m_ci: tuple[float, float] | None
    r_squared: float
    chi2_per_dof: float | None
    dof: int
    interval_method: str
    ranks: tuple[int, ...]
    model_sizes: tuple[float, ...]
    dropped: tuple[tuple[str, int], ...]
    residuals: tuple[Residual, ...]
    curvature: float | None
    curvature_ci: tuple[float, float] | None
    warnings: tuple[str, ...]
    notes: tuple[str, ...]
    replicates: np.ndarray = field(repr=False, compare=False)
    covariance: np.ndarray = field(repr=False, compare=False)
    cells: tuple[CellOptimum, ...] = field(repr=False, compare=False)

    @property
    def parameters(self) -> np.ndarray:
        """log c, k[, m]: the coefficients of the linear model in log space."""
        return np.array([math.log(self.c), self.k] + ([self.m] if self.m is not None else []))

    def design_row(self, rank: float, model_params: float | None = None) -> np.ndarray:
        row = [1.0, math.log(rank)]
        if self.m is not None:
            if model_params is None:
                raise ValueError("this law needs a model size")
            row.append(math.log(model_params))
        return np.array(row)

    def band(
        self, ranks: Sequence[float], model_params: float | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The optimum and its 95% interval at each of `ranks` (at one model size for a joint law)."""
        rows = np.stack([self.design_row(rank, model_params) for rank in ranks])
        return interval_band(self.parameters, self.covariance, self.replicates, self.dof, rows)

    def predict(self, rank: float, model_params: float | None = None) -> Prediction:
        """The optimum and its 95% interval at `rank` (and model size), with warnings when extrapolating."""
        values, lows, highs = self.band([rank], model_params)
        warnings = extrapolation_warnings(rank, self.ranks, model_params, self.model_sizes)
        if not self.supported:
            warnings.append("the law is not supported by the data: " + "; ".join(self.warnings))
        return Prediction(float(values[0]), float(lows[0]), float(highs[0]), tuple(warnings))

    @property
    def supported(self) -> bool:
        """False when the data do not support this law: too few ranks, a narrow range, or not a power law."""
        return not self.warnings

    def in_convention(self, convention: str) -> PowerLaw:
        """The same law stated in another convention: c unchanged, k shifted exactly."""
        if self.quantity != "alpha":
            raise ValueError("only laws for α change with the convention")
        shift = convert_exponent(0.0, self.convention, convention)
        replicates = self.replicates.copy()
        replicates[:, 1] += shift
        y = np.log([cell.optimum for cell in self.cells]) + shift * np.log([cell.rank for cell in self.cells])
        weights = 1.0 / np.array([cell.log_sigma for cell in self.cells]) ** 2
        chi2 = float(np.sum(weights * np.array([r.log_residual for r in self.residuals]) ** 2))
        return replace(
            self,
            convention=convention,
            k=self.k + shift,
            k_ci=(self.k_ci[0] + shift, self.k_ci[1] + shift),
            r_squared=_r_squared(y, weights, chi2),
            replicates=replicates,
        )

    def formula(self) -> str:
        symbol = CONVENTION_SYMBOLS[self.convention] if self.quantity == "alpha" else "lr"
        size = f" · N^{self.m:.3f}" if self.m is not None else ""
        return f"{symbol}* = {self.c:.4g} · r^{self.k:.3f}{size}"

    def group_label(self) -> str:
        return ", ".join(f"{name}={_show(value)}" for name, value in self.group) or "all cells"

    def to_dict(self) -> dict:
        return {
            "quantity": self.quantity,
            "form": "c * r^k * N^m" if self.m is not None else "c * r^k",
            "formula": self.formula(),
            "convention": self.convention,
            "group": {name: value for name, value in self.group},
            "size_measure": self.size_measure,
            "c": self.c,
            "c_ci95": list(self.c_ci),
            "k": self.k,
            "k_ci95": list(self.k_ci),
            "m": self.m,
            "m_ci95": list(self.m_ci) if self.m_ci else None,
            "covariance_from_residuals": self.covariance.tolist(),
            "r_squared": self.r_squared,
            "chi2_per_dof": self.chi2_per_dof,
            "dof": self.dof,
            "interval_method": self.interval_method,
            "cells_used": len(self.cells),
            "ranks": list(self.ranks),
            "model_sizes": list(self.model_sizes),
            "cells_dropped": dict(self.dropped),
            "residuals": [r.to_dict() for r in self.residuals],
            "curvature_log_r_squared": self.curvature,
            "curvature_ci95": list(self.curvature_ci) if self.curvature_ci else None,
            "supported": self.supported,
            "warnings": list(self.warnings),
            "notes": list(self.notes),
            # log c, k[, m] of each bootstrap resample (α laws): predictions from law.json get the fit's intervals
            "bootstrap_parameters": _rounded(self.replicates) if self.quantity == "alpha" else None,
        }


@dataclass(frozen=True)
class NoLaw:
    """A group whose usable optima cannot determine a law, and why."""

    quantity: str
    group: tuple[tuple[str, object], ...]
    reason: str
    dropped: tuple[tuple[str, int], ...]
    supported: bool = False

    def group_label(self) -> str:
        return ", ".join(f"{name}={_show(value)}" for name, value in self.group) or "all cells"

    def to_dict(self) -> dict:
        return {
            "quantity": self.quantity,
            "group": {name: value for name, value in self.group},
            "law": None,
            "reason": self.reason,
            "cells_dropped": dict(self.dropped),
        }


def fit_power_law(
    cells: Sequence[CellOptimum],
    *,
    quantity: str,
    convention: str,
    group: tuple[tuple[str, object], ...] = (),
    keep_edge: bool = False,
    size_measure: str | None = None,
) -> PowerLaw | NoLaw:
    """Fit optimum = c · r^k (or c · r^k · N^m when `size_measure` names a column of model sizes) to `cells`."""
    used, dropped = [], {}
    for cell in cells:
        reason = cell.exclusion(keep_edge)
        if reason is None and size_measure and getattr(cell, size_measure) is None:
            reason = f"no {size_measure}"
        if reason is None:
            used.append(cell)
        else:
            dropped[reason] = dropped.get(reason, 0) + 1
    dropped_items = tuple(sorted(dropped.items()))
    ranks = sorted({cell.rank for cell in used})
    sizes = sorted({getattr(cell, size_measure) for cell in used}) if size_measure else []
    if len(ranks) < 2:
        return NoLaw(
            quantity,
            group,
            f"{len(ranks)} usable rank{'s' if len(ranks) != 1 else ''} (a law needs 2 or more)",
            dropped_items,
        )
    if size_measure and len(sizes) < 2:
        return NoLaw(quantity, group, f"{len(sizes)} usable model size (a joint law needs 2 or more)", dropped_items)

    log_rank = np.log([cell.rank for cell in used])
    columns = [np.ones(len(used)), log_rank]
    if size_measure:
        columns.append(np.log([getattr(cell, size_measure) for cell in used]))
    design = np.column_stack(columns)
    if np.linalg.matrix_rank(design) < design.shape[1]:
        return NoLaw(
            quantity,
            group,
            f"{size_measure} moves in step with rank, so their exponents cannot be told apart",
            dropped_items,
        )
    y = np.log([cell.optimum for cell in used])
    weights = 1.0 / np.array([cell.log_sigma for cell in used]) ** 2
    samples = np.stack([cell.bootstrap_log_optimum for cell in used], axis=1)

    fit = _weighted_fit(design, y, weights, samples)
    intervals = fit.intervals()

    warnings = []
    if len(ranks) < MIN_RANKS:
        warnings.append(f"only {len(ranks)} ranks: two points always fit a power law, so its form is not tested")
    if ranks[-1] / ranks[0] < MIN_RANK_SPAN:
        warnings.append(f"ranks span only {ranks[-1] / ranks[0]:g}× (at least {MIN_RANK_SPAN:g}× is needed to pin k)")
    beyond_seed_noise = fit.method != "residuals" and fit.dof > 0 and stats.chi2.sf(fit.chi2, fit.dof) < LACK_OF_FIT_P
    curvature = curvature_ci = None
    if len(ranks) >= MIN_RANKS + 1:
        centred = (log_rank - log_rank.mean()) ** 2
        bent = _weighted_fit(np.column_stack([design, centred]), y, weights, samples)
        j = design.shape[1]
        curvature, curvature_ci = float(bent.estimate[j]), bent.interval(j)
        bends = _excludes_zero(curvature_ci)
        if not bends and bent.dof <= 1 and beyond_seed_noise and _excludes_zero(bent.bootstrap_interval(j)):
            # With four ranks the residual interval is too wide to show a bend; residuals far beyond seed noise
            # whose shape is a bend the seeds are sure of say the same.
            bends, curvature_ci = True, bent.bootstrap_interval(j)
        if bends:
            direction = "steepens" if curvature > 0 else "flattens"
            warnings.append(
                f"log optimum bends against log r ({direction} with rank; curvature {curvature:.3f}, "
                f"95% CI [{curvature_ci[0]:.3f}, {curvature_ci[1]:.3f}]): "
                f"not a power law over ranks {ranks[0]}–{ranks[-1]}"
            )
    if not all(math.isfinite(v) for interval in intervals for v in interval):
        warnings.append("no confidence interval: as many cells as parameters and no spread across seeds")
    notes = []
    if size_measure and len(sizes) == 2:
        notes.append("m rests on two model sizes: how the optimum depends on N is not tested")
    if fit.method == "residuals":
        notes.append(
            "no spread across seeds (one seed per cell, or noise-free results): intervals come from the residuals"
        )
    elif beyond_seed_noise:
        notes.append(
            f"optima scatter about the law more than seed noise explains (χ²/ν = {fit.chi2 / fit.dof:.1f}): "
            "the intervals rest on the residuals"
        )

    residual_values = y - design @ fit.estimate
    residuals = tuple(
        Residual(cell.label(), cell.rank, cell.model_params, float(res), float(cell.log_sigma))
        for cell, res in zip(used, residual_values)
    )
    has_size = size_measure is not None
    return PowerLaw(
        quantity=quantity,
        convention=convention,
        group=group,
        size_measure=size_measure,
        c=math.exp(fit.estimate[0]),
        c_ci=(math.exp(intervals[0][0]), math.exp(intervals[0][1])),
        k=float(fit.estimate[1]),
        k_ci=intervals[1],
        m=float(fit.estimate[2]) if has_size else None,
        m_ci=intervals[2] if has_size else None,
        r_squared=_r_squared(y, weights, fit.chi2),
        chi2_per_dof=fit.chi2 / fit.dof if fit.dof > 0 else None,
        dof=fit.dof,
        interval_method=fit.method,
        ranks=tuple(ranks),
        model_sizes=tuple(sizes),
        dropped=dropped_items,
        residuals=residuals,
        curvature=curvature,
        curvature_ci=curvature_ci,
        warnings=tuple(warnings),
        notes=tuple(notes),
        replicates=fit.replicates,
        covariance=fit.covariance,
        cells=tuple(used),
    )


@dataclass(frozen=True)
class _Fit:
    estimate: np.ndarray
    replicates: np.ndarray
    covariance: np.ndarray
    chi2: float
    dof: int
    method: str

    def interval(self, j: int) -> tuple[float, float]:
        return self.intervals()[j]

    def intervals(self) -> list[tuple[float, float]]:
        low, high = _intervals(self.estimate, self.replicates, np.sqrt(np.diag(self.covariance)), self.dof)
        return list(zip(low.tolist(), high.tolist()))

    def bootstrap_interval(self, j: int) -> tuple[float, float]:
        return _interval(self.estimate[j], self.replicates[:, j], math.nan, 0)


def weighted_least_squares(design: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Coefficients for each row of y (replicates × cells; nan cells left out of that replicate)."""
    y = np.atleast_2d(y)
    w = np.where(np.isnan(y), 0.0, weights)
    y = np.nan_to_num(y)
    normal = np.einsum("bn,ni,nj->bij", w, design, design)
    moment = np.einsum("bn,ni,bn->bi", w, design, y)
    # For a positive semi-definite matrix det / product of the diagonal is 1 when well conditioned, 0 when singular.
    diagonal = np.prod(np.diagonal(normal, axis1=1, axis2=2), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        solvable = np.linalg.det(normal) / diagonal > 1e-10
    coefficients = np.full((y.shape[0], design.shape[1]), np.nan)
    if solvable.any():
        coefficients[solvable] = np.linalg.solve(normal[solvable], moment[solvable][..., None])[..., 0]
    return coefficients


def _weighted_fit(design: np.ndarray, y: np.ndarray, weights: np.ndarray, samples: np.ndarray) -> _Fit:
    estimate = weighted_least_squares(design, y, weights)[0]
    replicates = weighted_least_squares(design, samples, weights)
    chi2 = float(np.sum(weights * (y - design @ estimate) ** 2))
    dof = len(y) - design.shape[1]
    scale = chi2 / dof if dof > 0 else math.nan
    covariance = np.linalg.inv(design.T @ (weights[:, None] * design)) * scale
    method = "residuals" if np.all(np.nanstd(replicates, axis=0) < 1e-12) else "bootstrap+residuals"
    return _Fit(estimate, replicates, covariance, chi2, dof, method)


def _intervals(
    estimates: np.ndarray, samples: np.ndarray, residual_sd: np.ndarray, dof: int
) -> tuple[np.ndarray, np.ndarray]:
    """95% for each column of `samples`: the wider on each side of the bootstrap percentile interval and the
    residual t interval (bootstrap samples without spread give none; ν = 0 gives no t interval)."""
    low, high = np.nanpercentile(samples, [2.5, 97.5], axis=0)
    no_spread = np.nanstd(samples, axis=0) < 1e-12
    low, high = np.where(no_spread, np.nan, low), np.where(no_spread, np.nan, high)
    if dof > 0:
        half = float(stats.t.ppf(0.975, dof)) * residual_sd
        low, high = np.fmin(low, estimates - half), np.fmax(high, estimates + half)
    return low, high


def _interval(estimate: float, samples: np.ndarray, residual_sd: float, dof: int) -> tuple[float, float]:
    low, high = _intervals(np.array([estimate]), samples[:, None], np.array([residual_sd]), dof)
    return (float(low[0]), float(high[0]))


def _excludes_zero(interval: tuple[float, float]) -> bool:
    return interval[0] > 0 or interval[1] < 0


def _r_squared(y: np.ndarray, weights: np.ndarray, chi2: float) -> float:
    """Weighted R² in log space. It depends on the convention: a law with k near 0 has R² near 0 however well
    it fits."""
    total = float(np.sum(weights * (y - np.average(y, weights=weights)) ** 2))
    return 1.0 - chi2 / total if total > 0 else math.nan


def _rounded(replicates: np.ndarray) -> list[list[float]]:
    return [[float(f"{v:.9g}") for v in row] for row in replicates.tolist()]


def _show(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
