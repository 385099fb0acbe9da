"""Training diagnostics in the analysis: per-trial summaries of the curve table, means over seeds, the figure."""

import math
import shutil

import numpy as np
import pytest

from scaling_lab import results
from scaling_lab.analysis import FitSettings, fit_study, load_results
from scaling_lab.analysis.__main__ import main

RANKS, ALPHAS, SEEDS = (1, 4), (8.0, 32.0, 128.0, 512.0), (0, 1)
LOGGED = (10, 20, 30, 40)  # diagnostic steps after step 1


def curve(alpha: float, seed: int) -> list[dict]:
    """Signal α·k at step k, drift ratio 0.1, update norm α·(1 + seed): step 1 is off by orders of magnitude,
    so that counting it shows; the last step is non-finite for one α, as a diverging step's would be."""
    points = [{"step": 0, "tokens": 0, "eval_loss": 2.0}]
    for step in range(1, 41):
        point = {"step": step, "tokens": 64 * step, "learning_rate": 1e-3, "train_loss": 2.0 - step / 100}
        if step == 1:
            point.update(signal=1e6, drift=1e6, drift_ratio=1.0, update_norm=0.0)
        elif step in LOGGED:
            drift = math.inf if (alpha == 512.0 and step == 40) else 0.1 * alpha * step
            point.update(
                signal=alpha * step, drift=drift, drift_ratio=drift / (alpha * step), update_norm=alpha * (1 + seed)
            )
        points.append(point)
    return points


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("diagnostics")
    for rank in RANKS:
        for alpha in ALPHAS:
            for seed in SEEDS:
                row = {
                    "trial_id": f"r{rank}a{alpha:g}s{seed}",
                    "model": "tiny",
                    "model_params": 90_000,
                    "rank": rank,
                    "alpha": alpha,
                    "learning_rate": 1e-3,
                    "seed": seed,
                    "scaling_rule": "standard",
                    "effective_scale": alpha / rank,
                    "status": "ok",
                    "final_eval_loss": 1.0 + 0.01 * (math.log2(alpha) - 5 - 0.5 * math.log2(rank)) ** 2 + 0.001 * seed,
                    "spectral_ratio_mean": 0.01 * alpha / rank,
                }
                results.write_trial(root, row, curve(alpha, seed))
    # A trial from before the diagnostics existed: its curve has none of their columns.
    old = {"trial_id": "old", "model": "tiny", "rank": 4, "alpha": 32.0, "learning_rate": 1e-3, "seed": 2}
    results.write_trial(root, {**old, "status": "ok", "final_eval_loss": 1.0}, [{"step": 1, "train_loss": 2.0}])
    return root


def test_each_trial_is_summarised_over_its_steps_after_step_one(study_dir):
    trials = load_results(study_dir, diagnostics=True).trials.set_index("trial_id")
    first = trials.loc["r4a32s1"]
    assert first["signal"] == pytest.approx(32.0 * np.mean(LOGGED))
    assert first["signal_early"] == pytest.approx(32.0 * LOGGED[0])
    assert first["drift_ratio"] == pytest.approx(0.1) and first["drift_ratio_early"] == pytest.approx(0.1)
    assert first["update_norm"] == pytest.approx(64.0) and first["spectral_ratio_mean"] == pytest.approx(0.08)
    # The non-finite last step is left out, not propagated.
    assert trials.loc["r1a512s0", "signal"] == pytest.approx(512.0 * np.mean(LOGGED[:-1]))
    assert math.isnan(trials.loc["old", "signal"])
    assert "signal" not in load_results(study_dir).trials


def test_means_over_seeds_per_rank_and_alpha(study_dir):
    fit = fit_study(load_results(study_dir, diagnostics=True), FitSettings(n_bootstrap=50))
    table = fit.diagnostics.set_index(["rank", "alpha"])
    assert len(table) == len(RANKS) * len(ALPHAS)
    assert table.loc[(1, 8.0), "update_norm"] == pytest.approx(8.0 * 1.5)  # seeds 0 and 1: α·1 and α·2
    assert table.loc[(4, 32.0), "n_trials"] == 3  # the old trial counts, without diagnostics
    assert table.loc[(4, 32.0), "signal"] == pytest.approx(32.0 * np.mean(LOGGED))
    assert fit_study(load_results(study_dir), FitSettings(n_bootstrap=50)).diagnostics is None


def test_fit_draws_the_diagnostics_figure_and_explains_it(study_dir, tmp_path, capsys):
    assert main(["fit", str(study_dir), "--bootstrap", "50", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    report = (tmp_path / "report.md").read_text()
    assert "## Training diagnostics" in report and "](diagnostics_vs_alpha.png)" in report
    assert "summed drift over summed signal" in report
    assert (tmp_path / "diagnostics_vs_alpha.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_files_and_directories_without_curves_have_no_diagnostics(study_dir, tmp_path):
    frame = results.load(study_dir)
    frame.to_parquet(tmp_path / "rows.parquet")
    assert "signal" not in load_results(tmp_path / "rows.parquet", diagnostics=True).trials
    rows_only = tmp_path / "rows_only"
    shutil.copytree(study_dir / "trials", rows_only / "trials")
    loaded = load_results(rows_only, diagnostics=True)
    assert "signal" not in loaded.trials and fit_study(loaded, FitSettings(n_bootstrap=20)).diagnostics is None
