"""Base models: the tiny family and its content-addressed cache, local directories, source checks."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from scaling_lab import data, model_sources, models, safetensors_reader, tiny_models
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

    assert list(model_sources.TINY_FAMILY)[:4] == ["xs", "s", "m", "l"]
    counts = []
    for size in model_sources.TINY_FAMILY:
        config = tiny_models.tiny_config(size)
        assert config.vocab_size == data.SYNTHETIC_VOCAB_SIZE
        assert config.max_position_embeddings >= 128
        with torch.device("meta"):
            counts.append(sum(p.numel() for p in LlamaForCausalLM(config).parameters()))
    assert counts == sorted(counts)
    assert counts[-1] >= 10 * counts[0]
    assert 50_000 < counts[0] < 200_000 and counts[-1] < 2_500_000


def test_spec_validation_imports_no_torch():
    code = ("import sys, scaling_lab.models, scaling_lab.tiny_models, scaling_lab.data; "
            "assert not {'torch', 'transformers'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


@pytest.mark.parametrize("size", ["xs", "s"])
def test_pretrained_tiny_model_learns_the_chain(size, tiny_cache):
    from transformers import LlamaForCausalLM

    base = models.load_base(tiny(size), tiny_cache)
    logits = data.pretraining_chain_logits()
    held_out = data.sample_markov(logits, 128, 64, torch.Generator().manual_seed(12345))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        random_init = LlamaForCausalLM(tiny_models.tiny_config(size)).eval()
    pretrained = chain_loss(base.model, held_out)
    assert pretrained < chain_loss(random_init, held_out) - 1.0
    assert pretrained < oracle_loss(logits, held_out) + 0.15
    assert base.tokenizer is None
    assert base.vocab_size == data.SYNTHETIC_VOCAB_SIZE
    assert base.num_params == sum(p.numel() for p in random_init.parameters())
    assert next(base.model.parameters()).dtype == torch.float32


def test_cached_tiny_model_is_not_pretrained_again(tiny_cache, monkeypatch):
    directory = tiny_models.ensure_tiny_model("xs", tiny_cache)

    def no_pretraining(size):
        raise AssertionError("pretrained again")

    monkeypatch.setattr(tiny_models, "pretrain_tiny", no_pretraining)
    monkeypatch.setattr(models, "_memo", {})
    assert tiny_models.ensure_tiny_model("xs", tiny_cache) == directory
    assert models.load_base(tiny("xs"), tiny_cache).num_params > 0
    assert directory.name.startswith("tiny-xs-") and (directory / "config.json").is_file()


def test_fresh_builds_in_different_caches_have_identical_weights(tmp_path, monkeypatch):
    full_length_name = tiny_models.tiny_model_dir("xs", tmp_path).name
    monkeypatch.setitem(tiny_models.TINY_PRETRAINING, "steps", 30)  # determinism, not quality, is tested here
    rng_before, threads_before = torch.random.get_rng_state(), torch.get_num_threads()
    first = tiny_models.ensure_tiny_model("xs", tmp_path / "a")
    second = tiny_models.ensure_tiny_model("xs", tmp_path / "b")
    assert torch.equal(torch.random.get_rng_state(), rng_before) and torch.get_num_threads() == threads_before
    assert first.name == second.name != full_length_name  # the settings are part of the address
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


def test_concurrent_builds_pretrain_once(tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    calls = []

    def slow_untrained(size):
        calls.append(size)
        time.sleep(0.3)
        return LlamaForCausalLM(tiny_models.tiny_config(size))

    monkeypatch.setattr(tiny_models, "pretrain_tiny", slow_untrained)
    directories = []

    def build():
        directories.append(tiny_models.ensure_tiny_model("xs", tmp_path))

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

    monkeypatch.setattr(tiny_models, "pretrain_tiny", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        tiny_models.ensure_tiny_model("xs", tmp_path)
    lock = tiny_models.tiny_model_dir("xs", tmp_path).name + ".lock"
    assert [p.name for p in (tmp_path / "models").iterdir()] == [lock]


def test_the_base_is_shared_and_taking_the_adapter_off_leaves_it_as_loaded(tiny_cache, monkeypatch):
    from scaling_lab import spec as spec_lib
    from scaling_lab.grid import expand
    from scaling_lab.train import lora_model

    monkeypatch.setattr(models, "_memo", {})
    base = models.load_base(tiny("xs"), tiny_cache)
    assert models.load_base(tiny("xs"), tiny_cache) is base  # no copy per trial
    (config,) = expand(spec_lib.parse({"name": "t", "models": [{"name": "xs", "source": "tiny:xs"}],
                                       "grid": {"ranks": [4], "alphas": [8]}}))
    adapted = lora_model(config, base)
    adapted.train()
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_" in name:
                param.add_(1.0)
    models.remove_adapter(base, adapted)

    models.forget()
    fresh = models.load_base(tiny("xs"), tiny_cache)
    assert fresh is not base
    assert [type(m) for m in base.model.modules()] == [type(m) for m in fresh.model.modules()]
    assert base.model.state_dict().keys() == fresh.model.state_dict().keys()
    assert all(torch.equal(v, fresh.model.state_dict()[k]) for k, v in base.model.state_dict().items())
    assert not base.model.training and not hasattr(base.model, "peft_config")


def test_the_base_loads_in_the_training_precision(tiny_cache, monkeypatch):
    monkeypatch.setattr(models, "_memo", {})
    base = models.load_base(tiny("xs"), tiny_cache, precision="bf16")
    assert {p.dtype for p in base.model.parameters()} == {torch.bfloat16}
    assert models.load_base(tiny("xs"), tiny_cache) is not base  # another precision: another base


def _load_partitioned_on_two_workers(rank: int, directory: str, port: int, report: str) -> None:
    import json
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    import deepspeed

    zero3 = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    base = models.load_base(ModelSpec(name="m", source=directory), Path(directory) / "cache", "fp32", zero3)
    shares = {name: (p.ds_tensor.numel(), p.ds_numel) for name, p in base.model.named_parameters()}
    saved = safetensors_reader.SafetensorsReader([Path(directory) / "model.safetensors"])
    equal = {}
    for name, param in base.model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            equal[name] = torch.equal(param.data, saved.read(name))
    Path(report, f"{rank}.json").write_text(json.dumps({"shares": shares, "equal": equal,
                                                         "num_params": base.num_params}))
    dist.destroy_process_group()
    # At interpreter exit a thread of DeepSpeed's CPU comm op is sometimes destroyed while running, which aborts
    # the process ("terminate called without an active exception") after all of the above has been done.
    os._exit(0)


def test_zero3_partitions_every_weight_as_it_loads(tmp_path):
    """Under ZeRO-3 each of 2 workers holds half of every weight from the start; gathered, they are the file's."""
    import json
    import socket

    import torch.multiprocessing as mp
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    saved = LlamaForCausalLM(config)
    saved.save_pretrained(tmp_path / "llama")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_load_partitioned_on_two_workers, args=(str(tmp_path / "llama"), port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        report = json.loads((tmp_path / f"{rank}.json").read_text())
        assert report["num_params"] == sum(p.numel() for p in saved.parameters())
        assert set(report["shares"]) == {name for name, _ in saved.named_parameters()}
        for name, (share, whole) in report["shares"].items():
            assert share == -(-whole // 2), name  # each worker holds its half of the weight, padded
        assert all(report["equal"].values())


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
    model_sources.check_model_source(source)


def test_existing_model_directory_passes(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    model_sources.check_model_source(str(tmp_path))


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
        model_sources.check_model_source(source)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_model_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        model_sources.check_model_source(str(tmp_path))
