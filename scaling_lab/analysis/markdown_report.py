"""report.md: the laws, the plots with their captions, the sections the data allow, the method and provenance."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from scaling_lab.analysis import methods
from scaling_lab.analysis.conventions import CONVENTION_DESCRIPTIONS
from scaling_lab.analysis.equivalence import WINDOW_DOUBLINGS
from scaling_lab.analysis.fit import StudyFit, TestedLaw
from scaling_lab.analysis.hypotheses import mu_a_exponent
from scaling_lab.analysis.law_json import equivalent_forms, package_versions
from scaling_lab.analysis.optimum import CellOptimum
from scaling_lab.analysis.powerlaw import PowerLaw
from scaling_lab.analysis.tables import (
    cell_header,
    cell_rows,
    data_line,
    dropped_text,
    equivalence_rows,
    equivalence_summary,
    exponent_interval,
    interval_text,
    markdown_table,
    number,
    rule_rows,
)

PLOT_CAPTIONS = {  # the plots' short titles (alt text) and captions
    "metric_vs_alpha.png": (
        "metric against α",
        "The metric against α per rank, mean over seeds, one panel per model. Stars: the optima with 95% intervals "
        "(hollow: not used in the law). Red crosses: diverged.",
    ),
    "alpha_vs_rank.png": (
        "optimal α against rank",
        "Optimal α against rank, log-log, with the fitted law and its 95% band. Grey: the rules k = 0, 0.5 and 1 "
        "through the middle of the data.",
    ),
    "residuals.png": (
        "residuals of the law",
        "Each optimum against its law's prediction, in percent, with 95% error bars. A power law leaves no pattern.",
    ),
    "learning_rate_vs_rank.png": (
        "optimal learning rate against rank",
        "Optimal learning rate against rank for each scaling rule and α of the grid, with the fitted laws.",
    ),
    "alpha_lr_surface.png": (
        "metric over α and learning rate",
        "The metric over α × learning rate (four cells at most). Colour: percent worse than the fitted optimum (★); "
        "red crosses: diverged. White contours: the full model at 1, 4 and 16 times the tolerance; dashed: α·lr "
        "constant. Contours parallel to the dashed line: only α·lr matters.",
    ),
    "diagnostics_vs_alpha.png": (
        "training diagnostics against α",
        "Training diagnostics against α, one line per rank, at the learning rate of the metric figure. Solid: the "
        "steps after step 1; dashed: the first of them. Dotted: ratio 1.",
    ),
}
SECTION_PLOTS = ("alpha_lr_surface.png", "diagnostics_vs_alpha.png")  # shown in their own sections


def format_markdown(fit: StudyFit, plot_names: Sequence[str]) -> str:
    res, settings = fit.results, fit.settings
    convention = settings.convention
    lines = [f"# Optimal LoRA α against rank — {res.source}", ""]
    lines += [_headline(fit), ""]
    lines += [
        "## Data",
        "",
        f"- {data_line(fit)}",
        f"- metric: `{res.metric}` ({'higher' if res.maximize else 'lower'} is better), from {res.metric_origin}",
    ]
    lines += [f"- {CONVENTION_DESCRIPTIONS[convention]}: every law below is stated in these terms"]
    if len(res.scaling_rules) > 1:
        lines.append(
            f"- trials under the scaling rules {', '.join(res.scaling_rules)} were converted through their effective "
            "scale and pooled"
        )
    lines += [f"- warning: {w}" for w in fit.warnings]
    lines += ["", "## Laws", ""]
    for tested in fit.alpha_laws + fit.joint_laws:
        lines += _markdown_law(tested) + [""]
    single = fit.alpha_laws[0].law if len(fit.alpha_laws) == 1 else None
    if isinstance(single, PowerLaw):
        lines += ["The same law in each convention (exact conversion: c unchanged, k shifted):", ""]
        lines += ["| convention | law | k 95% CI |", "|---|---|---|"]
        for name, form in equivalent_forms(single).items():
            lines.append(f"| {name} | {form['formula']} | {exponent_interval(form['k_ci95'])} |")
        lines.append("")
    lines += ["## Plots", ""]
    for name in plot_names:
        if name not in SECTION_PLOTS:
            lines += _figure(name)
    if fit.equivalence:
        lines += _markdown_equivalence(fit, plot_names)
    if SECTION_PLOTS[1] in plot_names:
        lines += ["## Training diagnostics", "", methods.DIAGNOSTICS, ""] + _figure(SECTION_PLOTS[1])
    lines += ["## Optimum per cell", ""] + _markdown_cells(fit, fit.alpha_cells, "α*") + [""]
    lines += _markdown_estimators(fit.alpha_cells, "α")
    if fit.learning_rate_is_axis:
        lines += ["## Learning rate", "", methods.LEARNING_RATE, ""]
        lines += _markdown_mu_a(fit) + [""]
        for tested in fit.learning_rate_laws:
            lines += _markdown_law(tested) + [""]
        lines += _markdown_cells(fit, fit.learning_rate_cells, "lr*") + [""]
    lines += ["## Method", ""] + _method(fit) + [""]
    lines += [
        "## Provenance",
        "",
        f"- settings: `{json.dumps(settings.to_dict())}`",
        f"- versions: `{json.dumps(package_versions())}`",
        "",
    ]
    return "\n".join(lines)


def _headline(fit: StudyFit) -> str:
    parts = []
    for tested in fit.alpha_laws:
        law = tested.law
        if not isinstance(law, PowerLaw):
            parts.append(f"**{law.group_label()}:** no law — {law.reason}{dropped_text(law.dropped)}.")
            continue
        verdict = "" if law.supported else " — **not supported by the data**: " + "; ".join(law.warnings)
        parts.append(f"**{law.group_label()}:** {law.formula()}, k 95% CI {exponent_interval(law.k_ci)}{verdict}.")
    return "\n\n".join(parts)


def _markdown_law(tested: TestedLaw) -> list[str]:
    law = tested.law
    if not isinstance(law, PowerLaw):
        return [f"### {law.group_label()}: no law", "", f"{law.reason}{dropped_text(law.dropped)}."]
    title = "joint law (model size)" if law.m is not None else "law"
    lines = [f"### {title} · {law.group_label()}: {law.formula()}", ""]
    lines += ["| parameter | estimate | 95% CI |", "|---|---|---|"]
    lines.append(f"| c | {number(law.c)} | {interval_text(*law.c_ci)} |")
    lines.append(f"| k | {law.k:.4f} | {exponent_interval(law.k_ci)} |")
    if law.m is not None:
        lines.append(f"| m (N = {law.size_measure}) | {law.m:.4f} | {exponent_interval(law.m_ci)} |")
    chi2 = f", χ²/ν = {law.chi2_per_dof:.2f} (ν = {law.dof})" if law.chi2_per_dof is not None else ""
    lines += [
        "",
        f"R² = {law.r_squared:.3f}{chi2}; {len(law.cells)} cells used over ranks {', '.join(map(str, law.ranks))}"
        f"{dropped_text(law.dropped)}.",
    ]
    lines += [""] + [f"- **warning:** {w}" for w in law.warnings] + [f"- {n}" for n in law.notes]
    lines += [
        "",
        "Residuals (optimum / law): " + ", ".join(f"{r.label} ×{math.exp(r.log_residual):.3f}" for r in law.residuals),
    ]
    if tested.tests:
        lines += [""] + markdown_table(*rule_rows(tested))
    return lines


def _markdown_cells(fit: StudyFit, cells: Sequence[CellOptimum], symbol: str) -> list[str]:
    return markdown_table(
        cell_header(fit, cells, symbol, near_optimal=True), cell_rows(fit, cells, near_optimal=True)
    )


def _markdown_estimators(cells: Sequence[CellOptimum], symbol: str) -> list[str]:
    """Why each cell's estimator, and the values to add where the bowl's shape is unknown or moved the optimum."""
    lines = [methods.ESTIMATOR_TABLE.format(symbol=symbol), ""]
    rows = []
    for cell in cells:
        if cell.optimum is None:
            continue
        parabola = number(cell.parabola_optimum) if cell.parabola_optimum is not None else "—"
        suggested = ", ".join(number(value) for value in cell.suggested) or "—"
        rows.append([cell.label(), cell.estimator, cell.estimator_reason, number(cell.optimum), parabola, suggested])
    header = ["cell", "estimator", "why", f"{symbol}*", "3-point parabola", f"suggested {symbol}"]
    return lines + markdown_table(header, rows) + [""]


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
        rows.append([law.group_label(), f"{law.k:.3f}", exponent_interval(law.k_ci), f"{predicted:g}", inside])
    return markdown_table(header, rows) if rows else []


def _markdown_equivalence(fit: StudyFit, plot_names: Sequence[str]) -> list[str]:
    test = (methods.EQUIVALENCE_TEST + "\n" + methods.EQUIVALENCE_VERDICT).format(
        window=f"{2**WINDOW_DOUBLINGS:g}", tolerance=fit.settings.tolerance
    )
    lines = ["## α and learning rate: one knob or two?", "", equivalence_summary(fit) + ".", ""]
    lines += [methods.EQUIVALENCE_HYPOTHESIS, "", test, ""]
    lines += markdown_table(*equivalence_rows(fit)) + [""]
    if SECTION_PLOTS[0] in plot_names:
        lines += _figure(SECTION_PLOTS[0])
    return lines


def _figure(name: str) -> list[str]:
    title, caption = PLOT_CAPTIONS.get(name, (name, name))
    return [f"![{title}]({name})", "", f"*{caption}*", ""]


def _method(fit: StudyFit) -> list[str]:
    """The Method section: each text of methods.METHOD_PARTS, with this fit's settings filled in."""
    settings = fit.settings
    edge_policy = methods.EDGE_OPTIMA_KEPT if settings.keep_edge else methods.EDGE_OPTIMA_LEFT_OUT
    values = {"n_bootstrap": settings.n_bootstrap, "tolerance": settings.tolerance, "edge_policy": edge_policy}
    parts = list(methods.METHOD_PARTS)
    cells = (*fit.alpha_cells, *fit.learning_rate_cells)
    if any(cell.n_trials < cell.n_seeds * len(cell.grid) for cell in cells):  # some point lacks one of its cell's seeds
        parts.insert(parts.index(methods.UNCERTAINTY) + 1, methods.SEED_NOISE)
    return "\n\n".join(part.format(**values) for part in parts).split("\n")
