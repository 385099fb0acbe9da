"""Law-guided adaptive search for the best α of every cell, as pure functions: measured points in, next α out.

Work is in log2 α ("octaves"). A cell's optimum is bracketed (a measured point with a worse one on each side, or
the α bound), then narrowed by parabolic steps, each with confirmation points one `resolution` to either side;
a cell is done when its best α has measured neighbours within `resolution` on both sides (the local grid spacing
the analysis's refinement sees), or when the best α is the bound itself. The parabola only chooses where to
measure; a cell's optimum, as reported and as used to start other ranks, is `fit`'s estimate (cell_optimum,
group_optima: scaling_lab/analysis/optimum.py's curve_optimum, the asymmetric bowl where the points allow it).
Within a law group (one model, scaling rule and learning rate) the smallest and largest ranks are searched first
from a coarse design across the α range; every other rank starts from the power law fitted to the optima found so
far (an interpolation), usually needing only its best α and the two confirmation points.

With `other_seeds: best_alpha` a new α runs at the first seed only and the other seeds run at each cell's best α
once the cell is done, the search going on should that move the best α: the seeds' mean matters at the optimum,
and the noise of the single-seed points shows in the scatter of the optima about the law. With `other_seed_ranks:
end_ranks` only the smallest and largest ranks of a law group run the seeds after the first; the ranks between run
the first seed alone. The end ranks carry the law's slope (they have the most leverage in the log-log fit of α*
against rank), and `fit` pools the seed spread over the model's replicated points, which the end ranks supply, to
draw the noise of every single-seed point: in benchmarks/adaptive_replay.py (40 noise seeds) the k intervals kept
their width and their coverage of the replayed law for about a fifth less trial time.

Once every cell of a law group is done, `fit` is asked which cells it would leave out of the law as near an edge
(scaling_lab/analysis/optimum.py: near_edge_low, near_edge_high: more than NEAR_EDGE_FRACTION of its bootstrap
resamples put the optimum at the lowest or highest measured α, which happens when that point is within the seed
noise of the best). Such an edge point measured by the first seed only is run at the other seeds; one that every
seed measured gets one more α a `resolution` beyond it (at the first seed only), unless it is the α bound
(edge_alphas). Measuring the edge better first keeps the cell's three points around its best where the edge was
only noisy, which extending it would not: in benchmarks/adaptive_replay.py the first gave narrower k intervals
for about the same trials. `fit` pools the seed noise of single-seed points over the group's replicated points,
known only once the group is done, which makes the check the group's last step: the same in the asynchronous
search, whatever the order the results come in. A cell whose best α moves is searched on, and the group checked again.

Proposed α values lie on a lattice of resolution/4 octaves anchored at the lower bound, so that a search repeated
on the same results proposes the same α values (and so the same trial ids).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from scaling_lab.analysis.optimum import CurveOptimum, curve_optimum, shared_shape
from scaling_lab.objective import parabola_vertex
from scaling_lab.spec_base import SpecError

LATTICE_PER_RESOLUTION = 4
GOLDEN = 0.381966  # golden-section fraction of a gap, for steps where no parabola can be trusted
EXPONENT_RANGE = 1.0  # with one optimum known, the law's exponent is assumed to lie within ±this
SAME_POINT = 1e-3  # octaves: α values closer than this are the same point

Points = Mapping[float, float]  # α → seed-averaged objective to minimize (+inf: diverged, pruned or unusable)


@dataclass(frozen=True)
class SearchSettings:
    """`search:` in the spec. grid: every α of grid.alphas at every rank; adaptive: α chosen as results come in,
    between the smallest and largest of grid.alphas."""

    method: Literal["grid", "adaptive"] = "grid"
    resolution: float = 1.0  # octaves: a cell is done when its best α has neighbours this close on both sides
    initial_points: int = 5  # the coarse design across the α range for a cell with no law to start from
    max_points: int = 12  # α values per cell at most
    # where the seeds after the first one run: at every α, or only at each cell's best α (module docstring)
    other_seeds: Literal["every_alpha", "best_alpha"] = "every_alpha"
    # which ranks run them: every rank, or only the smallest and largest (module docstring)
    other_seed_ranks: Literal["every_rank", "end_ranks"] = "every_rank"

    def check(self, path: str, alphas: tuple[float, ...]) -> None:
        if not (self.resolution > 0 and math.isfinite(self.resolution)):
            raise SpecError(f"{path}.resolution: expected a number of octaves > 0, got {self.resolution!r}")
        if self.initial_points < 3:
            raise SpecError(f"{path}.initial_points: expected an integer >= 3, got {self.initial_points!r}")
        if self.max_points < self.initial_points + 2:
            raise SpecError(
                f"{path}.max_points: expected an integer >= initial_points + 2 ({self.initial_points + 2}), "
                f"got {self.max_points!r}"
            )
        span = math.log2(max(alphas) / min(alphas))
        if self.method == "adaptive" and span < 2 * self.resolution:
            raise SpecError(
                f"grid.alphas: an adaptive search needs a range of at least twice its resolution "
                f"({2 * self.resolution:g} octaves, a factor {2 ** (2 * self.resolution):g}), got {span:g} octaves"
            )


@dataclass(frozen=True)
class Start:
    """Where a new cell's search begins: the law's predicted log2 α* and how far off it may be (octaves)."""

    centre: float
    half_width: float


@dataclass(frozen=True)
class Lattice:
    """The α values the search may propose, in octaves between the bounds."""

    low: float
    high: float
    step: float

    @classmethod
    def between(cls, alpha_min: float, alpha_max: float, resolution: float) -> Lattice:
        return cls(math.log2(alpha_min), math.log2(alpha_max), resolution / LATTICE_PER_RESOLUTION)

    def snap(self, x: float) -> float:
        return float(np.clip(self.low + round((x - self.low) / self.step) * self.step, self.low, self.high))

    def alpha(self, x: float) -> float:
        return float(f"{2.0**x:.6g}")


def next_alphas(points: Points, lattice: Lattice, settings: SearchSettings, start: Start | None = None,
                incomplete: Collection[float] = ()) -> list[float]:
    """The α values to measure next in one cell; an empty list when the cell is done. `incomplete`: the measured
    α values some seeds have not run (other_seeds: best_alpha); a measured α proposed again is run at those."""
    if not points:
        return _new_alphas(_initial_design(lattice, settings, start), [], lattice)
    proposed = []
    if len(points) < settings.max_points:
        measured = sorted((math.log2(alpha), value) for alpha, value in points.items())
        xs = np.array([x for x, _ in measured])
        ys = np.array([y for _, y in measured])
        proposed = _new_alphas(_proposals(xs, ys, lattice, settings.resolution), xs, lattice)
    best = min(points, key=points.__getitem__)
    if not proposed and best in incomplete and math.isfinite(points[best]):
        return [best]  # done at the first seed: the other seeds at the best α
    return proposed


def _initial_design(lattice: Lattice, settings: SearchSettings, start: Start | None) -> list[float]:
    coarse = list(np.linspace(lattice.low, lattice.high, settings.initial_points))
    if start is None:
        return coarse
    half = math.ceil(max(start.half_width, settings.resolution) / lattice.step - 1e-9) * lattice.step
    if 2 * half >= lattice.high - lattice.low:  # the law's window spans the whole range: it tells nothing
        return coarse
    centre = lattice.snap(float(np.clip(start.centre, lattice.low + half, lattice.high - half)))
    return [centre - half, centre, centre + half]


def _proposals(xs: np.ndarray, ys: np.ndarray, lattice: Lattice, resolution: float) -> list[float]:
    last = len(xs) - 1
    span = xs[-1] - xs[0]
    if not np.isfinite(ys).any():  # every point diverged: the optimum lies below them all
        return [xs[0] - max(2 * resolution, span)] if xs[0] > lattice.low + SAME_POINT else []
    best = int(np.argmin(ys))
    if best == 0 and xs[0] > lattice.low + SAME_POINT:
        return [xs[0] - max(2 * resolution, span)]
    if best == last and xs[-1] < lattice.high - SAME_POINT:
        return [xs[-1] + max(2 * resolution, span)]

    sides = [side for side in (-1, 1) if 0 <= best + side <= last]  # one side only when the best is a bound
    gaps = {side: abs(xs[best + side] - xs[best]) for side in sides}
    wide = [side for side in sides if gaps[side] > resolution + SAME_POINT]
    if not wide:
        return []
    vertex = _vertex(xs[best - 1 : best + 2], ys[best - 1 : best + 2]) if len(sides) == 2 else None
    if vertex is not None and abs(vertex - xs[best]) > resolution / 2:
        # the parabola moves the optimum: measure its vertex with a confirmation point to either side
        around = (vertex + k * resolution for k in (-1, 0, 1))
        cluster = [x for x in around if xs[best - 1] < x < xs[best + 1] and _far_from(x, xs, resolution / 2)]
        if cluster:
            return cluster
    # the best point stands: confirm it on each side still too far away, one resolution out (or halfway); where
    # no parabola can be trusted (a neighbour diverged, or the points do not curve upwards), by golden section
    steps = {side: min(resolution, gaps[side] / 2) for side in wide}
    if vertex is None:
        steps = {side: max(step, GOLDEN * gaps[side]) for side, step in steps.items()}
    return [xs[best] + side * step for side, step in steps.items()]


def _vertex(xs: np.ndarray, ys: np.ndarray) -> float | None:
    """The minimum of the parabola through three points, or None when they do not curve upwards."""
    if not np.isfinite(ys).all():
        return None
    shift, _, curvature = parabola_vertex(xs[0] - xs[1], xs[2] - xs[1], ys[0] - ys[1], ys[2] - ys[1])
    return float(xs[1] + shift) if curvature > 0 else None


def _far_from(x: float, xs, distance: float) -> bool:
    return all(abs(x - other) >= distance for other in xs)


def _new_alphas(xs: list[float], measured, lattice: Lattice) -> list[float]:
    """Snapped to the lattice, without repeats and without points already measured; as α values, ascending."""
    kept: list[float] = []
    for x in sorted(lattice.snap(x) for x in xs):
        if _far_from(x, [*measured, *kept], SAME_POINT):
            kept.append(x)
    return [lattice.alpha(x) for x in kept]


def cell_optimum(points: Points, shape: tuple[int, float] | None = None) -> float | None:
    """log2 α* of a cell as `fit` finds it (scaling_lab/analysis/optimum.py, curve_optimum: the asymmetric bowl
    fitted around the best point, else the parabola through it and its neighbours, else the best point); None when
    the best point is the lowest or highest measured α (unbracketed) or no point is finite. `shape`: the bowl
    shape a cell of four points around its best takes from the others (group_optima finds it)."""
    curve = _curve(points, shape)
    return None if curve is None else curve.log_optimum / math.log(2)


def group_optima(cells: Mapping[int, Points]) -> dict[int, float | None]:
    """log2 α* of every cell of a law group (rank → points) as `fit` finds them: as cell_optimum, a cell of four
    points around its best fitted with the bowl shape that the group's cells of five or more chose."""
    curves = {rank: _curve(points) for rank, points in cells.items()}
    shape = shared_shape([curve.shape for curve in curves.values() if curve is not None and curve.shape])
    optima = {}
    for rank, curve in curves.items():
        if curve is not None and curve.needs_shape and shape is not None:
            curve = _curve(cells[rank], shape)
        optima[rank] = None if curve is None else curve.log_optimum / math.log(2)
    return optima


