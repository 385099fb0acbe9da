"""python -m scaling_lab.study plan|run|resume|status: run a study spec as a grid of LoRA fine-tunes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from scaling_lab import results, spec as spec_lib
from scaling_lab.study import plan as plan_lib
from scaling_lab.study import progress

DEFAULT_SPEC = "studies/default.yaml"


def _default_spec() -> Path:
    here = Path(DEFAULT_SPEC)
    return here if here.is_file() else Path(__file__).resolve().parents[2] / DEFAULT_SPEC


def _load(args) -> spec_lib.StudySpec:
    spec = spec_lib.load(args.spec or _default_spec(), args.override)
    from scaling_lab.data import validate_data_source

    validate_data_source(spec.data, Path.cwd())
    return spec


def cmd_plan(args) -> None:
    spec = _load(args)
    print(plan_lib.describe(spec, Path.cwd()))


def cmd_run(args) -> None:
    from scaling_lab.grid import expand
    from scaling_lab.study.runner import RunOptions, run

    spec = _load(args)
    options = RunOptions(
        base_dir=Path.cwd(),
        address=args.address,
        cache_dir=Path(args.cache_dir).expanduser() if args.cache_dir else None,
        verbose=args.verbose,
    )
    try:
        run(spec, options)
    finally:
        print(progress.summary(spec.results_dir(options.base_dir), [t.trial_id for t in expand(spec)]))


def cmd_status(args) -> None:
    from scaling_lab.grid import expand

    store = results.Store(args.results)
    if not store.exists("spec.yaml"):
        raise results.ResultsError(f"{store}: no spec.yaml, so not a study results directory")
    spec = spec_lib.build(spec_lib.StudySpec, yaml.safe_load(store.read_bytes("spec.yaml")))
    results_dir = args.results
    trial_ids = [t.trial_id for t in expand(spec)]
    print(f"study {spec.name!r}: " + progress.snapshot(results_dir, trial_ids).line())
    for claim in progress.claims(results_dir):
        print(f"  running {claim['trial_id']} (attempt {claim.get('attempt')}, {claim.get('owner')}, "
              f"since {claim.get('started_at')})")
    for _, row in progress.failures(results_dir).iterrows():
        reason = (row["error"] or "").strip().splitlines()
        print(f"  {row['status']} {row['trial_id']} model={row['model']} r={row['rank']} α={row['alpha']:.4g}: "
              f"{reason[0] if reason else ''}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scaling_lab.study", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in [
        ("plan", cmd_plan, "print the trials, axes and estimated cost; runs nothing"),
        ("run", cmd_run, "run every unfinished trial (finished ones are skipped)"),
        ("resume", cmd_run, "the same as run: continue a study after a crash"),
    ]:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("spec", nargs="?", help=f"study spec YAML (default: the embedded {DEFAULT_SPEC})")
        sub.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                         help="override a spec field, e.g. training.steps=10 (repeatable)")
        sub.set_defaults(func=func)
        if func is cmd_run:
            sub.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
            sub.add_argument("--cache-dir", default=None, help="model cache (default: the spec's cache_dir)")
            sub.add_argument("--verbose", action="store_true", help="show the Ray workers' logs")
    status = commands.add_parser("status", help="done / running / failed / left of a results directory")
    status.add_argument("results")
    status.set_defaults(func=cmd_status)
    args = parser.parse_args(argv)
    from scaling_lab.data import DataError
    from scaling_lab.study.runner import GroupsFailed

    try:
        args.func(args)
    except (spec_lib.SpecError, results.ResultsError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except GroupsFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
