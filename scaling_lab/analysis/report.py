"""What a fit tells the user: a terminal summary, law.json and report.md (with the plots beside it)."""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Sequence
from pathlib import Path

from scaling_lab import results
from scaling_lab.analysis.conventions import (
    CONVENTION_DESCRIPTIONS,
    CONVENTION_EXPONENTS,
    CONVENTION_SYMBOLS,
)
from scaling_lab.analysis import verification
from scaling_lab.analysis.equivalence import VERDICT_LABELS, WINDOW_DOUBLINGS
from scaling_lab.analysis.fit import StudyFit, TestedLaw
from scaling_lab.analysis.hypotheses import mu_a_exponent
from scaling_lab.analysis.optimum import CellOptimum
from scaling_lab.analysis.powerlaw import NoLaw, PowerLaw, Prediction

LAW_FORMAT_VERSION = 2  # 2: the metric and its origin, the study spec, bootstrap resamples of each law
MAX_TERMINAL_CELLS = 40
VERSIONED_PACKAGES = ["scaling_lab", "numpy", "scipy", "pandas", "pyarrow", "matplotlib"]

METHOD = """\
- **Optimum per cell.** The metric is averaged over seeds at each α of the grid; a point where any seed diverged
  counts as worse than every finite one (never as missing); rows with status error or oom are left out and counted.
  The best point is refined by a parabola in log α through it and its two neighbours (the grid point stands when
  a neighbour is missing or diverged). A parabola through three points is exact for a loss parabolic in log α; on
  a loss that rises faster above the optimum than below it shifts every optimum alike, which biases c but hardly
  k. The learning rate, where it is an axis, is optimized the same way at each fixed α, and the metric plot shows
  each model at its best learning rate.
- **Uncertainty of an optimum.** {n_bootstrap} bootstrap resamples of the seeds within each cell (spread
  corrected by √(S/(S−1)) for S seeds), combined with the grid's resolution (grid step/√12, a fifth of that for a
  refined optimum).
- **Flags.** edge_low / edge_high: the best point is the smallest / largest value tried; near_edge_*: over 10% of
  resamples put it there; too_few_points: fewer than 3 finite points; all_diverged; not_refined; flat_to_edge:
  points within {tolerance:.2%} of the best reach the edge of the range; some_diverged.
  {edge_policy}
- **Law.** Weighted least squares of log optimum on log r (and log N for the joint law), weights 1/σ². Each 95%
  interval is the wider, on each side, of the bootstrap percentile interval (the law refitted on every resample of
  the optima) and a Student t interval from the residuals, which counts scatter the seeds do not show.
  R² is weighted and in log space; it depends on the convention (a law with k near 0 has R² near 0 however well
  it fits): judge the fit by χ²/ν and the residual plot.
- **Not a power law?** A quadratic term in log r is fitted too; when its interval excludes zero the law is marked
  not supported. So is a law from fewer than 3 ranks or ranks spanning less than 4×.
- **Rules.** For each rule (k fixed) its best c is fitted on all ranks but one and scored on the left-out rank:
  the metric at the rule's α (linear in log α between measured points) minus the best measured metric of that
  cell, averaged over ranks. The fitted law is scored the same way as a baseline.
"""