def _curve(points: Points, shape: tuple[int, float] | None = None) -> CurveOptimum | None:
    alphas = sorted(points)
    means = np.array([points[alpha] for alpha in alphas], dtype=float)
    if not np.isfinite(means).any():
        return None
    curve = curve_optimum(np.log(np.array(alphas, dtype=float)), means, shape)
    return None if curve.best in (0, len(alphas) - 1) else curve


def law_start(optima: Mapping[int, float], rank: int, resolution: float) -> Start | None:
    """Where to start `rank` from the optima (rank → log2 α*) already found: a least-squares line in log-log space,
    with a half-width of two standard errors of its prediction (at least one resolution)."""
    if not optima:
        return None
    u = math.log2(rank)
    known_u = np.log2(np.array(list(optima), dtype=float))
    known_x = np.array(list(optima.values()))
    if len(optima) == 1:
        return Start(float(known_x[0]), EXPONENT_RANGE * abs(u - known_u[0]) + resolution)
    slope, intercept = np.polyfit(known_u, known_x, 1)
    n = len(optima)
    residual_sd = math.sqrt(np.sum((known_x - intercept - slope * known_u) ** 2) / (n - 2)) if n > 2 else 0.0
    # a cell optimum found at this resolution is off by up to about a quarter of it
    residual_sd = max(residual_sd, resolution / 4)
    leverage = 1 / n + (u - known_u.mean()) ** 2 / np.sum((known_u - known_u.mean()) ** 2)
    half_width = 2 * residual_sd * math.sqrt(1 + leverage)
    return Start(float(intercept + slope * u), max(resolution, half_width))


