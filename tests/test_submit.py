"""Tier 2: `study submit` hands a study to a Ray cluster's job API, which runs it; a bad spec submits nothing."""

import re
import shutil
from pathlib import Path

import pytest
import yaml

from scaling_lab import results
from simulated_cluster import ROOT, free_port, simulated_cluster, study, wait_until

pytest.importorskip("aiohttp", reason="ray[default] (the dev extra) runs the dashboard that serves the job API")
pytestmark = pytest.mark.ray

SPEC = {
    "name": "submitted",
    "models": [{"name": "xs", "source": "tiny:xs"}],
    "grid": {"ranks": [1, 4, 16], "alphas": [4, 64, 1024]},
    "training": {"steps": 10, "eval_every": 5},
    "execution": {"backend": "simulated", "trials_per_group": 3},
}


@pytest.fixture(scope="module")
def job_api():
    """The job API (the dashboard) of a one-node cluster, as a user reaches it through `ray dashboard`."""
    from ray.job_submission import JobSubmissionClient

    port = free_port()
    head = {"num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port}
    with simulated_cluster(head):
        address = f"http://127.0.0.1:{port}"

        def client():
            try:
                connected = JobSubmissionClient(address)
                connected.list_jobs()
                return connected
            except (OSError, RuntimeError):
                return None

        yield address, wait_until(client, timeout_s=60)


def project(tmp_path: Path, spec: dict) -> Path:
    """A working directory as a user has it: the package and a study spec."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "scaling_lab", repo / "scaling_lab", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "study.yaml").write_text(yaml.safe_dump(spec))
    return repo


def test_submit_runs_the_study_as_a_ray_job(tmp_path, job_api):
    from ray.job_submission import JobStatus

    address, client = job_api
    output = tmp_path / "results"
    repo = project(tmp_path, {**SPEC, "output_dir": str(output)})
    done = study("submit", "study.yaml", "--address", address, "--override", "grid.ranks=[1, 4]", cwd=repo)
    assert done.returncode == 0, done.stderr
    job_id = re.search(r"as Ray job (\S+)", done.stdout).group(1)
    assert f"ray job logs --address {address} --follow {job_id}" in done.stdout
    assert f"python -m scaling_lab.study status {output}" in done.stdout
    assert "warning" not in done.stderr

    finished = wait_until(lambda: client.get_job_status(job_id) in {JobStatus.SUCCEEDED, JobStatus.FAILED}, 120)
    assert finished and client.get_job_status(job_id) == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-3000:]
    assert "run study.yaml --override 'grid.ranks=[1, 4]'" in client.get_job_logs(job_id)
    frame = results.load(output)
    assert len(frame) == 2 * 3 and set(frame["rank"]) == {1, 4}

    status = study("status", str(output), cwd=tmp_path)
    assert status.returncode == 0 and "6/6 done" in status.stdout


@pytest.mark.parametrize(
    "spec_file, change, message",
    [
        ("study.yaml", {"grid": {**SPEC["grid"], "rnks": [1]}}, "grid.rnks: unknown key"),
        ("study.yaml", {"execution": {"backend": "slurm"}}, "execution.backend: expected one of"),
        ("../outside.yaml", {}, "the spec must lie inside the working directory"),
    ],
)
def test_a_bad_spec_is_rejected_before_anything_is_submitted(tmp_path, job_api, spec_file, change, message):
    address, client = job_api
    jobs_before = len(client.list_jobs())
    repo = project(tmp_path, {**SPEC, **change})
    shutil.copy(repo / "study.yaml", tmp_path / "outside.yaml")
    done = study("submit", spec_file, "--address", address, cwd=repo)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert len(client.list_jobs()) == jobs_before


def test_an_unreachable_job_api_is_one_line(tmp_path):
    repo = project(tmp_path, SPEC)
    done = study("submit", "study.yaml", "--address", f"http://127.0.0.1:{free_port()}", cwd=repo)
    assert done.returncode == 1
    assert "error: cannot submit to the Ray job API" in done.stderr and "Traceback" not in done.stderr


def test_a_job_api_that_says_try_again_later_is_retried(monkeypatch, tmp_path):
    """A cluster just started answers so until its dashboard agent is up; a lasting answer still ends in one line."""
    import ray.job_submission

    from scaling_lab.study import submit

    answers = ["No available agent to submit job, please try again later."] * 2

    class JustStarted:
        def __init__(self, address):
            pass

        def submit_job(self, **_):
            if answers:
                raise RuntimeError(answers.pop())
            return "raysubmit_1"

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", JustStarted)
    monkeypatch.setattr(submit.time, "sleep", lambda _: None)
    assert submit._submit("http://127.0.0.1:1", "true", tmp_path, "s", {}) == "raysubmit_1" and not answers

    monkeypatch.setattr(submit, "TRANSIENT_RETRY_S", 0.0)
    answers.extend(["No available agent to submit job, please try again later."] * 1000)
    with pytest.raises(SystemExit):
        submit._submit("http://127.0.0.1:1", "true", tmp_path, "s", {})
