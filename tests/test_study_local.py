"""Tier 2: the study CLI on local Ray with the fast simulated trial."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scaling_lab import results, simulated

pytestmark = pytest.mark.ray

SPEC = {
    "name": "sim",
    "models": [{"name": "xs", "source": "tiny:xs"}],
    "grid": {"ranks": [1, 4, 16], "alphas": {"min": 1, "max": 4096, "num": 7}, "seeds": [0, 1]},
    "training": {"steps": 20, "eval_every": 5},
    "execution": {"backend": "simulated", "trials_per_group": 21},
}


def study(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "scaling_lab.study", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def write_spec(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def commit_all(directory: Path) -> str:
    """Make `directory` a git checkout with one commit of what it holds; the commit's hash."""
    identity = ["-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]

    def git(*args: str) -> str:
        return subprocess.run(["git", *identity, *args], cwd=directory, check=True, capture_output=True,
                              text=True).stdout.strip()

    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "the study")
    return git("rev-parse", "HEAD")


def test_run_resume_and_extend(tmp_path):
    spec = write_spec(tmp_path, SPEC)
    commit = commit_all(tmp_path)  # every row records the commit of the checkout the study ran from
    first = study("run", str(spec), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    frame = results.load(tmp_path / "results/sim")
    assert len(frame) == 3 * 7 * 2 and frame["trial_id"].is_unique
    assert set(frame["status"]) == {"ok", "diverged"}
    assert (frame["git_commit"] == commit).all(), set(frame["git_commit"])
    assert (frame["attempts"] == 1).all()
    diverged = frame[frame["status"] == "diverged"]
    assert diverged["last_finite_train_loss"].notna().all()
    assert "best α per cell" in first.stdout

    # per cell, the best α on the grid is the one nearest the planted optimum
    ok = frame[frame["status"] == "ok"]
    for rank, cell in ok.groupby("rank"):
        best = cell.groupby("alpha")["final_eval_loss"].mean().idxmin()
        grid = sorted(frame["alpha"].unique())
        assert best == min(grid, key=lambda a: abs(__import__("math").log(a / simulated.optimal_alpha(rank))))

    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "results/sim/trials").iterdir()}
    again = study("run", str(spec), cwd=tmp_path)
    assert again.returncode == 0 and "nothing to run" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "results/sim/trials").iterdir()} == mtimes

    extended = write_spec(tmp_path, {**SPEC, "grid": {**SPEC["grid"], "ranks": [1, 4, 16, 64]}})
    third = study("run", str(extended), cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    assert "14 of 56 trials to run" in third.stdout
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert len(results.load(tmp_path / "results/sim")) == 56

    status = study("status", "results/sim", cwd=tmp_path)
    assert status.returncode == 0 and "56/56 done" in status.stdout


@pytest.mark.parametrize(
    "change, message",
    [
        ({"grid": {**SPEC["grid"], "rnks": [1]}}, "grid.rnks: unknown key"),
        ({"grid": {**SPEC["grid"], "ranks": [-1]}}, "grid.ranks[0]: expected a positive integer"),
        ({"grid": {**SPEC["grid"], "ranks": []}}, "grid.ranks: expected a non-empty list"),
        ({"grid": {**SPEC["grid"], "alphas": [1, 0]}}, "grid.alphas[1]: expected a finite number > 0"),
        ({"grid": {**SPEC["grid"], "scaling_rules": ["sqrt"]}}, "grid.scaling_rules[0]: expected one of"),
        ({"data": {"source": "nope.jsonl", "text_column": "t"}}, "data.source: data file 'nope.jsonl' does not exist"),
        ({"models": [{"name": "m", "source": "./no/model"}]}, "models[0].source:"),
    ],
)
def test_bad_specs_fail_fast_with_one_line(tmp_path, change, message):
    spec = write_spec(tmp_path, {**SPEC, **change})
    done = study("run", str(spec), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "results").exists()
