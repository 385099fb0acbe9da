"""Tier 3: a trial on 2 Ray Train workers (DeepSpeed ZeRO-0, ZeRO-2, ZeRO-3, ZeRO-3 with CPU offload) follows the
same loss curve as on 1 worker, with the same global batch and seed, its gradients clipped to a norm that binds.

Only the order of floating-point reductions differs (gradients averaged across workers, eval sums all-reduced),
so the curves agree to RTOL; 12 steps on CPU measured at most 2e-7 relative.
"""

import numpy as np
import pytest

from scaling_lab import results, spec as spec_lib
from scaling_lab.grid import expand
from scaling_lab.study.runner import run_group_trainable
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
    group = {
        "trials": [t.to_dict() for t in trials(workers)],
        "resources": {"workers": workers, "cpus_per_worker": 1},
        "run_id": f"multiworker-{workers}",
        "results_dir": str(results_dir),
        "cache_dir": str(cache_dir),
        "base_dir": str(ROOT),
        "backend": "ray_train",
        "study": "multiworker",
        "git_commit": None,
        "cpus_per_worker": 1,
        "max_retries": 0,
    }
    run_group_trainable({"group": group})


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
