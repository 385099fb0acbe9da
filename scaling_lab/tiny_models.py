"""The embedded tiny Llama family: pretrained once on the synthetic pretraining chain, cached by content."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scaling_lab.build_once import build_once
from scaling_lab.model_sources import TINY_FAMILY

if TYPE_CHECKING:
    from transformers import LlamaConfig, PreTrainedModel

# AdamW with linear warmup and cosine decay on sequences of the pretraining chain (data.pretraining_chain_logits).
TINY_PRETRAINING: dict[str, Any] = {
    "steps": 250,
    "batch_size": 8,
    "seq_len": 64,
    "learning_rate": 3e-3,
    "warmup_steps": 20,
    "init_seed": 0,
    "data_seed": 1,
}
# Bump when the pretraining code changes what it computes: cached tiny models are then rebuilt.
TINY_CODE_VERSION = 1


def tiny_config(size: str) -> LlamaConfig:
    from transformers import LlamaConfig

    return LlamaConfig(**TINY_FAMILY[size])


def tiny_model_dir(size: str, cache_dir: Path) -> Path:
    """cache_dir/models/tiny-<size>-<hash of everything that determines the pretrained weights>."""
    from scaling_lab import markov_task as data

    config = tiny_config(size).to_dict()
    for incidental in ("transformers_version", "_name_or_path"):
        config.pop(incidental, None)
    content = {
        "config": config,
        "pretraining": TINY_PRETRAINING,
        "chain": {
            "vocab_size": data.SYNTHETIC_VOCAB_SIZE,
            "seed": data.PRETRAINING_CHAIN_SEED,
            "logit_scale": data.PRETRAINING_LOGIT_SCALE,
        },
        "code_version": TINY_CODE_VERSION,
    }
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser() / "models" / f"tiny-{size}-{digest}"


def ensure_tiny_model(size: str, cache_dir: Path) -> Path:
    """The directory of the pretrained tiny model, pretraining it first if no process has yet (once, whichever
    process on whichever node sharing the cache gets there first)."""

    def pretrain(staging: Path) -> None:
        started = time.perf_counter()
        _save(pretrain_tiny(size), staging)
        record = {"size": size, "pretraining": TINY_PRETRAINING, "seconds": time.perf_counter() - started}
        (staging / "pretraining.json").write_text(json.dumps(record, indent=2))

    return build_once(tiny_model_dir(size, cache_dir), pretrain)


def _save(model: PreTrainedModel, directory: Path) -> None:
    """Config and weights, written by whichever process calls this: save_pretrained writes nothing on a worker
    whose torch.distributed rank is not 0, and a tiny model may be first needed on any worker."""
    from safetensors.torch import save_file

    model.config.save_pretrained(directory)
    weights = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    if not (directory / "config.json").is_file():
        raise RuntimeError(f"{directory}: the model's config was not written")


def pretrain_tiny(size: str) -> PreTrainedModel:
    """A tiny Llama trained on the pretraining Markov chain; deterministic, and the global RNG is left untouched."""
    import torch
    from transformers import LlamaForCausalLM

    from scaling_lab import markov_task as data

    settings = TINY_PRETRAINING
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings["init_seed"])
        model = LlamaForCausalLM(tiny_config(size))
    corpus = data.sample_markov(
        data.pretraining_chain_logits(),
        num_sequences=settings["steps"] * settings["batch_size"],
        seq_len=settings["seq_len"],
        generator=torch.Generator().manual_seed(settings["data_seed"]),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["learning_rate"], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(settings["warmup_steps"], settings["steps"]))
    model.train()
    with _single_threaded():
        for batch in corpus.split(settings["batch_size"]):
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
    model.eval()
    return model


@contextmanager
def _single_threaded() -> Iterator[None]:
    """One intra-op thread: the result cannot depend on a node's core count, and a busy machine cannot stall
    the matrix products on threads waiting for each other (these models are too small to gain from more)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _warmup_cosine(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    return factor
