"""Tier 3: tiny real models through PEFT + DeepSpeed on CPU, alone and through Ray Train."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scaling_lab import results, spec as spec_lib
from scaling_lab.grid import expand
from scaling_lab.group import GroupSpec
from scaling_lab.trial import run_group

pytestmark = pytest.mark.real
ROOT = Path(__file__).resolve().parents[1]


def group_of(trials, results_dir: Path, cache_dir: Path) -> GroupSpec:
    return GroupSpec(trials=tuple(t.to_dict() for t in trials), results_dir=str(results_dir), cache_dir=str(cache_dir),
                     base_dir=str(ROOT), backend="ray_train", study="packing")


def run_alone_in_a_fresh_process(trial, results_dir: Path, cache_dir: Path) -> None:
    code = ("import json, sys; from scaling_lab.group import GroupSpec; from scaling_lab.trial import run_group; "
            "run_group(GroupSpec.from_dict(json.loads(sys.argv[1])))")
    group = json.dumps(group_of([trial], results_dir, cache_dir).to_dict())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code, group], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_later_trials_of_a_group_compute_what_they_compute_in_a_fresh_process(tmp_path, tiny_cache):
    """The trials of a group share one loaded base, each adding and removing its adapter: the 2nd and 3rd trial
    must not see what the trials before them did."""
    spec = spec_lib.parse(
        {
            "name": "packing",
            "models": [{"name": "xs", "source": "tiny:xs"}],
            "grid": {"ranks": [2], "alphas": [16, 256, 4096], "seeds": [0]},
            "training": {"steps": 6, "batch_size": 8, "eval_every": 3, "eval_batches": 1},
        }
    )
    trials = expand(spec)
    run_group(group_of(trials, tmp_path / "packed", tiny_cache))
    for trial in trials[1:]:
        run_alone_in_a_fresh_process(trial, tmp_path / "alone", tiny_cache)
        packed = results.load_curves(tmp_path / "packed", [trial.trial_id])
        alone = results.load_curves(tmp_path / "alone", [trial.trial_id])
        assert len(alone) == 7 and packed.equals(alone)
        measured = ["final_eval_loss", "final_eval_accuracy", "final_train_loss", "trainable_params"]
        packed_row = results.load(tmp_path / "packed").set_index("trial_id").loc[trial.trial_id, measured]
        alone_row = results.load(tmp_path / "alone").set_index("trial_id").loc[trial.trial_id, measured]
        assert packed_row.equals(alone_row)
    later = results.load(tmp_path / "packed").set_index("trial_id").loc[[t.trial_id for t in trials], "setup_time_s"]
    assert later.notna().all()


def test_micro_batches_accumulate_to_the_unaccumulated_curve(tiny_cache):
    from scaling_lab.train import fine_tune

    def curve(micro_batch_size):
        spec = spec_lib.parse({
            "name": "accumulate", "models": [{"name": "xs", "source": "tiny:xs"}],
            "grid": {"ranks": [4], "alphas": [4096], "seeds": [0]},  # the clipping cap binds at this α
            "training": {"steps": 6, "batch_size": 8, "micro_batch_size": micro_batch_size, "eval_every": 3,
                         "eval_batches": 1, "diagnostics_every": 3},
        })
        (config,) = expand(spec)
        return fine_tune(config, tiny_cache, ROOT).curve

    whole, accumulated = curve(None), curve(2)
    assert len(whole) == len(accumulated) == 7
    for column in ("train_loss", "eval_loss", "grad_a_norm", "grad_b_norm", "update_norm"):
        expected = [p[column] for p in whole if column in p]
        assert len(expected) >= 2, column
        assert [p[column] for p in accumulated if column in p] == pytest.approx(expected, rel=1e-5), column


def test_a_bf16_trial_loads_its_base_in_bf16(tiny_cache):
    import torch

    from scaling_lab import models
    from scaling_lab.train import fine_tune

    spec = spec_lib.parse({
        "name": "bf16", "models": [{"name": "xs", "source": "tiny:xs"}],
        "grid": {"ranks": [4], "alphas": [64], "learning_rates": [1e-3], "seeds": [0]},
        "training": {"steps": 3, "batch_size": 8, "eval_every": 3, "eval_batches": 1},
        "deepspeed": {"precision": "bf16"},
    })
    (config,) = expand(spec)
    outcome = fine_tune(config, tiny_cache, ROOT)
    assert outcome.status == "ok" and outcome.final_eval_loss < outcome.initial_eval_loss
    (base,) = models._memo.values()  # the process's shared base, as the trial left it
    assert {p.dtype for p in base.model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_a_bf16_trial_trains_its_adapter_in_bf16_at_every_zero_stage(tiny_cache, monkeypatch, zero_stage):
    """DeepSpeed casts every weight to bf16 at ZeRO-0 but none of a model built under zero.Init at ZeRO-3, where
    PEFT's fp32 adapter copied each LoRA layer's input to fp32 and trained in another precision than at ZeRO-0."""
    import torch

    from scaling_lab.deepspeed_setup import import_deepspeed
    from scaling_lab.train import fine_tune

    deepspeed, adapter_dtypes = import_deepspeed(), set()

    def initialize(*args, **kwargs):
        engine, *rest = initialize_engine(*args, **kwargs)
        adapter_dtypes.update(p.dtype for name, p in engine.module.named_parameters() if "lora_" in name)
        return (engine, *rest)

    initialize_engine = deepspeed.initialize
    monkeypatch.setattr(deepspeed, "initialize", initialize)
    spec = spec_lib.parse({
        "name": "bf16", "models": [{"name": "xs", "source": "tiny:xs"}],
        "grid": {"ranks": [4], "alphas": [64], "learning_rates": [1e-3], "seeds": [0]},
        "training": {"steps": 2, "batch_size": 8, "eval_every": 2, "eval_batches": 1},
        "deepspeed": {"precision": "bf16", "zero_stage": zero_stage},
    })
    (config,) = expand(spec)
    assert fine_tune(config, tiny_cache, ROOT).status == "ok"
    assert adapter_dtypes == {torch.bfloat16}


def test_a_bf16_trial_trains_the_same_at_zero_0_and_zero_2(tiny_cache):
    """At ZeRO-0 in bf16 DeepSpeed's optimizer takes a zero-gradient step as it is built, which AdamW counted (its
    first real update 0.74 × an unwrapped one's) and whose weight decay shrank the master weights: undone."""
    from scaling_lab.train import fine_tune

    def curve(zero_stage):
        spec = spec_lib.parse({
            "name": "bf16", "models": [{"name": "xs", "source": "tiny:xs"}],
            "grid": {"ranks": [4], "alphas": [512], "learning_rates": [1e-3], "seeds": [0]},
            "optimizer": {"weight_decay": 0.1},
            "training": {"steps": 4, "batch_size": 8, "eval_every": 2, "eval_batches": 1},
            "deepspeed": {"precision": "bf16", "zero_stage": zero_stage},
        })
        (config,) = expand(spec)
        return fine_tune(config, tiny_cache, ROOT).curve

    zero_0, zero_2 = curve(0), curve(2)
    for column in ("train_loss", "eval_loss"):
        expected = [p[column] for p in zero_2 if column in p]
        assert len(expected) >= 3, column
        assert [p[column] for p in zero_0 if column in p] == pytest.approx(expected, rel=1e-5), column