def format_terminal(fit: StudyFit, written: Sequence[Path] = ()) -> str:
    """A compact summary: data, optima per cell, the laws with intervals, the rules side by side, warnings."""
    res, settings = fit.results, fit.settings
    lines = [
        f"scaling_lab analysis · {res.source}",
        f"  {_data_line(fit)}",
        (
            f"  metric {res.metric} ({'higher' if res.maximize else 'lower'} is better) · "
            f"{settings.n_bootstrap} bootstrap resamples, seed {settings.seed}"
        ),
        f"  metric from {res.metric_origin}",
        f"  {CONVENTION_DESCRIPTIONS[settings.convention]}",
        "",
    ]
    lines += _cell_table(fit, fit.alpha_cells, "α*", MAX_TERMINAL_CELLS)
    for tested in fit.alpha_laws + fit.joint_laws:
        lines += [""] + _law_lines(tested)
    if fit.learning_rate_laws:
        lines += ["", "learning-rate laws (lr* against rank at the scaling rule and α the grid set)"]
        lines += ["  " + _law_summary(t.law) for t in fit.learning_rate_laws if isinstance(t.law, PowerLaw)]
        lines += [
            "  " + line for line in _no_law_summary([t.law for t in fit.learning_rate_laws if isinstance(t.law, NoLaw)])
        ]
    if fit.equivalence:
        lines += ["", _equivalence_summary(fit)]
        lines += ["  " + line for line in _aligned(*_equivalence_rows(fit, MAX_TERMINAL_CELLS))]
        if len(fit.equivalence) > MAX_TERMINAL_CELLS:
            lines.append(f"  … {len(fit.equivalence) - MAX_TERMINAL_CELLS} more cells in report.md and law.json")
    warnings = list(fit.warnings)
    if warnings:
        lines += ["", "warnings"] + [f"  ! {w}" for w in warnings]
    if written:
        lines += ["", f"wrote {', '.join(str(p) for p in written)}"]
    return "\n".join(lines)


def _data_line(fit: StudyFit) -> str:
    res = fit.results
    statuses = ", ".join(f"{name} {res.status_counts[name]}" for name in results.STATUSES if name in res.status_counts)
    extra = f" ({res.nonfinite_ok} 'ok' with a non-finite metric counted as diverged)" if res.nonfinite_ok else ""
    dropped = f"; {res.n_dropped} error/oom left out" if res.n_dropped else ""
    rules = (
        f"; rules {', '.join(res.scaling_rules)} pooled through the effective scale"
        if len(res.scaling_rules) > 1
        else ""
    )
    return f"{res.n_rows} trials: {statuses}{extra}{dropped} · {len(fit.alpha_cells)} cells{rules}"


def _number(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.{digits}g}"


def _interval_text(low: float | None, high: float | None, digits: int = 4) -> str:
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return "—"
    return f"[{low:.{digits}g}, {high:.{digits}g}]"


def _exponent_interval(interval: tuple[float, float] | None) -> str:
    if interval is None or not all(math.isfinite(v) for v in interval):
        return "—"
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]"


def _cell_rows(fit: StudyFit, cells: Sequence[CellOptimum], near_optimal: bool = False) -> list[list[str]]:
    rows = []
    for cell in cells:
        reason = cell.exclusion(fit.settings.keep_edge)
        flags = ", ".join(f for f in cell.flags if f != "not_refined" or reason is None)
        rows.append(
            [
                cell.model,
                *(value if isinstance(value, str) else _number(value) for _, value in cell.held_fixed),
                str(cell.rank),
                _number(cell.optimum),
                _interval_text(cell.optimum_low, cell.optimum_high),
                _number(cell.optimum_metric, 5),
                str(cell.n_seeds),
                f"{cell.n_trials - cell.n_diverged}/{cell.n_trials}",
                flags + (f" → not used ({reason})" if reason else ""),
                *([_interval_text(*cell.near_optimal) if cell.near_optimal else "—"] if near_optimal else []),
            ]
        )
    return rows


def _cell_header(fit: StudyFit, cells: Sequence[CellOptimum], symbol: str, near_optimal: bool = False) -> list[str]:
    fixed = [name for name, _ in cells[0].held_fixed] if cells else []
    tolerance = [f"within {fit.settings.tolerance:.2%} of best"] if near_optimal else []
    return [
        "model",
        *fixed,
        "rank",
        symbol,
        "95% CI",
        fit.results.metric,
        "seeds",
        "finite/trials",
        "flags",
        *tolerance,
    ]


