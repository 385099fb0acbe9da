"""Base models: the tiny family and its content-addressed cache, local directories, source checks."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from scaling_lab import data, models
from scaling_lab.spec import ModelSpec


def tiny(size: str) -> ModelSpec:
    return ModelSpec(name=size, source=f"tiny:{size}")


def chain_loss(model, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return model(input_ids=tokens, labels=tokens).loss.item()


def oracle_loss(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """The loss of the chain itself on the same next-token predictions: the floor a model can reach."""
    return torch.nn.functional.cross_entropy(logits[tokens[:, :-1]].flatten(0, 1), tokens[:, 1:].flatten()).item()


# ---- the tiny family ----


def test_tiny_family_spans_ten_fold_in_parameters():
    from transformers import LlamaForCausalLM

    assert list(models.TINY_FAMILY)[:4] == ["xs", "s", "m", "l"]
    counts = []
    for size in models.TINY_FAMILY:
        config = models.tiny_config(size)
        assert config.vocab_size == data.SYNTHETIC_VOCAB_SIZE
        assert config.max_position_embeddings >= 128
        with torch.device("meta"):
            counts.append(sum(p.numel() for p in LlamaForCausalLM(config).parameters()))
    assert counts == sorted(counts)
    assert counts[-1] >= 10 * counts[0]
    assert 50_000 < counts[0] < 200_000 and counts[-1] < 2_500_000


def test_spec_validation_imports_no_torch():
    code = "import sys, scaling_lab.models, scaling_lab.data; assert not {'torch', 'transformers'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


@pytest.mark.parametrize("size", ["xs", "s"])
def test_pretrained_tiny_model_learns_the_chain(size, tiny_cache):
    from transformers import LlamaForCausalLM

    base = models.load_base(tiny(size), tiny_cache)
    logits = data.pretraining_chain_logits()
    held_out = data.sample_markov(logits, 128, 64, torch.Generator().manual_seed(12345))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        random_init = LlamaForCausalLM(models.tiny_config(size)).eval()
    pretrained = chain_loss(base.model, held_out)
    assert pretrained < chain_loss(random_init, held_out) - 1.0
    assert pretrained < oracle_loss(logits, held_out) + 0.15
    assert base.tokenizer is None
    assert base.vocab_size == data.SYNTHETIC_VOCAB_SIZE
    assert base.num_params == sum(p.numel() for p in random_init.parameters())
    assert next(base.model.parameters()).dtype == torch.float32


def test_cached_tiny_model_is_not_pretrained_again(tiny_cache, monkeypatch):
    directory = models.ensure_tiny_model("xs", tiny_cache)

    def no_pretraining(size):
        raise AssertionError("pretrained again")

    monkeypatch.setattr(models, "pretrain_tiny", no_pretraining)
    monkeypatch.setattr(models, "_memo", {})
    assert models.ensure_tiny_model("xs", tiny_cache) == directory
    assert models.load_base(tiny("xs"), tiny_cache).num_params > 0
    assert directory.name.startswith("tiny-xs-") and (directory / "config.json").is_file()


def test_fresh_builds_in_different_caches_have_identical_weights(tmp_path, monkeypatch):
    full_length_name = models.tiny_model_dir("xs", tmp_path).name
    monkeypatch.setitem(models.TINY_PRETRAINING, "steps", 30)  # determinism, not quality, is tested here
    rng_before, threads_before = torch.random.get_rng_state(), torch.get_num_threads()
    first = models.ensure_tiny_model("xs", tmp_path / "a")
    second = models.ensure_tiny_model("xs", tmp_path / "b")
    assert torch.equal(torch.random.get_rng_state(), rng_before) and torch.get_num_threads() == threads_before
    assert first.name == second.name != full_length_name  # the settings are part of the address
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


def test_concurrent_builds_pretrain_once(tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    calls = []

    def slow_untrained(size):
        calls.append(size)
        time.sleep(0.3)
        return LlamaForCausalLM(models.tiny_config(size))

    monkeypatch.setattr(models, "pretrain_tiny", slow_untrained)
    directories = []

    def build():
        directories.append(models.ensure_tiny_model("xs", tmp_path))

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == ["xs"]
    assert len(set(directories)) == 1 and len(directories) == 3
    built = directories[0].name
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [built, f"{built}.lock"]


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def failing(size):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(models, "pretrain_tiny", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        models.ensure_tiny_model("xs", tmp_path)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [models.tiny_model_dir("xs", tmp_path).name + ".lock"]


def test_load_base_returns_independent_copies(tiny_cache):
    first = models.load_base(tiny("xs"), tiny_cache)
    second = models.load_base(tiny("xs"), tiny_cache)
    weight = first.model.get_input_embeddings().weight
    before = second.model.get_input_embeddings().weight.clone()
    with torch.no_grad():
        weight.add_(1.0)
    assert torch.equal(second.model.get_input_embeddings().weight, before)


def test_tiny_models_are_causal_only(tiny_cache):
    with pytest.raises(ValueError, match="causal language model"):
        models.load_base(ModelSpec(name="xs", source="tiny:xs", kind="seq_cls"), tiny_cache)


# ---- local directories ----


def test_local_causal_lm_directory(tmp_path, causal_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(causal_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
    )
    saved = LlamaForCausalLM(config)
    saved.save_pretrained(tmp_path / "llama")
    causal_tokenizer.save_pretrained(tmp_path / "llama")

    base = models.load_base(ModelSpec(name="local", source=str(tmp_path / "llama")), tmp_path / "cache")
    assert isinstance(base.model, LlamaForCausalLM)
    assert base.num_params == sum(p.numel() for p in saved.parameters())
    assert base.vocab_size == len(causal_tokenizer)
    assert base.tokenizer.pad_token == base.tokenizer.eos_token == "</s>"
    assert base.model.config.pad_token_id == base.tokenizer.pad_token_id
    assert torch.equal(base.model.lm_head.weight, saved.lm_head.weight)


def test_local_directory_without_tokenizer(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "bare")
    base = models.load_base(ModelSpec(name="bare", source=str(tmp_path / "bare")), tmp_path / "cache")
    assert base.tokenizer is None and base.vocab_size == 64


def test_local_bert_for_sequence_classification(tmp_path, bert_tokenizer, monkeypatch):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    config = BertConfig(
        vocab_size=len(bert_tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(tmp_path / "bert")
    bert_tokenizer.save_pretrained(tmp_path / "bert")
    spec = ModelSpec(name="bert", source=str(tmp_path / "bert"), kind="seq_cls", num_labels=3)

    base = models.load_base(spec, tmp_path / "cache")
    assert isinstance(base.model, BertForSequenceClassification)
    encoded = base.tokenizer(["the cat sat", "dog"], padding=True, return_tensors="pt")
    assert base.model(**encoded).logits.shape == (2, 3)

    # The new classification head does not depend on the global RNG: trials alone and packed start alike.
    monkeypatch.setattr(models, "_memo", {})
    torch.manual_seed(1234)
    again = models.load_base(spec, tmp_path / "cache")
    assert torch.equal(again.model.classifier.weight, base.model.classifier.weight)


# ---- checking sources ----


@pytest.mark.parametrize("source", ["tiny:xs", "tiny:l", "gpt2", "meta-llama/Llama-3.2-1B", "org/name_v1.5"])
def test_valid_sources_pass(source):
    models.check_model_source(source)


def test_existing_model_directory_passes(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    models.check_model_source(str(tmp_path))


@pytest.mark.parametrize(
    "source, message",
    [
        ("tiny:xxl", "unknown tiny model size 'xxl'; allowed: tiny:xs, tiny:s, tiny:m, tiny:l"),
        ("./no/such/model", "model directory './no/such/model' does not exist"),
        ("/no/such/model", "model directory '/no/such/model' does not exist"),
        ("org/name/extra", "neither tiny:<size>, an existing model directory, nor a hub id"),
        ("bad id!", "neither tiny:<size>, an existing model directory, nor a hub id"),
    ],
)
def test_bad_sources_raise_one_line_errors(source, message):
    with pytest.raises(ValueError) as error:
        models.check_model_source(source)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_model_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        models.check_model_source(str(tmp_path))