@pytest.mark.parametrize(("zero_stage", "grad_clip"), [(0, None), (0, 1.0), (0, 0.01), (2, 0.01)])
def test_the_deepspeed_loop_computes_what_a_plain_pytorch_loop_computes(tiny_cache, zero_stage, grad_clip):
    from scaling_lab.reference_loop import run
    from scaling_lab.train import fine_tune

    spec = spec_lib.parse({
        "name": "plain", "models": [{"name": "xs", "source": "tiny:xs"}],
        "grid": {"ranks": [4], "alphas": [4096], "seeds": [0]},  # large enough α that the gradient norm exceeds 1
        "optimizer": {"grad_clip": grad_clip},
        "training": {"steps": 8, "batch_size": 8, "eval_every": 8, "eval_batches": 1, "diagnostics_every": 0},
        "deepspeed": {"zero_stage": zero_stage},  # ZeRO-0 clips with torch, ZeRO-2 with DeepSpeed's own code
    })
    (config,) = expand(spec)
    through_deepspeed = [p["train_loss"] for p in fine_tune(config, tiny_cache, ROOT).curve if "train_loss" in p]
    expected = run(config, tiny_cache, ROOT).train_losses
    assert through_deepspeed == pytest.approx(expected, rel=1e-5)  # summation order differs: not bit-identical
    no_clipping = dataclasses.replace(config, optimizer=dataclasses.replace(config.optimizer, grad_clip=None))
    unclipped = run(no_clipping, tiny_cache, ROOT).train_losses
    if grad_clip is not None:  # the cap binds here, and changes the curve by far more than the tolerance
        assert max(abs(a / b - 1) for a, b in zip(through_deepspeed, unclipped)) > 1e-3