def _cell_table(fit: StudyFit, cells: Sequence[CellOptimum], symbol: str, most: int) -> list[str]:
    rows = _cell_rows(fit, cells)
    lines = [f"optimum per cell ({symbol} in the {fit.settings.convention} convention)"]
    lines += ["  " + line for line in _aligned(_cell_header(fit, cells, symbol), rows[:most])]
    if len(rows) > most:
        lines.append(f"  … {len(rows) - most} more cells in report.md and law.json")
    return lines


def _law_summary(law: PowerLaw) -> str:
    verdict = "" if law.supported else f"  NOT SUPPORTED: {law.warnings[0]}"
    return (
        f"{law.group_label()}: {law.formula()}  k {law.k:.3f} {_exponent_interval(law.k_ci)}  "
        f"R² {law.r_squared:.3f}{verdict}"
    )


def _no_law_summary(laws: Sequence[NoLaw]) -> list[str]:
    reasons: dict[str, list[str]] = {}
    for law in laws:
        reasons.setdefault(law.reason, []).append(law.group_label())
    return [
        f"no law for {len(groups)} group{'s' if len(groups) > 1 else ''} ({reason}): {'; '.join(groups)}"
        for reason, groups in reasons.items()
    ]


def _law_lines(tested: TestedLaw) -> list[str]:
    law = tested.law
    kind = "joint law (model size)" if isinstance(law, PowerLaw) and law.m is not None else "law"
    if not isinstance(law, PowerLaw):
        return [f"{kind} · {law.group_label()}: no law — {law.reason}" + _dropped_text(law.dropped)]
    lines = [
        f"{kind} · {law.group_label()} · {law.formula()}" + ("" if law.supported else "   ← NOT SUPPORTED by the data")
    ]
    lines.append(f"  c = {_number(law.c)}  95% CI {_interval_text(*law.c_ci)}")
    lines.append(f"  k = {law.k:.3f}  95% CI {_exponent_interval(law.k_ci)}")
    if law.m is not None:
        lines.append(f"  m = {law.m:.3f}  95% CI {_exponent_interval(law.m_ci)}   (N = {law.size_measure})")
    chi2 = f"  χ²/ν {law.chi2_per_dof:.2f} (ν={law.dof})" if law.chi2_per_dof is not None else ""
    lines.append(
        f"  R² {law.r_squared:.3f}{chi2} · {len(law.cells)} cells used over ranks {law.ranks[0]}–{law.ranks[-1]}"
        + _dropped_text(law.dropped)
    )
    lines += [f"  ! {w}" for w in law.warnings] + [f"  · {n}" for n in law.notes]
    if tested.tests:
        lines += ["  " + row for row in _aligned(*_rule_rows(tested))]
    return lines


def _dropped_text(dropped: Sequence[tuple[str, int]]) -> str:
    return (
        f", {sum(n for _, n in dropped)} dropped ({', '.join(f'{reason} {n}' for reason, n in dropped)})"
        if dropped
        else ", none dropped"
    )


def _aligned(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip() for row in [header, *rows]]


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(row) + " |" for row in rows
    ]


def _rule_rows(tested: TestedLaw) -> tuple[list[str], list[list[str]]]:
    header = ["rule", "k", "CI excludes it", "c with k fixed", "held-out penalty mean", "max", "relative", "note"]
    rows = []
    for test in tested.tests:
        notes = []
        if test.cells_diverged:
            notes.append(f"diverges at {test.cells_diverged} rank{'s' if test.cells_diverged > 1 else ''}")
        if test.cells_outside_grid:
            notes.append(f"{test.cells_outside_grid} outside the grid (penalty a lower bound)")
        rows.append(
            [
                test.name,
                f"{test.exponent:.3f}",
                "—" if test.excluded is None else ("yes" if test.excluded else "no"),
                _number(test.fitted_c),
                "—" if test.penalty_mean is None else f"{test.penalty_mean:+.4g}",
                "—" if test.penalty_max is None else f"{test.penalty_max:+.4g}",
                "—" if test.penalty_relative is None else f"{test.penalty_relative:.2%}",
                "; ".join(notes),
            ]
        )
    return header, rows


