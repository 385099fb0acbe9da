"""Benchmark: compute saved by early stopping (training.early_stop) and how far it moves each cell's optimum.

    .venv/bin/python benchmarks/early_stopping.py            # simulated trial, in-process (seconds)
    .venv/bin/python benchmarks/early_stopping.py --real     # tiny real models through the platform (minutes)

Each study runs twice into fresh results directories, without and with early stopping, through the platform's
own group runner (scaling_lab.trial.run_group: the pruning rule reads finished trials from the results store),
and both are fitted with scaling_lab.analysis. Printed: training steps run, the shift of every cell's optimum
(log2, i.e. octaves) and of the law's k, and last the ratio of training steps, without ÷ with early stopping.

Pruning needs every seed of some α beyond the trial finished (scaling_lab/early_stop.py), so what it saves depends
on the order trials run in. Two orders are measured: the grid's (expand: seeds of a cell one after another, α
ascending) and α-major (all seeds of an α together, α ascending).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from scaling_lab import results
from scaling_lab.analysis import fit_study, from_frame, load_results
from scaling_lab.analysis.fit import StudyFit
from scaling_lab.grid import TrialConfig, expand
from scaling_lab.group import GroupSpec
from scaling_lab.spec import StudySpec, dump, parse
from scaling_lab.trial import run_group

EARLY_STOP = {"enabled": True, "margin": 0.05, "min_step": 20}
SIMULATED_SPEC = {
    "name": "early-stopping",
    "models": [{"name": "xs", "source": "tiny:xs"}],
    "grid": {"ranks": [2**i for i in range(9)], "alphas": {"min": 1, "max": 65536, "num": 17}, "seeds": [0, 1]},
    "training": {"steps": 80, "eval_every": 10},
    "execution": {"backend": "simulated"},
}
REAL_SPEC = {
    "name": "early-stopping-real",
    "models": [{"name": "tiny-xs", "source": "tiny:xs"}],
    "grid": {"ranks": [1, 4, 16], "alphas": {"min": 16, "max": 65536, "num": 13}, "seeds": [0, 1]},
    "training": {"steps": 80, "batch_size": 32, "seq_len": 32, "eval_every": 10},
    "execution": {"backend": "ray_train", "resources": {"workers": 1, "cpus_per_worker": 1},
                  "trials_per_group": 100, "max_concurrent": 1},
}
ORDERS = {
    "grid order": lambda trials: trials,
    "α-major order": lambda trials: sorted(trials, key=lambda t: (t.model.name, t.rank, t.alpha, t.seed)),
}


def with_early_stop(data: dict, enabled: bool) -> dict:
    return {**data, "training": {**data["training"], "early_stop": {**EARLY_STOP, "enabled": enabled}}}


def run_simulated(spec: StudySpec, directory: Path, order) -> pd.DataFrame:
    store = results.Store(directory)
    store.write("spec.yaml", dump(spec).encode())
    trials: list[TrialConfig] = order(expand(spec))
    run_group(GroupSpec(trials=tuple(t.to_dict() for t in trials), results_dir=str(directory),
                        cache_dir=str(directory), base_dir=str(directory), backend="simulated", study=spec.name))
    return results.load(directory)


def run_real(data: dict, directory: Path) -> pd.DataFrame:
    path = directory / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    subprocess.run([sys.executable, "-m", "scaling_lab.study", "run", str(path)], cwd=directory, check=True)
    return results.load(directory / "results" / data["name"])


def compare(label: str, without: pd.DataFrame, with_: pd.DataFrame, fit_without: StudyFit, fit_with: StudyFit) -> float:
    steps_without, steps_with = int(without["steps"].sum()), int(with_["steps"].sum())
    pruned = int((with_["status"] == "pruned").sum())
    print(f"{label}: {len(with_)} trials, {pruned} pruned; training steps {steps_without} → {steps_with} "
          f"({1 - steps_with / steps_without:.1%} saved)")
    shifts = []
    for before, after in zip(fit_without.alpha_cells, fit_with.alpha_cells, strict=True):
        shift = abs(math.log2(after.optimum / before.optimum))
        shifts.append(shift)
        print(f"  r={before.rank:<4} α* {before.optimum:10.4g} → {after.optimum:10.4g}  shift {shift:.2e} octaves  "
              f"95% CI [{before.optimum_low:.4g}, {before.optimum_high:.4g}] → "
              f"[{after.optimum_low:.4g}, {after.optimum_high:.4g}]")
    (law_without,), (law_with,) = (t.law for t in fit_without.alpha_laws), (t.law for t in fit_with.alpha_laws)
    print(f"  largest optimum shift {max(shifts):.2e} octaves; k {law_without.k:.4f} → {law_with.k:.4f}")
    return steps_without / steps_with


def simulated() -> None:
    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, order in ORDERS.items():
            frames = {
                enabled: run_simulated(parse(with_early_stop(SIMULATED_SPEC, enabled)),
                                       Path(tmp) / f"{name}-{enabled}", order)
                for enabled in (False, True)
            }
            fits = {enabled: fit_study(from_frame(frame)) for enabled, frame in frames.items()}
            ratios[name] = compare(f"simulated, {name}", frames[False], frames[True], fits[False], fits[True])
    print(f"α-major order: training steps ratio (without ÷ with early stopping): {ratios['α-major order']:.2f}")
    print(f"grid order: training steps ratio (without ÷ with early stopping): {ratios['grid order']:.2f}")


def real() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        frames, fits = {}, {}
        for enabled in (False, True):
            data = with_early_stop({**REAL_SPEC, "name": f"{REAL_SPEC['name']}-{'on' if enabled else 'off'}"}, enabled)
            frames[enabled] = run_real(data, Path(tmp))
            fits[enabled] = fit_study(load_results(Path(tmp) / "results" / data["name"]))
        ratio = compare("tiny real models, grid order", frames[False], frames[True], fits[False], fits[True])
        wall = frames[False]["train_time_s"].sum() / frames[True]["train_time_s"].sum()
        print(f"training time ratio (without ÷ with early stopping): {wall:.2f}")
    print(f"training steps ratio (without ÷ with early stopping): {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="tiny real models through Ray (minutes)")
    real() if parser.parse_args().real else simulated()


if __name__ == "__main__":
    main()
