"""law.json: the laws with their intervals and rules, the cells behind them, data, settings and versions."""

from __future__ import annotations

import json
import platform

from scaling_lab import results
from scaling_lab.analysis import methods, verification
from scaling_lab.analysis.conventions import CONVENTION_DESCRIPTIONS, CONVENTION_EXPONENTS
from scaling_lab.analysis.equivalence import WINDOW_DOUBLINGS
from scaling_lab.analysis.fit import StudyFit
from scaling_lab.analysis.powerlaw import PowerLaw

LAW_FORMAT_VERSION = 2  # 2: the metric and its origin, the study spec, bootstrap resamples of each law
VERSIONED_PACKAGES = ["scaling_lab", "numpy", "scipy", "pandas", "pyarrow", "matplotlib"]


def law_document(fit: StudyFit) -> dict:
    """Everything law.json holds: laws with intervals and rules, the cells behind them, data, settings, versions."""
    convention = fit.settings.convention
    laws = [t.to_dict() for t in fit.alpha_laws]
    single = fit.alpha_laws[0].law if len(fit.alpha_laws) == 1 else None
    document = {
        "format_version": LAW_FORMAT_VERSION,
        "source": str(fit.results.source),
        "metric": {
            "column": fit.results.metric,
            "goal": "maximize" if fit.results.maximize else "minimize",
            "origin": fit.results.metric_origin,
        },
        "study_spec": fit.results.study_spec,
        "convention": {
            "name": convention,
            "description": CONVENTION_DESCRIPTIONS[convention],
            "alpha_equals_scale_times_rank_to_the": CONVENTION_EXPONENTS[convention],
        },
        "law": laws[0] if isinstance(single, PowerLaw) else None,
        "law_in_other_conventions": equivalent_forms(single) if isinstance(single, PowerLaw) else None,
        "laws": laws,
        "joint_laws": [t.to_dict() for t in fit.joint_laws],
        "learning_rate_laws": [t.to_dict() for t in fit.learning_rate_laws],
        "cells": [c.to_dict() for c in fit.alpha_cells],
        "learning_rate_cells": [c.to_dict() for c in fit.learning_rate_cells],
        "alpha_learning_rate_equivalence": _equivalence_document(fit) if fit.equivalence else None,
        "data": {**fit.results.to_dict(), "trials_used": fit.n_trials_used, "cells": len(fit.alpha_cells)},
        "settings": fit.settings.to_dict(),
        "warnings": list(fit.warnings),
        "versions": package_versions(),
    }
    return verification.json_safe(document)


def package_versions() -> dict[str, str]:
    return {"python": platform.python_version(), **json.loads(results.versions_json(VERSIONED_PACKAGES))}


def equivalent_forms(law: PowerLaw) -> dict:
    forms = {}
    for name in CONVENTION_EXPONENTS:
        converted = law.in_convention(name)
        forms[name] = {
            "formula": converted.formula(),
            "c": converted.c,
            "k": converted.k,
            "k_ci95": list(converted.k_ci),
        }
    return forms


def _equivalence_document(fit: StudyFit) -> dict:
    """The test's results per cell, with the method as report.md states it (methods.py) in plain text."""
    values = {"window": f"{2**WINDOW_DOUBLINGS:g}", "tolerance": fit.settings.tolerance}
    method = methods.EQUIVALENCE_TEST + "\n" + methods.EQUIVALENCE_VERDICT
    return {
        "hypothesis": " ".join(methods.plain(methods.EQUIVALENCE_HYPOTHESIS).split()),
        "test": {
            "method": " ".join(methods.plain(method.format(**values)).split()),
            "window_factor": 2**WINDOW_DOUBLINGS,
            "tolerance_relative": fit.settings.tolerance,
        },
        "cells": [t.to_dict() for t in fit.equivalence],
    }