def test_smoke_study_through_ray_train_and_deepspeed(tmp_path, tiny_cache):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "scaling_lab.study", "run", str(ROOT / "studies/smoke.yaml"),
               "--override", f"output_dir={tmp_path / 'smoke'}", "--cache-dir", str(tiny_cache)]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    frame = results.load(tmp_path / "smoke")
    spec = spec_lib.load(ROOT / "studies/smoke.yaml")
    assert sorted(frame["trial_id"]) == sorted(t.trial_id for t in expand(spec))
    assert frame["status"].isin(["ok", "diverged"]).all() and frame["error"].isna().all()
    blown_up = frame[frame["alpha"] == 1e9]
    assert (blown_up["status"] == "diverged").all()
    assert (blown_up["steps"] < blown_up["steps_planned"]).all()
    assert blown_up["last_finite_train_loss"].notna().all()
    sane = frame[frame["alpha"] == 64]
    assert (sane["status"] == "ok").all() and (sane["final_eval_loss"] < sane["initial_eval_loss"]).all()
    assert (frame["effective_scale"] == frame["alpha"] / frame["rank"]).all()
    assert frame["versions"].str.contains('"deepspeed"').all() and frame["device"].str.startswith("cpu").all()
    assert frame["node"].notna().all() and (frame["num_workers"] == 1).all()
    curves = results.load_curves(tmp_path / "smoke")
    assert set(curves["trial_id"]) == set(frame["trial_id"])
    diagnosed = curves.dropna(subset=["signal"])
    assert set(diagnosed["trial_id"]) == set(frame["trial_id"])
    assert (diagnosed["update_norm"][diagnosed["step"] > 1] > 0).all()  # B starts at zero
    assert diagnosed[diagnosed["trial_id"].isin(sane["trial_id"])]["drift_ratio"].notna().all()
    assert set(curves[curves["trial_id"].isin(sane["trial_id"])].dropna(subset=["signal"])["step"]) == {1, 4, 8, 12}
    assert (sane["spectral_ratio_max"] > 0).all()


@pytest.mark.parametrize("kind", ["causal_lm", "seq_cls"])
def test_a_trial_on_a_text_file_trains_from_data_prepared_once(tmp_path, causal_tokenizer, bert_tokenizer, kind):
    """A local model with its tokenizer on a JSON-lines file: the trial prepares the rows it reads under
    cache_dir/data, and a second trial of the study reuses them."""
    import pandas as pd
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from scaling_lab import data
    from scaling_lab.train import fine_tune

    words = ["the", "cat", "dog", "sat", "ran", "on", "mat", "far"]
    rows = [{"prompt": f"question {words[i % 8]} {words[i // 8 % 8]} ?", "completion": f"{words[i % 3]} yes",
             "label": i % 2} for i in range(400)]
    pd.DataFrame(rows).to_json(tmp_path / "qa.jsonl", orient="records", lines=True)
    if kind == "seq_cls":
        network, tokenizer = BertForSequenceClassification(BertConfig(
            vocab_size=len(bert_tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64)), bert_tokenizer
    else:
        network, tokenizer = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(causal_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)), causal_tokenizer
    network.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    spec = spec_lib.parse({
        "name": "text", "models": [{"name": "local", "source": str(tmp_path / "model"), "kind": kind}],
        "grid": {"ranks": [2], "alphas": [4, 16], "learning_rates": [1e-3]},
        "training": {"steps": 4, "batch_size": 4, "seq_len": 16, "eval_every": 2, "eval_batches": 2},
        "data": {"source": str(tmp_path / "qa.jsonl"), "prompt_column": "prompt", "completion_column": "completion",
                 **({"label_column": "label"} if kind == "seq_cls" else {})},
    }, tmp_path)
    first, second = expand(spec)
    outcome = fine_tune(first, tmp_path / "cache", tmp_path)
    assert outcome.status == "ok" and math.isfinite(outcome.final_eval_loss) and outcome.steps == 4
    (prepared,) = [path for path in (tmp_path / "cache" / "data").iterdir() if path.is_dir()]
    data._memo.clear()  # the next trial in another process
    assert fine_tune(second, tmp_path / "cache", tmp_path).status == "ok"
    assert [path for path in (tmp_path / "cache" / "data").iterdir() if path.is_dir()] == [prepared]
    (task,) = data._memo.values()
    assert len(task.train) == 4 * 4 and len(task.eval) == 2 * 4
