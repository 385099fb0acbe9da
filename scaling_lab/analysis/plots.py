"""The report's pictures, drawn on matplotlib's Agg canvas (no display, no global pyplot state)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import QuadMesh
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator

from scaling_lab.analysis.conventions import CONVENTION_AXIS_LABELS, CONVENTION_SYMBOLS
from scaling_lab.analysis.equivalence import VERDICT_LABELS, AlphaLrEquivalence
from scaling_lab.analysis.fit import StudyFit, TestedLaw
from scaling_lab.analysis.hypotheses import rules_for
from scaling_lab.analysis.optimum import CellOptimum
from scaling_lab.analysis.powerlaw import PowerLaw

MAX_PANEL_COLUMNS = 6
MAX_LAWS_SHOWN = 8
MAX_JOINT_LAWS_SHOWN = 2
MAX_SURFACES_SHOWN = 4
MAX_DIAGNOSTIC_MODELS = 4
CONTOUR_TOLERANCES = (1.0, 4.0, 16.0)  # fitted-surface contours, in multiples of the tolerance above its optimum
DIAGNOSTIC_PANELS = (
    ("drift_ratio", "(a) drift ratio (drift / signal)", 1.0),
    ("signal", "(b) signal (predicted probe-loss decrease)", None),
    ("update_norm", "(c) update norm ‖s·B·A‖_F", None),
    ("spectral_ratio_mean", "(d) spectral ratio σ₁(s·B·A) / σ₁(W)", 1.0),
)
GROUP_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive")
REFERENCE_STYLES = (":", "--", "-.")


def axis_label(fit: StudyFit, axis: str) -> str:
    if axis == "learning_rate":
        return "learning rate"
    return CONVENTION_AXIS_LABELS[fit.settings.convention]


def write_plots(fit: StudyFit, out_dir: Path) -> list[Path]:
    """Draw every plot the fit supports into `out_dir`; returns the files written."""
    paths = [
        _save(metric_vs_axis(fit, fit.alpha_cells, "alpha"), out_dir / "metric_vs_alpha.png"),
        _save(
            optimum_vs_rank(fit, fit.alpha_cells, fit.alpha_laws, fit.joint_laws, "alpha"),
            out_dir / "alpha_vs_rank.png",
        ),
        _save(residuals(fit.alpha_laws + fit.joint_laws, "α*"), out_dir / "residuals.png"),
    ]
    if fit.learning_rate_is_axis:
        paths.append(
            _save(
                optimum_vs_rank(fit, fit.learning_rate_cells, fit.learning_rate_laws, (), "learning_rate"),
                out_dir / "learning_rate_vs_rank.png",
            )
        )
    if any(test.surface is not None for test in fit.equivalence):
        paths.append(_save(alpha_lr_surfaces(fit), out_dir / "alpha_lr_surface.png"))
    if fit.diagnostics is not None:
        paths.append(_save(diagnostics_vs_alpha(fit), out_dir / "diagnostics_vs_alpha.png"))
    return paths


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=110)
    return path


def _plain(value: float, _position: int | None = None) -> str:
    """Tick labels as plain numbers (16, 256, 0.0003): easier to read than powers, and far cheaper to draw."""
    return f"{value:.0f}" if 1 <= value < 1e6 and value == round(value) else f"{value:.3g}"


def _log_axis(axis: Axis) -> None:
    axis.set_major_formatter(FuncFormatter(_plain))
    axis.set_minor_formatter(FuncFormatter(lambda *_: ""))


def _rank_colors(ranks: Sequence[int]) -> dict[int, tuple]:
    unique = sorted(set(ranks))
    cmap = colormaps["viridis"]
    return {r: cmap(0.9 * i / max(len(unique) - 1, 1)) for i, r in enumerate(unique)}


def _evenly(values: Sequence, most: int) -> list:
    if len(values) <= most:
        return list(values)
    return [values[i] for i in np.linspace(0, len(values) - 1, most).round().astype(int)]


def metric_vs_axis(fit: StudyFit, cells: Sequence[CellOptimum], axis: str) -> Figure:
    """Seed-averaged metric against the axis, one line per rank and one panel per model size. Where something else
    is held fixed (the learning rate, when it is an axis), each panel shows the value with the best optimum."""
    metric, maximize = fit.results.metric, fit.results.maximize
    models = _evenly(
        sorted({c.model for c in cells}, key=lambda m: (np.nan_to_num(_size(cells, m)), m)), MAX_PANEL_COLUMNS
    )
    colors = _rank_colors([c.rank for c in cells])
    figure = Figure(figsize=(max(4.6 * len(models), 7.5), 5.0), layout="constrained")
    axes = figure.subplots(1, len(models), squeeze=False)[0]
    for ax, model in zip(axes, models):
        fixed = _best_fixed(cells, model, maximize)
        panel = [c for c in cells if c.model == model and c.held_fixed == fixed]
        for cell in panel:
            _draw_cell(ax, cell, colors[cell.rank])
        _limit_metric_axis(ax, panel, maximize)
        ax.set_xscale("log", base=2 if axis == "alpha" else 10)
        ax.xaxis.set_major_locator(LogLocator(base=2 if axis == "alpha" else 10, numticks=7))
        _log_axis(ax.xaxis)
        size = _size(cells, model)
        title = model + (f" ({size:.3g} params)" if math.isfinite(size) else "")
        ax.set_title(title + "".join(f"\nat {name} = {value:g} (the best)" for name, value in fixed), fontsize=10)
        ax.set_xlabel(axis_label(fit, axis))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{metric} ({'higher' if maximize else 'lower'} is better)")
    handles = [Line2D([], [], color=colors[r], marker="o", ms=4, label=f"r = {r}") for r in sorted(colors)]
    handles += [
        Line2D([], [], color="k", marker="*", ms=11, ls="none", label="optimum, 95% CI"),
        Line2D(
            [], [], color="k", marker="*", ms=11, ls="none", mfc="white", label="optimum not used (edge, few points)"
        ),
        Line2D([], [], color="tab:red", marker="x", ls="none", label="diverged (drawn at top)"),
    ]
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=8)
    figure.suptitle(f"{metric} against {'α' if axis == 'alpha' else 'learning rate'}, mean over seeds, per rank")
    return figure


def _best_fixed(cells: Sequence[CellOptimum], model: str, maximize: bool) -> tuple[tuple[str, float], ...]:
    """Of the values held fixed in this model's cells, the one whose cells reach the best metric."""
    scored = [c for c in cells if c.model == model and c.optimum_metric is not None]
    if not scored:
        return next(c.held_fixed for c in cells if c.model == model)
    best = max(scored, key=lambda c: c.optimum_metric) if maximize else min(scored, key=lambda c: c.optimum_metric)
    return best.held_fixed


