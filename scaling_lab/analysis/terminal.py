"""What a fit prints in the terminal: the summary of `fit`, predictions, and the equivalence test alone."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from scaling_lab.analysis import methods
from scaling_lab.analysis.conventions import CONVENTION_DESCRIPTIONS, CONVENTION_SYMBOLS
from scaling_lab.analysis.equivalence import WINDOW_DOUBLINGS
from scaling_lab.analysis.fit import StudyFit, TestedLaw
from scaling_lab.analysis.optimum import CellOptimum
from scaling_lab.analysis.powerlaw import NoLaw, PowerLaw, Prediction
from scaling_lab.analysis.tables import (
    aligned,
    cell_header,
    cell_rows,
    data_line,
    dropped_text,
    equivalence_rows,
    equivalence_summary,
    exponent_interval,
    interval_text,
    number,
    rule_rows,
)

MAX_TERMINAL_CELLS = 40


def format_terminal(fit: StudyFit, written: Sequence[Path] = ()) -> str:
    """A compact summary: data, optima per cell, the laws with intervals, the rules side by side, warnings."""
    res, settings = fit.results, fit.settings
    lines = [
        f"scaling_lab analysis · {res.source}",
        f"  {data_line(fit)}",
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
        lines += ["", equivalence_summary(fit)]
        lines += ["  " + line for line in aligned(*equivalence_rows(fit, MAX_TERMINAL_CELLS))]
        if len(fit.equivalence) > MAX_TERMINAL_CELLS:
            lines.append(f"  … {len(fit.equivalence) - MAX_TERMINAL_CELLS} more cells in report.md and law.json")
    warnings = list(fit.warnings)
    if warnings:
        lines += ["", "warnings"] + [f"  ! {w}" for w in warnings]
    if written:
        lines += ["", f"wrote {', '.join(str(p) for p in written)}"]
    return "\n".join(lines)


def _cell_table(fit: StudyFit, cells: Sequence[CellOptimum], symbol: str, most: int) -> list[str]:
    rows = cell_rows(fit, cells)
    lines = [f"optimum per cell ({symbol} in the {fit.settings.convention} convention)"]
    lines += ["  " + line for line in aligned(cell_header(fit, cells, symbol), rows[:most])]
    if len(rows) > most:
        lines.append(f"  … {len(rows) - most} more cells in report.md and law.json")
    return lines


def _law_summary(law: PowerLaw) -> str:
    verdict = "" if law.supported else f"  NOT SUPPORTED: {law.warnings[0]}"
    return (
        f"{law.group_label()}: {law.formula()}  k {law.k:.3f} {exponent_interval(law.k_ci)}  "
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
        return [f"{kind} · {law.group_label()}: no law — {law.reason}" + dropped_text(law.dropped)]
    lines = [
        f"{kind} · {law.group_label()} · {law.formula()}" + ("" if law.supported else "   ← NOT SUPPORTED by the data")
    ]
    lines.append(f"  c = {number(law.c)}  95% CI {interval_text(*law.c_ci)}")
    lines.append(f"  k = {law.k:.3f}  95% CI {exponent_interval(law.k_ci)}")
    if law.m is not None:
        lines.append(f"  m = {law.m:.3f}  95% CI {exponent_interval(law.m_ci)}   (N = {law.size_measure})")
    chi2 = f"  χ²/ν {law.chi2_per_dof:.2f} (ν={law.dof})" if law.chi2_per_dof is not None else ""
    lines.append(
        f"  R² {law.r_squared:.3f}{chi2} · {len(law.cells)} cells used over ranks {law.ranks[0]}–{law.ranks[-1]}"
        + dropped_text(law.dropped)
    )
    lines += [f"  ! {w}" for w in law.warnings] + [f"  · {n}" for n in law.notes]
    if tested.tests:
        lines += ["  " + row for row in aligned(*rule_rows(tested))]
    return lines


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
            number(p.value),
            interval_text(p.low, p.high),
        ]
        for law, rank, p in predictions
    ]
    lines += ["  " + line for line in aligned(header, rows)]
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
                         number(p.value), interval_text(p.low, p.high)])
            notices.update(dict.fromkeys(p.warnings))
    metric = (document.get("metric") or {}).get("column")
    lines = [f"{symbol}* ({CONVENTION_DESCRIPTIONS[convention]}) from {path}, fitted on {document.get('source')}"
             + (f" (metric {metric})" if metric else "")]
    header = ["law", "rank", *(["N"] if model_params is not None else []), f"{symbol}*", "95% CI"]
    lines += ["  " + line for line in aligned(header, rows)]
    lines += [f"  ! {w}" for w in notices]
    return "\n".join(lines)


def format_equivalence(fit: StudyFit) -> str:
    """The equivalence test alone, for the terminal: data, one row per model and rank, how to read it."""
    res = fit.results
    lines = [
        f"scaling_lab analysis · α and learning rate · {res.source}",
        f"  {data_line(fit)}",
        (
            f"  metric {res.metric} ({'higher' if res.maximize else 'lower'} is better) · "
            f"{fit.settings.n_bootstrap} bootstrap resamples, seed {fit.settings.seed}"
        ),
        "",
        equivalence_summary(fit),
    ]
    lines += ["  " + line for line in aligned(*equivalence_rows(fit))]
    method = methods.EQUIVALENCE_TEST + "\n" + methods.EQUIVALENCE_VERDICT
    text = methods.plain(method.format(window=f"{2**WINDOW_DOUBLINGS:g}", tolerance=fit.settings.tolerance))
    lines += [""] + ["  " + line for line in text.splitlines()]
    return "\n".join(lines)
