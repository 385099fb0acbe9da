"""python -m scaling_lab.analysis: fit and predict end to end, its outputs, its errors, and what it imports."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from scaling_lab import results
from scaling_lab.analysis import methods
from scaling_lab.analysis.__main__ import main
from scaling_lab.analysis.planted import planted_trials, power_law

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """A results directory as a study writes it: two models, one trial file each, some diverged."""
    root = tmp_path_factory.mktemp("study")
    frame = planted_trials(
        power_law(16.0, 0.5, m=0.25),
        ranks=(1, 4, 16, 64),
        alphas=tuple(2.0 ** np.arange(0, 12)),
        seeds=2,
        models={"tiny": 1e5, "small": 8e5},
        noise=0.005,
        rng=np.random.default_rng(0),
    )
    for index, row in enumerate(frame.to_dict("records")):
        results.write_trial(root, {"trial_id": f"t{index:04d}", "study": "planted", **row}, [])
    return root


def test_fit_writes_law_report_and_plots(study_dir, capsys):
    assert main(["fit", str(study_dir), "--bootstrap", "100"]) == 0  # one law per model by default
    printed = capsys.readouterr().out
    assert "optimum per cell (α* in the standard convention)" in printed
    assert "joint law (model size)" in printed and "√r law" in printed
    out = study_dir / "analysis"
    law = json.loads((out / "law.json").read_text())
    assert law["convention"]["name"] == "standard"
    assert {t["group"]["model"] for t in law["laws"]} == {"tiny", "small"}
    (joint,) = law["joint_laws"]
    assert joint["size_measure"] == "model_params" and joint["k_ci95"][0] < 0.5 < joint["k_ci95"][1]
    assert {h["rule"] for h in joint["hypotheses"]} == {"fixed α", "√r law", "α ∝ r", "fitted law"}
    assert law["data"]["rows"] == 192 and law["versions"]["numpy"] == np.__version__
    assert len(law["cells"]) == 8 and all(c["optimum"] for c in law["cells"])
    report = (out / "report.md").read_text()
    for plot in ("metric_vs_alpha.png", "alpha_vs_rank.png", "residuals.png"):
        assert f"]({plot})" in report
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    method = report.split("## Method\n", 1)[1].split("## Provenance", 1)[0]
    values = {"n_bootstrap": 100, "tolerance": 0.0025, "edge_policy": methods.EDGE_OPTIMA_LEFT_OUT}
    for text in methods.METHOD_PARTS:
        assert report.count(text.format(**values)) == 1 and text.format(**values) in method


def test_convention_is_stated_and_converted(study_dir, tmp_path, capsys):
    arguments = ["fit", str(study_dir), "--bootstrap", "100", "--convention", "rslora", "--pool",
                 "--out", str(tmp_path)]
    assert main(arguments) == 0
    law = json.loads((tmp_path / "law.json").read_text())
    assert law["convention"]["name"] == "rslora"
    assert law["law"] is not None and law["law"]["formula"].startswith("α_rs* =")
    forms = law["law_in_other_conventions"]
    assert forms["standard"]["k"] == pytest.approx(law["law"]["k"] + 0.5)
    assert forms["scale"]["k"] == pytest.approx(law["law"]["k"] - 0.5)
    assert "2 models pooled into one law" in capsys.readouterr().out


def test_predict_at_unseen_rank_and_size(study_dir, capsys):
    assert (
        main(
            ["predict", str(study_dir), "--rank", "32", "--rank", "1024", "--model-params", "4e5", "--bootstrap", "100"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "rank 1024 is more than 4× the largest measured rank (64): extrapolated" in printed
    row = next(line for line in printed.splitlines() if line.split()[-5:-4] == ["32"])
    assert float(row.split()[-3]) == pytest.approx(16.0 * 32**0.5 * (4e5 / 1e6) ** 0.25, rel=0.15)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["fit", "{tmp}/absent.parquet"], "{tmp}/absent.parquet: no such file or directory"),
        (["fit", "{tmp}"], "{tmp}: no results (expected trials/*.parquet in it)"),
        (["predict", "{study}", "--rank", "8", "--model", "huge"], "no law for model 'huge' (models: small, tiny)"),
    ],
)
def test_errors_are_one_line_on_stderr_with_exit_code_2(study_dir, tmp_path, capsys, arguments, message):
    filled = [a.format(tmp=tmp_path, study=study_dir) for a in arguments]
    assert main(filled) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert message.format(tmp=tmp_path) in captured.err


def test_corrupt_parquet_through_the_real_command_line(tmp_path):
    bad = tmp_path / "results.parquet"
    bad.write_bytes(b"PAR1" + b"\0" * 64)
    done = subprocess.run(
        [sys.executable, "-m", "scaling_lab.analysis", "fit", str(bad)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        env={"PYTHONPATH": str(REPO), "PATH": ""},
    )
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: {bad}: not a readable Parquet file") and done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr


def test_analysis_imports_no_training_stack(tmp_path):
    """Block ray, torch, transformers, deepspeed and peft outright, then import and run the whole analysis."""
    csv = tmp_path / "sweep.csv"
    planted_trials(power_law(8.0, 0.5), ranks=(1, 4, 16), alphas=tuple(2.0 ** np.arange(8)), seeds=1).to_csv(
        csv, index=False
    )
    script = textwrap.dedent(
        f"""
        import sys
        BLOCKED = ("ray", "torch", "transformers", "deepspeed", "peft")

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked: {{name}}")
                return None

        sys.meta_path.insert(0, Block())
        import scaling_lab.analysis, scaling_lab.analysis.report, scaling_lab.analysis.plots
        import scaling_lab.analysis.adapter, scaling_lab.analysis.verification, scaling_lab.analysis.terminal
        from scaling_lab.analysis.__main__ import main
        assert main(["fit", {str(csv)!r}, "--bootstrap", "20"]) == 0
        loaded = sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED)
        assert not loaded, loaded
        assert "matplotlib.pyplot" not in sys.modules  # figures are drawn on the Agg canvas, no global backend
        print("clean")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        env={"PYTHONPATH": str(REPO), "PATH": ""},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("clean")