def _size(cells: Sequence[CellOptimum], model: str) -> float:
    sizes = [c.model_params for c in cells if c.model == model and c.model_params is not None]
    return sizes[0] if sizes else math.nan


def _draw_cell(ax: Axes, cell: CellOptimum, color: object) -> None:
    grid = np.array(cell.grid)
    values = np.array(cell.mean_metric)
    finite = np.isfinite(values)
    ax.plot(grid[finite], values[finite], "-o", color=color, ms=3, lw=1.2)
    if any(cell.diverged):
        ax.plot(
            grid[np.array(cell.diverged)],
            np.full(sum(cell.diverged), 0.97),
            "x",
            color="tab:red",
            ms=5,
            transform=ax.get_xaxis_transform(),
        )
    if cell.optimum is not None:
        used = cell.exclusion() is None
        ax.errorbar(
            [cell.optimum],
            [cell.optimum_metric],
            xerr=[[cell.optimum - cell.optimum_low], [cell.optimum_high - cell.optimum]],
            fmt="*",
            ms=12,
            color=color,
            mfc=color if used else "white",
            mec="k",
            capsize=3,
            zorder=5,
        )


def _limit_metric_axis(ax: Axes, panel: Sequence[CellOptimum], maximize: bool) -> None:
    """Show the region around the optima: a loss that explodes at large α would otherwise flatten every curve."""
    values = np.concatenate([np.array(c.mean_metric) for c in panel]) if panel else np.array([])
    values = values[np.isfinite(values)]
    if values.size < 2:
        return
    if maximize:
        low, high = np.quantile(values, 0.1), values.max()
    else:
        low, high = values.min(), np.quantile(values, 0.9)
    pad = 0.06 * (high - low) if high > low else 0.01 * abs(high) + 1e-9
    ax.set_ylim(low - pad, high + pad)


