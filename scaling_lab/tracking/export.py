"""python -m scaling_lab.results export RESULTS --to mlflow|tensorboard|wandb: a study's results in a tracker.

python -m scaling_lab.results export results/default --to mlflow --tracking-uri sqlite:///mlflow.db
python -m scaling_lab.results export results/default --to tensorboard --logdir runs
python -m scaling_lab.results export results/default --to wandb      # offline files unless logged in

One run per trial, and a study-level run with the analysis (law.json, report.md, plots) as artifacts. Exporting
again adds the trials that finished since and leaves the others alone.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import yaml

from scaling_lab import results
from scaling_lab.tracking import TRACKERS, TrackingError, open_tracker
from scaling_lab.tracking.layout import StudyRecord, trial_record

ANALYSIS_SUFFIXES = (".json", ".md", ".png", ".txt")
ANALYSIS_FOLDER = "analysis"


def study_name(store: results.Store, rows: list[dict]) -> str:
    if store.exists("spec.yaml"):
        spec = yaml.safe_load(store.read_bytes("spec.yaml"))
        if isinstance(spec, dict) and isinstance(spec.get("name"), str):
            return spec["name"]
    names = {row["study"] for row in rows if row.get("study")}
    if len(names) == 1:
        return names.pop()
    return Path(store.root).name


def analysis_files(store: results.Store, analysis: str | None) -> dict[str, bytes]:
    """The study's analysis outputs: from --analysis, else <results>/analysis, else the folder that holds a local
    results directory when it has a law.json (the layout of the published analysis/default/results)."""
    if analysis is not None:
        folder = Path(analysis)
        if not (folder / "law.json").is_file():
            raise results.ResultsError(f"{analysis}: no law.json, so not an analysis folder "
                                       f"(python -m scaling_lab.analysis fit writes one)")
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in ANALYSIS_SUFFIXES}
    if store.exists(f"{ANALYSIS_FOLDER}/law.json"):
        return {name: store.read_bytes(f"{ANALYSIS_FOLDER}/{name}")
                for suffix in ANALYSIS_SUFFIXES for name in store.list(ANALYSIS_FOLDER, suffix)}
    parent = Path(store.root).parent
    if store.local and (parent / "law.json").is_file():
        return {p.name: p.read_bytes() for p in sorted(parent.iterdir())
                if p.is_file() and p.suffix in ANALYSIS_SUFFIXES}
    return {}


def read_study(source: str, analysis: str | None = None) -> tuple[StudyRecord, list[dict], results.Store]:
    store = results.Store(source)
    if not store.is_dir():
        raise results.ResultsError(f"{source}: no such results directory")
    rows = results.read_trials(store).to_pylist()
    artifacts = analysis_files(store, analysis)
    if store.exists("spec.yaml"):
        artifacts.setdefault("spec.yaml", store.read_bytes("spec.yaml"))
    statuses = Counter(row["status"] for row in rows)
    study = StudyRecord(name=study_name(store, rows), source=str(store), trials=len(rows),
                        statuses=dict(sorted(statuses.items())), artifacts=artifacts)
    return study, rows, store


def curve_of(store: results.Store, trial_id: str) -> list[dict]:
    relative = f"{results.CURVES}/{trial_id}.parquet"
    return store.read_table(relative).to_pylist() if store.exists(relative) else []


def export(tracker, study: StudyRecord, rows: list[dict], store: results.Store) -> Counter:
    """Every trial of the study, then the study-level run; returns how many trials were logged, replaced or left
    unchanged."""
    outcomes = Counter()
    tracker.start_study(study)
    for row in rows:
        outcomes[tracker.log_trial(trial_record(row, curve_of(store, row["trial_id"])))] += 1
    tracker.finish_study(study)
    tracker.close()
    return outcomes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scaling_lab.results", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("export", help="log a study's trials and analysis to experiment trackers")
    command.add_argument("results", help="a results directory (local path or s3://, gs:// URI)")
    command.add_argument("--to", action="append", choices=TRACKERS, required=True,
                         help="the tracker (repeatable)")
    command.add_argument("--tracking-uri", help="MLflow tracking URI, e.g. sqlite:///mlflow.db or http://host:5000 "
                                                "(default: MLFLOW_TRACKING_URI)")
    command.add_argument("--logdir", help="TensorBoard log directory (runs go to LOGDIR/<study>/)")
    command.add_argument("--project", help="W&B project (default: the study's name)")
    command.add_argument("--wandb-dir", default=".", help="where W&B keeps offline runs, DIR/wandb (default: .)")
    command.add_argument("--analysis", help="the analysis folder with law.json, report.md and plots (default: "
                                            "RESULTS/analysis, or the folder holding RESULTS if it has a law.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    args = build_parser().parse_args(argv)
    try:
        study, rows, store = read_study(args.results, args.analysis)
        tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        trackers = [open_tracker(name, study.name, tracking_uri=tracking_uri, logdir=args.logdir, project=args.project,
                                 wandb_dir=args.wandb_dir, base_dir=Path.cwd())
                    for name in dict.fromkeys(args.to)]
        for tracker in trackers:
            outcomes = export(tracker, study, rows, store)
            print(f"{tracker.name}: {study.trials} trials of {study.name!r}: {outcomes['logged']} logged, "
                  f"{outcomes['replaced']} replaced (run again since), {outcomes['unchanged']} already there; "
                  f"study run with {len(study.artifacts)} artifacts; {tracker.where()}")
    except (results.ResultsError, TrackingError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
