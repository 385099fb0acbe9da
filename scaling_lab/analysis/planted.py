"""Synthetic results with a known law, for testing the analysis and benchmarking it.

The metric is a loss that is a parabola in log α (and in log learning rate) around the planted optima, plus
Gaussian seed noise; α far above the optimum diverges. Columns follow the results schema's names.
`planted_surface_trials` plants any loss surface over α × learning rate instead: a ridge in α·lr, or α and the
learning rate with optima of their own, for the equivalence test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from scaling_lab.analysis.conventions import effective_scale

RankLaw = Callable[[np.ndarray, np.ndarray], np.ndarray]


def power_law(c: float, k: float, m: float = 0.0, reference_size: float = 1e6) -> RankLaw:
    """α*(r, N) = c · r^k · (N / reference_size)^m, in the standard convention."""
    return lambda rank, size: c * rank**k * (size / reference_size) ** m


def planted_trials(
    optimal_alpha: RankLaw,
    *,
    ranks: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    alphas: Sequence[float] = tuple(2.0 ** np.arange(0, 15)),
    seeds: int = 3,
    models: dict[str, float] | None = None,
    learning_rates: Sequence[float] = (1e-4,),
    optimal_learning_rate: RankLaw | None = None,
    curvature: float = 0.05,
    noise: float = 0.002,
    diverge_above: float = 3.0,
    missing_fraction: float = 0.0,
    scaling_rule: str = "standard",
    rng: np.random.Generator | None = None,
) -> pd.DataFrame:
    """Every combination of model × rank × α × learning rate × seed as one trial row, α applied under
    `scaling_rule` (the planted α* is in the standard convention: it is compared with the effective scale · r).

    `diverge_above` is in units of log α − log α*; `missing_fraction` of the rows is dropped at random."""
    rng = rng or np.random.default_rng(0)
    models = models or {"planted": 1e6}
    names = np.array(list(models))
    grid = np.meshgrid(
        np.arange(len(names)),
        np.array(ranks),
        np.array(alphas, dtype=float),
        np.array(learning_rates, dtype=float),
        np.arange(seeds),
        indexing="ij",
    )
    model_index, rank, alpha, learning_rate, seed = (axis.ravel() for axis in grid)
    size = np.array([models[name] for name in names])[model_index]
    scale = effective_scale(alpha, rank, np.full(rank.size, scaling_rule))
    distance = np.log(scale * rank) - np.log(optimal_alpha(rank, size))
    loss = 1.0 + curvature * distance**2 + rng.normal(0.0, noise, size=rank.size)
    if optimal_learning_rate is not None:
        loss += curvature * (np.log(learning_rate) - np.log(optimal_learning_rate(rank, size))) ** 2
    diverged = distance > diverge_above
    frame = pd.DataFrame(
        {
            "model": names[model_index],
            "model_params": size.astype(np.int64),
            "trainable_params": (1000 * rank).astype(np.int64),
            "rank": rank.astype(np.int32),
            "alpha": alpha,
            "learning_rate": learning_rate,
            "seed": seed.astype(np.int32),
            "scaling_rule": scaling_rule,
            "effective_scale": scale,
            "status": np.where(diverged, "diverged", "ok"),
            "final_eval_loss": np.where(diverged, np.nan, loss),
            "final_eval_accuracy": np.where(diverged, np.nan, np.exp(-loss)),
        }
    )
    if missing_fraction > 0:
        frame = frame[rng.random(len(frame)) >= missing_fraction].reset_index(drop=True)
    return frame


Surface = Callable[[np.ndarray, np.ndarray], np.ndarray]


def ridge_surface(
    best_product: float, curvature: float = 0.05, steeper_above: float = 1.0, alpha_slope: float = 0.0
) -> Surface:
    """Excess loss over (log α, log lr) that depends on α·lr alone: a parabola in log(α·lr) around `best_product`,
    `steeper_above` times steeper above it; plus `alpha_slope` per e-fold of α at fixed α·lr (negative: larger α
    is better at the same product, as LoRA-α claims)."""

    def excess(log_alpha: np.ndarray, log_learning_rate: np.ndarray) -> np.ndarray:
        distance = log_alpha + log_learning_rate - np.log(best_product)
        return curvature * np.where(distance > 0, steeper_above, 1.0) * distance**2 + alpha_slope * log_alpha

    return excess


def separate_surface(
    best_alpha: float, best_learning_rate: float, alpha_curvature: float = 0.05, learning_rate_curvature: float = 0.05
) -> Surface:
    """Excess loss with an optimum of α and one of the learning rate of their own (α-dominant when the learning
    rate's curvature is the smaller): α·lr alone does not determine it."""

    def excess(log_alpha: np.ndarray, log_learning_rate: np.ndarray) -> np.ndarray:
        return (
            alpha_curvature * (log_alpha - np.log(best_alpha)) ** 2
            + learning_rate_curvature * (log_learning_rate - np.log(best_learning_rate)) ** 2
        )

    return excess


def planted_surface_trials(
    surface: Surface,
    *,
    alphas: Sequence[float],
    learning_rates: Sequence[float],
    ranks: Sequence[int] = (8,),
    seeds: int = 3,
    noise: float = 0.002,
    diverge_above: float = 0.5,
    rng: np.random.Generator | None = None,
) -> pd.DataFrame:
    """Every rank × α × learning rate × seed as one trial row of model "planted": loss 1 + surface + Gaussian seed
    noise; trials whose excess loss is above `diverge_above` diverge."""
    rng = rng or np.random.default_rng(0)
    grid = np.meshgrid(
        np.array(ranks),
        np.array(alphas, dtype=float),
        np.array(learning_rates, dtype=float),
        np.arange(seeds),
        indexing="ij",
    )
    rank, alpha, learning_rate, seed = (axis.ravel() for axis in grid)
    excess = surface(np.log(alpha), np.log(learning_rate))
    diverged = excess > diverge_above
    loss = 1.0 + excess + rng.normal(0.0, noise, size=rank.size)
    return pd.DataFrame(
        {
            "model": "planted",
            "rank": rank.astype(np.int32),
            "alpha": alpha,
            "learning_rate": learning_rate,
            "seed": seed.astype(np.int32),
            "scaling_rule": "standard",
            "effective_scale": alpha / rank,
            "status": np.where(diverged, "diverged", "ok"),
            "final_eval_loss": np.where(diverged, np.nan, loss),
        }
    )
