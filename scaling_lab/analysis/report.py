"""A fit's outputs written into one folder: law.json, the plots and report.md."""

from __future__ import annotations

import json
from pathlib import Path

from scaling_lab.analysis import verification
from scaling_lab.analysis.fit import StudyFit
from scaling_lab.analysis.law_json import law_document
from scaling_lab.analysis.markdown_report import format_markdown


def write_outputs(fit: StudyFit, out_dir: Path) -> list[Path]:
    """Write law.json, the plots and report.md into `out_dir`; returns the paths written."""
    from scaling_lab.analysis.plots import write_plots

    out_dir.mkdir(parents=True, exist_ok=True)
    law_path = out_dir / "law.json"
    document = law_document(fit)
    verified = _earlier_verification(law_path)  # written by `study verify`: a refit keeps it
    if verified:
        document["verification"] = verified
    law_path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    plots = write_plots(fit, out_dir)
    report_path = out_dir / "report.md"
    report = format_markdown(fit, [p.name for p in plots])
    report_path.write_text(verification.with_section(report, verification.markdown(verified)) if verified else report)
    return [law_path, report_path, *plots]


def _earlier_verification(law_path: Path) -> list[dict]:
    try:
        return json.loads(law_path.read_text()).get("verification") or []
    except (OSError, ValueError, AttributeError):
        return []