def next_step(cells: Mapping[int, Points], lattice: Lattice, settings: SearchSettings,
              incomplete: Mapping[int, Collection[float]] | None = None,
              near_edges: Mapping[int, Collection[int]] | None = None) -> dict[int, list[float]]:
    """The next α values of every rank of one law group (rank → measured points, empty when not started);
    an empty dict when the whole group is done. `incomplete`: rank → measured α values some seeds have not run;
    `near_edges`: rank → the sides that `fit` flags near an edge (-1 low, +1 high), checked once every cell is done."""
    ranks = sorted(cells)
    first = {ranks[0], ranks[-1]}
    incomplete = incomplete or {}
    step = {rank: next_alphas(cells[rank], lattice, settings, incomplete=incomplete.get(rank, ()))
            for rank in ranks if cells[rank] or rank in first}
    if any(step[rank] for rank in first):
        return {rank: alphas for rank, alphas in step.items() if alphas}
    done = group_optima({rank: cells[rank] for rank in step if not step[rank]})
    optima = {rank: x for rank, x in done.items() if x is not None}
    for rank in ranks:
        if rank not in step:
            step[rank] = next_alphas({}, lattice, settings, law_start(optima, rank, settings.resolution))
    if not any(step.values()) and near_edges:  # every cell done: the edge check (module docstring)
        step = {rank: edge_alphas(cells[rank], near_edges.get(rank, ()), lattice, settings, incomplete.get(rank, ()))
                for rank in ranks}
    return {rank: alphas for rank, alphas in step.items() if alphas}


