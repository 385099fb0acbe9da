"""Time-to-law of the embedded default study as a grid, and how it grows with the number of trials.

Runs the default study (studies/default.yaml) as a grid with 1, 2, ... seeds: the same trial mix, 84 trials per
seed; 2 seeds is the default's grid (the default itself searches α adaptively: benchmarks/adaptive_time_to_law.py).
Each run is `python -m scaling_lab.study run` then `python -m scaling_lab.analysis fit`, timed as commands from
start to end, into a fresh results directory; the model cache and DeepSpeed's op are built first, as `make
install` and the first run leave them. For each run it prints the time-to-law, the trials' own time and how busy
the slots were (trial time ÷ (slots × study time)). Last, the marginal time per trial between the smallest and
largest run ÷ the ideal (mean trial time ÷ slots): 1.0 means time grows linearly with the number of trials and
every slot is always busy. --steps shortens every trial, for a quick run.

    python benchmarks/time_to_law.py [--seeds 1 2] [--steps 80] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 600.0


def timed(command: list[str], cwd: Path) -> tuple[float, str]:
    started = time.time()
    done = subprocess.run(command, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True,
                          capture_output=True, text=True)
    return time.time() - started, done.stdout


def warm_up(spec: dict) -> None:
    from scaling_lab import models, spec as spec_lib
    from scaling_lab.deepspeed_setup import build_deepspeed_ops

    parsed = spec_lib.parse(spec)
    for model in parsed.models:
        models.load_base(model, Path(parsed.cache_dir).expanduser())
    build_deepspeed_ops()


def run(spec: dict, seeds: int, steps: int, workdir: Path) -> dict:
    from scaling_lab import results

    spec = {**spec, "output_dir": str(workdir / f"results-{seeds}"), "search": {"method": "grid"},
            "grid": {**spec["grid"], "seeds": list(range(seeds))}, "training": {**spec["training"], "steps": steps}}
    spec_path = workdir / f"spec-{seeds}.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    study_s, out = timed([sys.executable, "-m", "scaling_lab.study", "run", str(spec_path)], workdir)
    fit_s, _ = timed([sys.executable, "-m", "scaling_lab.analysis", "fit", spec["output_dir"],
                      "--out", str(workdir / f"analysis-{seeds}")], workdir)
    rows = results.load(spec["output_dir"])
    slots = int(re.search(r"(\d+) at a time", out).group(1))
    return {"trials": len(rows), "study_s": study_s, "fit_s": fit_s, "trial_s": float(rows["wall_time_s"].sum()),
            "slots": slots}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="seed counts to run (default 1 2)")
    parser.add_argument("--steps", type=int, default=80, help="training steps per trial (the default study: 80)")
    parser.add_argument("--keep", type=Path, help="keep each run's results and analysis here (default: discarded)")
    args = parser.parse_args()
    spec = yaml.safe_load((ROOT / "studies/default.yaml").read_text())
    warm_up(spec)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.keep.resolve() if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for seeds in sorted(args.seeds):
            measured = run(spec, seeds, args.steps, workdir)
            runs.append(measured)
            law_s = measured["study_s"] + measured["fit_s"]
            busy = measured["trial_s"] / (measured["slots"] * measured["study_s"])
            print(f"{measured['trials']} trials ({seeds} seeds, {args.steps} steps): study {measured['study_s']:.1f} s "
                  f"+ fit {measured['fit_s']:.1f} s = time-to-law {law_s / 60:.2f} min ({law_s / TARGET_S:.3f} of "
                  f"the 10 min target); trial time {measured['trial_s']:.1f} s on {measured['slots']} slots, "
                  f"busy {busy:.3f}", flush=True)
    if len(runs) > 1:
        small, large = runs[0], runs[-1]
        marginal = (large["study_s"] - small["study_s"]) / (large["trials"] - small["trials"])
        ideal = large["trial_s"] / large["trials"] / large["slots"]
        print(f"marginal study time per trial {marginal:.3f} s; ideal (mean trial time ÷ slots) {ideal:.3f} s")
        print(f"scaling ratio (marginal ÷ ideal, {small['trials']} → {large['trials']} trials): {marginal / ideal:.3f}")


if __name__ == "__main__":
    main()
