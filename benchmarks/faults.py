"""Benchmark: a study under repeated random SIGKILLs of its driver loses and duplicates nothing.

    .venv/bin/python benchmarks/faults.py [--kills 20] [--seed 0]

A simulated study (16 trials of 40 steps, 0.1 s a step, 2 trials a group) first runs once without faults, to
time it. Then drivers (`python -m scaling_lab.study run`) are started one after another and each is SIGKILLed
at a random moment of a fault-free run's duration, in one of three ways at random: the driver alone (Ray's head
processes go down with it, its workers follow within seconds), its process group (the head processes; workers
have groups of their own), or every process it started, as a crash of the machine would. A driver that
finishes before its kill has completed the study: it is
checked, and the next driver starts a new copy of the study. After the last kill a driver runs to the end.
Every finished copy is checked: one row and one curve per grid point, no other files, rows written before a
kill never rewritten. Extra compute counts trial restarts (row attempts beyond the first), an upper bound on
the work done twice, since a killed attempt had done only part of its trial.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from scaling_lab import results, spec as spec_lib
from scaling_lab.grid import expand

ROOT = Path(__file__).resolve().parents[1]
SPEC = {
    "name": "faults",
    "models": [{"name": "xs", "source": "tiny:xs"}],
    "grid": {"ranks": [1, 4], "alphas": {"min": 1, "max": 4096, "num": 8}},
    "training": {"steps": 40, "eval_every": 5},
    "execution": {"backend": "simulated", "trials_per_group": 2, "simulated_step_time_s": 0.1,
                  "claim_timeout_s": 30},
}


def start_driver(spec_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "scaling_lab.study", "run", str(spec_path)], cwd=spec_path.parent,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


KILLS = ("driver", "process group", "machine")


def kill_driver(driver: subprocess.Popen, what: str) -> None:
    family = psutil.Process(driver.pid).children(recursive=True)
    if what == "driver":
        driver.kill()
    else:
        os.killpg(driver.pid, signal.SIGKILL)
    if what == "machine":
        for process in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    driver.wait()
    _, alive = psutil.wait_procs(family, timeout=20)
    for process in alive:  # Ray's agents outlive a killed driver for a while
        process.kill()


def rows_now(results_dir: Path) -> dict[str, int]:
    folder = results_dir / results.TRIALS
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.parquet")} if folder.is_dir() else {}


def check(results_dir: Path, expected: set[str], rows_seen: dict[str, int]) -> dict[str, int]:
    """Counts of what went wrong in a finished copy of the study (all must be 0), and its trial restarts."""
    frame = results.load(results_dir)
    ids = list(frame["trial_id"])
    files = {folder: sorted(p.name for p in (results_dir / folder).iterdir() if not p.name.startswith("."))
             for folder in (results.TRIALS, results.CURVES)}
    now = rows_now(results_dir)
    return {
        "lost": len(expected - set(ids)),
        "duplicated": len(ids) - len(set(ids)) + len(set(ids) - expected),
        "stray files": sum(1 for names in files.values() for n in names if n.removesuffix(".parquet") not in expected),
        "missing curves": len(expected - {n.removesuffix(".parquet") for n in files[results.CURVES]}),
        "rows rewritten": sum(1 for name, mtime in rows_seen.items() if now.get(name) != mtime),
        "restarts": int((frame["attempts"] - 1).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs of a running driver to survive")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="faults-"))
    expected = {t.trial_id for t in expand(spec_lib.parse(SPEC))}

    baseline = work / "fault-free"
    baseline.mkdir()
    (baseline / "study.yaml").write_text(yaml.safe_dump(SPEC))
    started = time.monotonic()
    assert start_driver(baseline / "study.yaml").wait() == 0, "the fault-free run failed"
    fault_free_s = time.monotonic() - started
    assert not any(check(baseline / "results/faults", expected, {}).values()), "the fault-free run is incomplete"

    totals = {"lost": 0, "duplicated": 0, "stray files": 0, "missing curves": 0, "rows rewritten": 0, "restarts": 0}
    kills, copies, drivers = {what: 0 for what in KILLS}, 0, 0
    wall_s = 0.0
    copy_dir = None
    rows_seen: dict[str, int] = {}
    while sum(kills.values()) < args.kills or copy_dir is not None:
        if copy_dir is None:
            copies += 1
            copy_dir = work / f"copy-{copies}"
            copy_dir.mkdir()
            (copy_dir / "study.yaml").write_text(yaml.safe_dump(SPEC))
            rows_seen = {}
        driver = start_driver(copy_dir / "study.yaml")
        drivers += 1
        run_started = time.monotonic()
        finished = False
        if sum(kills.values()) < args.kills:
            try:
                driver.wait(timeout=rng.uniform(0, fault_free_s))
                finished = True
            except subprocess.TimeoutExpired:
                rows_seen.update(rows_now(copy_dir / "results/faults"))
                what = rng.choice(KILLS)
                kill_driver(driver, what)
                kills[what] += 1
        else:
            driver.wait()
            finished = True
        wall_s += time.monotonic() - run_started
        if finished:
            assert driver.returncode == 0, f"driver {drivers} failed with exit code {driver.returncode}"
            for name, count in check(copy_dir / "results/faults", expected, rows_seen).items():
                totals[name] += count
            copy_dir = None

    trials = copies * len(expected)
    print(f"fault benchmark: {copies} copies of a {len(expected)}-trial simulated study, {drivers} drivers started, "
          f"{sum(kills.values())} SIGKILLed at random moments ({', '.join(f'{n}: {w}' for w, n in kills.items())})")
    print(f"  kills survived: {sum(kills.values())}")
    print(f"  trials lost: {totals['lost']}   trials duplicated: {totals['duplicated']}   stray files: "
          f"{totals['stray files']}   missing curves: {totals['missing curves']}   finished rows rewritten: "
          f"{totals['rows rewritten']}")
    print(f"  extra compute: {totals['restarts']} trial restarts for {trials} trials = "
          f"{totals['restarts'] / trials:.2f} of the fault-free compute (an upper bound)")
    print(f"  wall time: {wall_s:.0f} s for {copies} copies vs {fault_free_s:.0f} s per fault-free run = "
          f"{wall_s / (copies * fault_free_s):.1f}× (each restart pays Ray's start-up again)")
    failures = {k: v for k, v in totals.items() if k != "restarts" and v}
    print(f"  {'FAILED: ' + str(failures) if failures else 'ok: nothing lost, duplicated or rewritten'}  ({work})")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
