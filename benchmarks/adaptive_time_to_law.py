"""Time-to-law of the embedded default study as a grid and as an adaptive search, in one run.

Each is a whole command, timed from start to end into a fresh temporary directory: `python -m scaling_lab.study
run` (no spec: the embedded default; the adaptive one with --override search.method=adaptive and any
--adaptive-override) then `python -m scaling_lab.analysis fit`. The model cache and DeepSpeed's op are built first,
as `make install` and the first run leave them. For each it prints trials, trial time (the rows' wall_time_s),
study and fit wall time, the width of every law's k interval (law.json: per model and joint), and the longest time
any slot stood idle while trials remained (from the rows' started_at and finished_at: the longest stretch before
the last trial started with fewer trials running than slots). Last, the ratio adaptive wall time ÷ grid wall time
(study + fit); the target is <= 0.5 with k intervals no wider than the grid's.

    python benchmarks/adaptive_time_to_law.py [--adaptive-override search.resolution=1.5 ...] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(command: list[str], cwd: Path) -> tuple[float, str]:
    started = time.time()
    done = subprocess.run(command, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return time.time() - started, done.stdout


def warm_up() -> None:
    from scaling_lab import models, spec as spec_lib
    from scaling_lab.deepspeed_setup import build_deepspeed_ops

    spec = spec_lib.load(ROOT / "studies/default.yaml")
    for model in spec.models:
        models.load_base(model, Path(spec.cache_dir).expanduser())
    build_deepspeed_ops()


def longest_idle_gap(rows: pd.DataFrame, slots: int) -> float:
    """The longest stretch, between the first trial's start and the last one's, with fewer than `slots` running."""
    starts = pd.to_datetime(rows["started_at"], utc=True)
    ends = pd.to_datetime(rows["finished_at"], utc=True)
    last_start = starts.max()
    events = sorted([(t, 1) for t in starts] + [(t, -1) for t in ends if t < last_start])
    running, idle_since, longest = 0, None, 0.0
    for moment, change in events:
        running += change
        if running < slots and idle_since is None:
            idle_since = moment
        elif running >= slots and idle_since is not None:
            longest = max(longest, (moment - idle_since).total_seconds())
            idle_since = None
    return longest


def k_widths(law_json: Path) -> dict[str, float]:
    law = json.loads(law_json.read_text())
    widths = {}
    for entry in law["laws"] + law["joint_laws"]:
        name = entry["group"].get("model", "joint")
        low, high = entry["k_ci95"]
        widths[name] = high - low
    return widths


def run(name: str, overrides: list[str], workdir: Path) -> dict:
    from scaling_lab import results

    out = workdir / name
    options = [item for override in [f"output_dir={out / 'results'}", *overrides] for item in ("--override", override)]
    study_s, log = timed([sys.executable, "-m", "scaling_lab.study", "run", *options], workdir)
    fit_s, _ = timed([sys.executable, "-m", "scaling_lab.analysis", "fit", str(out / "results"),
                      "--out", str(out / "analysis")], workdir)
    (out / "study.log").write_text(log)
    rows = results.load(out / "results")
    slots = int(re.search(r"(\d+) at a time", log).group(1))
    return {"name": name, "trials": len(rows), "trial_s": float(rows["wall_time_s"].sum()), "study_s": study_s,
            "fit_s": fit_s, "slots": slots, "idle_s": longest_idle_gap(rows, slots),
            "k_widths": k_widths(out / "analysis/law.json")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adaptive-override", action="append", default=[],
                        help="a further --override for the adaptive run (repeatable), e.g. search.resolution=1.5")
    parser.add_argument("--keep", type=Path, help="keep both runs' results, logs and analyses here")
    args = parser.parse_args()
    warm_up()
    with tempfile.TemporaryDirectory(prefix="adaptive-time-to-law-") as tmp:
        workdir = args.keep.resolve() if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        measured = []
        for name, overrides in [("grid", ["search.method=grid"]),
                                ("adaptive", ["search.method=adaptive", *args.adaptive_override])]:
            m = run(name, overrides, workdir)
            measured.append(m)
            widths = ", ".join(f"{model} {width:.3f}" for model, width in m["k_widths"].items())
            print(f"{name}: {m['trials']} trials, trial time {m['trial_s']:.0f} s on {m['slots']} slots; wall time "
                  f"{m['study_s'] + m['fit_s']:.0f} s (study {m['study_s']:.0f} s + fit {m['fit_s']:.0f} s); "
                  f"k interval widths: {widths}; longest idle slot while trials remained {m['idle_s']:.1f} s",
                  flush=True)
    grid, adaptive = measured
    narrower = all(adaptive["k_widths"][model] <= width for model, width in grid["k_widths"].items())
    print(f"k intervals of the adaptive study no wider than the grid's: {'yes' if narrower else 'no'}")
    ratio = (adaptive["study_s"] + adaptive["fit_s"]) / (grid["study_s"] + grid["fit_s"])
    print(f"adaptive wall time ÷ grid wall time: {ratio:.3f} (target <= 0.5)")


if __name__ == "__main__":
    main()
