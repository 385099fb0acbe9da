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
The one-curvature families' 2 × 2 least squares are written out: to the last bit what einsum and LAPACK
(np.linalg.inv, det) give, without a LAPACK call per matrix.
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


def _first_column(distance: np.ndarray, family: np.ndarray, steepness: np.ndarray) -> np.ndarray:
    """shapes × vertices × points (distance: the same): the curvature column of each shape of the one-curvature
    families (1, 2, 3), each computed only for its own family; non-finite values are 1e300."""
    first = np.empty(distance.shape)
    with np.errstate(over="ignore", invalid="ignore"):
        for member, wall_side, formula in (
            (family == 1, np.less, lambda d, lam: exponential_rise(np.maximum(d, 0.0), np.abs(lam))),
            (family == 2, np.greater_equal, lambda d, lam: exponential_rise(np.maximum(-d, 0.0), np.abs(lam))),
            (family == 3, None, exponential_rise),
        ):
            if member.any():
                d = distance[member]
                rise = formula(d, steepness[member][:, None, None])
                first[member] = rise if wall_side is None else np.where(wall_side(d, 0), d**2, rise)
    return np.where(np.isfinite(first), first, 1e300)


def _two_half_parabolas(distance: np.ndarray) -> np.ndarray:
    """shapes × vertices × points × 3 (distance: shapes × vertices × points): level, curvature below the vertex,
    curvature above it."""
    square = distance**2
    first = np.where(distance < 0, square, 0.0)
    second = np.where(distance >= 0, square, 0.0)
    return np.stack([np.ones_like(first), first, second], axis=-1)


@dataclass(frozen=True)
class _Prepared:
    """What a search's least squares need of the shapes and vertices, whatever the curves fitted to them."""

    two: np.ndarray  # which shapes are the two half-parabolas (three columns)
    three: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # the two half-parabolas': _three_columns
    flats: list[np.ndarray]  # per block of the other shapes, points × (shapes × vertices × 2): level, curvature
    inverse: np.ndarray | None  # shapes × vertices × 2 × 2: their normal matrices' inverses
    solvable: np.ndarray | None


def _prepare(log_points, vertices, family, steepness, blocks: list[int] | None = None) -> _Prepared:
    """`vertices`: one lattice for every shape, or one per shape (shapes × vertices). `blocks`: the sizes of the
    runs of one-curvature shapes whose moments are computed apart (one matrix product each; by default one)."""
    distance = log_points - vertices[..., None]  # (shapes ×) vertices × points
    distance = np.broadcast_to(distance, (family.size, *distance.shape[-2:]))
    two = family == 0
    three = _three_columns(_two_half_parabolas(distance[two])) if two.any() else None
    flats, inverse, solvable = [], None, None
    if not two.all():
        first = _first_column(distance[~two], family[~two], steepness[~two])  # shapes × vertices × points
        n_points = distance.shape[-1]
        # the normal matrix [[n, Σf], [Σf, Σf²]], summed point by point (the order einsum sums in)
        total, squares = np.zeros(first.shape[:2]), np.zeros(first.shape[:2])
        for point in range(n_points):
            column = first[:, :, point]
            total, squares = total + 1.0 * column, squares + column * column
        with np.errstate(invalid="ignore", over="ignore"):
            scale = float(n_points) * squares
            solvable = np.isfinite(scale) & _determinant_exceeds(float(n_points), total, squares, 1e-10 * scale)
        inverse = _inverse(float(n_points), total, squares, solvable)
        sizes = blocks or [first.shape[0]]
        for start, size in zip(np.cumsum([0, *sizes[:-1]]), sizes):
            block = first[start : start + size]
            flat = np.empty((n_points, *block.shape[:2], 2))
            flat[..., 0] = 1.0
            flat[..., 1] = np.moveaxis(block, 2, 0)
            flats.append(flat.reshape(n_points, -1))
    return _Prepared(two, three, flats, inverse, solvable)


