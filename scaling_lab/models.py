"""Base models: the embedded tiny Llama family (pretrained once, cached by content), local directories and hub ids.

torch, transformers and peft are imported inside functions: spec validation imports this module before any compute.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from scaling_lab.spec import TINY_PREFIX

if TYPE_CHECKING:
    from transformers import LlamaConfig, PreTrainedModel

    from scaling_lab.spec import ModelSpec

TINY_VOCAB_SIZE = 64  # the synthetic tasks' alphabet, data.SYNTHETIC_VOCAB_SIZE


def _tiny_llama(hidden_size: int, num_layers: int, num_heads: int) -> dict[str, Any]:
    return {
        "vocab_size": TINY_VOCAB_SIZE,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads,
        "max_position_embeddings": 256,
    }


# LlamaConfig arguments; head dimension 16 throughout. Parameter counts: xs 90k, s 289k, m 673k, l 1.5M.
TINY_FAMILY: dict[str, dict[str, Any]] = {
    "xs": _tiny_llama(hidden_size=64, num_layers=2, num_heads=4),
    "s": _tiny_llama(hidden_size=96, num_layers=3, num_heads=6),
    "m": _tiny_llama(hidden_size=128, num_layers=4, num_heads=8),
    "l": _tiny_llama(hidden_size=192, num_layers=4, num_heads=12),
}

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

_HUB_ID = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?")
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
PACKAGE_PREFIX = "package:"
_PACKAGE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class BaseModel:
    model: PreTrainedModel
    tokenizer: Any | None  # None for tiny models: the synthetic token tasks need none
    num_params: int
    vocab_size: int


# ---- checking a source without loading anything ----


def check_model_source(source: str) -> None:
    """Raise ValueError with a one-line reason if `source` cannot name a model; torch-free and fast."""
    if source.startswith(TINY_PREFIX):
        size = source.removeprefix(TINY_PREFIX)
        if size not in TINY_FAMILY:
            allowed = ", ".join(TINY_PREFIX + name for name in TINY_FAMILY)
            raise ValueError(f"unknown tiny model size {size!r}; allowed: {allowed}")
        return
    directory = _local_directory(source)
    if directory is not None:
        if not directory.exists():
            raise ValueError(f"model directory {source!r} does not exist")
        if not (directory / "config.json").is_file():
            raise ValueError(f"model directory {source!r} has no config.json")
        return
    if not _HUB_ID.fullmatch(source):
        raise ValueError(
            f"{source!r} is neither tiny:<size>, an existing model directory, nor a hub id like org/name"
        )


def _local_directory(source: str) -> Path | None:
    """The path `source` names, if it looks like one or exists on disk; otherwise it is a hub id.

    `package:<import name>[/<folder>]` is a model folder shipped inside an installed Python package.
    """
    if source.startswith(PACKAGE_PREFIX):
        return package_model_directory(source)
    path = Path(source).expanduser()
    if source.startswith(("/", "./", "../", "~")) or path.exists():
        return path
    return None


def model_location(source: str) -> str:
    """What from_pretrained is given for a local or package `source`: its directory; a hub id as it is."""
    directory = _local_directory(source)
    return str(directory) if directory is not None else source


def package_model_directory(source: str) -> Path:
    """The folder of `package:<name>[/<folder>]`: <folder> inside the package, or else the package's only folder
    holding a config.json (the package itself first). Finds the package without importing it."""
    import importlib.util

    name, _, folder = source.removeprefix(PACKAGE_PREFIX).partition("/")
    found = importlib.util.find_spec(name) if _PACKAGE_NAME.fullmatch(name) else None
    if found is None or not found.submodule_search_locations:
        raise ValueError(
            f"package {name!r} is not installed; install it with: python -m pip install {name.replace('_', '-')}"
        )
    package_dir = Path(next(iter(found.submodule_search_locations)))
    if folder:
        return package_dir / folder
    configs = sorted(package_dir.rglob("config.json"), key=lambda path: (len(path.parts), str(path)))
    return configs[0].parent if configs else package_dir


# ---- loading ----

_memo: dict[tuple, BaseModel] = {}


def load_base(model: ModelSpec, cache_dir: Path) -> BaseModel:
    """The base model in float32, ready for PEFT, with its tokenizer.

    The last base loaded is kept in memory, so a pack of trials reads it from disk once; each call returns
    an independent copy, since LoRA wraps and trains it.
    """
    cache_dir = Path(cache_dir).expanduser().resolve()
    key = (model.source, model.kind, model.num_labels, cache_dir)
    if key not in _memo:
        _memo.clear()
        _memo[key] = _load(model, cache_dir)
    return copy.deepcopy(_memo[key])


def _load(model: ModelSpec, cache_dir: Path) -> BaseModel:
    import torch

    check_model_source(model.source)
    # A fixed seed for weights the checkpoint lacks (a new classification head), whatever the global RNG holds.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if model.source.startswith(TINY_PREFIX):
            network, tokenizer = _load_tiny(model, cache_dir), None
        else:
            network, tokenizer = _load_pretrained(model)
    return BaseModel(
        model=network,
        tokenizer=tokenizer,
        num_params=sum(p.numel() for p in network.parameters()),
        vocab_size=network.get_input_embeddings().num_embeddings,
    )


def _load_tiny(model: ModelSpec, cache_dir: Path) -> PreTrainedModel:
    import torch
    from transformers import LlamaForCausalLM

    if model.kind != "causal_lm":
        raise ValueError(f"{model.source} is a causal language model; it cannot be loaded as {model.kind}")
    directory = ensure_tiny_model(model.source.removeprefix(TINY_PREFIX), cache_dir)
    return LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)


def _load_pretrained(model: ModelSpec) -> tuple[PreTrainedModel, Any | None]:
    """From a local directory or the hub (through the Hugging Face cache, which honours HF_HOME and offline mode)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    directory = _local_directory(model.source)
    location = str(directory) if directory is not None else model.source
    if model.kind == "seq_cls":
        network = AutoModelForSequenceClassification.from_pretrained(
            location, num_labels=model.num_labels, dtype=torch.float32
        )
    else:
        network = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
    has_tokenizer = directory is None or any((directory / name).is_file() for name in _TOKENIZER_FILES)
    tokenizer = AutoTokenizer.from_pretrained(location) if has_tokenizer else None
    if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer is not None and network.config.pad_token_id is None:
        network.config.pad_token_id = tokenizer.pad_token_id  # decoder classifiers find the last token by it
    return network, tokenizer


