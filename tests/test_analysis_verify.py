"""Checking a law out of sample on planted data: held-out ranks, the bracket at a new rank, law.json and report.md."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from scaling_lab.analysis import AnalysisError, FitSettings, fit_study, from_frame
from scaling_lab.analysis.planted import planted_trials, power_law
from scaling_lab.analysis.powerlaw import Prediction
from scaling_lab.analysis.report import write_outputs
from scaling_lab.analysis.verification import bracket, record, verify_at_rank, without_rank

RANKS = (1, 2, 4, 8, 16, 32, 64)
ALPHAS = tuple(2.0 ** np.arange(0, 14, 0.5))
SETTINGS = FitSettings(n_bootstrap=200)


def bent(rank, size):
    """√r up to rank 32, then α* falls: a law that holds on ranks 1-32 and fails at 64."""
    return 16.0 * np.minimum(rank, 32) ** 0.5 / np.where(rank > 32, rank / 32, 1.0)


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_held_out_rank_of_a_planted_law_is_predicted_inside_the_measured_interval(seed):
    frame = planted_trials(power_law(16.0, 0.5), ranks=RANKS, alphas=ALPHAS, seeds=3, noise=0.002,
                           rng=np.random.default_rng(seed))
    (check,) = verify_at_rank(from_frame(frame), 64, SETTINGS, mode="held_out")
    assert check.fit_ranks == RANKS[:-1] and check.rank == 64
    assert check.measured_ci[0] <= check.predicted <= check.measured_ci[1]
    assert check.predicted_ci[0] <= 16.0 * 8 <= check.predicted_ci[1]
    assert check.verdict == "consistent" and check.overlap
    assert 0 <= check.regret < 0.002
    rules = {rule.name: rule for rule in check.rules}
    assert rules["√r law"].regret < rules["fixed α"].regret and rules["√r law"].regret < rules["α ∝ r"].regret
    assert rules["fixed α"].regret > 0.01


def test_a_law_that_bends_at_the_held_out_rank_is_flagged():
    frame = planted_trials(bent, ranks=RANKS, alphas=ALPHAS, seeds=3, noise=0.002, rng=np.random.default_rng(3))
    (check,) = verify_at_rank(from_frame(frame), 64, SETTINGS, mode="held_out")
    assert check.verdict == "missed" and check.overlap is False
    assert "above the measured optimum" in check.reason
    assert check.measured == pytest.approx(bent(np.array(64), 0), rel=0.15)
    assert check.regret > 0.02


def test_rows_at_the_verified_rank_never_enter_its_fit():
    frame = planted_trials(power_law(16.0, 0.5), ranks=RANKS, alphas=ALPHAS, seeds=2, rng=np.random.default_rng(1))
    loaded = from_frame(frame)
    (first,) = verify_at_rank(loaded, 64, SETTINGS, mode="held_out")
    extra = planted_trials(power_law(1.0, 0.0), ranks=(64,), alphas=ALPHAS, seeds=2, rng=np.random.default_rng(2))
    (again,) = verify_at_rank(from_frame(pd.concat([frame, extra], ignore_index=True)), 64, SETTINGS, mode="held_out")
    assert again.predicted == pytest.approx(first.predicted, rel=1e-12)
    assert 64 not in set(without_rank(loaded, 64).trials["rank"])


def test_nothing_measured_or_no_law_is_said_so():
    frame = planted_trials(power_law(16.0, 0.5), ranks=(1, 4, 16), alphas=ALPHAS, seeds=2)
    (check,) = verify_at_rank(from_frame(frame), 128, SETTINGS, mode="new_rank")
    assert check.verdict == "not_verified" and check.reason == "nothing measured at rank 128"
    assert check.predicted is not None
    (no_law,) = verify_at_rank(from_frame(frame[frame["rank"] != 4]), 16, SETTINGS, mode="held_out")
    assert no_law.verdict == "not_verified" and "no law without rank 16" in no_law.reason


def test_bracket_spans_the_predicted_interval_at_half_octave_steps_at_least():
    wide = bracket(Prediction(100.0, 50.0, 180.0, ()))
    assert len(wide) == 5 and wide[2] == 100.0 and wide[0] < 50.0 and wide[-1] > 180.0
    narrow = bracket(Prediction(100.0, 98.0, 103.0, ()))
    assert narrow == pytest.approx([50.0, 70.71, 100.0, 141.4, 200.0], rel=1e-3)
    assert all(b / a == pytest.approx(math.sqrt(2), rel=1e-3) for a, b in zip(narrow, narrow[1:]))


def test_record_writes_law_json_and_report_and_a_refit_keeps_them(tmp_path):
    frame = planted_trials(power_law(16.0, 0.5), ranks=RANKS, alphas=ALPHAS, seeds=2, rng=np.random.default_rng(1))
    loaded = from_frame(frame)
    write_outputs(fit_study(loaded, SETTINGS), tmp_path)
    held_out = verify_at_rank(loaded, 64, SETTINGS, mode="held_out")
    record(tmp_path, held_out)
    record(tmp_path, verify_at_rank(loaded, 32, SETTINGS, mode="new_rank", fit_ranks=(1, 2, 4, 8, 16)))
    record(tmp_path, held_out)  # the same check again replaces its entry
    entries = json.loads((tmp_path / "law.json").read_text())["verification"]
    assert [(e["mode"], e["rank"]) for e in entries] == [("new_rank", 32), ("held_out", 64)]
    assert entries[1]["prediction_inside_measured_ci"] and entries[1]["fitted_on_ranks"] == [1, 2, 4, 8, 16, 32]
    report = (tmp_path / "report.md").read_text()
    assert report.count("## Verification out of sample") == 1 and "| held out | 64 |" in report

    write_outputs(fit_study(loaded, SETTINGS), tmp_path)
    assert json.loads((tmp_path / "law.json").read_text())["verification"] == entries
    assert (tmp_path / "report.md").read_text().count("| held out | 64 |") == 1


def test_models_are_verified_one_law_each():
    frame = planted_trials(power_law(16.0, 0.5, m=0.25), ranks=(1, 4, 16, 64), alphas=ALPHAS, seeds=2,
                           models={"a": 1e5, "b": 8e5}, rng=np.random.default_rng(1))
    checks = verify_at_rank(from_frame(frame), 64, FitSettings(n_bootstrap=100, by_model=True), mode="held_out")
    assert [c.model for c in checks] == ["a", "b"] and all(c.verdict == "consistent" for c in checks)
    assert [c.measured for c in checks] == pytest.approx([16 * 8 * 0.1**0.25, 16 * 8 * 0.8**0.25], rel=0.1)
    with pytest.raises(AnalysisError, match="verify laws by model"):
        verify_at_rank(from_frame(frame), 64, FitSettings(n_bootstrap=100), mode="held_out")
