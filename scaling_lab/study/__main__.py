"""python -m scaling_lab.study plan|run|resume|status|submit|verify: run a study spec as a grid of LoRA fine-tunes."""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import yaml

from scaling_lab import claims, results, spec as spec_lib
from scaling_lab.search.space import search_note, study_trial_ids
from scaling_lab.study import plan as plan_lib, progress
from scaling_lab.study.memory_advice import advice_text
from scaling_lab.study.spec_checks import check_deepspeed_config
from scaling_lab.study.submit import cmd_submit

DEFAULT_SPEC = "studies/default.yaml"


def _default_spec() -> Path:
    here = Path(DEFAULT_SPEC)
    return here if here.is_file() else Path(__file__).resolve().parents[2] / DEFAULT_SPEC


def _load(args) -> spec_lib.StudySpec:
    spec = spec_lib.load(args.spec or _default_spec(), args.override)
    from scaling_lab.data import validate_data_source

    validate_data_source(spec.data, Path.cwd())
    check_deepspeed_config(spec)
    return spec


def cmd_plan(args) -> None:
    spec = _load(args)
    print(plan_lib.describe(spec, Path.cwd()))


def cmd_run(args) -> None:
    from scaling_lab.study.runner import GroupsFailed, RunOptions, TrialsFailed, run

    spec = _load(args)
    from scaling_lab.preflight import check as preflight_check

    preflight_check(spec, args.address, Path.cwd())  # before Ray starts: what the trials need is installed
    options = RunOptions(
        base_dir=Path.cwd(),
        address=args.address,
        cache_dir=Path(args.cache_dir).expanduser() if args.cache_dir else None,
        verbose=args.verbose,
        retry_failed=args.retry_failed,
    )
    results_dir = spec.results_dir(options.base_dir)
    try:
        run(spec, options)
    except GroupsFailed:
        print(progress.summary(results_dir, study_trial_ids(spec, results_dir), spec.metric))
        raise
    trial_ids = study_trial_ids(spec, results_dir)
    print(progress.summary(results_dir, trial_ids, spec.metric))
    failed = progress.snapshot(results_dir, trial_ids).failed
    if failed:
        raise TrialsFailed(f"{failed} trials failed (error or oom): `status {results_dir}` says why, and "
                           f"`run --retry-failed` runs them again")


def cmd_verify(args) -> None:
    from scaling_lab.analysis.__main__ import default_out_dir
    from scaling_lab.analysis.fit import FitSettings
    from scaling_lab.analysis.verification import format_terminal
    from scaling_lab.study.runner import RunOptions
    from scaling_lab.study.verify import verify_study

    if args.rank is not None and args.rank < 1:
        raise spec_lib.SpecError(f"--rank: expected a positive integer, got {args.rank}")
    if args.points < 3:
        raise spec_lib.SpecError(f"--points: expected an integer >= 3, got {args.points}")
    options = RunOptions(base_dir=Path.cwd(), address=args.address,
                         cache_dir=Path(args.cache_dir).expanduser() if args.cache_dir else None,
                         verbose=args.verbose)
    settings = FitSettings(convention=args.convention, n_bootstrap=args.bootstrap, seed=args.seed, by_model=True)
    out_dir = args.out or default_out_dir(args.results)
    entries = verify_study(args.results, args.rank, args.model, settings, options, out_dir, args.points)
    print(format_terminal(entries, entries[0].metric if entries else ""))
    print(f"wrote the verification to {out_dir / 'law.json'} and {out_dir / 'report.md'}")


