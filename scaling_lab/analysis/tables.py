"""Numbers, intervals, tables and rows that the terminal summary and report.md both print."""

from __future__ import annotations

import math
from collections.abc import Sequence

from scaling_lab import results
from scaling_lab.analysis.equivalence import VERDICT_LABELS
from scaling_lab.analysis.fit import StudyFit, TestedLaw
from scaling_lab.analysis.optimum import CellOptimum


def number(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.{digits}g}"


def interval_text(low: float | None, high: float | None, digits: int = 4) -> str:
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return "—"
    return f"[{low:.{digits}g}, {high:.{digits}g}]"


def exponent_interval(interval: tuple[float, float] | None) -> str:
    if interval is None or not all(math.isfinite(v) for v in interval):
        return "—"
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]"


def dropped_text(dropped: Sequence[tuple[str, int]]) -> str:
    return (
        f", {sum(n for _, n in dropped)} dropped ({', '.join(f'{reason} {n}' for reason, n in dropped)})"
        if dropped
        else ", none dropped"
    )


def aligned(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip() for row in [header, *rows]]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(row) + " |" for row in rows
    ]


def data_line(fit: StudyFit) -> str:
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


def cell_header(fit: StudyFit, cells: Sequence[CellOptimum], symbol: str, near_optimal: bool = False) -> list[str]:
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
        "estimator",
        *tolerance,
    ]


def cell_rows(fit: StudyFit, cells: Sequence[CellOptimum], near_optimal: bool = False) -> list[list[str]]:
    rows = []
    for cell in cells:
        reason = cell.exclusion(fit.settings.keep_edge)
        flags = ", ".join(f for f in cell.flags if f != "not_refined" or reason is None)
        rows.append(
            [
                cell.model,
                *(value if isinstance(value, str) else number(value) for _, value in cell.held_fixed),
                str(cell.rank),
                number(cell.optimum),
                interval_text(cell.optimum_low, cell.optimum_high),
                number(cell.optimum_metric, 5),
                str(cell.n_seeds),
                f"{cell.n_trials - cell.n_diverged}/{cell.n_trials}",
                flags + (f" → not used ({reason})" if reason else ""),
                cell.estimator,
                *([interval_text(*cell.near_optimal) if cell.near_optimal else "—"] if near_optimal else []),
            ]
        )
    return rows


def rule_rows(tested: TestedLaw) -> tuple[list[str], list[list[str]]]:
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
                number(test.fitted_c),
                "—" if test.penalty_mean is None else f"{test.penalty_mean:+.4g}",
                "—" if test.penalty_max is None else f"{test.penalty_max:+.4g}",
                "—" if test.penalty_relative is None else f"{test.penalty_relative:.2%}",
                "; ".join(notes),
            ]
        )
    return header, rows


def equivalence_summary(fit: StudyFit) -> str:
    counts: dict[str, int] = {}
    for test in fit.equivalence:
        counts[test.verdict] = counts.get(test.verdict, 0) + 1
    verdicts = "; ".join(f"{VERDICT_LABELS[v]} {n}" for v, n in counts.items())
    return f"α and learning rate: is the metric a function of α·lr alone? {len(fit.equivalence)} cells: {verdicts}"


def equivalence_rows(fit: StudyFit, most: int | None = None) -> tuple[list[str], list[list[str]]]:
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
                interval_text(*test.alpha_slope_ci, digits=3),
                f"{test.ridge_spread:.3g}",
                interval_text(*test.ridge_spread_ci, digits=3),
                f"{test.tolerance:.3g}",
                f"{test.best_alpha:.4g}, {test.best_learning_rate:.3g}",
            ]
        )
    return header, rows