def edge_alphas(points: Points, sides: Collection[int], lattice: Lattice, settings: SearchSettings,
                incomplete: Collection[float] = ()) -> list[float]:
    """For a done cell, each of `sides` (those `fit` flags near an edge: -1 its lowest measured α, +1 its highest):
    the edge α again where some seeds have not run it (`incomplete`), else one α a `resolution` beyond it unless
    it is the α bound; within max_points."""
    measured = sorted(points)
    edges = {-1: (measured[0], lattice.low), 1: (measured[-1], lattice.high)}
    again = [edges[side][0] for side in sorted(sides) if edges[side][0] in incomplete]
    beyond = [math.log2(edge) + side * settings.resolution for side, (edge, bound) in sorted(edges.items())
              if side in sides and edge not in incomplete and abs(math.log2(edge) - bound) >= SAME_POINT]
    extended = _new_alphas(beyond, [math.log2(alpha) for alpha in measured], lattice)
    return sorted(again + extended[: max(settings.max_points - len(points), 0)])


def expected_trials(ranks: Collection[int], n_seeds: int, settings: SearchSettings) -> tuple[int, int]:
    """Trials a law group needs: at best (the coarse design finds each end rank's optimum in one parabolic step,
    the law every other rank's, and the other seeds run at the best α only where other_seeds asks) and at worst
    (every cell at max_points, at every seed it runs)."""
    ends = {min(ranks), max(ranks)}
    seeded = seeded_ranks(ranks, settings)
    fewest = most = 0
    for rank in ranks:
        points = settings.initial_points + 2 if rank in ends else 3
        other_seeds = n_seeds - 1 if rank in seeded else 0
        fewest += points + (other_seeds if settings.other_seeds == "best_alpha" else other_seeds * points)
        most += settings.max_points * (1 + other_seeds)
    return fewest, most


def seeded_ranks(ranks: Collection[int], settings: SearchSettings) -> set[int]:
    """The ranks of a law group whose cells run every seed; the others run the first seed only."""
    if settings.other_seed_ranks == "end_ranks":
        return {min(ranks), max(ranks)}
    return set(ranks)
