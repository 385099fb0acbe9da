"""Tier 1: the bowl fit's written-out least squares (scaling_lab/analysis/bowl.py) against numpy's and LAPACK's."""

import numpy as np
import pytest

from scaling_lab.analysis import bowl

STEP = np.log(2.0)
POINTS = np.array([-2.0, -1.0, 0.0, 1.0, 2.0]) * STEP


def normal_parts(rng: np.random.Generator, size: int):
    n = rng.choice([4.0, 5.0], size)
    total = np.abs(rng.normal(size=size)) * 10.0 ** rng.uniform(-3, 4, size)  # |Σf| above and below n: both pivots
    squares = total**2 / n * (1 + 10.0 ** rng.uniform(-6, 2, size))  # Σf² ≥ (Σf)²/n, as for any column f
    return n, total, squares


def test_inverses_are_lapacks_and_the_identity_where_not_solvable():
    rng = np.random.default_rng(0)
    for n_points in (4.0, 5.0):
        _, total, squares = normal_parts(rng, 5000)
        squares = np.maximum(squares, total**2 / n_points * 1.001)
        solvable = rng.random(5000) < 0.9
        normal = np.stack([np.stack([np.full(5000, n_points), total], -1), np.stack([total, squares], -1)], -2)
        expected = np.where(solvable[:, None, None], np.linalg.inv(normal), np.eye(2))
        np.testing.assert_allclose(bowl._inverse(n_points, total, squares, solvable), expected, rtol=1e-12, atol=0)


def test_the_determinant_test_decides_as_lapack_even_at_the_threshold():
    rng = np.random.default_rng(1)
    n, total, squares = normal_parts(rng, 20000)
    n = float(n[0])
    determinant = n * squares - total * total
    # thresholds far from the determinant, and within a few roundings of it, where LAPACK must decide
    threshold = np.abs(determinant) * np.where(rng.random(20000) < 0.5, rng.uniform(0.5, 2.0, 20000),
                                               1 + rng.normal(0, 1e-15, 20000))
    normal = np.stack([np.stack([np.full(20000, n), total], -1), np.stack([total, squares], -1)], -2)
    expected = np.abs(np.linalg.det(normal)) > threshold
    assert np.array_equal(bowl._determinant_exceeds(n, total, squares, threshold), expected)


@pytest.mark.parametrize("n_points", [4, 5])
def test_search_gives_the_least_squares_fit_of_every_shape(n_points):
    rng = np.random.default_rng(2)
    points = POINTS[:n_points]
    means = 1.0 + 0.3 * (points - 0.2) ** 2 + rng.normal(0, 0.01, (3, n_points))
    vertices = np.linspace(-STEP, STEP, 9)
    family, steepness = bowl.all_shapes(STEP)
    rss, levels = bowl._search(points, means, vertices, family, steepness)
    for shape in (0, 5, 60, 100, 150):
        for vertex_index in (2, 4, 7):
            distance = points - vertices[vertex_index]
            lam = steepness[shape]
            if family[shape] == 0:
                columns = [np.where(distance < 0, distance**2, 0.0), np.where(distance >= 0, distance**2, 0.0)]
            elif family[shape] == 1:
                columns = [np.where(distance < 0, distance**2, bowl.exponential_rise(np.maximum(distance, 0), lam))]
            elif family[shape] == 2:
                columns = [np.where(distance >= 0, distance**2, bowl.exponential_rise(np.maximum(-distance, 0), lam))]
            else:
                columns = [bowl.exponential_rise(distance, lam)]
            design = np.stack([np.ones(n_points), *columns], axis=1)
            for row in range(3):
                coefficients, *_ = np.linalg.lstsq(design, means[row], rcond=None)
                residual = np.sum((design @ coefficients - means[row]) ** 2)
                if np.all(coefficients[1:] > 0):
                    assert rss[row, shape, vertex_index] == pytest.approx(residual, rel=1e-6, abs=1e-12)
                    assert levels[row, shape, vertex_index] == pytest.approx(coefficients[0], rel=1e-9)
                else:
                    assert rss[row, shape, vertex_index] == np.inf


def test_families_zoomed_side_by_side_give_each_familys_own_fit():
    means = 1.0 + np.where(POINTS < 0.3, 0.2 * (POINTS - 0.3) ** 2, 0.9 * (POINTS - 0.3) ** 2)
    vertices = np.linspace(-STEP, STEP, bowl.VERTEX_LATTICE)
    starts = [(0, 1.0 / STEP), (1, 2.0 / STEP), (2, 0.5 / STEP), (3, -1.0 / STEP)]
    together = bowl._refine(POINTS, means, -STEP, STEP, [bowl._Zoom(f, s, vertices) for f, s in starts])
    alone = [bowl._refine(POINTS, means, -STEP, STEP, [bowl._Zoom(f, s, vertices)])[0] for f, s in starts]
    assert [fit.family for _, fit in together] == [0, 1, 2, 3]
    for (rss, fit), (rss_alone, fit_alone) in zip(together, alone):
        assert rss == pytest.approx(rss_alone, rel=1e-12, abs=1e-15)
        assert fit.log_optimum == pytest.approx(fit_alone.log_optimum, rel=1e-12)
        assert fit.steepness == pytest.approx(fit_alone.steepness, rel=1e-12)
