"""Checking a law out of sample: fit it without one rank, predict α* there, and compare with what was measured.

The verdict and the regrets are defined in methods.VERIFICATION (the text report.md prints). The rows at the
verified rank are never in the fit, so a verification is the same however often it is run, and trials added
there to measure it do not move the prediction they test.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from scaling_lab.analysis import methods
from scaling_lab.analysis.conventions import CONVENTION_SYMBOLS, alpha_in_convention
from scaling_lab.analysis.fit import AnalysisError, FitSettings, StudyFit, fit_study
from scaling_lab.analysis.hypotheses import ALPHA_RULES, objective_at, rule_coefficients, rules_for
from scaling_lab.analysis.load import LoadedResults
from scaling_lab.analysis.optimum import CellOptimum, find_optima
from scaling_lab.analysis.powerlaw import PowerLaw, Prediction

BRACKET_POINTS = 5
BRACKET_MIN_STEP = math.log(2.0) / 2  # half an octave between the α values of a bracket, at least
BRACKET_DIGITS = 4  # significant digits of a bracket's α values: the same trials however the fit's last bits fall
SECTION_START = "<!-- verification: written by `python -m scaling_lab.study verify` -->"
SECTION_END = "<!-- end of verification -->"


@dataclass(frozen=True)
class RuleRegret:
    name: str
    exponent: float
    alpha: float
    regret: float | None  # None: the rule's α diverged at this rank
    outside_measured: bool

    def to_dict(self) -> dict:
        return {
            "rule": self.name,
            "k": self.exponent,
            "alpha": self.alpha,
            "regret": self.regret,
            "diverged": self.regret is None,
            "outside_measured_alphas": self.outside_measured,
        }


@dataclass(frozen=True)
class Verification:
    """One law checked at one rank."""

    mode: str  # "held_out": a finished rank left out of the fit; "new_rank": trials run at a rank to check it
    model: str
    group: tuple[tuple[str, object], ...]
    rank: int
    convention: str
    metric: str
    fit_ranks: tuple[int, ...]
    law: str | None
    law_k_ci: tuple[float, float] | None
    law_supported: bool
    law_warnings: tuple[str, ...]
    predicted: float | None
    predicted_ci: tuple[float, float] | None
    prediction_warnings: tuple[str, ...]
    measured: float | None
    measured_ci: tuple[float, float] | None
    measured_flags: tuple[str, ...]
    measured_alphas: tuple[float, ...]
    best_measured_metric: float | None
    regret: float | None
    regret_relative: float | None
    prediction_outside_measured: bool
    rules: tuple[RuleRegret, ...]
    verdict: str
    reason: str

    @property
    def overlap(self) -> bool | None:
        if self.predicted_ci is None or self.measured_ci is None:
            return None
        return self.predicted_ci[0] <= self.measured_ci[1] and self.measured_ci[0] <= self.predicted_ci[1]

    def label(self) -> str:
        extra = " ".join(f"{name}={value:g}" for name, value in self.group if name != "model")
        return " ".join(part for part in (self.model, extra) if part)

    def to_dict(self) -> dict:
        inside = None if self.measured_ci is None or self.predicted is None else (
            self.measured_ci[0] <= self.predicted <= self.measured_ci[1])
        measured_inside = None if self.predicted_ci is None or self.measured is None else (
            self.predicted_ci[0] <= self.measured <= self.predicted_ci[1])
        return {
            "mode": self.mode,
            "model": self.model,
            "group": {name: value for name, value in self.group},
            "rank": self.rank,
            "convention": self.convention,
            "metric": self.metric,
            "fitted_on_ranks": list(self.fit_ranks),
            "law": self.law,
            "law_k_ci95": list(self.law_k_ci) if self.law_k_ci else None,
            "law_supported": self.law_supported,
            "law_warnings": list(self.law_warnings),
            "predicted": self.predicted,
            "predicted_ci95": list(self.predicted_ci) if self.predicted_ci else None,
            "prediction_warnings": list(self.prediction_warnings),
            "measured": self.measured,
            "measured_ci95": list(self.measured_ci) if self.measured_ci else None,
            "measured_flags": list(self.measured_flags),
            "measured_alphas": list(self.measured_alphas),
            "best_measured_metric": self.best_measured_metric,
            "intervals_overlap": self.overlap,
            "prediction_inside_measured_ci": inside,
            "measured_inside_predicted_ci": measured_inside,
            "regret_at_predicted_alpha": self.regret,
            "regret_relative": self.regret_relative,
            "predicted_alpha_outside_measured_alphas": self.prediction_outside_measured,
            "rules_of_thumb": [r.to_dict() for r in self.rules],
            "verdict": self.verdict,
            "reason": self.reason,
        }


def without_rank(results: LoadedResults, rank: int, fit_ranks: Sequence[int] | None = None) -> LoadedResults:
    """The results less the rows at `rank` (and, with `fit_ranks`, less every rank not in it)."""
    trials = results.trials
    keep = trials["rank"] != rank
    if fit_ranks is not None:
        keep &= trials["rank"].isin(list(fit_ranks))
    return replace(results, trials=trials[keep].reset_index(drop=True))


def fit_without_rank(
    results: LoadedResults, rank: int, settings: FitSettings, fit_ranks: Sequence[int] | None = None
) -> StudyFit:
    return fit_study(without_rank(results, rank, fit_ranks), settings)


def law_groups(fit: StudyFit, model: str | None = None) -> list:
    """The α laws of a fit (TestedLaw), those of `model` only when given."""
    return [t for t in fit.alpha_laws if model is None or dict(t.law.group).get("model", model) == model]


def bracket(prediction: Prediction, points: int = BRACKET_POINTS) -> list[float]:
    """α values (in the law's convention) around a prediction, log-spaced, wide enough that its interval lies
    inside the outer pair: where a trial at each will show whether the optimum is where the law says."""
    half_width = max(math.log(prediction.high / prediction.value), math.log(prediction.value / prediction.low))
    outer = (points - 1) / 2
    step = max(BRACKET_MIN_STEP, 1.5 * half_width / outer) if math.isfinite(half_width) else BRACKET_MIN_STEP
    return [float(f"{prediction.value * math.exp(step * (i - outer)):.{BRACKET_DIGITS}g}") for i in range(points)]


def verify_at_rank(
    results: LoadedResults,
    rank: int,
    settings: FitSettings,
    *,
    mode: str,
    fit_ranks: Sequence[int] | None = None,
    model: str | None = None,
    fit: StudyFit | None = None,
) -> list[Verification]:
    """Every α law of the results fitted without `rank` (on `fit_ranks` only, when given), checked at `rank`.
    `fit`: that fit, when the caller has it already (fit_without_rank with the same arguments)."""
    if not settings.by_model and results.trials["model"].nunique() > 1:
        raise AnalysisError("a law pooled over several models has no one measured optimum: verify laws by model")
    fit = fit or fit_without_rank(results, rank, settings, fit_ranks)
    measured_rows = results.trials[results.trials["rank"] == rank]
    cells = _measured_cells(measured_rows, fit, settings)
    return [_verify_law(tested.law, cells, rank, fit, mode) for tested in law_groups(fit, model)]


def _measured_cells(rows, fit: StudyFit, settings: FitSettings) -> list[CellOptimum]:
    if rows.empty:
        return []
    work = rows.assign(alpha=alpha_in_convention(rows["effective_scale"], rows["rank"], settings.convention))
    fixed = ("learning_rate",) if fit.learning_rate_is_axis else ()
    return find_optima(work, "alpha", fixed, maximize=fit.results.maximize, n_bootstrap=settings.n_bootstrap,
                       rng=np.random.default_rng(settings.seed), tolerance=settings.tolerance)


def _matching_cell(law, cells: Sequence[CellOptimum]) -> CellOptimum | None:
    group = dict(law.group)
    for cell in cells:
        fixed = dict(cell.held_fixed)
        if group.get("model", cell.model) == cell.model and all(
            math.isclose(value, group[name], rel_tol=1e-9) for name, value in fixed.items() if name in group
        ):
            return cell
    return None


def _verify_law(law, cells: Sequence[CellOptimum], rank: int, fit: StudyFit, mode: str) -> Verification:
    group = tuple(law.group)
    model = str(dict(group).get("model", fit.results.trials["model"].iloc[0]))
    base = {
        "mode": mode,
        "model": model,
        "group": group,
        "rank": rank,
        "convention": fit.settings.convention,
        "metric": fit.results.metric,
    }
    if not isinstance(law, PowerLaw):
        return _unverified(base, f"no law without rank {rank}: {law.reason}")
    prediction = law.predict(rank)
    base.update(
        fit_ranks=law.ranks,
        law=law.formula(),
        law_k_ci=law.k_ci,
        law_supported=law.supported,
        law_warnings=law.warnings,
        predicted=prediction.value,
        predicted_ci=(prediction.low, prediction.high),
        prediction_warnings=prediction.warnings,
    )
    cell = _matching_cell(law, cells)
    if cell is None or cell.optimum is None:
        return _unverified(base, f"nothing measured at rank {rank}" if cell is None else "every trial diverged")
    maximize = fit.results.maximize
    objective = cell.objective_curve(maximize)
    log_grid = np.log(cell.grid)
    best = float(np.min(objective))
    value, outside = objective_at(log_grid, objective, math.log(prediction.value))
    regret = None if math.isinf(value) else value - best
    rules = []
    for name, exponent, _ in rules_for(law):
        coefficients = rule_coefficients(law, exponent)
        alpha = float(math.exp(law.design_row(rank) @ coefficients))
        rule_value, rule_outside = objective_at(log_grid, objective, math.log(alpha))
        rules.append(RuleRegret(name, exponent, alpha, None if math.isinf(rule_value) else rule_value - best,
                                rule_outside))
    measured_ci = (cell.optimum_low, cell.optimum_high)
    overlap = prediction.low <= measured_ci[1] and measured_ci[0] <= prediction.high
    edge = [flag for flag in cell.flags if flag in ("edge_low", "edge_high")]
    if edge:
        verdict = "inconclusive"
        reason = f"the measured optimum is at the edge of the α values tried ({', '.join(edge)}): only a bound"
    elif overlap:
        verdict = "consistent"
        reason = "the predicted and measured 95% intervals overlap"
    else:
        verdict = "missed"
        side = "above" if prediction.value > cell.optimum else "below"
        reason = f"the prediction lies {side} the measured optimum: the 95% intervals do not overlap"
    if not law.supported:
        reason += "; the law fitted without this rank is not supported by its data"
    return Verification(
        **base,
        measured=cell.optimum,
        measured_ci=measured_ci,
        measured_flags=cell.flags,
        measured_alphas=cell.grid,
        best_measured_metric=-best if maximize else best,
        regret=regret,
        regret_relative=regret / abs(best) if regret is not None and best != 0 else None,
        prediction_outside_measured=outside,
        rules=tuple(rules),
        verdict=verdict,
        reason=reason,
    )


def _unverified(base: dict, reason: str) -> Verification:
    defaults = {
        "fit_ranks": (),
        "law": None,
        "law_k_ci": None,
        "law_supported": False,
        "law_warnings": (),
        "predicted": None,
        "predicted_ci": None,
        "prediction_warnings": (),
    }
    return Verification(
        **{**defaults, **base},
        measured=None,
        measured_ci=None,
        measured_flags=(),
        measured_alphas=(),
        best_measured_metric=None,
        regret=None,
        regret_relative=None,
        prediction_outside_measured=False,
        rules=(),
        verdict="not_verified",
        reason=reason,
    )


# ---- law.json and report.md ----


def _key(entry: dict) -> tuple:
    return (entry["mode"], entry["rank"], json.dumps(entry["group"], sort_keys=True), entry.get("convention"))


def merge_entries(previous: Sequence[dict], new: Sequence[dict]) -> list[dict]:
    """Earlier verifications, each replaced by a new one of the same mode, rank, law group and convention."""
    replaced = {_key(entry) for entry in new}
    return [entry for entry in previous if _key(entry) not in replaced] + list(new)


def record(out_dir: Path, entries: Sequence[Verification]) -> list[Path]:
    """Add the verifications to out_dir/law.json (its "verification" list) and report.md (its verification
    section); both must exist (written by `fit`)."""
    law_path, report_path = out_dir / "law.json", out_dir / "report.md"
    document = json.loads(law_path.read_text())
    new = [json_safe(entry.to_dict()) for entry in entries]
    document["verification"] = merge_entries(document.get("verification") or [], new)
    law_path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    report = report_path.read_text() if report_path.exists() else ""
    report_path.write_text(with_section(report, markdown(document["verification"])))
    return [law_path, report_path]


def with_section(report: str, section: str) -> str:
    """The report with its verification section replaced (or appended)."""
    if SECTION_START in report and SECTION_END in report:
        before, rest = report.split(SECTION_START, 1)
        after = rest.split(SECTION_END, 1)[1]
        return before + section + after
    return report.rstrip("\n") + "\n\n" + section + "\n"


def markdown(entries: Sequence[dict]) -> str:
    lines = [SECTION_START, "## Verification out of sample", "", methods.VERIFICATION, ""]
    rule_names = [name for name, _, _ in ALPHA_RULES]
    header = ["law", "mode", "rank", "fitted on ranks", "predicted α* [95% CI]", "measured α* [95% CI]",
              "verdict", "regret at predicted α", *(f"regret: {name}" for name in rule_names)]
    rows = []
    for entry in entries:
        symbol = CONVENTION_SYMBOLS.get(entry.get("convention") or "standard", "α")
        group = ", ".join(f"{k}={v}" for k, v in entry["group"].items()) or entry["model"]
        rules = {r["rule"]: r for r in entry["rules_of_thumb"]}
        rows.append([
            f"{group} ({entry['law'] or 'no law'})",
            entry["mode"].replace("_", " "),
            str(entry["rank"]),
            ", ".join(map(str, entry["fitted_on_ranks"])),
            f"{symbol}* = {_estimate(entry['predicted'], entry['predicted_ci95'])}",
            _estimate(entry["measured"], entry["measured_ci95"]),
            f"**{entry['verdict']}**: {entry['reason']}",
            _regret(entry["regret_at_predicted_alpha"], entry["predicted_alpha_outside_measured_alphas"],
                    entry["verdict"] != "not_verified"),
            *(_rule_regret(rules.get(name)) for name in rule_names),
        ])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    notes = {w for entry in entries for w in entry.get("prediction_warnings", [])}
    lines += [""] + [f"- {w}" for w in sorted(notes)] if notes else []
    lines += ["", SECTION_END]
    return "\n".join(lines)


def format_terminal(entries: Sequence[Verification], metric: str) -> str:
    lines = []
    for entry in entries:
        symbol = CONVENTION_SYMBOLS[entry.convention]
        lines.append(f"{entry.label()} · rank {entry.rank} ({entry.mode.replace('_', ' ')}) · {entry.verdict}: "
                     f"{entry.reason}")
        if entry.law is None:
            continue
        lines.append(f"  law fitted on ranks {', '.join(map(str, entry.fit_ranks))}: {entry.law}")
        lines.append(f"  predicted {symbol}* = {_estimate(entry.predicted, entry.predicted_ci)}")
        if entry.measured is not None:
            lines.append(f"  measured  {symbol}* = {_estimate(entry.measured, entry.measured_ci)} "
                         f"over {len(entry.measured_alphas)} α values"
                         + (f" ({', '.join(entry.measured_flags)})" if entry.measured_flags else ""))
            lines.append(f"  regret in {metric} at the predicted α: "
                         f"{_regret(entry.regret, entry.prediction_outside_measured, True)}"
                         + (f" ({entry.regret_relative:+.3%})" if entry.regret_relative is not None else ""))
            for rule in entry.rules:
                regret = _regret(rule.regret, rule.outside_measured, True)
                lines.append(f"    {rule.name:<10} {symbol} = {rule.alpha:<10.4g} regret {regret}")
        lines += [f"  ! {w}" for w in entry.prediction_warnings]
    return "\n".join(lines)


def _estimate(value: float | None, interval) -> str:
    if value is None:
        return "—"
    if not interval or any(v is None or not math.isfinite(v) for v in interval):
        return f"{value:.4g}"
    return f"{value:.4g} [{interval[0]:.4g}, {interval[1]:.4g}]"


def _regret(value: float | None, outside: bool, measured: bool) -> str:
    if not measured:
        return "—"
    if value is None:
        return "diverges"
    return f"{'≥ ' if outside else ''}{value:+.4g}"


def _rule_regret(rule: dict | None) -> str:
    if rule is None:
        return "—"
    return _regret(rule["regret"], rule["outside_measured_alphas"], True) + f" (α {rule['alpha']:.4g})"


def json_safe(value):
    """JSON has no NaN or infinity: null instead."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
