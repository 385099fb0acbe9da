"""Fault injection on local Ray with the fast simulated trial: killed drivers, workers and nodes, failing trials,
concurrent drivers, a full disk. Each test ends by checking that every grid point has exactly one row and that
nothing partial is visible. benchmarks/faults.py repeats the driver kills many times."""

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from scaling_lab import results, spec as spec_lib
from scaling_lab.grid import expand
from scaling_lab.group import GroupSpec
from scaling_lab.trial import run_group
from simulated_cluster import simulated_cluster

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
KILL_DELAY_SEED = 15  # the delays before the driver kills: the same on every run

SPEC = {
    "name": "rel",
    "models": [{"name": "xs", "source": "tiny:xs"}],
    "grid": {"ranks": [1, 4, 16], "alphas": [4, 16, 64, 256, 1024, 4096]},
    "training": {"steps": 20, "eval_every": 5},
    "execution": {"backend": "simulated", "trials_per_group": 3, "simulated_step_time_s": 0.03,
                  "claim_timeout_s": 15, "max_retries": 2},
}


def write_spec(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def start(*args, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """The study CLI in its own process group, its output in files (a pipe nobody reads could fill up)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    out, err = (open(cwd / f"driver-{time.monotonic_ns()}.{name}", "w+") for name in ("out", "err"))
    driver = subprocess.Popen([sys.executable, "-m", "scaling_lab.study", *args], cwd=cwd, env=env,
                              stdout=out, stderr=err, text=True, start_new_session=True)
    driver.output_files = (out, err)
    return driver


def finish(driver: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    code = driver.wait(timeout=timeout)
    texts = []
    for file in driver.output_files:
        file.seek(0)
        texts.append(file.read())
        file.close()
    return code, *texts


def study(*args, cwd: Path, env: dict | None = None) -> tuple[int, str, str]:
    return finish(start(*args, cwd=cwd, env=env))


def kill(driver: subprocess.Popen, what: str) -> None:
    """SIGKILL the driver alone (Ray's head processes fate-share with it, its workers follow within seconds), or
    its process group (the head processes; workers have groups of their own), or, as a crash of the machine
    would, every process it started. Then wait for the rest to go, ending the few that outlive a driver (Ray's
    agents), by pid."""
    assert driver.poll() is None, "the driver finished before its kill"
    family = psutil.Process(driver.pid).children(recursive=True)
    if what == "driver":
        driver.kill()
    else:
        os.killpg(driver.pid, signal.SIGKILL)
    if what == "machine":
        for process in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    finish(driver)
    _, alive = psutil.wait_procs(family, timeout=20)
    for process in alive:
        process.kill()


def wait_for(condition, timeout: float = 120, what: str = ""):
    """Poll until `condition()` is true; returns its value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def assert_complete(results_dir: Path, spec_path: Path):
    """Exactly one row and one curve per grid point, nothing partial or left over."""
    expected = {t.trial_id for t in expand(spec_lib.load(spec_path))}
    frame = results.load(results_dir)
    assert frame["trial_id"].is_unique and set(frame["trial_id"]) == expected
    for folder in (results.TRIALS, results.CURVES):
        visible = [n for n in files(results_dir / folder) if not n.startswith(".")]
        assert visible == sorted(f"{t}.parquet" for t in expected), folder
    assert set(results.load_curves(results_dir)["trial_id"]) == expected
    assert [n for n in files(results_dir / results.CLAIMS) if not n.startswith(".")] == []
    assert files(results_dir / results.CHECKPOINTS) == []
    return frame


def fault_free_curves(tmp_path: Path, spec_path: Path):
    """The curves of the same study computed in-process with no faults (simulated trials are deterministic)."""
    data = yaml.safe_load(spec_path.read_text())
    data["execution"] = {**data["execution"], "inject_faults": [], "simulated_step_time_s": 0}
    spec = spec_lib.parse(data, tmp_path)
    store = results.Store(tmp_path / "fault-free")
    run_group(GroupSpec(trials=tuple(t.to_dict() for t in expand(spec)), results_dir=str(store), cache_dir=str(store),
                        base_dir=str(store), backend="simulated", study=spec.name))
    return results.load_curves(store)


def test_a_driver_killed_at_random_points_loses_and_duplicates_nothing(tmp_path):
    """The driver alone, then its whole process tree (benchmarks/faults.py adds its process group alone)."""
    spec_path = write_spec(tmp_path, {**SPEC, "execution": {**SPEC["execution"], "trials_per_group": 9}})
    rows = tmp_path / "results/rel" / results.TRIALS
    rng = random.Random(KILL_DELAY_SEED)
    finished_before_a_kill: dict[str, int] = {}
    for what in ("driver", "machine"):
        driver = start("run", str(spec_path), cwd=tmp_path)
        wait_for(lambda: len(files(rows)) > len(finished_before_a_kill), what="a new row")
        time.sleep(rng.uniform(0, 1))
        finished_before_a_kill.update({n: (rows / n).stat().st_mtime_ns for n in files(rows) if n.endswith(".parquet")})
        kill(driver, what)
    claims_dir = tmp_path / "results/rel/claims"
    cut_short = {n.removesuffix(".json"): json.loads((claims_dir / n).read_text())["attempt"] for n in files(claims_dir)
                 if n.endswith(".json") and n.removesuffix(".json") + ".parquet" not in files(rows)}

    code, out, err = study("resume", str(spec_path), cwd=tmp_path)
    assert code == 0, err[-3000:]
    frame = assert_complete(tmp_path / "results/rel", spec_path)
    assert 0 < len(finished_before_a_kill) < len(frame)
    assert {n: (rows / n).stat().st_mtime_ns for n in finished_before_a_kill} == finished_before_a_kill  # not re-run
    assert set(frame["status"]) <= {"ok", "diverged"}
    attempts = frame.set_index("trial_id")["attempts"]
    assert {t: attempts[t] for t in cut_short} == {t: a + 1 for t, a in cut_short.items()}  # taken over, once
    assert (attempts.drop(index=list(cut_short)) <= 2).all()


def test_ctrl_c_stops_the_study_and_the_ray_instance_it_started(tmp_path):
    spec_path = write_spec(tmp_path, {**SPEC, "execution": {**SPEC["execution"], "simulated_step_time_s": 0.3}})
    rows = tmp_path / "results/rel" / results.TRIALS
    driver = start("run", str(spec_path), cwd=tmp_path)
    wait_for(lambda: files(rows), what="a first row")
    family = psutil.Process(driver.pid).children(recursive=True)
    os.killpg(driver.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
    code, _, err = finish(driver, timeout=60)
    assert code == 130 and err.strip().splitlines()[-1].startswith("interrupted: finished trials are kept"), err
    assert len(files(rows)) < 18  # stopped, not run on to the end
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, [p.cmdline()[:1] for p in alive]


def test_a_killed_worker_is_retried_and_resumes_from_its_checkpoint(tmp_path):
    crash = {"kind": "crash", "ranks": [1], "alphas": [4], "at_step": 12, "attempts": 1}  # kills its own worker
    spec_path = write_spec(tmp_path, {
        **SPEC, "grid": {"ranks": [1, 4], "alphas": [4, 16, 64]},
        "execution": {**SPEC["execution"], "simulated_step_time_s": 0.06, "checkpoint_every": 5,
                      "inject_faults": [crash]},
    })
    trials = expand(spec_lib.load(spec_path))
    crashed = next(t.trial_id for t in trials if t.rank == 1 and t.alpha == 4)
    results_dir = tmp_path / "results/rel"
    driver = start("run", str(spec_path), "--verbose", cwd=tmp_path)

    def kill_a_checkpointed_trial() -> str | None:
        """Kill, from outside, the worker running a trial other than the crashing one once it has a checkpoint."""
        for trial_id in files(results_dir / results.CHECKPOINTS):
            if trial_id != crashed and (results_dir / "checkpoints" / trial_id / "latest.json").exists():
                try:
                    claim = yaml.safe_load((results_dir / "claims" / f"{trial_id}.json").read_text())
                except FileNotFoundError:
                    continue  # it finished meanwhile
                os.kill(claim["pid"], signal.SIGKILL)
                return trial_id
        return None

    victim = wait_for(kill_a_checkpointed_trial, what="a checkpointed trial to kill")

    code, out, err = finish(driver)
    assert code == 0, err[-3000:]
    frame = assert_complete(results_dir, spec_path).set_index("trial_id")
    assert frame.loc[crashed, "attempts"] == 2 and frame.loc[victim, "attempts"] == 2
    assert (frame.drop(index=[crashed, victim])["attempts"] == 1).all()
    assert f"trial {crashed}: resumed from its checkpoint at step 10" in out
    assert f"trial {victim}: resumed from its checkpoint at step" in out
    assert results.load_curves(results_dir).equals(fault_free_curves(tmp_path, spec_path))


def test_failing_trials_become_rows_and_retry_failed_reruns_only_them(tmp_path):
    faults = [
        {"kind": "error", "ranks": [4], "alphas": [4], "at_step": 2},
        {"kind": "oom", "ranks": [16], "alphas": [16]},
        {"kind": "nan", "ranks": [1], "alphas": [16], "at_step": 7},
        {"kind": "explode", "ranks": [4], "alphas": [64], "at_step": 4},  # diverged after divergence_patience = 3
        {"kind": "crash", "ranks": [16], "alphas": [64]},  # on every attempt: its group fails past its retries
    ]
    data = {**SPEC, "grid": {"ranks": [1, 4, 16], "alphas": [4, 16, 64]},
            "execution": {**SPEC["execution"], "max_retries": 1, "inject_faults": faults}}
    spec_path = write_spec(tmp_path, data)
    secrets = {"AWS_SECRET_ACCESS_KEY": "fake-aws-secret-0123456789", "HF_TOKEN": "hf_fakeFAKEfake0123456789"}
    code, out, err = study("run", str(spec_path), cwd=tmp_path, env=secrets)
    assert code == 1 and re.match(r"error: 1 of \d+ trial groups failed after retries", err.strip().splitlines()[-1])
    frame = results.load(tmp_path / "results/rel").set_index(["rank", "alpha"])
    assert frame.loc[(4, 4), "status"] == "error" and frame.loc[(16, 16), "status"] == "oom"
    assert frame.loc[(1, 16), ["status", "steps"]].tolist() == ["diverged", 7]
    assert frame.loc[(4, 64), ["status", "steps"]].tolist() == ["diverged", 6]
    assert (16, 64) not in frame.index

    code, status_out, _ = study("status", "results/rel", cwd=tmp_path)
    assert code == 0
    assert f"error {frame.loc[(4, 4), 'trial_id']} model=xs r=4 α=4: RuntimeError: injected error at step 2" \
        in status_out
    assert f"oom {frame.loc[(16, 16), 'trial_id']} model=xs r=16 α=16: out of memory: worker peak RSS" in status_out
    assert "MemoryError: injected out-of-memory at step 1" in frame.loc[(16, 16), "error"]
    assert "stale (the next run takes it over)" in status_out  # the crashed trial's claim

    rows = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "results/rel/trials").iterdir()}
    write_spec(tmp_path, {**data, "execution": {**data["execution"], "inject_faults": []}})
    code, retry_out, err = study("run", str(spec_path), "--retry-failed", cwd=tmp_path, env=secrets)
    assert code == 0, err[-3000:]
    assert "failed trials to run again: 2" in retry_out
    frame = assert_complete(tmp_path / "results/rel", spec_path).set_index(["rank", "alpha"])
    assert set(frame["status"]) == {"ok", "diverged"} and frame.loc[(16, 64), "attempts"] == 3
    rerun = {f"{frame.loc[cell, 'trial_id']}.parquet" for cell in [(4, 4), (16, 16)]}
    assert {n: t for n, t in rows.items() if n not in rerun} == {
        n: (tmp_path / "results/rel/trials" / n).stat().st_mtime_ns for n in rows if n not in rerun}
    assert sorted(files(tmp_path / "results/rel/failed"))[0].split(".")[0] in {n.split(".")[0] for n in rerun}
    assert len(files(tmp_path / "results/rel/failed")) == 4  # the two rows and their curves

    written = [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()] + [
        t.encode() for t in (out, err, status_out, retry_out)]
    for value in secrets.values():
        assert not any(value.encode() in blob for blob in written)


def test_two_drivers_on_one_study_never_run_a_trial_twice(tmp_path):
    spec_path = write_spec(tmp_path, {
        **SPEC, "grid": {"ranks": [1, 4, 16], "alphas": [4, 16, 64, 256]},
        "execution": {**SPEC["execution"], "trials_per_group": 2, "simulated_step_time_s": 0.3,
                      "max_concurrent": 1},  # one lane each: the second driver starts while trials remain
    })
    first = start("run", str(spec_path), cwd=tmp_path)
    wait_for(lambda: [n for n in files(tmp_path / "results/rel/claims") if n.endswith(".json")],
             what="the first driver's first trial")
    second = start("run", str(spec_path), cwd=tmp_path)
    outputs = [finish(first), finish(second)]
    assert [code for code, _, _ in outputs] == [0, 0], [err[-2000:] for _, _, err in outputs]
    frame = assert_complete(tmp_path / "results/rel", spec_path)
    assert frame["node"].nunique() == 2  # each driver's own local Ray ran some of the trials ...
    assert (frame["attempts"] == 1).all()  # ... and each trial was claimed once: none taken over, none run twice


def test_a_removed_node_s_trials_are_retried_on_another(tmp_path):
    spec_path = write_spec(tmp_path, {
        **SPEC, "grid": {"ranks": [1, 4], "alphas": [4, 16, 64]},
        "execution": {**SPEC["execution"], "trials_per_group": 6, "simulated_step_time_s": 0.25},
    })
    with simulated_cluster(head={"num_cpus": 0}, nodes=[{"num_cpus": 1}]) as (cluster, [doomed]):
        driver = start("run", str(spec_path), "--address", cluster.address, cwd=tmp_path)
        claims = tmp_path / "results/rel/claims"
        wait_for(lambda: any(n.endswith(".json") for n in files(claims)), what="a running trial")
        cluster.add_node(num_cpus=1)
        cluster.remove_node(doomed, allow_graceful=False)
        code, out, err = finish(driver)
    assert code == 0, err[-3000:]
    frame = assert_complete(tmp_path / "results/rel", spec_path)
    assert frame["attempts"].max() == 2  # the trial running on the removed node


def test_a_full_disk_stops_the_study_with_one_clear_line_and_no_partial_rows(tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        spec_path = write_spec(tmp_path, {**SPEC, "output_dir": str(mount / "results"),
                                          "execution": {**SPEC["execution"], "max_retries": 0}})
        driver = start("run", str(spec_path), cwd=tmp_path)
        wait_for(lambda: files(mount / "results" / results.TRIALS), what="a row")
        with open(mount / "filler", "wb") as filler, pytest.raises(OSError, match="No space left"):
            while True:
                filler.write(os.urandom(2**16))
                filler.flush()
        code, out, err = finish(driver)
        last_line = err.strip().splitlines()[-1]
        assert code == 1 and last_line.startswith("error: ") and "cannot write (No space left on device)" in last_line
        written = results.load(mount / "results")
        assert 0 < len(written) < 18 and written["trial_id"].is_unique
        assert set(results.load_curves(mount / "results")["trial_id"]) == set(written["trial_id"])
        assert not [n for folder in ("trials", "curves") for n in files(mount / "results" / folder)
                    if not n.endswith(".parquet")]
    finally:
        subprocess.run(["umount", str(mount)], check=True)
