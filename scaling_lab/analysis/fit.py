"""From loaded trials to optima, laws and hypothesis tests: the whole analysis as one pure function."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from scaling_lab.analysis.conventions import CONVENTION_EXPONENTS, alpha_in_convention
from scaling_lab.analysis.equivalence import AlphaLrEquivalence, alpha_lr_equivalence
from scaling_lab.analysis.hypotheses import HypothesisTest, evaluate_rules
from scaling_lab.analysis.load import LoadedResults
from scaling_lab.analysis.optimum import CellOptimum, find_optima
from scaling_lab.analysis.powerlaw import (
    SIZE_MEASURES,
    NoLaw,
    PowerLaw,
    Prediction,
    fit_power_law,
)
from scaling_lab.analysis.training_diagnostics import diagnostics_by_alpha, has_diagnostics

LEARNING_RATE_HELD_FIXED = ("scaling_rule", "alpha")  # the α as set, under its rule: a learning-rate law's setting


class AnalysisError(ValueError):
    """Settings or a request the data cannot answer (the data themselves were readable)."""


@dataclass(frozen=True)
class FitSettings:
    convention: str = "standard"
    by_model: bool = False
    size: str = "base"
    n_bootstrap: int = 1000
    seed: int = 0
    tolerance: float = 0.0025
    keep_edge: bool = False

    def __post_init__(self) -> None:
        if self.convention not in CONVENTION_EXPONENTS:
            raise AnalysisError(f"convention must be one of {list(CONVENTION_EXPONENTS)}, got {self.convention!r}")
        if self.size not in SIZE_MEASURES:
            raise AnalysisError(f"size must be one of {list(SIZE_MEASURES)}, got {self.size!r}")
        if self.n_bootstrap < 10:
            raise AnalysisError(f"bootstrap needs at least 10 resamples, got {self.n_bootstrap}")

    def to_dict(self) -> dict:
        return {
            "convention": self.convention,
            "by_model": self.by_model,
            "model_size": SIZE_MEASURES[self.size],
            "bootstrap_resamples": self.n_bootstrap,
            "seed": self.seed,
            "near_optimal_tolerance": self.tolerance,
            "edge_optima_in_fit": self.keep_edge,
        }


@dataclass(frozen=True)
class TestedLaw:
    law: PowerLaw | NoLaw
    tests: tuple[HypothesisTest, ...]

    def to_dict(self) -> dict:
        return {**self.law.to_dict(), "hypotheses": [t.to_dict() for t in self.tests]}


@dataclass(frozen=True)
class StudyFit:
    results: LoadedResults
    settings: FitSettings
    alpha_cells: tuple[CellOptimum, ...]
    alpha_laws: tuple[TestedLaw, ...]
    joint_laws: tuple[TestedLaw, ...]
    learning_rate_cells: tuple[CellOptimum, ...]
    learning_rate_laws: tuple[TestedLaw, ...]
    equivalence: tuple[AlphaLrEquivalence, ...]
    diagnostics: pd.DataFrame | None  # training diagnostics per model × learning rate × rank × α, means over seeds
    warnings: tuple[str, ...]

    @property
    def learning_rate_is_axis(self) -> bool:
        return bool(self.learning_rate_cells)

    @property
    def n_trials_used(self) -> int:
        return len(self.results.trials)


def fit_study(results: LoadedResults, settings: FitSettings = FitSettings()) -> StudyFit:
    trials = results.trials
    warnings = list(results.warnings)
    learning_rates = trials["learning_rate"].dropna().unique()
    learning_rate_is_axis = len(learning_rates) > 1
    if learning_rate_is_axis and trials["learning_rate"].isna().any():
        warnings.append(f"{int(trials['learning_rate'].isna().sum())} trials without a learning rate left out")
        trials = trials[trials["learning_rate"].notna()]
    models = trials["model"].unique()
    if len(models) > 1 and not settings.by_model:
        warnings.append(
            f"{len(models)} models pooled into one law (--pool): without it, one law per model and a joint law"
        )

    work = trials.assign(alpha=alpha_in_convention(trials["effective_scale"], trials["rank"], settings.convention))
    alpha_rng, learning_rate_rng, equivalence_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(settings.seed).spawn(3)
    )
    optimum_options = {
        "maximize": results.maximize,
        "n_bootstrap": settings.n_bootstrap,
        "tolerance": settings.tolerance,
    }
    alpha_fixed = ("learning_rate",) if learning_rate_is_axis else ()
    alpha_cells = find_optima(work, "alpha", alpha_fixed, rng=alpha_rng, **optimum_options)
    by_model = ("model",) if settings.by_model else ()
    alpha_laws = _fit_groups(alpha_cells, by_model + alpha_fixed, "alpha", settings, results.maximize)

    joint_laws: list[TestedLaw] = []
    if settings.by_model and len(models) > 1:
        joint_laws = _fit_groups(
            alpha_cells, alpha_fixed, "alpha", settings, results.maximize, size_measure=SIZE_MEASURES[settings.size]
        )

    learning_rate_cells: list[CellOptimum] = []
    learning_rate_laws: list[TestedLaw] = []
    equivalence: list[AlphaLrEquivalence] = []
    if learning_rate_is_axis:
        # lr*(r) at the setting as run: the scaling rule and the α the grid set, whatever convention α laws use.
        learning_rate_cells = find_optima(
            trials, "learning_rate", LEARNING_RATE_HELD_FIXED, rng=learning_rate_rng, **optimum_options
        )
        learning_rate_laws = _fit_groups(
            learning_rate_cells, by_model + LEARNING_RATE_HELD_FIXED, "learning_rate", settings, results.maximize
        )
        equivalence = alpha_lr_equivalence(
            work,
            maximize=results.maximize,
            tolerance=settings.tolerance,
            n_bootstrap=settings.n_bootstrap,
            rng=equivalence_rng,
        )

    return StudyFit(
        results=results,
        settings=settings,
        alpha_cells=tuple(alpha_cells),
        alpha_laws=tuple(alpha_laws),
        joint_laws=tuple(joint_laws),
        learning_rate_cells=tuple(learning_rate_cells),
        learning_rate_laws=tuple(learning_rate_laws),
        equivalence=tuple(equivalence),
        diagnostics=diagnostics_by_alpha(work) if has_diagnostics(work) else None,
        warnings=tuple(warnings),
    )


def _group_key(cell: CellOptimum, columns: Sequence[str]) -> tuple[tuple[str, object], ...]:
    fixed = dict(cell.held_fixed)
    return tuple((name, cell.model if name == "model" else fixed[name]) for name in columns)


def _fit_groups(
    cells: Sequence[CellOptimum],
    group_columns: Sequence[str],
    quantity: str,
    settings: FitSettings,
    maximize: bool,
    size_measure: str | None = None,
) -> list[TestedLaw]:
    groups: dict[tuple, list[CellOptimum]] = {}
    for cell in cells:
        groups.setdefault(_group_key(cell, group_columns), []).append(cell)
    tested = []
    for group, members in groups.items():
        law = fit_power_law(
            members,
            quantity=quantity,
            convention=settings.convention,
            group=group,
            keep_edge=settings.keep_edge,
            size_measure=size_measure,
        )
        tested.append(TestedLaw(law, evaluate_rules(law, maximize) if isinstance(law, PowerLaw) else ()))
    return tested


def predict(
    fit: StudyFit, ranks: Sequence[float], model_params: float | None = None, model: str | None = None
) -> list[tuple[PowerLaw, float, Prediction]]:
    """The optimal α (in the fit's convention) and its interval at each rank, from every law that applies.

    With `model_params` the joint law c·r^k·N^m is used; with `model`, that model's own law; otherwise every α law."""
    if model_params is not None:
        laws = [t.law for t in fit.joint_laws]
        if not laws:
            measure = SIZE_MEASURES[fit.settings.size]
            raise AnalysisError(
                f"no joint law in model size: the data hold fewer than two models with a known {measure}"
            )
    elif model is not None:
        laws = [t.law for t in fit.alpha_laws if dict(t.law.group).get("model") == model]
        if not laws:
            known = sorted({cell.model for cell in fit.alpha_cells})
            raise AnalysisError(f"no law for model {model!r} (models: {', '.join(known)})")
    else:
        laws = [t.law for t in fit.alpha_laws]
    fitted = [law for law in laws if isinstance(law, PowerLaw)]
    if not fitted:
        reasons = "; ".join(f"{law.group_label()}: {law.reason}" for law in laws if isinstance(law, NoLaw))
        raise AnalysisError(f"no law could be fitted ({reasons})")
    return [(law, rank, law.predict(rank, model_params)) for law in fitted for rank in ranks]