def optimum_vs_rank(
    fit: StudyFit,
    cells: Sequence[CellOptimum],
    laws: Sequence[TestedLaw],
    joint_laws: Sequence[TestedLaw],
    axis: str,
) -> Figure:
    """Optima against rank on log-log axes: fitted law with its 95% band, the rules the field argues about."""
    figure = Figure(figsize=(8.5, 6.0), layout="constrained")
    ax = figure.add_subplot()
    symbol = f"{CONVENTION_SYMBOLS[fit.settings.convention]}*" if axis == "alpha" else "lr*"
    shown = _evenly([t for t in laws if isinstance(t.law, PowerLaw)], MAX_LAWS_SHOWN)
    groups = [t.law.group for t in shown]
    excluded = [
        c
        for c in cells
        if c.optimum is not None
        and c.exclusion(fit.settings.keep_edge) is not None
        and any(_in_group(c, g) for g in groups)
    ]
    if excluded:
        ax.plot(
            [c.rank for c in excluded],
            [c.optimum for c in excluded],
            "o",
            mfc="white",
            mec="grey",
            ms=7,
            label="optimum not used (edge / few points)",
        )
    fitted = [t.law for t in shown]
    for index, law in enumerate(fitted):
        color = GROUP_COLORS[index % len(GROUP_COLORS)]
        ranks = np.array([c.rank for c in law.cells], dtype=float)
        low = np.array([c.optimum - c.optimum_low for c in law.cells])
        high = np.array([c.optimum_high - c.optimum for c in law.cells])
        ax.errorbar(ranks, [c.optimum for c in law.cells], yerr=[low, high], fmt="o", color=color, capsize=3, ms=6)
        _draw_law(
            ax,
            law,
            color,
            f"{law.group_label()}: {law.formula()}, k 95% CI [{law.k_ci[0]:.2f}, {law.k_ci[1]:.2f}]"
            + ("" if law.supported else "  (NOT SUPPORTED)"),
        )
    for law in _evenly([t.law for t in joint_laws if isinstance(t.law, PowerLaw)], MAX_JOINT_LAWS_SHOWN):
        for size in law.model_sizes:
            _draw_law(ax, law, "k", None, size=size, band=False)
        label = f"joint law {law.group_label()}: {law.formula()} (N = {law.size_measure}), one line per model"
        ax.plot([], [], "k--", lw=1, label=label)
    if fitted:
        _draw_references(ax, fitted)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _log_axis(ax.xaxis)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    _log_axis(ax.yaxis)
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel(f"optimal {axis_label(fit, axis)}")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    verdict = (
        ""
        if all(law.supported for law in fitted) and fitted
        else "\nsee the report's warnings: not every law is supported"
    )
    omitted = sum(isinstance(t.law, PowerLaw) for t in laws) - len(shown)
    subset = f"; {len(shown)} of {len(shown) + omitted} laws shown" if omitted else ""
    ax.set_title(
        f"{symbol} against rank, 95% intervals ({fit.settings.convention} convention{subset}){verdict}", fontsize=10
    )
    return figure


def _in_group(cell: CellOptimum, group: tuple[tuple[str, object], ...]) -> bool:
    fixed = dict(cell.held_fixed)
    return all((cell.model if name == "model" else fixed.get(name)) == value for name, value in group)


def _draw_law(
    ax: Axes, law: PowerLaw, color: object, label: str | None, size: float | None = None, band: bool = True
) -> None:
    ranks = np.geomspace(min(law.ranks) / 1.5, max(law.ranks) * 1.5, 60)
    values, lows, highs = law.band(ranks, size)
    ax.plot(ranks, values, "-" if band else "--", color=color, lw=1.6 if band else 1.0, label=label)
    if band:
        ax.fill_between(ranks, lows, highs, color=color, alpha=0.15, lw=0)


def _draw_references(ax: Axes, laws: Sequence[PowerLaw]) -> None:
    """Reference slopes through the geometric centre of the fitted optima."""
    optima = np.array([c.optimum for law in laws for c in law.cells])
    ranks = np.array([c.rank for law in laws for c in law.cells], dtype=float)
    centre_rank, centre_value = math.exp(np.log(ranks).mean()), math.exp(np.log(optima).mean())
    span = np.geomspace(ranks.min() / 1.5, ranks.max() * 1.5, 2)
    for style, (name, exponent, _) in zip(REFERENCE_STYLES * 2, rules_for(laws[0])):
        ax.plot(
            span,
            centre_value * (span / centre_rank) ** exponent,
            style,
            color="grey",
            lw=1,
            label=f"reference k = {exponent:g}: {name}",
        )


