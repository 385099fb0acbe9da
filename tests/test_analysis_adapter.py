"""From a law to an adapter: predict reads law.json without refitting, and writes PEFT's adapter config."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from scaling_lab import results
from scaling_lab.analysis.__main__ import main
from scaling_lab.analysis.adapter import peft_lora_alpha, read_law_document, stored_laws
from scaling_lab.analysis.planted import planted_trials, power_law

REPO = Path(__file__).resolve().parents[1]
SPEC = {"name": "planted", "metric": "eval_loss",
        "models": [{"name": "tiny", "source": "tiny:xs", "kind": "causal_lm"},
                   {"name": "small", "source": "tiny:s", "kind": "causal_lm"}],
        "lora": {"target_modules": ["q_proj", "v_proj"], "dropout": 0.1, "init": "default"},
        "grid": {"learning_rates": [2e-4]}}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A two-model results directory with its spec, and the law.json `fit` wrote for it."""
    root = tmp_path_factory.mktemp("study")
    frame = planted_trials(power_law(16.0, 0.5, m=0.25), ranks=(1, 4, 16, 64), alphas=tuple(2.0 ** np.arange(0, 12)),
                           seeds=2, models={"tiny": 1e5, "small": 8e5}, noise=0.005, rng=np.random.default_rng(0))
    for index, row in enumerate(frame.to_dict("records")):
        results.write_trial(root, {"trial_id": f"t{index:04d}", "study": "planted", **row}, [])
    (root / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    assert main(["fit", str(root), "--bootstrap", "100"]) == 0
    return root


def prediction_row(printed: str, rank: str) -> list[str]:
    return next(line.split() for line in printed.splitlines() if rank in line.split()[-4:-3])


def test_predict_from_law_json_matches_a_refit(fitted, capsys):
    assert main(["predict", str(fitted), "--rank", "32", "--model", "small", "--bootstrap", "100"]) == 0
    refit = prediction_row(capsys.readouterr().out, "32")
    assert main(["predict", str(fitted / "analysis/law.json"), "--rank", "32", "--model", "small"]) == 0
    printed = capsys.readouterr().out
    stored = prediction_row(printed, "32")
    assert float(stored[-3]) == pytest.approx(float(refit[-3]), rel=1e-6)
    assert stored[-2:] == refit[-2:]  # the same interval: law.json keeps the bootstrap resamples
    assert "fitted on" in printed and "metric final_eval_loss" in printed


def test_predict_from_law_json_warns_past_four_times_the_largest_rank(fitted, capsys):
    assert main(["predict", str(fitted / "analysis/law.json"), "--rank", "512", "--model-params", "3e5"]) == 0
    assert "rank 512 is more than 4× the largest measured rank (64): extrapolated" in capsys.readouterr().out


@pytest.mark.parametrize("convention, use_rslora", [("standard", False), ("rslora", True), ("scale", False)])
def test_peft_out_applies_the_predicted_scale(fitted, tmp_path, capsys, convention, use_rslora):
    out = tmp_path / "law"
    assert main(["fit", str(fitted), "--bootstrap", "50", "--convention", convention, "--out", str(out)]) == 0
    adapter = tmp_path / "adapter"
    arguments = ["predict", str(out / "law.json"), "--rank", "32", "--model", "tiny", "--peft-out", str(adapter)]
    assert main(arguments) == 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    note = json.loads((adapter / "scaling_lab_prediction.json").read_text())
    assert config["r"] == 32 and config["use_rslora"] is use_rslora and config["peft_type"] == "LORA"
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["lora_dropout"] == 0.1
    assert config["base_model_name_or_path"] == "tiny:xs" and config["task_type"] == "CAUSAL_LM"
    scale = config["lora_alpha"] / (math.sqrt(32) if use_rslora else 32)
    truth = 16.0 * 32**0.5 * (1e5 / 1e6) ** 0.25 / 32  # the planted optimum as an effective scale
    assert scale == pytest.approx(truth, rel=0.15)
    assert note["peft"]["effective_scale"] == pytest.approx(scale, rel=1e-9)
    low, high = note["peft"]["lora_alpha_ci95"]
    assert low < config["lora_alpha"] < high
    assert note["law"]["convention"] == convention and note["learning_rate"] == 2e-4
    assert note["law_json"] == str(out / "law.json")


def test_peft_out_needs_one_law_and_one_integer_rank(fitted, tmp_path, capsys):
    law = str(fitted / "analysis/law.json")
    assert main(["predict", law, "--rank", "32", "--peft-out", str(tmp_path)]) == 2
    assert "--peft-out needs one law, found 2" in capsys.readouterr().err
    assert main(["predict", law, "--rank", "8", "--rank", "16", "--model", "tiny", "--peft-out", str(tmp_path)]) == 2
    assert "--peft-out needs exactly one integer --rank" in capsys.readouterr().err
    assert not (tmp_path / "adapter_config.json").exists()


def test_published_default_law_to_a_config_peft_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    arguments = ["predict", "analysis/default/law.json", "--rank", "32", "--model", "tiny-s",
                 "--peft-out", str(tmp_path)]
    assert main(arguments) == 0
    capsys.readouterr()
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert config.r == 32 and not config.use_rslora and config.target_modules == "all-linear"
    document = read_law_document(REPO / "analysis/default/law.json")
    (law,) = stored_laws(document, model="tiny-s")
    assert config.lora_alpha == pytest.approx(law.entry["c"] * 32 ** law.entry["k"], rel=1e-9)


def test_peft_lora_alpha_per_convention():
    assert peft_lora_alpha(2.0, "scale", 16) == (32.0, False)
    assert peft_lora_alpha(40.0, "rslora", 16) == (40.0, True)
    assert peft_lora_alpha(40.0, "standard", 16) == (40.0, False)