def format_predictions(
    fit: StudyFit, predictions: Sequence[tuple[PowerLaw, float, Prediction]], model_params: float | None
) -> str:
    convention = fit.settings.convention
    symbol = CONVENTION_SYMBOLS[convention]
    lines = [f"{symbol}* ({CONVENTION_DESCRIPTIONS[convention]}) from {fit.results.source}"]
    header = ["law", "rank", *(["N"] if model_params is not None else []), f"{symbol}*", "95% CI"]
    rows = [
        [
            law.group_label() + f" ({law.formula()})",
            f"{rank:g}",
            *([f"{model_params:.3g}"] if model_params is not None else []),
            _number(p.value),
            _interval_text(p.low, p.high),
        ]
        for law, rank, p in predictions
    ]
    lines += ["  " + line for line in _aligned(header, rows)]
    notices = dict.fromkeys([*fit.warnings, *(w for _, _, p in predictions for w in p.warnings)])
    lines += [f"  ! {w}" for w in notices]
    return "\n".join(lines)


def format_stored_predictions(
    document: dict, path: Path, laws: Sequence, ranks: Sequence[float], model_params: float | None
) -> str:
    """Predictions from the laws of a law.json (adapter.StoredLaw), as format_predictions shows a fit's."""
    convention = document["convention"]["name"]
    symbol = CONVENTION_SYMBOLS[convention]
    rows, notices = [], {}
    for law in laws:
        for rank in ranks:
            p = law.predict(rank, model_params)
            rows.append([f"{law.group_label()} ({law.formula()})", f"{rank:g}",
                         *([f"{model_params:.3g}"] if model_params is not None else []),
                         _number(p.value), _interval_text(p.low, p.high)])
            notices.update(dict.fromkeys(p.warnings))
    metric = (document.get("metric") or {}).get("column")
    lines = [f"{symbol}* ({CONVENTION_DESCRIPTIONS[convention]}) from {path}, fitted on {document.get('source')}"
             + (f" (metric {metric})" if metric else "")]
    header = ["law", "rank", *(["N"] if model_params is not None else []), f"{symbol}*", "95% CI"]
    lines += ["  " + line for line in _aligned(header, rows)]
    lines += [f"  ! {w}" for w in notices]
    return "\n".join(lines)


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
        "law_in_other_conventions": _equivalent_forms(single) if isinstance(single, PowerLaw) else None,
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
    return _finite(document)


def package_versions() -> dict[str, str]:
    return {"python": platform.python_version(), **json.loads(results.versions_json(VERSIONED_PACKAGES))}


def _equivalent_forms(law: PowerLaw) -> dict:
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


