"""The published MiniLM-L6 law (analysis/minilm/) is what `fit` gives on its published rows.

It refits the rows in analysis/minilm/results (it does not regenerate the task, whose rows depend on the Python
version), so it holds on every machine; numbers are compared with a relative tolerance.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "analysis/minilm"
FIT = ["fit", "analysis/minilm/results", "--metric", "final_eval_loss", "--out"]
PLOTS = ("metric_vs_alpha.png", "alpha_vs_rank.png", "residuals.png")
EDGE_FLAGS = {"edge_low", "edge_high", "near_edge_low", "near_edge_high"}


@pytest.fixture(scope="module")
def refit(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm")
    done = subprocess.run([sys.executable, "-m", "scaling_lab.analysis", *FIT, str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads((out / "law.json").read_text())


@pytest.fixture(scope="module")
def published():
    return json.loads((PUBLISHED / "law.json").read_text())


def test_published_report_and_plots_exist():
    for name in ("README.md", "report.md", "law.json", "fit_output.txt", *PLOTS):
        assert (PUBLISHED / name).is_file(), name
    assert "## Closed-loop check" in (PUBLISHED / "README.md").read_text()


def test_published_law_is_what_a_fresh_fit_gives(refit, published):
    assert refit["data"]["rows"] == published["data"]["rows"] and refit["data"]["metric"] == "final_eval_loss"
    assert len(refit["laws"]) == len(published["laws"]) >= 1
    for fresh, shown in zip(refit["laws"], published["laws"]):
        assert fresh["cells_used"] == shown["cells_used"] and fresh["ranks"] == shown["ranks"]
        for name in ("c", "k", "r_squared"):
            assert fresh[name] == pytest.approx(shown[name], rel=1e-6), name
        for name in ("c_ci95", "k_ci95"):
            assert fresh[name] == pytest.approx(shown[name], rel=1e-6), name
        for fresh_rule, shown_rule in zip(fresh["hypotheses"], shown["hypotheses"]):
            assert fresh_rule["rule"] == shown_rule["rule"]
            assert fresh_rule["excluded_by_ci95"] == shown_rule["excluded_by_ci95"]
            assert fresh_rule["held_out_penalty_mean"] == pytest.approx(shown_rule["held_out_penalty_mean"], rel=1e-6)


def test_every_rank_optimum_is_reproduced_and_interior_or_flagged(refit, published):
    assert [(c["rank"], c["flags"]) for c in refit["cells"]] == [(c["rank"], c["flags"]) for c in published["cells"]]
    for fresh, shown in zip(refit["cells"], published["cells"]):
        assert fresh["optimum"] == pytest.approx(shown["optimum"], rel=1e-6)
        assert fresh["optimum_ci95"] == pytest.approx(shown["optimum_ci95"], rel=1e-6)
        grid = shown["grid"]
        interior = grid[0] < shown["optimum"] < grid[-1]
        assert interior or EDGE_FLAGS & set(shown["flags"]), f"rank {shown['rank']}: optimum on the edge, unflagged"


def test_the_report_states_what_law_json_holds(published):
    report = (PUBLISHED / "report.md").read_text()
    for law in published["laws"]:
        assert law["formula"] in report
