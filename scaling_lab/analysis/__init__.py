"""The α*-against-rank law of a study's results: optima per cell, a power law with confidence intervals, the rules
the field argues about, the α-versus-learning-rate equivalence test, training diagnostics against α, plots and a
report. Plain numpy/scipy/pandas; imports nothing from ray, torch, transformers or deepspeed. Command line:
python -m scaling_lab.analysis fit|predict|equivalence (see __main__)."""

from scaling_lab.analysis.conventions import convert_exponent
from scaling_lab.analysis.equivalence import AlphaLrEquivalence, alpha_lr_equivalence
from scaling_lab.analysis.fit import (
    AnalysisError,
    FitSettings,
    StudyFit,
    TestedLaw,
    fit_study,
    predict,
)
from scaling_lab.analysis.hypotheses import HypothesisTest
from scaling_lab.analysis.load import LoadedResults, from_frame, load_results
from scaling_lab.analysis.optimum import CellOptimum
from scaling_lab.analysis.powerlaw import NoLaw, PowerLaw, Prediction

__all__ = [
    "AlphaLrEquivalence",
    "AnalysisError",
    "CellOptimum",
    "FitSettings",
    "HypothesisTest",
    "LoadedResults",
    "NoLaw",
    "PowerLaw",
    "Prediction",
    "StudyFit",
    "TestedLaw",
    "alpha_lr_equivalence",
    "convert_exponent",
    "fit_study",
    "from_frame",
    "load_results",
    "predict",
]
