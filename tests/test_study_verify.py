"""Tier 2: `study verify` on local Ray with the simulated trial (α* = 16·√r planted): a held-out rank and a new one."""

import json
from pathlib import Path

import pytest
import yaml

from scaling_lab import results
from scaling_lab.study.verify import bracket_trials, load_study, rule_alpha
from simulated_cluster import study

SPEC = {
    "name": "sim",
    "models": [{"name": "xs", "source": "tiny:xs"}],
    "grid": {"ranks": [1, 4, 16], "alphas": {"min": 1, "max": 4096, "num": 13}, "seeds": [0, 1]},
    "training": {"steps": 20, "eval_every": 5},
    "execution": {"backend": "simulated", "trials_per_group": 100},
}


def write_spec(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_rule_alpha_converts_the_convention_to_the_trials_rule():
    assert rule_alpha(64.0, 16, "standard", "standard") == 64.0
    assert rule_alpha(64.0, 16, "standard", "rslora") == 16.0  # the same scale 4 as α/√r
    assert rule_alpha(64.0, 16, "standard", "fixed") == 4.0
    assert rule_alpha(4.0, 16, "scale", "standard") == 64.0


@pytest.mark.ray
def test_verify_held_out_and_at_a_new_rank(tmp_path):
    spec_path = write_spec(tmp_path, SPEC)
    assert study("run", str(spec_path), cwd=tmp_path).returncode == 0
    results_dir = tmp_path / "results/sim"
    spec_before = (results_dir / "spec.yaml").read_text()
    rows_before = results.completed_ids(results_dir)

    held_out = study("verify", "results/sim", cwd=tmp_path)
    assert held_out.returncode == 0, held_out.stderr
    assert "xs · rank 16 (held out) · consistent" in held_out.stdout
    assert results.completed_ids(results_dir) == rows_before  # no new trials

    new_rank = study("verify", "results/sim", "--rank", "64", cwd=tmp_path)
    assert new_rank.returncode == 0, new_rank.stderr
    assert "10 of 10 trials to run" in new_rank.stdout and "xs · rank 64 (new rank) · consistent" in new_rank.stdout
    added = results.completed_ids(results_dir) - rows_before
    rows = results.load(results_dir)
    assert len(added) == 10 and set(rows[rows["trial_id"].isin(added)]["rank"]) == {64}
    assert (results_dir / "spec.yaml").read_text() == spec_before

    law = json.loads((results_dir / "analysis/law.json").read_text())
    checks = {(entry["mode"], entry["rank"]): entry for entry in law["verification"]}
    at_64 = checks[("new_rank", 64)]
    assert at_64["fitted_on_ranks"] == [1, 4, 16] and at_64["intervals_overlap"]
    assert at_64["measured_ci95"][0] <= 16 * 8 <= at_64["measured_ci95"][1]
    assert at_64["predicted"] == pytest.approx(16 * 8, rel=0.1) and 0 <= at_64["regret_at_predicted_alpha"] < 1e-3
    assert len(at_64["measured_alphas"]) == 5 and at_64["verdict"] == "consistent"
    assert {r["rule"] for r in at_64["rules_of_thumb"]} == {"fixed α", "√r law", "α ∝ r"}
    assert checks[("held_out", 16)]["fitted_on_ranks"] == [1, 4]
    report = (results_dir / "analysis/report.md").read_text()
    assert "## Verification out of sample" in report and "| new rank | 64 |" in report

    again = study("verify", "results/sim", "--rank", "64", cwd=tmp_path)
    assert again.returncode == 0 and "all 10 trials are finished" in again.stdout
    status = study("status", "results/sim", cwd=tmp_path)
    assert "78/78 done" in status.stdout and "10 finished trials are not in the current grid" in status.stdout
    rerun = study("run", str(spec_path), cwd=tmp_path)
    assert rerun.returncode == 0 and "nothing to run" in rerun.stdout


def test_verify_refuses_bad_input_before_any_compute(tmp_path):
    results_dir = tmp_path / "results/sim"
    results_dir.mkdir(parents=True)
    (results_dir / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    unknown = study("verify", "results/sim", "--model", "huge", cwd=tmp_path)
    assert unknown.returncode == 2 and "--model 'huge': not a model of study 'sim' (models: xs)" in unknown.stderr
    bad_rank = study("verify", "results/sim", "--rank", "0", cwd=tmp_path)
    assert bad_rank.returncode == 2 and "--rank: expected a positive integer, got 0" in bad_rank.stderr
    no_spec = study("verify", str(tmp_path), cwd=tmp_path)
    assert no_spec.returncode == 2 and "no spec.yaml" in no_spec.stderr


def test_bracket_trials_are_the_study_grid_at_the_new_rank(tmp_path):
    from scaling_lab.analysis import FitSettings, from_frame
    from scaling_lab.analysis.planted import planted_trials, power_law
    from scaling_lab.analysis.verification import fit_without_rank, law_groups

    results_dir = tmp_path / "results/sim"
    results_dir.mkdir(parents=True)
    rslora = {**SPEC, "grid": {**SPEC["grid"], "scaling_rules": ["rslora"]}}
    (results_dir / "spec.yaml").write_text(yaml.safe_dump(rslora))
    spec = load_study(str(results_dir))
    assert spec.output_dir == str(results_dir.resolve())
    frame = planted_trials(power_law(16.0, 0.5), ranks=(1, 4, 16), seeds=2, models={"xs": 1e5})
    fit = fit_without_rank(from_frame(frame), 64, FitSettings(n_bootstrap=50, by_model=True))
    trials = bracket_trials(spec, [t.law for t in law_groups(fit)], 64, "standard", None, 5)
    assert len(trials) == 10 and {t.rank for t in trials} == {64} and {t.scaling_rule for t in trials} == {"rslora"}
    assert {t.seed for t in trials} == {0, 1} and all(t.training.steps == 20 for t in trials)
    scales = sorted({round(t.effective_scale, 3) for t in trials})
    assert scales[2] == pytest.approx(16.0 * 8 / 64, rel=0.05)  # the middle of the bracket: the predicted scale
