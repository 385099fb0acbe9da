"""The rules the field argues about, tested against a fitted law side by side.

For each rule (a fixed exponent k0): does the law's 95% interval for k exclude it, and what does following the
rule's best-fitting version cost in the metric, held out rank by rank (methods.RULES, the text report.md prints)?
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from scaling_lab.analysis.conventions import CONVENTION_EXPONENTS, RULE_EXPONENTS, convert_exponent
from scaling_lab.analysis.powerlaw import PowerLaw, weighted_least_squares

ALPHA_RULES = (  # exponent in the standard convention (α = lora_alpha, scale α/r)
    ("fixed α", 0.0, "the same α at every rank (scale ∝ 1/r)"),
    ("√r law", 0.5, "α ∝ √r: rsLoRA with a fixed α; LoRA-α's α* ≈ 256·√r"),
    ("α ∝ r", 1.0, "a fixed scale, e.g. α = 2r"),
)


@dataclass(frozen=True)
class HypothesisTest:
    name: str
    description: str
    exponent: float
    excluded: bool | None
    fitted_c: float
    penalty_mean: float | None
    penalty_max: float | None
    penalty_relative: float | None
    cells_scored: int
    cells_diverged: int
    cells_outside_grid: int

    def to_dict(self) -> dict:
        return {
            "rule": self.name,
            "description": self.description,
            "k": self.exponent,
            "excluded_by_ci95": self.excluded,
            "fitted_c": self.fitted_c,
            "held_out_penalty_mean": self.penalty_mean,
            "held_out_penalty_max": self.penalty_max,
            "held_out_penalty_relative_mean": self.penalty_relative,
            "cells_scored": self.cells_scored,
            "cells_where_rule_diverges": self.cells_diverged,
            "cells_predicted_outside_grid": self.cells_outside_grid,
        }


def rules_for(law: PowerLaw) -> list[tuple[str, float, str]]:
    """The rules to test, with exponents in the law's own convention."""
    if law.quantity == "alpha":
        return [(name, convert_exponent(k, "standard", law.convention), text) for name, k, text in ALPHA_RULES]
    mu_a = mu_a_exponent(law)
    rules = [("rank-invariant lr", 0.0, "the same learning rate at every rank")]
    if mu_a != 0.0:
        rules.append(("μA prediction", mu_a, f"lr* ∝ r^{mu_a:g} at this setting (A random, B zero)"))
    return rules


def mu_a_exponent(law: PowerLaw) -> float:
    """μA (Chen, Villar, Hayou): a multiplier r^-γ on B·A gives lr* ∝ r^-(1-γ)/2. A learning-rate law holds the α
    the grid set fixed under its scaling rule, whose multiplier is α/r^q: γ = q, so lr* ∝ r^0 (α/r), r^-1/4
    (α/√r), r^-1/2 (a fixed scale). A law without a rule in its group holds α fixed in its convention."""
    rule = dict(law.group).get("scaling_rule")
    gamma = RULE_EXPONENTS[rule] if rule is not None else CONVENTION_EXPONENTS[law.convention]
    return 0.0 - (1.0 - gamma) / 2.0  # 0.0 rather than -0.0 for the rank-invariant case


def evaluate_rules(law: PowerLaw, maximize: bool) -> tuple[HypothesisTest, ...]:
    """Each rule of `rules_for(law)`, then the fitted law itself as a baseline."""
    tests = [_test(law, name, text, exponent, maximize) for name, exponent, text in rules_for(law)]
    tests.append(_test(law, "fitted law", "this fit: k free", None, maximize))
    return tuple(tests)


def _test(law: PowerLaw, name: str, description: str, exponent: float | None, maximize: bool) -> HypothesisTest:
    cells = law.cells
    ranks = np.array([cell.rank for cell in cells])
    design = _design(law)
    y = np.log([cell.optimum for cell in cells])
    weights = 1.0 / np.array([cell.log_sigma for cell in cells]) ** 2
    fitted = _fit(design, y, weights, exponent)

    penalties, relative, diverged, outside = [], [], 0, 0
    for held_out in np.unique(ranks):
        train = ranks != held_out
        coefficients = _fit(design[train], y[train], weights[train], exponent)
        if not np.all(np.isfinite(coefficients)):
            continue
        for index in np.flatnonzero(~train):
            cell = cells[index]
            objective = cell.objective_curve(maximize)
            value, off_grid = objective_at(np.log(cell.grid), objective, float(design[index] @ coefficients))
            outside += off_grid
            best = float(np.min(objective))
            if math.isinf(value):
                diverged += 1
                continue
            penalties.append(value - best)
            relative.append((value - best) / abs(best) if best != 0 else math.nan)

    k_low, k_high = law.k_ci
    excluded = (
        None
        if exponent is None or not (math.isfinite(k_low) and math.isfinite(k_high))
        else not (k_low <= exponent <= k_high)
    )
    return HypothesisTest(
        name=name,
        description=description,
        exponent=law.k if exponent is None else exponent,
        excluded=excluded,
        fitted_c=math.exp(fitted[0]),
        penalty_mean=float(np.mean(penalties)) if penalties else None,
        penalty_max=float(np.max(penalties)) if penalties else None,
        penalty_relative=float(np.nanmean(relative)) if relative and not np.all(np.isnan(relative)) else None,
        cells_scored=len(penalties) + diverged,
        cells_diverged=diverged,
        cells_outside_grid=int(outside),
    )


def rule_coefficients(law: PowerLaw, exponent: float) -> np.ndarray:
    """log c, k[, m] of the rule k = `exponent` fitted to the law's cells (c, and m, free)."""
    y = np.log([cell.optimum for cell in law.cells])
    weights = 1.0 / np.array([cell.log_sigma for cell in law.cells]) ** 2
    return _fit(_design(law), y, weights, exponent)


def _design(law: PowerLaw) -> np.ndarray:
    return np.stack(
        [law.design_row(cell.rank, getattr(cell, law.size_measure) if law.size_measure else None) for cell in law.cells]
    )


def _fit(design: np.ndarray, y: np.ndarray, weights: np.ndarray, exponent: float | None) -> np.ndarray:
    """Coefficients (log c, k[, m]); with `exponent` given, k is held at it and the others are fitted."""
    if exponent is None:
        return weighted_least_squares(design, y, weights)[0]
    free = [j for j in range(design.shape[1]) if j != 1]
    partial = weighted_least_squares(design[:, free], y - exponent * design[:, 1], weights)[0]
    coefficients = np.empty(design.shape[1])
    coefficients[free], coefficients[1] = partial, exponent
    return coefficients


def objective_at(log_grid: np.ndarray, objective: np.ndarray, log_value: float) -> tuple[float, bool]:
    """The objective at `log_value`, linear in log between measured points; next to a diverged point the nearer
    point decides. Outside the grid the edge value stands (a lower bound on the cost), flagged by the bool."""
    if log_value <= log_grid[0] or log_value >= log_grid[-1]:
        edge = 0 if log_value <= log_grid[0] else len(log_grid) - 1
        return float(objective[edge]), not math.isclose(log_value, log_grid[edge], abs_tol=1e-9)
    right = int(np.searchsorted(log_grid, log_value))
    left = right - 1
    fraction = (log_value - log_grid[left]) / (log_grid[right] - log_grid[left])
    y_left, y_right = objective[left], objective[right]
    if math.isfinite(y_left) and math.isfinite(y_right):
        return float(y_left + fraction * (y_right - y_left)), False
    return float(y_left if fraction < 0.5 else y_right), False