def write_study(root: Path, frame, spec: dict | None) -> Path:
    for index, row in enumerate(frame.to_dict("records")):
        results.write_trial(root, {"trial_id": f"t{index:04d}", "study": "planted", **row}, [])
    if spec is not None:
        (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    return root


def accuracy_study(root: Path, metric: str | None) -> Path:
    """Loss and accuracy disagree: the loss is best at α* = 8·√r, the accuracy at 32·√r."""
    frame = planted_trials(power_law(8.0, 0.5), ranks=(1, 4, 16, 64), alphas=tuple(2.0 ** np.arange(0, 12)), seeds=2,
                           noise=0.002, rng=np.random.default_rng(1))
    by_accuracy = planted_trials(power_law(32.0, 0.5), ranks=(1, 4, 16, 64), alphas=tuple(2.0 ** np.arange(0, 12)),
                                 seeds=2, noise=0.002, diverge_above=9.0, rng=np.random.default_rng(2))
    frame["final_eval_accuracy"] = by_accuracy["final_eval_accuracy"].to_numpy()
    frame["status"], frame["final_eval_loss"] = "ok", frame["final_eval_loss"].fillna(9.0)
    return write_study(root, frame, None if metric is None else {"name": "planted", "metric": metric})


def test_the_study_metric_is_fitted_with_no_flag(tmp_path, capsys):
    study = accuracy_study(tmp_path / "accuracy", "eval_accuracy")
    assert main(["fit", str(study), "--bootstrap", "50"]) == 0
    printed = capsys.readouterr().out
    assert "metric final_eval_accuracy (higher is better)" in printed
    law = json.loads((study / "analysis/law.json").read_text())
    assert law["metric"]["column"] == "final_eval_accuracy" and law["metric"]["goal"] == "maximize"
    assert "spec.yaml: metric: eval_accuracy" in law["metric"]["origin"]
    assert law["study_spec"] == {"name": "planted", "metric": "eval_accuracy"}
    assert law["law"]["c"] == pytest.approx(32.0, rel=0.1)
    report = (study / "analysis/report.md").read_text()
    assert "metric: `final_eval_accuracy` (higher is better), from the study spec" in report

    # --metric overrides the spec; without a spec the default is the loss
    assert main(["predict", str(study), "--rank", "16", "--metric", "final_eval_loss", "--bootstrap", "50"]) == 0
    assert float(capsys.readouterr().out.splitlines()[2].split()[-3]) == pytest.approx(8.0 * 4, rel=0.1)
    bare = accuracy_study(tmp_path / "bare", None)
    assert main(["fit", str(bare), "--bootstrap", "50"]) == 0
    assert "metric from default (no study spec beside the results)" in capsys.readouterr().out


def test_equivalence_and_a_bad_spec_metric(tmp_path, capsys):
    study = accuracy_study(tmp_path / "bad", "eval_perplexity")
    assert main(["fit", str(study)]) == 2
    assert "spec.yaml: metric: expected one of ['eval_loss', 'eval_accuracy'], got 'eval_perplexity'" in (
        capsys.readouterr().err
    )


def test_models_get_their_own_laws_unless_pooled(study_dir, tmp_path, capsys):
    assert main(["fit", str(study_dir), "--bootstrap", "50", "--out", str(tmp_path / "per_model")]) == 0
    law = json.loads((tmp_path / "per_model/law.json").read_text())
    assert [t["group"] for t in law["laws"]] == [{"model": "small"}, {"model": "tiny"}] and len(law["joint_laws"]) == 1
    assert "pooled" not in capsys.readouterr().out
    assert main(["fit", str(study_dir), "--bootstrap", "50", "--pool", "--out", str(tmp_path / "pooled")]) == 0
    pooled = json.loads((tmp_path / "pooled/law.json").read_text())
    assert [t["group"] for t in pooled["laws"]] == [{}] and pooled["joint_laws"] == []
    assert "2 models pooled into one law (--pool)" in capsys.readouterr().out


def test_run_summary_picks_the_best_alpha_by_the_study_metric(tmp_path):
    from scaling_lab.study.progress import summary

    study = accuracy_study(tmp_path / "summary", "eval_accuracy")
    trial_ids = sorted(results.completed_ids(study))
    by_accuracy = summary(str(study), trial_ids, "eval_accuracy")
    by_loss = summary(str(study), trial_ids, "eval_loss")
    assert "seed-averaged final held-out accuracy, higher is better" in by_accuracy
    assert "r=16    α*=128" in by_accuracy and "accuracy=" in by_accuracy
    assert "r=16    α*=32 " in by_loss


def test_learning_rate_law_under_a_fixed_scale_with_no_flag(tmp_path, capsys):
    """The issue's case: lr* = 1e-3·r^-0.5 under a fixed scale of 2, ranks 2-64, 11 learning rates, 2 seeds."""
    csv = tmp_path / "lr_fixed.csv"
    planted_trials(power_law(16.0, 0.5), ranks=(2, 4, 8, 16, 32, 64), alphas=(2.0,), seeds=2,
                   learning_rates=tuple(np.geomspace(1e-5, 1e-1, 11)),
                   optimal_learning_rate=lambda rank, size: 1e-3 * rank**-0.5, scaling_rule="fixed",
                   rng=np.random.default_rng(3)).to_csv(csv, index=False)
    assert main(["fit", str(csv), "--bootstrap", "50", "--out", str(tmp_path / "out")]) == 0
    assert "scaling_rule=fixed, alpha=2: lr* = " in capsys.readouterr().out
    (law,) = json.loads((tmp_path / "out/law.json").read_text())["learning_rate_laws"]
    assert law["k_ci95"][0] <= -0.5 <= law["k_ci95"][1]
    row = next(line for line in (tmp_path / "out/report.md").read_text().splitlines()
               if line.startswith("| model=planted, scaling_rule=fixed, alpha=2 |"))
    assert row.endswith("| -0.5 | yes |")  # μA's exponent for a fixed scale, inside the law's interval


def test_plain_method_text_drops_emphasis_and_keeps_the_optimum_stars():
    assert methods.plain("**Law.** *α slope*: at (α·lr)* and α*, lr* ∝ r^-1/4; **ridge** or *undecided*.") == (
        "Law. α slope: at (α·lr)* and α*, lr* ∝ r^-1/4; ridge or undecided."
    )
