"""Tier 1: the objective's rules (scaling_lab/objective.py), and that the analysis's loader applies the same ones."""

import math

import numpy as np
import pandas as pd
import pytest

from scaling_lab.analysis import from_frame
from scaling_lab.early_stop_hook import FinishedTrial, finished_points
from scaling_lab.objective import metric_column, parabola_vertex, point_value, trial_objective


def test_metric_column_and_direction():
    assert metric_column("eval_loss") == ("final_eval_loss", False)
    assert metric_column("eval_accuracy") == ("final_eval_accuracy", True)


@pytest.mark.parametrize(
    "status, value, maximize, expected",
    [
        ("ok", 1.5, False, 1.5),
        ("ok", 0.75, True, -0.75),
        ("ok", math.nan, False, math.inf),
        ("ok", None, False, math.inf),
        ("diverged", 1.5, False, math.inf),
        ("pruned", 0.75, True, math.inf),
        ("error", 1.5, False, None),
        ("oom", None, False, None),
    ],
)
def test_trial_objective(status, value, maximize, expected):
    assert trial_objective(status, value, maximize) == expected


def test_the_loader_gives_every_trial_the_objective_of_trial_objective():
    statuses = ["ok", "ok", "diverged", "pruned", "error", "oom", "ok"]
    values = [0.5, math.nan, 0.7, 0.9, 0.1, 0.2, 0.8]
    frame = pd.DataFrame({"rank": 1, "alpha": np.arange(1.0, 8.0), "status": statuses, "final_eval_accuracy": values})
    loaded = from_frame(frame, "final_eval_accuracy")
    expected = [trial_objective(s, v, True) for s, v in zip(statuses, values)]
    assert list(loaded.trials["objective"]) == [e for e in expected if e is not None]


def test_point_value_is_the_seed_mean_worse_than_any_when_a_seed_diverged():
    assert point_value([1.0, 2.0, None, 4.5]) == pytest.approx(2.5, rel=1e-12)
    assert point_value([1.0, math.inf]) == math.inf
    assert point_value([None, None]) == math.inf


def test_early_stopping_takes_the_points_whose_every_seed_finished():
    def trial(alpha, seed, status, loss):
        return FinishedTrial(f"{alpha}-{seed}", "cell", alpha, seed, status, loss, None)

    trials = [trial(1.0, 0, "ok", 1.0), trial(1.0, 1, "ok", 2.0), trial(2.0, 0, "diverged", None),
              trial(2.0, 1, "ok", 0.5), trial(4.0, 0, "ok", 0.5), trial(8.0, 0, "ok", 0.5), trial(8.0, 1, "pruned", 9)]
    assert finished_points(trials, {0, 1}, "eval_loss") == {1.0: pytest.approx(1.5, rel=1e-12), 2.0: math.inf}


def test_parabola_vertex_of_a_parabola_on_an_uneven_grid():
    def y(x):
        return 3.0 + 2.0 * (x - 0.3) ** 2

    shift, rise, curvature = parabola_vertex(np.array(-1.0), np.array(0.5), y(-1.0) - y(0.0), y(0.5) - y(0.0))
    assert shift == pytest.approx(0.3, rel=1e-12) and y(0.0) + rise == pytest.approx(3.0, rel=1e-12)
    assert curvature == pytest.approx(2.0, rel=1e-12)
    _, _, downwards = parabola_vertex(np.array(-1.0), np.array(1.0), -1.0, -1.0)
    assert downwards < 0
