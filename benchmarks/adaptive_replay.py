"""Replay the adaptive search on the published grid's rows: what a search setting would cost in trial seconds and
what k intervals `fit` would give, in seconds instead of a real study.

Each (model, rank, seed) curve of analysis/default_grid/results is interpolated over log2 α (a cubic spline through the
finite grid points, straight on past the last one); an α beyond the midpoint between a seed's last finite and first
diverged grid point diverges. Off the grid's α, the interpolated loss gets Gaussian noise of the trial-to-trial
size measured in those rows (`--noise`), drawn per noise seed. A finite trial costs its cell's mean finite trial
time in the rows, a diverged one its cell's mean diverged time (trial time does not depend on α otherwise). The
search runs step by step (proposals.next_step, with its edge check: the asynchronous search proposes the same
trials), its rows go through `fit` (200 bootstrap resamples unless --bootstrap), and the grid's own rows through the
same fit; each run prints the cells `fit` left out of a law as near an edge. Last line: median ratio of adaptive to
grid trial time over the noise seeds.

    python benchmarks/adaptive_replay.py [--override search.resolution=1.5 ...] [--noise-seeds 5]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.interpolate import CubicSpline

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scaling_lab import results, spec as spec_lib  # noqa: E402
from scaling_lab.analysis import FitSettings, fit_study, from_frame  # noqa: E402
from scaling_lab.search.proposals import next_step  # noqa: E402
from scaling_lab.search.space import SearchSpace  # noqa: E402

PUBLISHED = ROOT / "analysis/default_grid/results"


class Replay:
    """The published rows as curves over log2 α, one per (model, rank, seed), with trial times per cell."""

    def __init__(self, rows: pd.DataFrame, noise: float, noise_seed: int):
        self.noise, self.noise_seed = noise, noise_seed
        self.templates, self.curves, self.edges, self.grid_x = {}, {}, {}, {}
        self.finite_s, self.diverged_s = {}, {}
        default_diverged_s = float(rows.loc[rows.status != "ok", "wall_time_s"].mean())
        for (model, rank, seed), group in rows.groupby(["model", "rank", "seed"]):
            group = group.assign(x=np.log2(group["alpha"])).sort_values("x")
            finite = group[group.status == "ok"]
            first_diverged = group.loc[(group.status != "ok") & (group.x > finite.x.max()), "x"]
            self.templates[model, rank, seed] = group.iloc[0].to_dict()
            self.curves[model, rank, seed] = CubicSpline(finite.x, finite.final_eval_loss)
            self.edges[model, rank, seed] = (finite.x.max() + first_diverged.min()) / 2 if len(first_diverged) else 99
            self.grid_x[model, rank, seed] = set(np.round(group.x, 3))
        for (model, rank), group in rows.groupby(["model", "rank"]):
            self.finite_s[model, rank] = float(group.loc[group.status == "ok", "wall_time_s"].mean())
            diverged = group.loc[group.status != "ok", "wall_time_s"]
            self.diverged_s[model, rank] = float(diverged.mean()) if len(diverged) else default_diverged_s

    def row(self, model: str, rank: int, seed: int, alpha: float, trial_id: str) -> dict:
        key, x = (model, rank, seed), math.log2(alpha)
        row = {**self.templates[key], "trial_id": trial_id, "alpha": alpha, "peft_lora_alpha": alpha,
               "effective_scale": alpha / rank}
        if x > self.edges[key]:
            diverged_s = self.diverged_s[model, rank]
            return {**row, "status": "diverged", "final_eval_loss": math.nan, "wall_time_s": diverged_s}
        loss = float(self.curves[key](x))
        if round(x, 3) not in self.grid_x[key]:
            digest = hashlib.sha256(f"{self.noise_seed} {model} {rank} {seed} {x:.4f}".encode()).digest()
            loss += self.noise * float(np.random.default_rng(int.from_bytes(digest[:8], "little")).normal())
        return {**row, "status": "ok", "final_eval_loss": loss, "wall_time_s": self.finite_s[model, rank]}


def run_search(space: SearchSpace, replay: Replay) -> pd.DataFrame:
    rows: list[dict] = []
    for key in space.groups:
        while True:
            frame = pd.DataFrame(rows, columns=space.columns + ["wall_time_s"])
            cells, incomplete = space.measured_seeds(frame)
            step = next_step(cells[key], space.lattice, space.settings, incomplete[key])
            if not step:  # every cell done: the edge check
                near_edges = space.near_edges(frame)[key]
                step = next_step(cells[key], space.lattice, space.settings, incomplete[key], near_edges)
            done = {row["trial_id"] for row in rows}
            todo = [c for rank, alphas in step.items() for alpha in alphas
                    for c in space.configs(key, rank, alpha, cells[key][rank]) if c.trial_id not in done]
            if not todo:
                break
            rows += [replay.row(c.model.name, c.rank, c.seed, c.alpha, c.trial_id) for c in todo]
    return pd.DataFrame(rows)


def laws(frame: pd.DataFrame, n_bootstrap: int = 200) -> tuple[dict[str, tuple[float, float, float]], dict[str, int]]:
    """k and its 95% interval of every law `fit --by model` finds: per model, and joint; and per model, the cells
    left out of its law as near an edge (near_edge_low, near_edge_high)."""
    study = fit_study(from_frame(frame), FitSettings(by_model=True, n_bootstrap=n_bootstrap))
    found = {}
    for tested in [*study.alpha_laws, *study.joint_laws]:
        law = tested.law
        if hasattr(law, "k_ci"):
            found[dict(law.group).get("model", "joint")] = (law.k, *law.k_ci)
    near_edge = {cell.model: 0 for cell in study.alpha_cells}
    for cell in study.alpha_cells:
        near_edge[cell.model] += any(flag.startswith("near_edge") for flag in cell.flags)
    return found, near_edge


def dense_grid(replay: Replay, space: SearchSpace) -> pd.DataFrame:
    """The replayed curves on a grid 1/4 octave apart over the whole α range, every seed: the k they imply."""
    xs = np.arange(space.lattice.low, space.lattice.high + 1e-9, 0.25)
    return pd.DataFrame([replay.row(c.model.name, c.rank, c.seed, float(2**x), c.trial_id)
                         for key in space.groups for rank in space.templates[key] for x in xs
                         for c in space.configs(key, rank, float(2**x))])


def per_rank(frame: pd.DataFrame) -> str:
    counts = frame.groupby(["model", "rank"]).alpha.nunique()
    return " ".join(f"{model[5:]}{rank}:{n}" for (model, rank), n in counts.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--override", action="append", default=[], help="a spec override (repeatable)")
    parser.add_argument("--noise-seeds", type=int, default=5)
    parser.add_argument("--bootstrap", type=int, default=200, help="fit's bootstrap resamples (fit's own: 1000)")
    parser.add_argument("--noise", type=float, default=0.0054, help="loss noise off the grid's α (one trial's sd)")
    args = parser.parse_args()
    grid_rows = results.load(PUBLISHED)
    spec = spec_lib.load(ROOT / "studies/default.yaml", ["search.method=adaptive", *args.override])
    space = SearchSpace(spec)
    grid_s = float(grid_rows.wall_time_s.sum())
    grid_laws, grid_near_edge = laws(grid_rows, args.bootstrap)
    dense_laws, _ = laws(dense_grid(Replay(grid_rows, 0.0, 0), space), args.bootstrap)
    print(f"grid: {len(grid_rows)} trials, {grid_s:.0f} s; k " + _ks(grid_laws) + "; " + _near(grid_near_edge))
    print("dense noiseless grid of the replayed curves (what the replay's k is): k " + _ks(dense_laws))
    ratios, covered, widths = [], {name: 0 for name in dense_laws}, {name: [] for name in dense_laws}
    near_edge_total = {name: 0 for name in grid_near_edge}
    for noise_seed in range(args.noise_seeds):
        frame = run_search(space, Replay(grid_rows, args.noise, noise_seed))
        found, near_edge = laws(frame, args.bootstrap)
        trial_s = float(frame.wall_time_s.sum())
        ratios.append(trial_s / grid_s)
        wider = [name for name, (_, low, high) in found.items() if high - low > grid_laws[name][2] - grid_laws[name][1]]
        for name, (_, low, high) in found.items():
            covered[name] += low <= dense_laws[name][0] <= high
            widths[name].append(high - low)
        diverged = int((frame.status != "ok").sum())
        print(f"noise seed {noise_seed}: {len(frame)} trials ({diverged} diverged), {trial_s:.0f} s "
              f"({trial_s / grid_s:.3f}); k {_ks(found)}" + (f"; WIDER: {', '.join(wider)}" if wider else "")
              + f"; {_near(near_edge)}; α per cell {per_rank(frame)}", flush=True)
        near_edge_total = {name: n + near_edge.get(name, 0) for name, n in near_edge_total.items()}
    print("the dense grid's k inside the search's interval: "
          + ", ".join(f"{name} {n}/{args.noise_seeds}" for name, n in covered.items()))
    print("median k interval width: " + ", ".join(f"{name} {statistics.median(w):.3f}" for name, w in widths.items()))
    print("cells left out as near an edge, over the noise seeds: " + _near(near_edge_total))
    print(f"median adaptive ÷ grid trial time: {statistics.median(ratios):.3f}")


def _near(near_edge: dict[str, int]) -> str:
    return "near-edge cells " + ", ".join(f"{name} {n}" for name, n in near_edge.items())


def _ks(found: dict[str, tuple[float, float, float]]) -> str:
    return ", ".join(f"{name} {k:.3f} [{low:.3f}, {high:.3f}] (width {high - low:.3f})"
                     for name, (k, low, high) in found.items())


if __name__ == "__main__":
    main()
