"""Tier 3: a trial on 2 Ray Train workers (DeepSpeed ZeRO-0, ZeRO-2, ZeRO-3, ZeRO-3 with CPU offload) follows the
same loss curve as on 1 worker, with the same global batch and seed, its gradients clipped to a norm that binds.

Only the order of floating-point reductions differs (gradients averaged across workers, eval sums all-reduced),
so the curves agree to RTOL; 12 steps on CPU measured at most 2e-7 relative.
"""

import numpy as np
import pytest

from scaling_lab import results, spec as spec_lib
from scaling_lab.grid import expand
from scaling_lab.group import GroupSpec
from scaling_lab.spec import Resources
from scaling_lab.study.tune_wiring import run_group_trainable
from simulated_cluster import ROOT, simulated_cluster

pytestmark = pytest.mark.real

RTOL = 1e-5
DEEPSPEED = [{"zero_stage": 0}, {"zero_stage": 2}, {"zero_stage": 3}, {"zero_stage": 3, "offload": True}]


def trials(workers: int) -> list:
    return [
        expand(spec_lib.parse({
            "name": "multiworker",
            "models": [{"name": "xs", "source": "tiny:xs"}],
            "grid": {"ranks": [4], "alphas": [64], "learning_rates": [1e-3], "seeds": [0]},
            # 17 held-out rows in batches of 8: the last batch has fewer rows than there are workers
            "training": {"steps": 12, "batch_size": 8, "eval_every": 4, "eval_batches": 3},
            "optimizer": {"grad_clip": 0.01},
            "data": {"eval_examples": 17},
            "deepspeed": settings,
            "execution": {"resources": {"workers": workers}},
        }))[0]
        for settings in DEEPSPEED
    ]


def run_on(workers: int, results_dir, cache_dir) -> None:
    """One Ray Train worker group of `workers` runs the trials one after another, as a study group does."""
    group = GroupSpec(trials=tuple(t.to_dict() for t in trials(workers)), resources=Resources(workers=workers),
                      run_id=f"multiworker-{workers}", results_dir=str(results_dir), cache_dir=str(cache_dir),
                      base_dir=str(ROOT), backend="ray_train", study="multiworker", max_retries=0)
    run_group_trainable({"group": group.to_dict()})


def test_two_workers_follow_the_one_worker_loss_curve_under_zero_0_2_and_3(tmp_path, tiny_cache):
    import ray

    with simulated_cluster({"num_cpus": 2}) as (cluster, _):
        ray.init(address=cluster.address)
        try:
            run_on(1, tmp_path / "one", tiny_cache)
            run_on(2, tmp_path / "two", tiny_cache)
        finally:
            ray.shutdown()

    one, two = results.load(tmp_path / "one"), results.load(tmp_path / "two")
    assert (one["status"] == "ok").all() and (two["status"] == "ok").all(), two["error"].dropna().tolist()
    assert (one["num_workers"] == 1).all() and (two["num_workers"] == 2).all()
    assert set(one["zero_stage"]) == set(two["zero_stage"]) == {0, 2, 3}
    for trial in trials(1):
        alone = results.load_curves(tmp_path / "one", [trial.trial_id])
        shared = results.load_curves(tmp_path / "two", [trial.trial_id])
        assert len(alone) == len(shared) == 13
        for column in ("train_loss", "eval_loss", "eval_accuracy"):
            expected, got = alone[column].to_numpy(), shared[column].to_numpy()
            assert np.array_equal(np.isnan(expected), np.isnan(got)), column
            np.testing.assert_allclose(got, expected, rtol=RTOL, equal_nan=True, err_msg=f"{trial.deepspeed} {column}")


def zero3_trials(alphas, micro_batch_size=None) -> list:
    return expand(spec_lib.parse({
        "name": "multiworker",
        "models": [{"name": "xs", "source": "tiny:xs"}],
        "grid": {"ranks": [4], "alphas": alphas, "learning_rates": [1e-3], "seeds": [0]},
        "training": {"steps": 6, "batch_size": 8, "eval_every": 3, "eval_batches": 1,
                     "micro_batch_size": micro_batch_size},
        "optimizer": {"grad_clip": 0.01},
        "deepspeed": {"zero_stage": 3},
        "execution": {"resources": {"workers": 2}},
    }))


def run_group_of(trial_list, run_id: str, results_dir, cache_dir) -> None:
    group = GroupSpec(trials=tuple(t.to_dict() for t in trial_list), resources=Resources(workers=2), run_id=run_id,
                      results_dir=str(results_dir), cache_dir=str(cache_dir), base_dir=str(ROOT),
                      backend="ray_train", study="multiworker", max_retries=0)
    run_group_trainable({"group": group.to_dict()})


def test_zero3_later_trials_of_a_group_match_a_fresh_worker_group_and_micro_batches_match(tmp_path, tiny_cache):
    """Under ZeRO-3 the partitioned base is loaded once per worker group: its 2nd and 3rd trials compute what
    they compute in a worker group of their own; accumulating micro-batches of 2 follows the same curve."""
    import ray

    first, second = zero3_trials([16, 64])
    (accumulated,) = zero3_trials([64], micro_batch_size=2)
    with simulated_cluster({"num_cpus": 2}) as (cluster, _):
        ray.init(address=cluster.address)
        try:
            run_group_of([first, second, accumulated], "packed", tmp_path / "packed", tiny_cache)
            run_group_of([second], "alone", tmp_path / "alone", tiny_cache)
        finally:
            ray.shutdown()
    packed, alone = results.load(tmp_path / "packed"), results.load(tmp_path / "alone")
    assert (packed["status"] == "ok").all() and (alone["status"] == "ok").all(), packed["error"].dropna().tolist()
    assert set(packed.loc[packed["trial_id"] == accumulated.trial_id, "micro_batch_size"]) == {2}
    expected = results.load_curves(tmp_path / "alone", [second.trial_id])
    assert results.load_curves(tmp_path / "packed", [second.trial_id]).equals(expected)
    got = results.load_curves(tmp_path / "packed", [accumulated.trial_id])
    for column in ("train_loss", "eval_loss"):
        np.testing.assert_allclose(got[column].to_numpy(), expected[column].to_numpy(), rtol=RTOL, equal_nan=True)
