"""The causal LM's loss in blocks (scaling_lab/chunked_loss.py) computes the plain path's loss and LoRA gradients,
under ZeRO-0 and ZeRO-3 on 2 workers, with micro-batches; the held-out sums too; small logits keep the plain path."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from scaling_lab import chunked_loss

VOCAB = 1000  # large enough for several vocabulary chunks and blocks of tokens, with the limits below


def _batch(seed: int, rows: int = 1, length: int = 24) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (rows, length), generator=generator)
    labels = input_ids.clone()
    labels[:, :5] = chunked_loss.IGNORE_INDEX  # a prompt without loss, as the data's loss_start makes it
    labels[0, -3:] = chunked_loss.IGNORE_INDEX  # and padding
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def _worker(rank: int, directory: str, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from peft import LoraConfig, get_peft_model

    from scaling_lab import models, vocab_chunks
    from scaling_lab.deepspeed_setup import import_deepspeed
    from scaling_lab.spec import ModelSpec
    from scaling_lab.train import evaluate  # noqa: F401  (as a trial imports it)

    deepspeed = import_deepspeed()
    vocab_chunks.MIN_CHUNKED_ELEMENTS = 0  # the ZeRO-3 head in chunks of rows, as a large vocabulary's is
    chunked_loss.BLOCK_ELEMENTS, chunked_loss.ROWS_PER_BLOCK = 300, 96  # blocks of a few tokens and rows
    report = {}
    for stage in (0, 3):
        ds_config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
                     "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
        base = models.load_base(ModelSpec(name="m", source=directory), Path(directory) / "cache", "fp32",
                                ds_config if stage == 3 else None)
        torch.manual_seed(0)
        model = get_peft_model(base.model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                      init_lora_weights="gaussian"))
        with torch.no_grad():  # B away from its zeros, so that every LoRA weight has a gradient
            for param in (param for name, param in model.named_parameters() if "lora_B" in name):
                param.normal_(std=0.1)
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(trainable, lr=0.0), config=ds_config)
        parts = chunked_loss.lm_parts(engine)
        micro_batches = [_batch(10 * rank + index) for index in range(2)]
        for path, min_logits in (("plain", 1 << 62), ("chunked", 0)):
            losses = []
            for micro_batch in micro_batches:
                loss = chunked_loss.causal_lm_loss(engine, micro_batch, min_logits=min_logits, parts=parts)
                engine.backward(loss)
                losses.append(loss.item())
                if engine.is_gradient_accumulation_boundary():
                    grads = [deepspeed.utils.safe_get_full_grad(p).tolist() for p in trainable]
                engine.step()  # lr 0: the weights stay as they are, the gradients are cleared
            report[f"{stage}-{path}"] = {"losses": losses, "grads": grads}
        engine.eval()
        with torch.no_grad():
            batch = _batch(7 + rank, rows=2)
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            targets = batch["labels"][:, 1:]
            mask = targets != chunked_loss.IGNORE_INDEX
            plain = [torch.nn.functional.cross_entropy(logits[mask], targets[mask], reduction="sum").item(),
                     (logits[mask].argmax(-1) == targets[mask]).sum().item(), mask.sum().item()]
            chunked = chunked_loss.causal_lm_sums(engine, batch, parts)
            report[f"{stage}-sums"] = {"plain": plain, "chunked": list(chunked)}
        report[f"{stage}-head"] = type(parts.causal.get_output_embeddings()).__name__
        models.remove_adapter(base, model)
        engine.destroy()
    Path(directory, f"{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()
    os._exit(0)  # DeepSpeed's CPU comm thread may abort the interpreter's exit (see tests/test_models.py)


@pytest.mark.real
def test_chunked_loss_equals_the_plain_loss_under_zero0_and_zero3(tmp_path):
    import torch.multiprocessing as mp
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_worker, args=(str(tmp_path), port), nprocs=2)
    for rank in (0, 1):
        report = json.loads((tmp_path / f"{rank}.json").read_text())
        assert report["0-head"] == "Linear" and report["3-head"] == "ChunkedHead"
        for stage in (0, 3):
            plain, chunked = report[f"{stage}-plain"], report[f"{stage}-chunked"]
            torch.testing.assert_close(torch.tensor(chunked["losses"]), torch.tensor(plain["losses"]),
                                       rtol=1e-5, atol=0)
            assert len(plain["grads"]) == len(chunked["grads"]) > 0
            for got, expected in zip(chunked["grads"], plain["grads"]):
                expected = torch.tensor(expected)
                assert expected.abs().max() > 0
                torch.testing.assert_close(torch.tensor(got), expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
            sums = report[f"{stage}-sums"]
            torch.testing.assert_close(sums["chunked"][0], sums["plain"][0], rtol=1e-5, atol=0)
            assert sums["chunked"][1:] == sums["plain"][1:]


def test_small_logits_and_unsupported_models_keep_the_plain_path():
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from scaling_lab import data

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=data.SYNTHETIC_VOCAB_SIZE, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    assert chunked_loss.lm_parts(llama) is None  # a head that trains: its gradient is not computed in blocks
    parts = chunked_loss.lm_parts(llama.requires_grad_(False))  # frozen, as under PEFT
    assert parts is not None and parts.body is llama.model
    default_study_tokens = 32 * 32  # batch_size × seq_len
    assert not chunked_loss.chunks_loss(parts, default_study_tokens)  # the embedded tiny family: bit for bit as before
    assert chunked_loss.chunks_loss(parts, default_study_tokens, min_logits=0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32))
    assert chunked_loss.lm_parts(bert) is None
    llama.config.model_type = "granite"  # a model whose forward scales its logits
    assert chunked_loss.lm_parts(llama) is None
