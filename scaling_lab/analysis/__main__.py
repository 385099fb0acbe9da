"""python -m scaling_lab.analysis fit|predict: the α*-against-rank law of a study's results.

python -m scaling_lab.analysis fit results/default                 # law, law.json, report.md, plots
python -m scaling_lab.analysis fit results/default --pool          # all models in one law (default: one per model)
python -m scaling_lab.analysis predict results/default --rank 256  # α* and its interval at an unseen rank
python -m scaling_lab.analysis predict analysis/default/law.json --rank 32 --model tiny-s --peft-out adapter/
python -m scaling_lab.analysis fit results.parquet --convention rslora
python -m scaling_lab.analysis equivalence results/lr_alpha        # is the metric a function of α·lr alone?
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scaling_lab.analysis.adapter import (
    is_law_file,
    read_law_document,
    stored_laws,
    study_spec_of,
    write_peft_config,
)
from scaling_lab.analysis.conventions import CONVENTION_EXPONENTS
from scaling_lab.analysis.equivalence import MIN_AXIS_VALUES
from scaling_lab.analysis.fit import AnalysisError, FitSettings, fit_study, predict
from scaling_lab.analysis.law_json import law_document
from scaling_lab.analysis.load import DEFAULT_METRIC, load_results
from scaling_lab.analysis.powerlaw import SIZE_MEASURES
from scaling_lab.analysis.report import write_outputs
from scaling_lab.analysis.terminal import (
    format_equivalence,
    format_predictions,
    format_stored_predictions,
    format_terminal,
)
from scaling_lab.results import ResultsError


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scaling_lab.analysis", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "source",
        help="a results directory (with trials/*.parquet; a local path or s3://, gs:// URI), "
        "or a .parquet or .csv file",
    )
    common.add_argument(
        "--convention",
        choices=list(CONVENTION_EXPONENTS),
        default="standard",
        help="state laws in α/r terms (standard, default), α/√r terms (rslora) or as the effective scale",
    )
    common.add_argument(
        "--metric",
        default=None,
        help=f"column to optimize (default: the study's metric from the results directory's spec.yaml, "
        f"else {DEFAULT_METRIC})",
    )
    goal = common.add_mutually_exclusive_group()
    goal.add_argument(
        "--maximize", action="store_true", default=None, help="higher metric is better (default for *accuracy*)"
    )
    goal.add_argument(
        "--minimize", dest="maximize", action="store_false", help="lower metric is better (default otherwise)"
    )
    common.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    common.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    common.add_argument(
        "--size",
        choices=list(SIZE_MEASURES),
        default="base",
        help="model size N in the joint law: base parameters (default) or trainable parameters",
    )
    common.add_argument(
        "--tolerance",
        type=_positive_float,
        default=0.0025,
        help="relative metric tolerance for the near-optimal range (default 0.0025)",
    )
    common.add_argument(
        "--keep-edge", action="store_true", help="include optima at the edge of the α range in the law fit"
    )

    fit_command = commands.add_parser(
        "fit", parents=[common], help="fit the law and write law.json, report.md and plots"
    )
    grouping = fit_command.add_mutually_exclusive_group()
    grouping.add_argument(
        "--by", choices=["model"], help="one law per model, plus a joint law in model size (the default)"
    )
    grouping.add_argument("--pool", action="store_true", help="pool all models into one law")
    fit_command.add_argument(
        "--out",
        type=Path,
        help="output folder (default <results dir>/analysis, <file stem>_analysis beside a file, ./analysis for a URI)",
    )

    predict_command = commands.add_parser(
        "predict",
        parents=[common],
        help="the optimal α and its interval at given ranks, from a law.json (no refit) or by fitting results",
    )
    predict_command.add_argument(
        "--rank", type=_positive_float, action="append", required=True, help="rank to predict (repeatable)"
    )
    predict_command.add_argument(
        "--model-params", type=_positive_float, help="model size N: use the joint law c·r^k·N^m"
    )
    predict_command.add_argument("--model", help="use this model's own law")
    predict_command.add_argument(
        "--peft-out",
        type=Path,
        help="write DIR/adapter_config.json (peft.LoraConfig.from_pretrained(DIR) loads it) for one rank and one law",
    )

    commands.add_parser(
        "equivalence",
        parents=[common],
        help="per model and rank on an α × learning-rate grid: is the metric a function of α·lr alone?",
    )
    return parser


def default_out_dir(source: str) -> Path:
    if "://" in source:
        return Path("analysis")
    path = Path(source)
    return path / "analysis" if path.is_dir() else path.with_name(f"{path.stem}_analysis")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "predict" and is_law_file(args.source):
            return predict_from_law_file(args)
        settings = FitSettings(
            convention=args.convention,
            by_model=not getattr(args, "pool", False),
            size=args.size,
            n_bootstrap=args.bootstrap,
            seed=args.seed,
            tolerance=args.tolerance,
            keep_edge=args.keep_edge,
        )
        results = load_results(
            args.source, metric=args.metric, maximize=args.maximize, diagnostics=args.command == "fit"
        )
        fit = fit_study(results, settings)
        if args.command == "predict":
            predictions = predict(fit, args.rank, model_params=args.model_params, model=args.model)
            print(format_predictions(fit, predictions, args.model_params))
            if args.peft_out is not None:
                document = law_document(fit)
                laws = stored_laws(document, args.model, args.model_params)
                _write_adapter(args, laws, document, None)
            return 0
        if args.command == "equivalence":
            if not fit.equivalence:
                raise AnalysisError(
                    f"no α × learning-rate grid: no model and rank has trials at {MIN_AXIS_VALUES} or more values "
                    f"of each"
                )
            print(format_equivalence(fit))
            return 0
        written = write_outputs(fit, args.out or default_out_dir(args.source))
    except ResultsError as exc:
        return _fail(str(exc))
    except AnalysisError as exc:
        return _fail(f"{args.source}: {exc}")
    except OSError as exc:
        return _fail(f"{exc.filename or args.source}: {exc.strerror or exc}")
    print(format_terminal(fit, written))
    return 0


def predict_from_law_file(args) -> int:
    """predict from a law.json: the laws as written, no refit."""
    path = Path(args.source)
    document = read_law_document(path)
    laws = stored_laws(document, args.model, args.model_params)
    print(format_stored_predictions(document, path, laws, args.rank, args.model_params))
    if args.peft_out is not None:
        _write_adapter(args, laws, document, path)
    return 0


def _write_adapter(args, laws, document: dict, law_path: Path | None) -> None:
    if len(args.rank) != 1 or args.rank[0] != int(args.rank[0]):
        raise AnalysisError("--peft-out needs exactly one integer --rank")
    if len(laws) != 1:
        labels = "; ".join(law.group_label() for law in laws)
        raise AnalysisError(f"--peft-out needs one law, found {len(laws)} ({labels}): choose one with --model NAME "
                            "or --model-params N")
    (law,) = laws
    rank = int(args.rank[0])
    spec, spec_origin = study_spec_of(document, law_path)
    model = args.model or law.group.get("model")
    provenance = {
        "law_json": str(law_path) if law_path else None,
        "fitted_on": document.get("source"),
        "metric": document.get("metric"),
        "law_format_version": document.get("format_version"),
        "git_commits": (document.get("data") or {}).get("git_commits"),
        "studies": (document.get("data") or {}).get("studys"),
    }
    written = write_peft_config(args.peft_out, law=law, rank=rank, prediction=law.predict(rank, args.model_params),
                                spec=spec, spec_origin=spec_origin, model=model, model_params=args.model_params,
                                provenance=provenance)
    print(f"wrote {', '.join(str(p) for p in written)}")


def _fail(message: str) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
