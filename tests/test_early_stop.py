"""Early stopping: the pruning rule (tier 1), and a simulated study pruned through the results store whose optima
do not move."""

import math
import re

import pytest

from scaling_lab import results, spec as spec_lib
from scaling_lab.analysis import fit_study, load_results
from scaling_lab.early_stop import EarlyStopSettings, optimum_out_of_reach, should_prune
from scaling_lab.grid import expand
from scaling_lab.group import GroupSpec
from scaling_lab.trial import run_group

ON = EarlyStopSettings(enabled=True, margin=0.05, min_step=10)
# α → seed-mean final loss: falls to α = 16, rises after it
FINISHED = {1.0: 1.4, 4.0: 1.1, 16.0: 1.0, 64.0: 1.1, 256.0: 1.3}


@pytest.mark.parametrize(
    "alpha, expected",
    [
        (1024.0, True),  # 256 and 64 are worse than 16 further in: the optimum is beyond both, out of the fit's reach
        (512.0, True),
        (128.0, False),  # only 64 lies between it and the optimum: within the bowl fit's two points
        (64.0, False),  # itself measured, no point between it and the optimum
        (32.0, False),  # could be the optimum's neighbour
        (8.0, False),
        (0.5, True),  # 1 and 4 lie between it and the optimum (1 is worse than 4 further in)
        (2.0, False),
    ],
)
def test_optimum_out_of_reach_needs_a_worse_point_between(alpha, expected):
    assert optimum_out_of_reach(alpha, FINISHED) is expected


def test_optimum_out_of_reach_counts_diverged_as_worst_and_needs_a_strict_drop():
    assert optimum_out_of_reach(1024.0, {16.0: 1.0, 64.0: 1.2, 256.0: math.inf})
    assert not optimum_out_of_reach(1024.0, {16.0: 1.0, 256.0: math.inf})  # one point between: within reach
    assert not optimum_out_of_reach(1024.0, {16.0: math.inf, 64.0: math.inf, 256.0: math.inf})
    assert not optimum_out_of_reach(1024.0, {16.0: 1.0, 64.0: 1.0, 256.0: 1.0})
    assert not optimum_out_of_reach(1024.0, {})


def test_should_prune_needs_the_step_the_margin_and_the_optimum_elsewhere():
    assert should_prune(1024.0, 10, 1.2, 1.1, FINISHED, ON)
    assert not should_prune(1024.0, 9, 1.2, 1.1, FINISHED, ON)  # before min_step
    assert not should_prune(1024.0, 10, 1.15, 1.1, FINISHED, ON)  # within the margin
    assert not should_prune(1024.0, 10, 1.2, None, FINISHED, ON)  # nothing to compare with at this step
    assert not should_prune(32.0, 10, 5.0, 1.1, FINISHED, ON)  # far behind, yet maybe the optimum's neighbour


@pytest.mark.parametrize("settings, message", [
    ({"margin": -1}, "training.early_stop.margin: expected a number >= 0"),
    ({"min_step": 0}, "training.early_stop.min_step: expected an integer >= 1"),
    ({"enable": True}, "training.early_stop.enable: unknown key (did you mean 'enabled'?)"),
])
def test_early_stop_spec_errors_name_the_field(settings, message):
    data = {**SPEC, "training": {**SPEC["training"], "early_stop": settings}}
    with pytest.raises(spec_lib.SpecError, match=re.escape(message)):
        spec_lib.parse(data)


SPEC = {
    "name": "pruning",
    "models": [{"name": "xs", "source": "tiny:xs"}],
    "grid": {"ranks": [1], "alphas": {"min": 1, "max": 4096, "num": 7}, "seeds": [0, 1]},
    "training": {"steps": 40, "eval_every": 10},
    "execution": {"backend": "simulated"},
}


def run_study(tmp_path, enabled: bool):
    data = {**SPEC, "training": {**SPEC["training"], "early_stop": {"enabled": enabled, "min_step": 10}}}
    spec = spec_lib.parse(data)
    directory = tmp_path / ("on" if enabled else "off")
    results.Store(directory).write("spec.yaml", spec_lib.dump(spec).encode())
    trials = sorted(expand(spec), key=lambda t: (t.rank, t.alpha, t.seed))  # all seeds of an α together
    run_group(GroupSpec(trials=tuple(t.to_dict() for t in trials), results_dir=str(directory),
                        cache_dir=str(tmp_path), base_dir=str(tmp_path), backend="simulated", study=spec.name))
    return directory


def test_simulated_study_prunes_trials_without_moving_any_optimum(tmp_path):
    without, with_ = run_study(tmp_path, False), run_study(tmp_path, True)
    full, pruned_run = results.load(without), results.load(with_)
    assert set(full["trial_id"]) == set(pruned_run["trial_id"]), "early stopping does not change trial ids"
    pruned = pruned_run[pruned_run["status"] == "pruned"]
    assert sorted(pruned["alpha"]) == [1024, 1024, 4096, 4096]  # past the best α (16) and two points beyond
    assert (pruned["steps"] < 40).all() and pruned["final_eval_loss"].notna().all(), "rows keep their last metrics"
    assert pruned_run["steps"].sum() < full["steps"].sum()

    loaded = load_results(with_)
    assert loaded.status_counts["pruned"] == len(pruned)
    assert loaded.trials.loc[loaded.trials["status"] == "pruned", "objective"].eq(math.inf).all()
    before, after = fit_study(load_results(without)).alpha_cells, fit_study(loaded).alpha_cells
    assert [c.optimum for c in before] == [c.optimum for c in after]
    assert [(c.optimum_low, c.optimum_high) for c in before] == [(c.optimum_low, c.optimum_high) for c in after]