def cmd_status(args) -> None:
    store = results.Store(args.results)
    if not store.exists("spec.yaml"):
        raise results.ResultsError(f"{store}: no spec.yaml, so not a study results directory")
    try:
        spec = spec_lib.build(spec_lib.StudySpec, yaml.safe_load(store.read_bytes("spec.yaml")))
    except (spec_lib.SpecError, yaml.YAMLError) as exc:
        raise spec_lib.SpecError(f"{store.path('spec.yaml')}: {str(exc).splitlines()[0]}") from None
    results_dir = args.results
    trial_ids = study_trial_ids(spec, results_dir)
    print(f"study {spec.name!r}: " + progress.snapshot(results_dir, trial_ids).line() + search_note(spec))
    outside = len(results.completed_ids(store) - set(trial_ids))
    if outside:
        print(f"  {outside} finished trials are not in the current grid (their rows are kept)")
    set_aside = [n for n in store.list(results.FAILED, ".parquet") if not n.endswith(".curve.parquet")]
    if set_aside:
        print(f"  rows of earlier failed attempts kept in {store.path(results.FAILED)}: {len(set_aside)}")
    for claim in progress.claims(results_dir):
        state = "stale (the next run takes it over)" if claims.is_stale(claim) else "running"
        print(f"  {state} {claim['trial_id']} (attempt {claim.get('attempt')}, {claim.get('host')} pid "
              f"{claim.get('pid')}, since {claim.get('started_at')})")
    for _, row in progress.failures(results_dir).iterrows():
        reason = (row["error"] or "").strip().splitlines()
        print(f"  {row['status']} {row['trial_id']} model={row['model']} r={row['rank']} α={row['alpha']:.4g}: "
              f"{reason[0] if reason else ''}")
    out_of_memory = progress.failures(results_dir).query("status == 'oom'")
    if not out_of_memory.empty:
        print(advice_text(spec, set(out_of_memory["model"])))


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
            sub.add_argument("--retry-failed", action="store_true",
                             help="run failed trials (error, oom) again; their rows are moved to failed/")
    status = commands.add_parser("status", help="done / running / failed / left of a results directory")
    status.add_argument("results")
    status.set_defaults(func=cmd_status)
    submit = commands.add_parser("submit", help="run a study on a Ray cluster as a Ray job; prints the job id")
    submit.add_argument("spec", help="study spec YAML, inside the working directory")
    submit.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field (repeatable); passed on to the job's `run`")
    submit.add_argument("--address", default=None,
                        help="the cluster's job API, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS)")
    submit.add_argument("--working-dir", default=".", help="the directory uploaded to the cluster (default: .)")
    submit.add_argument("--env", action="append", default=[], metavar="NAME",
                        help="pass this environment variable (e.g. HF_TOKEN) to the job and its workers, with its "
                             "value here; the value is written nowhere (repeatable)")
    submit.set_defaults(func=cmd_submit)
    verify = commands.add_parser("verify", help="check the study's law out of sample: hold out its largest rank, "
                                                "or run a bracket of α around the prediction at --rank")
    verify.add_argument("results", help="the study's results directory (with spec.yaml)")
    verify.add_argument("--rank", type=int, default=None,
                        help="rank to verify by new trials (default: hold out the largest finished rank, no trials)")
    verify.add_argument("--model", default=None, help="verify this model's law only (default: every model's)")
    verify.add_argument("--points", type=int, default=5, help="α values in the bracket at --rank (default 5)")
    verify.add_argument("--convention", choices=["standard", "rslora", "scale"], default="standard",
                        help="the convention the law is stated in (default standard)")
    verify.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    verify.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    verify.add_argument("--out", type=Path, default=None,
                        help="folder of law.json and report.md (default <results>/analysis, as fit's)")
    verify.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    verify.add_argument("--cache-dir", default=None, help="model cache (default: the spec's cache_dir)")
    verify.add_argument("--verbose", action="store_true", help="show the Ray workers' logs")
    verify.set_defaults(func=cmd_verify)
    args = parser.parse_args(argv)
    from scaling_lab.analysis.fit import AnalysisError
    from scaling_lab.data import DataError
    from scaling_lab.study.runner import GroupsFailed, TrialsFailed

    try:
        args.func(args)
    except (spec_lib.SpecError, results.ResultsError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except AnalysisError as exc:
        print(f"error: {args.results if args.command == 'verify' else ''}: {exc}", file=sys.stderr)
        return 2
    except (GroupsFailed, TrialsFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished trials are kept; run the same command again to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    code = main()
    gc.freeze()  # Python's last collections on the way out would walk all that Ray, Tune and pandas left: seconds
    sys.exit(code)