def _determinant_exceeds(n: float, total: np.ndarray, squares: np.ndarray, threshold: np.ndarray) -> np.ndarray:
    """|det [[n, Σf], [Σf, Σf²]]| > threshold, decided as LAPACK's determinant (np.linalg.det) decides it: by the
    closed form where it is farther from the threshold than either's rounding error, by LAPACK elsewhere."""
    with np.errstate(invalid="ignore", over="ignore"):
        product, cross = n * squares, total * total
        determinant = product - cross
        margin = np.abs(np.abs(determinant) - threshold)
        unsure = ~(margin > 64 * np.finfo(float).eps * (np.abs(product) + cross)) & np.isfinite(threshold)
        exceeds = np.abs(determinant) > threshold
    if unsure.any():
        normal = np.empty((int(unsure.sum()), 2, 2))
        normal[:, 0, 0], normal[:, 1, 1] = n, squares[unsure]
        normal[:, 0, 1] = normal[:, 1, 0] = total[unsure]
        with np.errstate(invalid="ignore", over="ignore"):
            exceeds[unsure] = np.abs(np.linalg.det(normal)) > threshold[unsure]
    return exceeds


def _inverse(n: float, total: np.ndarray, squares: np.ndarray, solvable: np.ndarray) -> np.ndarray:
    """The inverses (… × 2 × 2) of [[n, Σf], [Σf, Σf²]] where solvable, else of the identity, computed as LAPACK's
    dgesv does for np.linalg.inv, to the last bit: LU with partial pivoting, pivots applied as reciprocals."""
    n, total, squares = np.where(solvable, n, 1.0), np.where(solvable, total, 0.0), np.where(solvable, squares, 1.0)
    swap = np.abs(total) > n  # the pivot of the first column is the larger of n and |Σf|
    pivot, lower, upper = np.where(swap, total, n), np.where(swap, n, total), np.where(swap, squares, total)
    factor = lower * (1.0 / pivot)
    to_corner, to_pivot = 1.0 / (np.where(swap, total, squares) - factor * upper), 1.0 / pivot
    # solve L·U·X = P: the second row of X from (row 1 of P) − factor · (row 0 of P), then the first row
    eliminated = (0.0 - factor) * to_corner  # where row 0 of P has its 1
    with_one, with_zero = (1.0 - upper * eliminated) * to_pivot, (0.0 - upper * to_corner) * to_pivot
    inverse = np.empty((*n.shape, 2, 2))
    inverse[..., 0, 0], inverse[..., 0, 1] = np.where(swap, with_zero, with_one), np.where(swap, with_one, with_zero)
    inverse[..., 1, 0] = np.where(swap, to_corner, eliminated)
    inverse[..., 1, 1] = np.where(swap, eliminated, to_corner)
    return inverse


def _search(log_points, means, vertices, family, steepness, prepared: _Prepared | None = None, blocks=None):
    """Residual sum of squares (rows × shapes × vertices; inf where a curvature is not positive) and levels.
    `prepared`: _prepare's result for the same shapes and vertices, when several searches share them."""
    prepared = prepared or _prepare(log_points, vertices, family, steepness, blocks)
    n_vertices = vertices.shape[-1]
    # centred, so that the residual (a difference of two sums of squares) keeps its digits
    centre = means.mean(axis=1)
    means = means - centre[:, None]
    two = prepared.two
    rss = np.full((means.shape[0], family.size, n_vertices), np.inf)
    levels = np.full_like(rss, np.nan)
    total = np.einsum("bn,bn->b", means, means)
    if prepared.three is not None:
        rss[:, two], levels[:, two] = _three_column_fit(prepared.three, means, total, centre)
    if prepared.flats:
        # coefficients = inverse @ moments and the residual total − moments · coefficients, written out for 2 × 2
        moments = np.concatenate([means @ flat for flat in prepared.flats], axis=1)
        m0, m1 = np.moveaxis(moments.reshape(means.shape[0], -1, n_vertices, 2), -1, 0)
        inverse = prepared.inverse
        with np.errstate(over="ignore", invalid="ignore"):  # a shape that cannot be solved overflows here
            c0 = inverse[..., 0, 0] * m0 + inverse[..., 0, 1] * m1
            c1 = inverse[..., 1, 0] * m0 + inverse[..., 1, 1] * m1
            residual = total[:, None, None] - (m0 * c0 + m1 * c1)
        feasible = prepared.solvable[None] & (c1 > 0)
        rss[:, ~two] = np.where(feasible, np.maximum(residual, 0.0), np.inf)
        levels[:, ~two] = c0 + centre[:, None, None]
    return rss, levels


