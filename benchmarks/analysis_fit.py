"""Benchmark: fit 1 million result rows (load Parquet, optima, laws, rules, law.json, report and plots).

    .venv/bin/python benchmarks/analysis_fit.py [--rows-scale 1.0]

The planted study: 4 models × 10 ranks × 25 α × 10 learning rates × 100 seeds = 1,000,000 trials, so both
laws are fitted (α*: 400 cells of 2,500 trials; lr*: 1,000 cells of 1,000 trials), 1,000 bootstrap resamples.
The target is under 10 s; the last line prints the time and its ratio to that target.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from scaling_lab.analysis.fit import FitSettings, fit_study
from scaling_lab.analysis.load import load_results
from scaling_lab.analysis.planted import planted_trials, power_law
from scaling_lab.analysis.report import write_outputs

TARGET_S = 10.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=100, help="seeds per setting (100 gives 1,000,000 rows)")
    args = parser.parse_args()
    frame = planted_trials(
        power_law(16.0, 0.5, m=0.2),
        ranks=tuple(2**i for i in range(10)),
        alphas=tuple(2.0 ** np.arange(-2, 23) / 2),
        seeds=args.seeds,
        models={"xs": 1e6, "s": 4e6, "m": 1.6e7, "l": 6.4e7},
        learning_rates=tuple(np.geomspace(1e-5, 1e-2, 10)),
        optimal_learning_rate=lambda rank, size: 3e-4 * rank**-0.25,
        noise=0.01,
        missing_fraction=0.0,
        rng=np.random.default_rng(0),
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "results.parquet"
        frame.to_parquet(path)
        start, start_cpu = time.perf_counter(), time.process_time()
        results = load_results(path)
        loaded = time.perf_counter()
        fit = fit_study(results, FitSettings(by_model=True, n_bootstrap=1000))
        fitted = time.perf_counter()
        write_outputs(fit, Path(folder) / "analysis")
        done, cpu = time.perf_counter(), time.process_time() - start_cpu
    law = next(t.law for t in fit.joint_laws)
    print(
        f"rows {len(frame):,}; α cells {len(fit.alpha_cells)}, lr cells {len(fit.learning_rate_cells)}; "
        f"joint law {law.formula()}"
    )
    print(f"load {loaded - start:.2f} s, fit {fitted - loaded:.2f} s, report and plots {done - fitted:.2f} s")
    # CPU time says how much work it was when other processes share the machine and stretch the wall time.
    print(f"CPU time of this process (all threads) {cpu:.2f} s; load average {os.getloadavg()[0]:.1f}")
    total = done - start
    print(f"total {total:.2f} s for {len(frame):,} rows (target {TARGET_S:g} s, ratio {total / TARGET_S:.2f})")


if __name__ == "__main__":
    main()