def residuals(laws: Sequence[TestedLaw], symbol: str) -> Figure:
    """Each optimum against its law's prediction, in percent, with 95% error bars: a power law leaves no pattern."""
    figure = Figure(figsize=(8.5, 4.2), layout="constrained")
    ax = figure.add_subplot()
    fitted = _evenly([t.law for t in laws if isinstance(t.law, PowerLaw)], MAX_LAWS_SHOWN)
    for index, law in enumerate(fitted):
        color = GROUP_COLORS[index % len(GROUP_COLORS)]
        ranks = np.array([r.rank for r in law.residuals], dtype=float) * (1 + 0.04 * index)
        log_residual = np.array([r.log_residual for r in law.residuals])
        sigma = np.array([r.log_sigma for r in law.residuals])
        percent = 100 * np.expm1(log_residual)
        low = percent - 100 * np.expm1(log_residual - 1.96 * sigma)
        high = 100 * np.expm1(log_residual + 1.96 * sigma) - percent
        kind = f"joint law, {law.group_label()}" if law.m is not None else law.group_label()
        ax.errorbar(ranks, percent, yerr=[low, high], fmt="o", color=color, capsize=3, label=kind)
    ax.axhline(0.0, color="k", lw=1)
    ax.set_xscale("log", base=2)
    _log_axis(ax.xaxis)
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel(f"measured {symbol} vs law (%)")
    ax.set_title(f"Residuals: measured {symbol} relative to the fitted law, 95% error bars", fontsize=10)
    ax.grid(alpha=0.3)
    if fitted:
        ax.legend(fontsize=8)
    return figure


def alpha_lr_surfaces(fit: StudyFit) -> Figure:
    """Per (model, rank): how far the seed-averaged metric is from the fitted optimum over log α × log lr, the
    fitted full model's contours, its optimum and the line α·lr = const through it (the α·lr hypothesis's ridge)."""
    tests = _evenly([t for t in fit.equivalence if t.surface is not None], MAX_SURFACES_SHOWN)
    figure = Figure(figsize=(4.2 * len(tests) + 1.2, 4.4), layout="constrained")
    axes = figure.subplots(1, len(tests), squeeze=False)[0]
    top = 100 * CONTOUR_TOLERANCES[-1] * fit.settings.tolerance
    for ax, test in zip(axes, tests):
        mesh = _draw_surface(ax, fit, test, top)
    figure.colorbar(mesh, ax=axes, shrink=0.9, label=f"{fit.results.metric}: % worse than the fitted optimum")
    shown = "" if len(tests) == len(fit.equivalence) else f" ({len(tests)} of {len(fit.equivalence)} cells)"
    figure.suptitle(
        f"{fit.results.metric} over α × learning rate{shown}. White: the fitted surface at "
        f"{', '.join(f'{k:g}' for k in CONTOUR_TOLERANCES)}× the tolerance above its optimum (★); "
        "dashed: α·lr = const through it",
        fontsize=9,
    )
    return figure


def _draw_surface(ax: Axes, fit: StudyFit, test: AlphaLrEquivalence, top: float) -> QuadMesh:
    alphas, rates = np.array(test.alphas), np.array(test.learning_rates)
    sign = -1.0 if fit.results.maximize else 1.0
    worse = 100 * sign * (test.mean_metric.T - test.best_metric) / abs(test.best_metric)  # rows: learning rates
    mesh = ax.pcolormesh(_edges(alphas), _edges(rates), np.ma.masked_invalid(worse), cmap="viridis", vmin=0.0, vmax=top)
    diverged_alpha, diverged_rate = np.nonzero(test.diverged)
    ax.plot(alphas[diverged_alpha], rates[diverged_rate], "x", color="tab:red", ms=5, ls="none")

    surface = test.surface
    log_alpha = np.linspace(surface.log2_alphas[0], surface.log2_alphas[-1], 80)
    log_rate = np.linspace(surface.log2_learning_rates[0], surface.log2_learning_rates[-1], 80)
    grid_alpha, grid_rate = np.meshgrid(log_alpha, log_rate)
    objective = surface.objective(grid_alpha, grid_rate)
    levels = [sign * test.best_metric + k * test.tolerance for k in CONTOUR_TOLERANCES]
    if np.isfinite(objective).any():
        ax.contour(2.0**grid_alpha, 2.0**grid_rate, objective, levels=levels, colors="white", linewidths=0.8)
    product = test.best_alpha * test.best_learning_rate
    ax.plot(alphas, product / alphas, "--", color="white", lw=1.2)
    ax.plot([test.best_alpha], [test.best_learning_rate], "*", color="white", mec="k", ms=13)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlim(_edges(alphas)[[0, -1]])
    ax.set_ylim(_edges(rates)[[0, -1]])
    _log_axis(ax.xaxis)
    _log_axis(ax.yaxis)
    ax.minorticks_off()  # the cells already mark the grid, and minor ticks cost a third of the drawing
    ax.set_xlabel(axis_label(fit, "alpha"), fontsize=8)
    ax.set_ylabel("learning rate", fontsize=8)
    p_value = "" if test.p_value is None else f", F-test p = {test.p_value:.2g}"
    ax.set_title(f"{test.label()}: {VERDICT_LABELS[test.verdict]}{p_value}", fontsize=9)
    return mesh


