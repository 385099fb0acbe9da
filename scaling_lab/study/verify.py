"""python -m scaling_lab.study verify: check a study's law out of sample, with new trials where it needs them.

With --rank R: the law is fitted on the study's finished grid ranks (never on rows at R), predicts α* at R with its
interval, and a bracket of α values around each prediction is trained at R through the platform, as trials of the
same study in the same results directory (its spec otherwise unchanged; finished trials are skipped, so running
verify again runs nothing). Without --rank: the largest finished rank of the grid is held out and the law fitted on
the others, at no new trials. Either way the analysis (scaling_lab.analysis.verification) compares the prediction
with the optimum measured at R and writes a verification block to law.json and a section to report.md.

The new trials are rows of the study: a later `fit` counts them as one more cell at rank R, which is right, since
they are trials of the study's own configuration; `run` and `status` of the study's grid are unaffected (its
spec.yaml is left as it is; `status` counts them among the finished trials not in the grid).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from scaling_lab import results, spec as spec_lib
from scaling_lab.analysis import verification
from scaling_lab.analysis.conventions import CONVENTION_EXPONENTS, RULE_EXPONENTS
from scaling_lab.analysis.fit import AnalysisError, FitSettings, fit_study
from scaling_lab.analysis.load import load_results
from scaling_lab.analysis.powerlaw import PowerLaw
from scaling_lab.analysis.report import write_outputs
from scaling_lab.grid import TrialConfig, expand
from scaling_lab.spec import StudySpec
from scaling_lab.study.runner import RunOptions, run_trials


def load_study(results_dir: str) -> StudySpec:
    """The study spec in a results directory (spec.yaml), its output_dir pointing at that directory."""
    store = results.Store(results_dir)
    if not store.exists("spec.yaml"):
        raise results.ResultsError(f"{store}: no spec.yaml, so not a study results directory")
    try:
        spec = spec_lib.build(StudySpec, yaml.safe_load(store.read_bytes("spec.yaml")))
    except (spec_lib.SpecError, yaml.YAMLError) as exc:
        raise spec_lib.SpecError(f"{store.path('spec.yaml')}: {str(exc).splitlines()[0]}") from None
    target = results_dir if "://" in results_dir else str(Path(results_dir).resolve())
    return dataclasses.replace(spec, output_dir=target)


def rule_alpha(alpha: float, rank: int, convention: str, rule: str) -> float:
    """The α a trial sets under `rule` to apply the multiplier that `alpha` stands for in `convention`."""
    scale = alpha / rank ** CONVENTION_EXPONENTS[convention]
    return float(f"{scale * rank ** RULE_EXPONENTS[rule]:.{verification.BRACKET_DIGITS}g}")


def bracket_trials(spec: StudySpec, laws: list, rank: int, convention: str, model: str | None,
                   points: int) -> list[TrialConfig]:
    """The trials of a bracket around each law's prediction at `rank`: the study's grid at that rank, with the
    bracket's α values, for the law's model (every model for a pooled law) and learning rate."""
    rule = spec.grid.scaling_rules[0]
    trials: dict[str, TrialConfig] = {}
    for law in laws:
        if not isinstance(law, PowerLaw):
            continue
        group = dict(law.group)
        models = [m for m in spec.models if m.name == group.get("model", m.name) and m.name == (model or m.name)]
        learning_rates = (group["learning_rate"],) if "learning_rate" in group else spec.grid.learning_rates
        alphas = tuple(rule_alpha(a, rank, convention, rule)
                       for a in verification.bracket(law.predict(rank), points))
        for spec_model in models:
            grid = dataclasses.replace(spec.grid, ranks=(rank,), alphas=alphas, learning_rates=learning_rates,
                                       scaling_rules=(rule,))
            for trial in expand(dataclasses.replace(spec, models=(spec_model,), grid=grid)):
                trials[trial.trial_id] = trial
    return list(trials.values())


def verify_study(
    results_dir: str,
    rank: int | None,
    model: str | None,
    settings: FitSettings,
    options: RunOptions,
    out_dir: Path,
    points: int = verification.BRACKET_POINTS,
) -> list[verification.Verification]:
    """Check the study's laws at `rank` (or its largest finished rank, held out); returns the verifications."""
    spec = load_study(results_dir)
    if model is not None and model not in {m.name for m in spec.models}:
        raise spec_lib.SpecError(f"--model {model!r}: not a model of study {spec.name!r} "
                                 f"(models: {', '.join(m.name for m in spec.models)})")
    loaded = load_results(results_dir)
    finished = sorted(set(loaded.trials["rank"].unique().tolist()) & set(spec.grid.ranks))
    mode = "new_rank" if rank is not None else "held_out"
    if rank is None:
        if not finished:
            raise AnalysisError(f"no finished trials at the grid's ranks {list(spec.grid.ranks)}")
        rank = finished[-1]
    fit_ranks = [r for r in finished if r != rank]
    if len(fit_ranks) < 2:
        raise AnalysisError(f"verifying rank {rank} needs a law from 2 or more other finished ranks; "
                            f"finished: {finished}")
    fit = None
    if mode == "new_rank":
        # The rows at the other grid ranks are what they were after the new trials: this fit serves both steps.
        fit = verification.fit_without_rank(loaded, rank, settings, fit_ranks)
        laws = [t.law for t in verification.law_groups(fit, model)]
        for law in laws:
            if isinstance(law, PowerLaw):
                print(f"{law.group_label()}: {law.formula()} (ranks {', '.join(map(str, law.ranks))}) predicts "
                      f"α* = {law.predict(rank).value:.4g} at rank {rank}")
        trials = bracket_trials(spec, laws, rank, settings.convention, model, points)
        if trials:
            run_trials(spec, options, trials)
            loaded = load_results(results_dir)
    entries = verification.verify_at_rank(loaded, rank, settings, mode=mode, fit_ranks=fit_ranks, model=model,
                                          fit=fit)
    if not (out_dir / "law.json").exists():
        write_outputs(fit_study(load_results(results_dir, diagnostics=True), settings), out_dir)
    verification.record(out_dir, entries)
    return entries
