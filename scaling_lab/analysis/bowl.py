"""The optimum of an asymmetric bowl: local least-squares fits in log α with a shape of their own on each side.

Real loss-against-α curves rise faster above the optimum (towards divergence) than below it, so the parabola
through the best point and its neighbours, which assumes a symmetric bowl, puts the optimum too low by up to half
a grid step. Here each candidate family is fitted to the best point and two neighbours on each side (five points
or more), and the family with the smallest residual sum of squares gives the optimum (four points, one on a
side, fit every shape exactly: there the caller names the shape, from other cells, or the two half-parabolas
are fitted):
- two half-parabolas: separate curvatures below and above a shared vertex (a curvature that jumps at the optimum);
- exponential wall above (below): a parabola below (above) the vertex and 2·(e^{λd} − 1 − λd)/λ² above (below),
  the same curvature at the vertex: a bowl that steepens towards divergence;
- linex: 2·(e^{λd} − 1 − λd)/λ² on both sides, a smooth skewed bowl (λ of either sign).
All have four parameters (level, vertex, a curvature, and a second curvature or λ). The vertex is searched on a
fine lattice between the best point's neighbours (refined by a parabola through the residual profile), λ on a
lattice in units of the grid step, each family's best refined by zooming in; the linear parameters are exact
least squares, curvatures must be positive. Bootstrap refits keep the chosen family and search λ within √2.
On noise-free planted bowls each family recovers its own shape exactly; shapes outside all four (a softplus wall,
a plateau below, powers other than 2) leave mean errors of up to about 0.15 of a grid step, 0.3 at worst.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FAMILIES = ("two half-parabolas", "exponential wall above", "exponential wall below", "linex")
VERTEX_LATTICE = 41
STEEPNESS = np.geomspace(0.05, 10.0, 40)  # λ × grid step, for the walls and (either sign) the linex
LOCAL_STEEPNESS = 2.0 ** np.linspace(-0.5, 0.5, 3)  # the λ around a fitted one that refits try
POINTS_PER_SIDE = 2


def exponential_rise(distance: np.ndarray, steepness: np.ndarray) -> np.ndarray:
    """2·(e^{λd} − 1 − λd)/λ²: d² near 0, exponential for λd ≫ 1, linear for λd ≪ −1."""
    scaled = steepness * distance
    return 2.0 * (np.expm1(scaled) - scaled) / steepness**2


def all_shapes(step: float) -> tuple[np.ndarray, np.ndarray]:
    """(family index, λ) of every candidate shape, λ in units of 1/log α."""
    n = STEEPNESS.size
    family = np.concatenate([[0], np.full(n, 1), np.full(n, 2), np.full(2 * n, 3)])
    steepness = np.concatenate([[1.0], STEEPNESS, STEEPNESS, -STEEPNESS[::-1], STEEPNESS]) / step
    return family, steepness


def _designs(log_points: np.ndarray, vertices: np.ndarray, family: np.ndarray, steepness: np.ndarray) -> np.ndarray:
    """shapes × vertices × points × 3: level, first curvature column, second (zero unless two half-parabolas)."""
    distance = (log_points[None, :] - vertices[:, None])[None]  # 1 × vertices × points
    lam = steepness[:, None, None]
    fam = family[:, None, None]
    square = distance**2
    with np.errstate(over="ignore", invalid="ignore"):
        above = exponential_rise(np.maximum(distance, 0.0), np.abs(lam))
        below = exponential_rise(np.maximum(-distance, 0.0), np.abs(lam))
        both = exponential_rise(distance, lam)
    below_mask, above_mask = distance < 0, distance >= 0
    first = np.select(
        [fam == 0, fam == 1, fam == 2],
        [np.where(below_mask, square, 0.0), np.where(below_mask, square, above), np.where(above_mask, square, below)],
        both,
    )
    second = np.where((fam == 0) & above_mask, square, 0.0)
    ones = np.ones_like(first)
    return np.stack([ones, first, np.broadcast_to(second, first.shape)], axis=-1)


def _search(log_points, means, vertices, family, steepness):
    """Residual sum of squares (rows × shapes × vertices; inf where a curvature is not positive) and levels."""
    # centred, so that the residual (a difference of two sums of squares) keeps its digits
    centre = means.mean(axis=1)
    means = means - centre[:, None]
    designs = _designs(log_points, vertices, family, steepness)
    designs = np.where(np.isfinite(designs), designs, 1e300)
    two = family == 0
    rss = np.full((means.shape[0], family.size, vertices.size), np.inf)
    levels = np.full_like(rss, np.nan)
    total = np.einsum("bn,bn->b", means, means)
    for chosen, p in ((two, 3), (~two, 2)):
        if not chosen.any():
            continue
        design = designs[chosen][..., :p]
        normal = np.einsum("svni,svnj->svij", design, design)
        with np.errstate(invalid="ignore", over="ignore"):
            scale = np.prod(np.diagonal(normal, axis1=2, axis2=3), axis=-1)
            solvable = np.isfinite(scale) & (np.abs(np.linalg.det(normal)) > 1e-10 * scale)
        inverse = np.linalg.inv(np.where(solvable[..., None, None], normal, np.eye(p)))
        n_shapes, n_vertices, n_points, _ = design.shape
        flat = np.moveaxis(design, 2, 0).reshape(n_points, -1)
        moments = (means @ flat).reshape(means.shape[0], n_shapes, n_vertices, p)
        coefficients = (inverse[None] * moments[..., None, :]).sum(axis=-1)
        residual = total[:, None, None] - (moments * coefficients).sum(axis=-1)
        feasible = solvable[None] & np.all(coefficients[..., 1:] > 0, axis=-1)
        rss[:, chosen] = np.where(feasible, np.maximum(residual, 0.0), np.inf)
        levels[:, chosen] = coefficients[..., 0] + centre[:, None, None]
    return rss, levels


def _best(rss, levels, vertices):
    rows = np.arange(rss.shape[0])
    flat = rss.reshape(rss.shape[0], -1).argmin(axis=1)
    shape_index, vertex_index = np.unravel_index(flat, rss.shape[1:])
    best_rss = rss[rows, shape_index, vertex_index]
    left = rss[rows, shape_index, np.maximum(vertex_index - 1, 0)]
    right = rss[rows, shape_index, np.minimum(vertex_index + 1, vertices.size - 1)]
    interior = (vertex_index > 0) & (vertex_index < vertices.size - 1) & np.isfinite(left) & np.isfinite(right)
    with np.errstate(divide="ignore", invalid="ignore"):
        bend = left + right - 2 * best_rss
        shift = np.where(interior & (bend > 0), 0.5 * (left - right) / bend, 0.0)
    log_optimum = vertices[vertex_index] + np.clip(shift, -0.5, 0.5) * (vertices[1] - vertices[0])
    missing = ~np.isfinite(best_rss)
    return (
        np.where(missing, np.nan, log_optimum),
        np.where(missing, np.nan, levels[rows, shape_index, vertex_index]),
        shape_index,
        missing,
    )


@dataclass(frozen=True)
class BowlFit:
    log_optimum: float
    value: float
    family: int
    steepness: float  # λ in units of 1/log α (0 for two half-parabolas)

    @property
    def label(self) -> str:
        return FAMILIES[self.family]


def fit_bowl(
    log_points: np.ndarray,
    means: np.ndarray,
    low: float,
    high: float,
    step: float,
    shape: tuple[int, float] | None = None,
) -> BowlFit | None:
    """The best-fitting family and its vertex in [low, high] for one curve (all points finite): every family's
    best lattice fit refined, the smallest residual sum of squares wins. None when no candidate has positive
    curvatures.

    With four points (which any one family fits exactly) only `shape` (family, λ × grid step, from other cells)
    is fitted, its λ searched within a factor √2; without it, the two half-parabolas."""
    vertices = np.linspace(low, high, VERTEX_LATTICE)
    family, steepness = all_shapes(step)
    if log_points.size < 5:
        family, steepness = local_shapes(shape[0], shape[1] / step) if shape else (family[:1], steepness[:1])
    rss, _ = _search(log_points, means[None], vertices, family, steepness)
    fits = []
    for candidate in np.unique(family):  # each family refined from its best lattice point, then compared
        of_family = np.where((family == candidate)[None, :, None], rss, np.inf)[0]
        if not np.isfinite(of_family).any():
            continue
        shape_index, _ = np.unravel_index(of_family.argmin(), of_family.shape)
        fits.append(_refine(log_points, means, low, high, int(candidate), float(steepness[shape_index]), vertices))
    fits = [fit for fit in fits if fit is not None]
    return min(fits, key=lambda fit: fit[0])[1] if fits else None


def _refine(log_points, means, low, high, family, steepness, vertices) -> tuple[float, BowlFit] | None:
    """Zoom in on the vertex (20-fold per pass) and on λ (8-fold per pass) around a lattice fit."""
    spread = 0.25  # log2 of the λ factor either way
    for _ in range(4):
        factors = 2.0 ** np.linspace(-spread, spread, 21) if family else np.ones(1)
        lam = steepness * factors
        rss, levels = _search(log_points, means[None], vertices, np.full(lam.size, family), lam)
        log_optimum, value, shape_index, missing = _best(rss, levels, vertices)
        if missing[0]:
            return None
        best_rss = float(rss[0].min())
        steepness = float(lam[shape_index[0]])
        spacing = vertices[1] - vertices[0]
        vertices = np.clip(np.linspace(log_optimum[0] - spacing, log_optimum[0] + spacing, VERTEX_LATTICE), low, high)
        spread /= 8
    return best_rss, BowlFit(float(log_optimum[0]), float(value[0]), family, steepness if family else 0.0)


def local_shapes(family: int, steepness: float) -> tuple[np.ndarray, np.ndarray]:
    """The lattice of λ within a factor √2 of `steepness` (one shape for the two half-parabolas)."""
    if family == 0:
        return np.array([0]), np.array([1.0])
    return np.full(LOCAL_STEEPNESS.size, family), steepness * LOCAL_STEEPNESS


def refit_bowls(
    log_points: np.ndarray, means: np.ndarray, low: float, high: float, fit: BowlFit
) -> tuple[np.ndarray, np.ndarray]:
    """The vertex and level for each row of `means` (bootstrap replicates) within `fit`'s family, λ searched on a
    lattice around `fit`'s (a factor √2 either way); nan where nothing fits."""
    vertices = np.linspace(low, high, VERTEX_LATTICE)
    family, steepness = local_shapes(fit.family, fit.steepness)
    usable = np.all(np.isfinite(means), axis=1)
    unique, inverse = np.unique(np.where(usable[:, None], means, 0.0), axis=0, return_inverse=True)
    log_optimum = np.empty(unique.shape[0])
    value = np.empty(unique.shape[0])
    for start in range(0, unique.shape[0], 200):
        rows = unique[start : start + 200]
        rss, levels = _search(log_points, rows, vertices, family, steepness)
        log_optimum[start : start + 200], value[start : start + 200], _, _ = _best(rss, levels, vertices)
    inverse = inverse.ravel()
    return np.where(usable, log_optimum[inverse], np.nan), np.where(usable, value[inverse], np.nan)


def bowl_window(means: np.ndarray, best: int) -> tuple[int, int] | None:
    """The contiguous finite points around `best` used by the bowl fit (up to two grid points away on each side):
    one on each side at least and four in all, else None."""
    finite = np.isfinite(means)
    start = best
    while start > 0 and finite[start - 1] and best - start < POINTS_PER_SIDE:
        start -= 1
    stop = best
    while stop < len(means) - 1 and finite[stop + 1] and stop - best < POINTS_PER_SIDE:
        stop += 1
    if best - start < 1 or stop - best < 1 or stop - start + 1 < 4:
        return None
    return start, stop + 1
