"""The published laws of the embedded default study (analysis/default/, an adaptive search) and of its grid
(analysis/default_grid/) are what `fit` gives on their results."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REL_TOL = 1e-9


def laws(path: Path) -> list[dict]:
    document = json.loads(path.read_text())
    return [{k: law[k] for k in ("formula", "c", "c_ci95", "k", "k_ci95", "cells_used")}
            for law in document["laws"] + (document.get("joint_laws") or [])]


def assert_close(fresh, published, where="law.json"):
    """Equal structure and strings; floats equal to a relative tolerance (the last bits differ across machines)."""
    if isinstance(published, float) or isinstance(fresh, float):
        assert math.isclose(fresh, published, rel_tol=REL_TOL, abs_tol=1e-12), f"{where}: {fresh} != {published}"
    elif isinstance(published, dict):
        assert fresh.keys() == published.keys(), where
        for key in published:
            assert_close(fresh[key], published[key], f"{where}.{key}")
    elif isinstance(published, list):
        assert len(fresh) == len(published), where
        for index, (a, b) in enumerate(zip(fresh, published)):
            assert_close(a, b, f"{where}[{index}]")
    else:
        assert fresh == published, f"{where}: {fresh!r} != {published!r}"


@pytest.mark.parametrize("folder", ["analysis/default", "analysis/default_grid"])
def test_published_report_matches_a_fresh_fit(tmp_path, folder):
    published = ROOT / folder
    command = [sys.executable, "-m", "scaling_lab.analysis", "fit", f"{folder}/results", "--by", "model",
               "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_close(laws(tmp_path / "law.json"), laws(published / "law.json"))
    printed = done.stdout.replace(str(tmp_path), folder)
    assert printed == (published / "fit_output.txt").read_text()
    fresh = (tmp_path / "report.md").read_text().replace(str(tmp_path), folder)
    assert without_versions(fresh) == without_versions((published / "report.md").read_text())


def without_versions(report: str) -> str:
    """The report less its line of package versions, which differ between installs, not between fits."""
    return "\n".join(line for line in report.splitlines() if not line.startswith("- versions:"))