def _three_columns(design: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The flattened design (points × (shapes × vertices × 3)), the inverses of its normal matrices (identity where
    not solvable) and which are solvable."""
    normal = np.einsum("svni,svnj->svij", design, design)
    with np.errstate(invalid="ignore", over="ignore"):
        scale = np.prod(np.diagonal(normal, axis1=2, axis2=3), axis=-1)
        solvable = np.isfinite(scale) & (np.abs(np.linalg.det(normal)) > 1e-10 * scale)
    inverse = np.linalg.inv(np.where(solvable[..., None, None], normal, np.eye(3)))
    return np.moveaxis(design, 2, 0).reshape(design.shape[2], -1), inverse, solvable


def _three_column_fit(prepared: tuple[np.ndarray, np.ndarray, np.ndarray], means, total, centre):
    flat, inverse, solvable = prepared
    n_shapes, n_vertices, p = inverse.shape[:3]
    moments = np.moveaxis((means @ flat).reshape(means.shape[0], n_shapes, n_vertices, p), -1, 0)
    # inverse @ moments and total − moments · coefficients, summed left to right as numpy's sum over an axis does
    with np.errstate(over="ignore", invalid="ignore"):
        c0, c1, c2 = (
            (inverse[..., i, 0] * moments[0] + inverse[..., i, 1] * moments[1]) + inverse[..., i, 2] * moments[2]
            for i in range(3)
        )
        residual = total[:, None, None] - ((moments[0] * c0 + moments[1] * c1) + moments[2] * c2)
    feasible = solvable[None] & (c1 > 0) & (c2 > 0)
    return np.where(feasible, np.maximum(residual, 0.0), np.inf), c0 + centre[:, None, None]


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
    starts = []
    for candidate in np.unique(family):  # each family refined from its best lattice point, then compared
        of_family = np.where((family == candidate)[None, :, None], rss, np.inf)[0]
        if not np.isfinite(of_family).any():
            continue
        shape_index, _ = np.unravel_index(of_family.argmin(), of_family.shape)
        starts.append(_Zoom(int(candidate), float(steepness[shape_index]), vertices))
    fits = _refine(log_points, means, low, high, starts)
    return min(fits, key=lambda fit: fit[0])[1] if fits else None


@dataclass
class _Zoom:
    family: int
    steepness: float
    vertices: np.ndarray
    rss: float = np.inf
    fit: BowlFit | None = None


def _refine(log_points, means, low, high, zooms: list[_Zoom]) -> list[tuple[float, BowlFit]]:
    """Zoom in on the vertex (20-fold per pass) and on λ (8-fold per pass) around each family's lattice fit (the
    families side by side in one search per pass); a family without a fit drops out."""
    spread = 0.25  # log2 of the λ factor either way
    for _ in range(4):
        if not zooms:
            break
        factors = 2.0 ** np.linspace(-spread, spread, 21)
        lams = [zoom.steepness * (factors if zoom.family else np.ones(1)) for zoom in zooms]
        family = np.concatenate([np.full(lam.size, zoom.family) for zoom, lam in zip(zooms, lams)])
        vertices = np.concatenate([np.broadcast_to(zoom.vertices, (lam.size, zoom.vertices.size))
                                   for zoom, lam in zip(zooms, lams)])
        blocks = [lam.size for zoom, lam in zip(zooms, lams) if zoom.family]
        rss, levels = _search(log_points, means[None], vertices, family, np.concatenate(lams), blocks=blocks)
        kept, start = [], 0
        for zoom, lam in zip(zooms, lams):
            block = slice(start, start + lam.size)
            start += lam.size
            log_optimum, value, shape_index, missing = _best(rss[:, block], levels[:, block], zoom.vertices)
            if missing[0]:
                continue
            zoom.rss = float(rss[0, block].min())
            zoom.steepness = float(lam[shape_index[0]])
            steepness = zoom.steepness if zoom.family else 0.0
            zoom.fit = BowlFit(float(log_optimum[0]), float(value[0]), zoom.family, steepness)
            spacing = zoom.vertices[1] - zoom.vertices[0]
            lattice = np.linspace(log_optimum[0] - spacing, log_optimum[0] + spacing, VERTEX_LATTICE)
            zoom.vertices = np.clip(lattice, low, high)
            kept.append(zoom)
        zooms = kept
        spread /= 8
    return [(zoom.rss, zoom.fit) for zoom in zooms]


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
    prepared = _prepare(log_points, vertices, family, steepness)
    for start in range(0, unique.shape[0], 200):
        rows = unique[start : start + 200]
        rss, levels = _search(log_points, rows, vertices, family, steepness, prepared)
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
