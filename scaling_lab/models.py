"""Base models: the embedded tiny Llama family (pretrained once, cached by content), local directories and hub ids.

torch, transformers and peft are imported inside functions: spec validation imports this module before any compute.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from scaling_lab.build_once import build_once
from scaling_lab.spec_axes import TINY_PREFIX

if TYPE_CHECKING:
    from transformers import LlamaConfig, PreTrainedModel

    from scaling_lab.spec_axes import ModelSpec

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


PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class BaseModel:
    """A frozen base model as loaded in one process; the trials there share it, each adding and removing its adapter."""

    model: PreTrainedModel
    tokenizer: Any | None  # None for tiny models: the synthetic token tasks need none
    num_params: int
    vocab_size: int
    commit: str | None = None  # the hub commit the weights came from, where the hub names one
    deepspeed_context: Any = None  # under ZeRO-3: transformers' HfDeepSpeedConfig, alive as long as the model


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


def is_hub_source(source: str) -> bool:
    return not source.startswith(TINY_PREFIX) and _local_directory(source) is None


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


def load_base(model: ModelSpec, cache_dir: Path, precision: str = "fp32",
              zero3_config: dict | None = None) -> BaseModel:
    """The base model in the training precision, with its tokenizer, ready for PEFT.

    Loaded once per process and shared by the trials that run there one after another: each trial adds its own
    adapter and takes it off again (`remove_adapter`), which leaves the frozen weights as they were loaded; a trial
    that fails calls `forget`, so that the next one loads afresh. Only the last base loaded is kept.
    With `zero3_config` (the trial's DeepSpeed config, ZeRO stage 3), every weight is partitioned across the
    workers as it loads: no worker ever holds the whole model.
    """
    cache_dir = Path(cache_dir).expanduser().resolve()
    partitioning = json.dumps(zero3_config["zero_optimization"], sort_keys=True) if zero3_config else None
    key = (model.source, model.revision, model.kind, model.num_labels, cache_dir, precision, partitioning)
    if key not in _memo:
        forget()
        _memo[key] = _load(model, cache_dir, precision, zero3_config)
    return _memo[key]


def forget() -> None:
    """Drop the shared base (and, under ZeRO-3, transformers' global DeepSpeed config with it)."""
    if any(base.deepspeed_context is not None for base in _memo.values()):
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    _memo.clear()


def remove_adapter(base: BaseModel, peft_model) -> None:
    """Take a trial's adapter off the shared base, leaving the base as it was loaded."""
    from peft.utils.other import ModulesToSaveWrapper

    # Modules trained in full (a classifier's new head) stay as trained after unload(): the originals go back.
    originals = {name: module.original_module for name, module in base.model.named_modules()
                 if isinstance(module, ModulesToSaveWrapper)}
    network = peft_model.unload()  # PEFT puts the original modules back in place of the LoRA layers
    if network is not base.model:
        raise RuntimeError("PEFT returned another model than the base it wrapped")
    for name, original in originals.items():
        network.set_submodule(name, original)
    if any(getattr(module, "gradient_checkpointing", False) for module in network.modules()):
        network.gradient_checkpointing_disable()
    if getattr(network, "_require_grads_hook", None) is not None:
        network.disable_input_require_grads()
    network.eval()  # as from_pretrained returns it


def _load(model: ModelSpec, cache_dir: Path, precision: str, zero3_config: dict | None) -> BaseModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    check_model_source(model.source)
    if model.source.startswith(TINY_PREFIX):
        if model.kind != "causal_lm":
            raise ValueError(f"{model.source} is a causal language model; it cannot be loaded as {model.kind}")
        location = str(ensure_tiny_model(model.source.removeprefix(TINY_PREFIX), cache_dir))
    else:
        directory = _local_directory(model.source)
        location = str(directory) if directory is not None else model.source  # hub: through the HF cache
    seq_cls = model.kind == "seq_cls"
    auto = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
    options = {"revision": model.revision} if model.revision else {}
    head = {"num_labels": model.num_labels} if seq_cls else {}
    dtype = getattr(torch, PRECISION_DTYPES[precision])
    context = None
    # A fixed seed for weights the checkpoint lacks (a new classification head), whatever the global RNG holds.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        files = _safetensors_files(location, options)
        tiny = model.source.startswith(TINY_PREFIX)  # loaded as ever: the published default study's curves
        if zero3_config is None and files is not None and not seq_cls and not tiny:
            network = _load_streamed(location, auto, dtype, options, files)
        elif zero3_config is None:  # a tiny model, a new classifier head to initialize, or no safetensors
            network = auto.from_pretrained(location, dtype=dtype, **options, **head)
        else:
            network, context = _load_partitioned(location, auto, dtype, zero3_config, options, head, seq_cls, files)
    tokenizer = None if model.source.startswith(TINY_PREFIX) else _tokenizer(location, options)
    if tokenizer is not None and network.config.pad_token_id is None:
        network.config.pad_token_id = tokenizer.pad_token_id  # decoder classifiers find the last token by it
    return BaseModel(
        model=network,
        tokenizer=tokenizer,
        num_params=sum(getattr(p, "ds_numel", p.numel()) for p in network.parameters()),
        vocab_size=network.get_input_embeddings().num_embeddings,
        commit=getattr(network.config, "_commit_hash", None),
        deepspeed_context=context,
    )


def _tokenizer(location: str, options: dict) -> Any | None:
    from transformers import AutoTokenizer

    directory = _local_directory(location)
    if directory is not None and not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        return None
    tokenizer = AutoTokenizer.from_pretrained(location, **options)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_streamed(location: str, auto, dtype, options: dict, files: list[Path]) -> PreTrainedModel:
    """The model's empty weights in the training precision, then the checkpoint copied in one weight at a time
    with plain reads: the worker holds the model once, never the model plus a memory-mapped checkpoint (which
    from_pretrained maps whole, in the checkpoint's precision)."""
    import torch
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    with no_init_weights():
        network = auto.from_config(AutoConfig.from_pretrained(location, **options), dtype=dtype)
    network.tie_weights()
    checkpoint = SafetensorsReader(files)
    prefix = getattr(network, "base_model_prefix", "")
    with torch.no_grad():
        for name, param in network.named_parameters():
            found = checkpoint.find(name, prefix)
            if found is None:
                raise ValueError(f"{location}: the checkpoint has no weight {name}")
            param.copy_(checkpoint.read(found))
        for name, buffer in network.named_buffers():
            found = checkpoint.find(name, prefix)
            if found is not None:
                buffer.copy_(checkpoint.read(found))
    return network.eval()


def _load_partitioned(location: str, auto, dtype, ds_config: dict, options: dict, head: dict, seq_cls: bool,
                      files: list[Path] | None):
    """The model built under deepspeed.zero.Init (each worker keeps 1/world of every weight), then its checkpoint
    copied in one weight at a time: worker 0 reads the weight from disk, the gathered weight takes it, and
    leaving the gather partitions it again. Plain reads, no memory map, so no worker's memory ever holds more
    than one full weight beside its partitions."""
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoConfig
    from transformers.integrations import HfDeepSpeedConfig

    context = HfDeepSpeedConfig(ds_config)  # while it lives, transformers builds models under deepspeed.zero.Init
    if files is None:  # no safetensors: transformers' own ZeRO-3 loading (worker 0 reads the whole checkpoint)
        return auto.from_pretrained(location, dtype=dtype, **options, **head), context
    network = auto.from_config(AutoConfig.from_pretrained(location, **options, **head), dtype=dtype)
    checkpoint = SafetensorsReader(files)
    prefix = getattr(network, "base_model_prefix", "")
    names = {name: checkpoint.find(name, prefix) for name, _ in network.named_parameters()}
    missing = [name for name, found in names.items() if found is None]
    if missing and not seq_cls:  # a classifier's new head is the only weight a checkpoint may lack
        raise ValueError(f"{location}: the checkpoint lacks {len(missing)} weights of the model, e.g. {missing[0]}")
    loads_here = dist.get_rank() == 0
    for name, param in network.named_parameters():
        if names[name] is None:
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if loads_here:
                param.data.copy_(checkpoint.read(names[name]))
    return network.eval(), context


def _safetensors_files(location: str, options: dict) -> list[Path] | None:
    directory = _local_directory(location)
    if directory is None:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors"]
        directory = Path(snapshot_download(location, allow_patterns=patterns, **options))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return sorted({directory / name for name in json.loads(index.read_text())["weight_map"].values()})
    single = directory / "model.safetensors"
    return [single] if single.is_file() else None


class SafetensorsReader:
    """Tensors of .safetensors files, read one at a time into ordinary memory."""

    DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}

    def __init__(self, files: list[Path]):
        self.entries: dict[str, tuple[Path, int, dict]] = {}
        for path in files:
            with open(path, "rb") as handle:
                header_size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(header_size))
            header.pop("__metadata__", None)
            for name, entry in header.items():
                self.entries[name] = (path, 8 + header_size, entry)

    def find(self, name: str, prefix: str) -> str | None:
        """The checkpoint's name for model parameter `name` (a bare base model's checkpoint lacks the prefix)."""
        for candidate in (name, name.removeprefix(f"{prefix}."), f"{prefix}.{name}"):
            if candidate in self.entries:
                return candidate
        return None

    def read(self, name: str):
        import torch

        path, data_start, entry = self.entries[name]
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        with open(path, "rb") as handle:
            handle.seek(data_start + begin)
            handle.readinto(buffer)
        dtype = getattr(torch, self.DTYPES[entry["dtype"]])
        if not buffer:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])


# ---- the tiny family: content-addressed cache ----


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