def _finite(value):
    """JSON has no NaN or infinity: write null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_outputs(fit: StudyFit, out_dir: Path) -> list[Path]:
    """Write law.json, the plots and report.md into `out_dir`; returns the paths written."""
    from scaling_lab.analysis.plots import write_plots

    out_dir.mkdir(parents=True, exist_ok=True)
    law_path = out_dir / "law.json"
    document = law_document(fit)
    verified = _earlier_verification(law_path)  # written by `study verify`: a refit keeps it
    if verified:
        document["verification"] = verified
    law_path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    plots = write_plots(fit, out_dir)
    report_path = out_dir / "report.md"
    report = format_markdown(fit, [p.name for p in plots])
    report_path.write_text(verification.with_section(report, verification.markdown(verified)) if verified else report)
    return [law_path, report_path, *plots]


def _earlier_verification(law_path: Path) -> list[dict]:
    try:
        return json.loads(law_path.read_text()).get("verification") or []
    except (OSError, ValueError, AttributeError):
        return []


PLOT_CAPTIONS = {
    "metric_vs_alpha.png": "Metric against α per rank (mean over seeds), one panel per model size. Stars: optima with 95% intervals; hollow stars are not used in the law; red crosses: diverged.",
    "alpha_vs_rank.png": "Optimal α against rank on log-log axes with the fitted law and its 95% band; grey lines: the reference rules k = 0, 0.5, 1 (in this convention's terms) through the centre of the data.",
    "residuals.png": "Each optimum relative to its law's prediction, in percent, with 95% error bars. A power law leaves no pattern around 0.",
    "learning_rate_vs_rank.png": (
        "Optimal learning rate against rank at each scaling rule and α the grid set, with the fitted laws."
    ),
    "alpha_lr_surface.png": "The metric over α × learning rate per model and rank (at most four cells): colour, how much worse the mean over seeds is than the fitted optimum (★), in percent; red crosses: diverged. White contours: the fitted full model at 1, 4 and 16 times the tolerance above its optimum, where it was fitted; dashed: the line α·lr = const through the optimum. Under the α·lr hypothesis the contours run parallel to it; an α effect of its own closes them across it.",
    "diagnostics_vs_alpha.png": "Training diagnostics against α, one line per rank (the metric figure's colours), at the learning rate that figure shows. Solid: each trial's value over its diagnostic steps after step 1 (mean signal and update norm; drift ratio = summed drift / summed signal), mean over seeds; dashed: the first logged step after step 1. Spectral ratio: end of training, mean over adapted layers. Dotted: ratio 1.",
}


SECTION_PLOTS = ("alpha_lr_surface.png", "diagnostics_vs_alpha.png")  # shown in their own sections

EQUIVALENCE_TEXT = """\
**Hypothesis.** At a fixed model and rank the metric is a function of α·lr alone: doubling α and halving the
learning rate changes nothing. Why it might be: with B initialised to zero and A independent of α, the multiplier
s on B·A scales B's gradients by s, which Adam's normalisation cancels, so training B at learning rate lr moves s·B
as training it at s·lr would; at a fixed rank s ∝ α. A (which moves at lr itself), Adam's ε, weight decay and
gradient clipping see α and lr apart: they can give α an effect of its own, as LoRA-α claims.

