"""Tier 3: a study whose worker group is killed from outside, over and over, the way Ray's memory monitor kills a
node's newest workers and Ray Train's own actors while memory stays short, still ends on its own: the trial it cut
short becomes a row, the driver exits non-zero with one line, and none of its Ray processes is left behind."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from scaling_lab import results

pytestmark = [pytest.mark.ray, pytest.mark.real]
ROOT = Path(__file__).resolve().parents[1]
# What the memory monitor killed in the study that hung: the training workers and Ray Train's own actors.
VICTIMS = ("ray::RayTrainWorker", "ray::SynchronizationActor", "ray::PreemptionWatcher", "ray::DatasetManager")

SPEC = {
    "name": "killed",
    "models": [{"name": "tiny-xs", "source": "tiny:xs"}],
    "grid": {"ranks": [4], "alphas": [64], "learning_rates": [1.0e-3]},
    "training": {"steps": 100000, "batch_size": 16, "seq_len": 32, "eval_every": 50000, "eval_batches": 1},
    "execution": {"resources": {"workers": 2, "cpus_per_worker": 1}, "max_retries": 1},
}


def victims(family: list[psutil.Process]) -> list[psutil.Process]:
    """The processes of the kinds the memory monitor killed."""
    found = []
    for process in family:
        with contextlib.suppress(psutil.Error):
            if process.cmdline() and process.cmdline()[0].startswith(VICTIMS):
                found.append(process)
    return found


def test_a_study_whose_workers_keep_being_killed_ends_with_the_trial_recorded(tmp_path, tiny_cache):
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(SPEC))
    # Ray Train waits 60 s for a worker group to start; shorter here, so that the bounded retries end sooner.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"}
    log = open(tmp_path / "driver.log", "w+")
    driver = subprocess.Popen([sys.executable, "-m", "scaling_lab.study", "run", "study.yaml", "--cache-dir",
                               str(tiny_cache)], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    claims_dir = tmp_path / "results/killed/claims"
    kills, family = 0, set()  # every process the driver started (never another study's)
    deadline = time.monotonic() + 420
    try:
        while driver.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(psutil.Error):
                family.update(psutil.Process(driver.pid).children(recursive=True))
            if any(claims_dir.glob("*.json")):  # the trial is running: kill its workers whenever they exist
                for process in victims(family):
                    with contextlib.suppress(psutil.Error):
                        process.send_signal(signal.SIGKILL)
                        kills += 1
            time.sleep(0.5)
        assert driver.poll() is not None, "the study did not end on its own"
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        log.seek(0)
        output = log.read()
    assert kills > 0, output[-3000:]
    assert driver.returncode == 1, output[-3000:]
    assert output.strip().splitlines()[-1].startswith("error: 1 trials failed (error or oom)"), output[-3000:]
    frame = results.load(tmp_path / "results/killed")
    assert len(frame) == 1 and frame["status"].iloc[0] == "error", output[-3000:]
    assert "its worker group failed past its retries (memory of node" in frame["error"].iloc[0]
    assert not any(claims_dir.glob("*.json"))
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
