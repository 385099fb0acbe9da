"""The published law of the embedded default study (analysis/default/) is what `fit` gives on its results."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "analysis/default"


def laws(path: Path) -> list[tuple]:
    """Each law's text as rendered, and its numbers: summation order and BLAS kernels differ between machines,
    so the same fit agrees to the last bits only on the same machine."""
    return [(law["formula"], law["cells_used"], [law["c"], *law["c_ci95"], law["k"], *law["k_ci95"]])
            for law in json.loads(path.read_text())["laws"]]


def test_published_report_matches_a_fresh_fit(tmp_path):
    command = [sys.executable, "-m", "scaling_lab.analysis", "fit", "analysis/default/results", "--by", "model",
               "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    published = laws(PUBLISHED / "law.json")
    assert laws(tmp_path / "law.json") == [(text, cells, pytest.approx(numbers, rel=1e-9))
                                           for text, cells, numbers in published]
    printed = done.stdout.replace(str(tmp_path), "analysis/default")
    assert printed == (PUBLISHED / "fit_output.txt").read_text()
    fresh = (tmp_path / "report.md").read_text().replace(str(tmp_path), "analysis/default")
    assert without_versions(fresh) == without_versions((PUBLISHED / "report.md").read_text())


def without_versions(report: str) -> str:
    """The report less its line of package versions, which differ between installs, not between fits."""
    return "\n".join(line for line in report.splitlines() if not line.startswith("- versions:"))