**Test.** In u = log₂(α·lr) and v = log₂ α, the ridge model g(u) (a cubic spline in u) is compared with the full
model g(u) + a·v + b·u·v + c·v², both fitted by least squares to the trials of the finite grid points whose α·lr
is within {window}× the best measured one's. *F-test*: is any α effect detectable (3 degrees of freedom)?
*α slope*: the metric's change per doubling of α at fixed α·lr, at the fitted optimum's α·lr. *Ridge spread*:
along the line α·lr = (α·lr)* through the fitted optimum, over the α range the finite grid covers on it, the
largest minus the smallest value of the α terms: what choosing α costs once α·lr is right. Intervals (95%): on
each side the wider of a bootstrap over seeds and the fit's own covariance (which counts lack of fit).
*Verdict*, an equivalence test on the spread against the near-optimal tolerance ({tolerance:.2%} of the best
metric): **ridge** when the spread's upper bound is below it, **α effect** when its lower bound is above it,
otherwise **undecided**. A small F-test p with a ridge verdict is an α effect too small to matter."""

DIAGNOSTICS_TEXT = """\
Definitions (ours, from `scaling_lab/diagnostics.py`; the LoRA-α paper's exact ones are not public), measured at
step 1 and every `training.diagnostics_every` steps on a fixed probe batch:
- **signal** S = −⟨∇L_probe, Δθ⟩: the first-order predicted decrease of the probe loss from one step's update Δθ;
- **drift** D = (L_probe(θ + Δθ) − L_probe(θ)) + S: how much the actual change falls short of that prediction
  (½ Δθᵀ H Δθ on a quadratic loss); **drift ratio** D / S: 0 when the step is as good as predicted, 1 when it
  gains nothing on the probe batch, above 1 when it makes the probe loss worse;
- **update norm** ‖s·B·A‖_F summed in squares over the adapted layers: how far the adapters have moved the model;
- **spectral ratio** σ₁(s·B·A) / σ₁(W) per adapted layer at the end of the trial, mean over layers: how large the
  update is against the frozen weight's top direction (below 1: spectrally suppressed).

Each trial's value is taken over its diagnostic steps after step 1 (at step 1 B is still zero): the mean signal
and update norm, and the drift ratio as summed drift over summed signal (a mean of per-step ratios explodes where a
step's signal is near zero); dashed lines show the first logged step after step 1 instead. Then the mean over
seeds; diverged trials count up to their last finite step. How to read it: LoRA-α's claim is that raising α
raises the signal without raising the drift ratio, up to the α where the loss jumps; a drift ratio that climbs
towards 1 as α grows marks where larger steps stop paying."""


def _figure(name: str) -> list[str]:
    caption = PLOT_CAPTIONS.get(name, name)
    return [f"![{caption}]({name})", "", f"*{caption}*", ""]


def format_equivalence(fit: StudyFit) -> str:
    """The equivalence test alone, for the terminal: data, one row per model and rank, how to read it."""
    res = fit.results
    lines = [
        f"scaling_lab analysis · α and learning rate · {res.source}",
        f"  {_data_line(fit)}",
        (
            f"  metric {res.metric} ({'higher' if res.maximize else 'lower'} is better) · "
            f"{fit.settings.n_bootstrap} bootstrap resamples, seed {fit.settings.seed}"
        ),
        "",
        _equivalence_summary(fit),
    ]
    lines += ["  " + line for line in _aligned(*_equivalence_rows(fit))]
    lines += [
        "",
        "  α slope: metric change per doubling of α at fixed α·lr. Ridge spread: largest minus smallest metric along",
        "  α·lr = best within the grid. Verdict: ridge if the spread's 95% upper bound is below the tolerance,",
        "  α effect if its lower bound is above it. Method: report.md of `fit`.",
    ]
    return "\n".join(lines)


def _equivalence_document(fit: StudyFit) -> dict:
    return {
        "hypothesis": "at fixed model and rank the metric is a function of alpha * learning_rate alone",
        "test": {
            "ridge_model": "g(u), a cubic spline in u = log2(alpha * learning_rate)",
            "full_model": "g(u) + a*v + b*u*v + c*v^2 with v = log2(alpha)",
            "fitted_on": f"finite grid points with alpha * learning_rate within {2**WINDOW_DOUBLINGS:g}x the best measured",
            "alpha_slope": "metric change per doubling of alpha at fixed alpha * learning_rate, at the optimum's product",
            "ridge_spread": "max - min of a*v + b*u*v + c*v^2 along alpha * learning_rate = best, within the grid",
            "verdict": "ridge if the spread's 95% upper bound is below the tolerance, alpha_effect if its lower bound is above it",
            "tolerance_relative": fit.settings.tolerance,
        },
        "cells": [t.to_dict() for t in fit.equivalence],
    }


def _equivalence_summary(fit: StudyFit) -> str:
    counts: dict[str, int] = {}
    for test in fit.equivalence:
        counts[test.verdict] = counts.get(test.verdict, 0) + 1
    verdicts = "; ".join(f"{VERDICT_LABELS[v]} {n}" for v, n in counts.items())
    return f"α and learning rate: is the metric a function of α·lr alone? {len(fit.equivalence)} cells: {verdicts}"


def _equivalence_rows(fit: StudyFit, most: int | None = None) -> tuple[list[str], list[list[str]]]:
    header = [
        "model",
        "rank",
        "verdict",
        "F-test p",
        "α slope /doubling",
        "95% CI",
        "ridge spread",
        "95% CI",
        "tolerance",
        "best α, lr",
    ]
    rows = []
    for test in fit.equivalence[:most]:
        if test.reason is not None:
            rows.append([test.model, str(test.rank), f"not tested: {test.reason}"] + ["—"] * (len(header) - 3))
            continue
        rows.append(
            [
                test.model,
                str(test.rank),
                VERDICT_LABELS[test.verdict],
                "—" if test.p_value is None else f"{test.p_value:.2g}",
                f"{test.alpha_slope:+.3g}",
                _interval_text(*test.alpha_slope_ci, digits=3),
                f"{test.ridge_spread:.3g}",
                _interval_text(*test.ridge_spread_ci, digits=3),
                f"{test.tolerance:.3g}",
                f"{test.best_alpha:.4g}, {test.best_learning_rate:.3g}",
            ]
        )
    return header, rows


def _markdown_equivalence(fit: StudyFit, plot_names: Sequence[str]) -> list[str]:
    text = EQUIVALENCE_TEXT.format(window=f"{2**WINDOW_DOUBLINGS:g}", tolerance=fit.settings.tolerance)
    lines = ["## α and learning rate: one knob or two?", "", _equivalence_summary(fit) + ".", "", text, ""]
    lines += _markdown_table(*_equivalence_rows(fit)) + [""]
    if SECTION_PLOTS[0] in plot_names:
        lines += _figure(SECTION_PLOTS[0])
    return lines


def format_markdown(fit: StudyFit, plot_names: Sequence[str]) -> str:
    res, settings = fit.results, fit.settings
    convention = settings.convention
    lines = [f"# Optimal LoRA α against rank — {res.source}", ""]
    lines += [_headline(fit), ""]
    lines += [
        "## Data",
        "",
        f"- {_data_line(fit)}",
        f"- metric: `{res.metric}` ({'higher' if res.maximize else 'lower'} is better), from {res.metric_origin}",
    ]
    lines += [f"- {CONVENTION_DESCRIPTIONS[convention]}: every law below is stated in these terms"]
    if len(res.scaling_rules) > 1:
        lines.append(
            f"- trials under the scaling rules {', '.join(res.scaling_rules)} were converted through their effective scale and pooled"
        )
    lines += [f"- warning: {w}" for w in fit.warnings]
    lines += ["", "## Laws", ""]
    for tested in fit.alpha_laws + fit.joint_laws:
        lines += _markdown_law(tested) + [""]
    single = fit.alpha_laws[0].law if len(fit.alpha_laws) == 1 else None
    if isinstance(single, PowerLaw):
        lines += ["The same law in each convention (exact conversion: c unchanged, k shifted):", ""]
        lines += ["| convention | law | k 95% CI |", "|---|---|---|"]
        for name, form in _equivalent_forms(single).items():
            lines.append(f"| {name} | {form['formula']} | {_exponent_interval(form['k_ci95'])} |")
        lines.append("")
    lines += ["## Plots", ""]
    for name in plot_names:
        if name not in SECTION_PLOTS:
            lines += _figure(name)
    if fit.equivalence:
        lines += _markdown_equivalence(fit, plot_names)
    if SECTION_PLOTS[1] in plot_names:
        lines += ["## Training diagnostics", "", DIAGNOSTICS_TEXT, ""] + _figure(SECTION_PLOTS[1])
    lines += ["## Optimum per cell", ""] + _markdown_cells(fit, fit.alpha_cells, "α*") + [""]
    if fit.learning_rate_is_axis:
        lines += ["## Learning rate", "", LEARNING_RATE_TEXT, ""]
        lines += _markdown_mu_a(fit) + [""]
        for tested in fit.learning_rate_laws:
            lines += _markdown_law(tested) + [""]
        lines += _markdown_cells(fit, fit.learning_rate_cells, "lr*") + [""]
    edge_policy = (
        "Edge optima are only bounds, so they are left out of the law fit (use --keep-edge to include them)."
        if not settings.keep_edge
        else "Edge optima are included in the law fit (--keep-edge): they are only bounds."
    )
    lines += ["## Method", ""]
    lines += [METHOD.format(n_bootstrap=settings.n_bootstrap, tolerance=settings.tolerance, edge_policy=edge_policy)]
    lines += [
        "## Provenance",
        "",
        f"- settings: `{json.dumps(settings.to_dict())}`",
        f"- versions: `{json.dumps(package_versions())}`",
        "",
    ]
    return "\n".join(lines)


LEARNING_RATE_TEXT = """\
lr* against rank at the setting as run: one law per scaling rule and α value the grid set (the α column is that
α, not the convention above), so that a study under α/r, α/√r or a fixed scale each gets its lr*(r) law.
μA (Chen, Villar, Hayou, arXiv 2602.06204): with A random and B zero, a multiplier r^-γ on B·A gives
lr* ∝ r^-(1-γ)/2; a fixed α under α/r, α/√r and a fixed scale is γ = 1, 1/2, 0, so lr* ∝ r^0, r^-1/4, r^-1/2."""


def _markdown_mu_a(fit: StudyFit) -> list[str]:
    header = ["law", "k", "95% CI", "μA's k", "inside the CI"]
    rows = []
    for tested in fit.learning_rate_laws:
        law = tested.law
        if not isinstance(law, PowerLaw):
            continue
        predicted = mu_a_exponent(law)
        low, high = law.k_ci
        finite = math.isfinite(low) and math.isfinite(high)
        inside = "—" if not finite else ("yes" if low <= predicted <= high else "no")
        rows.append([law.group_label(), f"{law.k:.3f}", _exponent_interval(law.k_ci), f"{predicted:g}", inside])
    return _markdown_table(header, rows) if rows else []


def _headline(fit: StudyFit) -> str:
    parts = []
    for tested in fit.alpha_laws:
        law = tested.law
        if not isinstance(law, PowerLaw):
            parts.append(f"**{law.group_label()}:** no law — {law.reason}{_dropped_text(law.dropped)}.")
            continue
        verdict = "" if law.supported else " — **not supported by the data**: " + "; ".join(law.warnings)
        parts.append(f"**{law.group_label()}:** {law.formula()}, k 95% CI {_exponent_interval(law.k_ci)}{verdict}.")
    return "\n\n".join(parts)


def _markdown_law(tested: TestedLaw) -> list[str]:
    law = tested.law
    if not isinstance(law, PowerLaw):
        return [f"### {law.group_label()}: no law", "", f"{law.reason}{_dropped_text(law.dropped)}."]
    title = "joint law (model size)" if law.m is not None else "law"
    lines = [f"### {title} · {law.group_label()}: {law.formula()}", ""]
    lines += ["| parameter | estimate | 95% CI |", "|---|---|---|"]
    lines.append(f"| c | {_number(law.c)} | {_interval_text(*law.c_ci)} |")
    lines.append(f"| k | {law.k:.4f} | {_exponent_interval(law.k_ci)} |")
    if law.m is not None:
        lines.append(f"| m (N = {law.size_measure}) | {law.m:.4f} | {_exponent_interval(law.m_ci)} |")
    chi2 = f", χ²/ν = {law.chi2_per_dof:.2f} (ν = {law.dof})" if law.chi2_per_dof is not None else ""
    lines += [
        "",
        f"R² = {law.r_squared:.3f}{chi2}; {len(law.cells)} cells used over ranks {', '.join(map(str, law.ranks))}{_dropped_text(law.dropped)}.",
    ]
    lines += [""] + [f"- **warning:** {w}" for w in law.warnings] + [f"- {n}" for n in law.notes]
    lines += [
        "",
        "Residuals (optimum / law): " + ", ".join(f"{r.label} ×{math.exp(r.log_residual):.3f}" for r in law.residuals),
    ]
    if tested.tests:
        lines += [""] + _markdown_table(*_rule_rows(tested))
    return lines


def _markdown_cells(fit: StudyFit, cells: Sequence[CellOptimum], symbol: str) -> list[str]:
    return _markdown_table(
        _cell_header(fit, cells, symbol, near_optimal=True), _cell_rows(fit, cells, near_optimal=True)
    )
