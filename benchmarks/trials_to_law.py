"""Benchmark: trials needed for the law α* = c·r^k, adaptive search against the full grid.

    .venv/bin/python benchmarks/trials_to_law.py [--noise-seeds 20] [--noise 0.002] [--resolution 1]
    .venv/bin/python benchmarks/trials_to_law.py --real      # once, tiny real models through Ray (minutes)

Simulated (default): the simulated trial's loss surface (a parabola in log α around α*(r) = 16·√r, diverging far
above it) over ranks 1…256 and α = 2^0…2^16 (17 values an octave apart) with 2 seeds per point, for several
draws of its seed noise. Each draw runs the full grid and the adaptive search (scaling_lab/search/proposals.py, driven
directly, without Ray), fits both with scaling_lab.analysis and prints the trials each used and its k with 95%
interval. The adaptive search stops at the grid's spacing (--resolution, in octaves), so its optima are located as
finely as the grid's and its k interval is as wide or narrower (the widths are printed). The last line is the
median ratio of trials, grid ÷ adaptive (target ≥ 3).

--real: the same comparison once on tiny real models (studies-like spec below), both through the platform
(`python -m scaling_lab.study run`), in a temporary directory.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from scaling_lab import results
from scaling_lab.analysis import FitSettings, PowerLaw, fit_study, from_frame, load_results
from scaling_lab.grid import TrialConfig, expand
from scaling_lab.search.proposals import next_step
from scaling_lab.search.space import SearchSpace
from scaling_lab.simulated import SEED_NOISE, simulate
from scaling_lab.spec import parse

SIMULATED_SPEC = {
    "name": "trials-to-law",
    "models": [{"name": "xs", "source": "tiny:xs"}],
    "grid": {"ranks": [2**i for i in range(9)], "alphas": {"min": 1, "max": 65536, "num": 17}, "seeds": [0, 1]},
    "training": {"steps": 20, "eval_every": 5},
    "execution": {"backend": "simulated"},
}
REAL_SPEC = {
    "name": "trials-to-law-real",
    "models": [{"name": "tiny-xs", "source": "tiny:xs"}],
    "grid": {"ranks": [1, 2, 4, 8, 16], "alphas": {"min": 16, "max": 65536, "num": 13}, "seeds": [0, 1]},
    "training": {"steps": 80, "batch_size": 32, "seq_len": 32, "eval_every": 20},
    "execution": {"backend": "ray_train", "resources": {"workers": 1, "cpus_per_worker": 1}, "trials_per_group": 64},
}


def row(config: TrialConfig, noise_seed: int, noise: float) -> dict:
    outcome = simulate(config, noise_seed=noise_seed, noise_sd=noise)
    return {
        "trial_id": config.trial_id,
        "model": config.model.name,
        "scaling_rule": config.scaling_rule,
        "learning_rate": config.learning_rate,
        "rank": config.rank,
        "seed": config.seed,
        "alpha": config.alpha,
        "status": outcome.status,
        "final_eval_loss": outcome.final_eval_loss,
    }


def run_adaptive(space: SearchSpace, noise_seed: int, noise: float) -> pd.DataFrame:
    rows: list[dict] = []
    (key,) = space.groups
    while True:
        frame = pd.DataFrame(rows, columns=space.columns)
        cells = space.measured(frame)[key]
        step = next_step(cells, space.lattice, space.settings)
        if not step:  # every cell done: the edge check
            step = next_step(cells, space.lattice, space.settings, near_edges=space.near_edges(frame)[key])
        if not step:
            return pd.DataFrame(rows)
        rows += [
            row(config, noise_seed, noise)
            for rank, alphas in step.items()
            for alpha in alphas
            for config in space.configs(key, rank, alpha)
        ]


def exponent(frame: pd.DataFrame) -> PowerLaw:
    (tested,) = fit_study(from_frame(frame), FitSettings(n_bootstrap=200)).alpha_laws
    return tested.law


def simulated(noise_seeds: int, noise: float, resolution: float) -> None:
    spec = parse({**SIMULATED_SPEC, "search": {"method": "adaptive", "resolution": resolution}})
    space = SearchSpace(spec)
    grid_configs = expand(spec)
    print(f"ranks {list(spec.grid.ranks)}, α 2^0…2^16 (17 values), {len(spec.grid.seeds)} seeds per point, "
          f"seed noise {noise}, adaptive resolution {resolution} octave; planted k = 0.5")
    print(f"{'noise seed':>10} {'grid':>5} {'adaptive':>8}   {'grid k [95% CI]':<28} "
          f"{'adaptive k [95% CI]':<28} inside")
    ratios, widths, inside_all = [], [], True
    for noise_seed in range(noise_seeds):
        grid = exponent(pd.DataFrame([row(c, noise_seed, noise) for c in grid_configs]))
        adaptive_rows = run_adaptive(space, noise_seed, noise)
        adaptive = exponent(adaptive_rows)
        inside = grid.k_ci[0] <= adaptive.k <= grid.k_ci[1]
        inside_all &= inside
        ratios.append(len(grid_configs) / len(adaptive_rows))
        widths.append((adaptive.k_ci[1] - adaptive.k_ci[0]) / (grid.k_ci[1] - grid.k_ci[0]))
        print(f"{noise_seed:>10} {len(grid_configs):>5} {len(adaptive_rows):>8}   {_k(grid):<28} {_k(adaptive):<28} "
              f"{'yes' if inside else 'NO'}")
    print(f"median width of adaptive's k interval ÷ the grid's: {statistics.median(widths):.2f} "
          f"(max {max(widths):.2f})")
    print(f"adaptive k inside the grid's 95% interval in every noise seed: {'yes' if inside_all else 'NO'}")
    print(f"median trials ratio (grid ÷ adaptive): {statistics.median(ratios):.2f}")


def _k(law: PowerLaw) -> str:
    return f"{law.k:.3f} [{law.k_ci[0]:.3f}, {law.k_ci[1]:.3f}]"


def real() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        laws, counts = {}, {}
        for method in ("grid", "adaptive"):
            spec = {**REAL_SPEC, "name": f"{REAL_SPEC['name']}-{method}", "search": {"method": method}}
            if method == "adaptive":
                spec["search"]["resolution"] = 1.0
            path = Path(tmp) / f"{method}.yaml"
            path.write_text(yaml.safe_dump(spec))
            subprocess.run([sys.executable, "-m", "scaling_lab.study", "run", str(path)], cwd=tmp, check=True)
            results_dir = Path(tmp) / "results" / spec["name"]
            counts[method] = len(results.load(results_dir))
            (tested,) = fit_study(load_results(results_dir)).alpha_laws
            laws[method] = tested.law
            print(f"{method}: {counts[method]} trials, k = " + (_k(tested.law) if isinstance(tested.law, PowerLaw)
                                                                 else f"no law ({tested.law.reason})"))
    print(f"trials ratio (grid ÷ adaptive): {counts['grid'] / counts['adaptive']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise-seeds", type=int, default=20, help="draws of the simulated seed noise")
    parser.add_argument("--noise", type=float, default=SEED_NOISE, help="standard deviation of the seed noise")
    parser.add_argument("--resolution", type=float, default=1.0, help="adaptive resolution in octaves")
    parser.add_argument("--real", action="store_true", help="run once on tiny real models through the platform")
    args = parser.parse_args()
    if args.real:
        real()
    else:
        simulated(args.noise_seeds, args.noise, args.resolution)


if __name__ == "__main__":
    main()