# ---- the tiny family: content-addressed cache ----


def tiny_config(size: str) -> LlamaConfig:
    from transformers import LlamaConfig

    return LlamaConfig(**TINY_FAMILY[size])


def tiny_model_dir(size: str, cache_dir: Path) -> Path:
    """cache_dir/models/tiny-<size>-<hash of everything that determines the pretrained weights>."""
    from scaling_lab import data

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
    """The directory of the pretrained tiny model, pretraining it first if no process has yet.

    Concurrent callers (trials on one node, or nodes sharing the cache) wait on a file lock and build it once;
    the model is written to a temporary directory and renamed, so a directory that exists is complete.
    """
    directory = tiny_model_dir(size, cache_dir)
    if directory.is_dir():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(directory.parent / f"{directory.name}.lock"):
        if directory.is_dir():
            return directory
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            started = time.perf_counter()
            pretrain_tiny(size).save_pretrained(staging)
            record = {"size": size, "pretraining": TINY_PRETRAINING, "seconds": time.perf_counter() - started}
            (staging / "pretraining.json").write_text(json.dumps(record, indent=2))
            os.rename(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return directory


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pretrain_tiny(size: str) -> PreTrainedModel:
    """A tiny Llama trained on the pretraining Markov chain; deterministic, and the global RNG is left untouched."""
    import torch
    from transformers import LlamaForCausalLM

    from scaling_lab import data

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
