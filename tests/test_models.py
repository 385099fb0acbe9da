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


def _load_partitioned_on_two_workers(rank: int, directory: str, port: int, report: str, chunked: bool) -> None:
    import gc
    import json
    import os

    import torch.distributed as dist

    from scaling_lab import vocab_chunks
    from scaling_lab.deepspeed_setup import import_deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    deepspeed = import_deepspeed()  # as a trial imports it: gathers on gloo in place
    if chunked:
        vocab_chunks.MIN_CHUNKED_ELEMENTS = 0

    zero3 = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    base = models.load_base(ModelSpec(name="m", source=directory), Path(directory) / "cache", "fp32", zero3)
    shares = {name: (p.ds_tensor.numel(), p.ds_numel) for name, p in base.model.named_parameters()}
    own = {id(p) for p in base.model.parameters()}  # partitions alive outside the model (the replaced weights'):
    stray = sum(o.ds_tensor.numel() for o in gc.get_objects()
                if isinstance(o, torch.Tensor) and hasattr(o, "ds_tensor") and id(o) not in own)
    saved = safetensors_reader.SafetensorsReader([Path(directory) / "model.safetensors"])
    equal = {}
    for name, param in base.model.named_parameters():
        stored, _, index = name.partition(".chunks.")  # a chunk: rows of the saved weight
        expected = saved.read(stored + ".weight" if index else name)
        if index:
            rows = vocab_chunks.split(len(expected), vocab_chunks.CHUNKS)
            expected = expected.split(rows)[int(index.split(".")[0])]
        with deepspeed.zero.GatheredParameters([param]):
            equal[name] = torch.equal(param.data, expected)
    with torch.no_grad(), deepspeed.zero.GatheredParameters(list(base.model.parameters())):
        logits = base.model(input_ids=torch.arange(90).reshape(2, 45)).logits
    Path(report, f"{rank}.json").write_text(json.dumps({"shares": shares, "equal": equal, "logits": logits.tolist(),
                                                         "num_params": base.num_params, "stray": stray}))
    dist.destroy_process_group()
    # At interpreter exit a thread of DeepSpeed's CPU comm op is sometimes destroyed while running, which aborts
    # the process ("terminate called without an active exception") after all of the above has been done.
    os._exit(0)


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "vocabulary-in-chunks"])
def test_zero3_partitions_every_weight_as_it_loads(tmp_path, chunked):
    """Under ZeRO-3 each of 2 workers holds half of every weight from the start, read from the file by itself;
    gathered, they are the file's, and the model computes the saved model's logits (its embedding and LM head in
    chunks where they are large: scaling_lab/vocab_chunks.py)."""
    import json
    import socket

    import torch.multiprocessing as mp
    from transformers import LlamaConfig, LlamaForCausalLM

    from scaling_lab import vocab_chunks

    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    saved = LlamaForCausalLM(config).eval()
    saved.save_pretrained(tmp_path / "llama")
    with torch.no_grad():
        expected_logits = saved(input_ids=torch.arange(90).reshape(2, 45)).logits
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_load_partitioned_on_two_workers, args=(str(tmp_path / "llama"), port, str(tmp_path), chunked), nprocs=2)
    names = {name for name, _ in saved.named_parameters()}
    if chunked:
        chunks = len(vocab_chunks.split(config.vocab_size, vocab_chunks.CHUNKS))
        names = {name for name in names if name not in ("model.embed_tokens.weight", "lm_head.weight")} | {
            f"{layer}.chunks.{index}.weight" for layer in ("model.embed_tokens", "lm_head") for index in range(chunks)}
    for rank in (0, 1):
        report = json.loads((tmp_path / f"{rank}.json").read_text())
        assert report["num_params"] == sum(p.numel() for p in saved.parameters())
        assert set(report["shares"]) == names and report["stray"] == 0
        for name, (share, whole) in report["shares"].items():
            assert share == -(-whole // 2), name  # each worker holds its half of the weight, padded
        assert all(report["equal"].values())
        torch.testing.assert_close(torch.tensor(report["logits"]), expected_logits, rtol=1e-5, atol=1e-5)


def test_partition_range_is_deepspeeds_layout():
    """Worker r's ZeRO-3 partition of a weight of n elements: elements r·P ... (r+1)·P-1, P = ceil(n / workers),
    the last one padded (DeepSpeed's _partition_param)."""
    assert [models.partition_range(10, 4, rank) for rank in range(3)] == [(0, 4), (4, 4), (8, 2)]
    assert [models.partition_range(2, 1, rank) for rank in range(3)] == [(0, 1), (1, 1), (2, 0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ranges_of_a_checkpoint_tensor_read_straight_into_their_destination(tmp_path, monkeypatch, dtype):
    from safetensors.torch import save_file

    weight = torch.randn(37, 11)
    save_file({"w": weight, "empty": torch.empty(0)}, tmp_path / "model.safetensors")
    reader = safetensors_reader.SafetensorsReader([tmp_path / "model.safetensors"])
    monkeypatch.setattr(reader, "CHUNK_BYTES", 64)  # many chunks where the dtype is converted
    out = torch.full((150,), -1.0, dtype=dtype)
    reader.read_range("w", 100, out)
    assert torch.equal(out, weight.flatten()[100:250].to(dtype))
    whole = torch.empty(37, 11, dtype=dtype)
    reader.read_into("w", whole)
    assert torch.equal(whole, weight.to(dtype))
    reader.read_into("empty", torch.empty(0, dtype=dtype))
    with pytest.raises(ValueError, match="do not fit"):
        reader.read_range("w", 400, torch.empty(8))


def test_chunked_vocabulary_layers_compute_what_the_whole_layers_compute(monkeypatch):
    """Without ZeRO-3 too: the chunked embedding looks up the same rows, the chunked head gives the same logits,
    and PEFT's all-linear targets leave the chunks alone."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from scaling_lab import vocab_chunks

    monkeypatch.setattr(vocab_chunks, "MIN_CHUNKED_ELEMENTS", 0)
    config = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    whole = LlamaForCausalLM(config).eval()
    chunked = LlamaForCausalLM(config).eval()
    sources = vocab_chunks.chunk_vocabulary_layers(chunked, torch.float32)
    state = whole.state_dict()
    with torch.no_grad():
        for name, param in chunked.named_parameters():
            stored, first_row = sources.get(name, (name, 0))
            param.copy_(state[stored][first_row : first_row + len(param)] if name in sources else state[name])
    input_ids = torch.tensor([[0, 100, 13, 14, 26, 27, 52, 99]])
    assert torch.equal(chunked.get_input_embeddings()(input_ids), whole.get_input_embeddings()(input_ids))
    with torch.no_grad():
        torch.testing.assert_close(chunked(input_ids=input_ids).logits, whole(input_ids=input_ids).logits)
    targets = LoraConfig(r=2, target_modules="all-linear")
    adapted = {name for name, _ in get_peft_model(chunked, targets).named_modules() if name.endswith("lora_A")}
    assert adapted and not any("chunks" in name for name in adapted)


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