def _edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges for pcolormesh on a log axis: geometric midpoints, the outer ones mirrored."""
    logs = np.log(centres)
    middle = (logs[1:] + logs[:-1]) / 2
    return np.exp(np.concatenate([[2 * logs[0] - middle[0]], middle, [2 * logs[-1] - middle[-1]]]))


def diagnostics_vs_alpha(fit: StudyFit) -> Figure:
    """Per model (rows): drift ratio, signal, update norm and spectral ratio against α, one line per rank in the
    metric figure's colours, at the learning rate that figure shows."""
    table = fit.diagnostics
    maximize = fit.results.maximize
    models = _evenly(
        sorted(table["model"].unique(), key=lambda m: (np.nan_to_num(_size(fit.alpha_cells, m)), m)),
        MAX_DIAGNOSTIC_MODELS,
    )
    colors = _rank_colors([c.rank for c in fit.alpha_cells])
    figure = Figure(figsize=(17.0, 3.4 * len(models) + 0.8), layout="constrained")
    axes = figure.subplots(len(models), len(DIAGNOSTIC_PANELS), squeeze=False)
    for row, model in zip(axes, models):
        rows = table[table["model"] == model]
        fixed = dict(_best_fixed(fit.alpha_cells, model, maximize))
        if "learning_rate" in fixed:
            rows = rows[np.isclose(rows["learning_rate"], fixed["learning_rate"])]
        at = f" (lr = {fixed['learning_rate']:g})" if "learning_rate" in fixed else ""
        for ax, (quantity, title, reference) in zip(row, DIAGNOSTIC_PANELS):
            _draw_diagnostic(ax, rows, quantity, colors)
            if reference is not None:
                ax.axhline(reference, color="grey", ls=":", lw=1)
            ax.set_title(f"{model}{at}: {title}", fontsize=9)
            ax.set_xscale("log", base=2)
            _log_axis(ax.xaxis)
            ax.set_xlabel(axis_label(fit, "alpha"), fontsize=8)
            ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colors[r], marker="o", ms=4, label=f"r = {r}") for r in sorted(colors)]
    handles += [
        Line2D([], [], color="k", lw=1.4, label="trial value (steps after 1), mean over seeds"),
        Line2D([], [], color="k", lw=0.9, ls="--", alpha=0.6, label="first logged step after step 1"),
    ]
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 8), fontsize=8)
    figure.suptitle("Training diagnostics against α per rank (definitions in report.md)", fontsize=10)
    return figure


def _draw_diagnostic(ax: Axes, rows: pd.DataFrame, quantity: str, colors: dict[int, tuple]) -> None:
    early = f"{quantity}_early"
    drawn = []
    for rank, line in rows.groupby("rank"):
        line = line.sort_values("alpha")
        ax.plot(line["alpha"], line[quantity], "-o", color=colors.get(rank, "k"), ms=3, lw=1.4)
        drawn.append(line[quantity].to_numpy())
        if early in line:
            ax.plot(line["alpha"], line[early], "--", color=colors.get(rank, "k"), lw=0.9, alpha=0.6)
            drawn.append(line[early].to_numpy())
    _value_scale(ax, np.concatenate(drawn) if drawn else np.array([]))


def _value_scale(ax: Axes, values: np.ndarray) -> None:
    """Logarithmic when every value is positive (norms span decades with α), else symmetric-logarithmic."""
    values = values[np.isfinite(values)]
    if not values.size:
        return
    if (values > 0).all():
        ax.set_yscale("log")
        return
    nonzero = np.abs(values[values != 0])
    ax.set_yscale("symlog", linthresh=float(np.quantile(nonzero, 0.1)) if nonzero.size else 1.0)
