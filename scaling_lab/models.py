"""The base model a trial fine-tunes, loaded once per worker process in the training precision (under ZeRO-3
partitioned as it loads) and shared by the trials that run there.

torch, transformers and peft are imported inside functions: spec validation imports this module before any compute.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scaling_lab.model_sources import TINY_PREFIX, check_model_source, local_directory
from scaling_lab.safetensors_reader import SafetensorsReader, safetensors_files
from scaling_lab.tiny_models import ensure_tiny_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from scaling_lab.spec_axes import ModelSpec

_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
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
        directory = local_directory(model.source)
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
        files = safetensors_files(location, options)
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

    directory = local_directory(location)
    if directory is not None and not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        return None
    tokenizer = AutoTokenizer.from_pretrained(location, **options)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_streamed(location: str, auto, dtype, options: dict, files: list[Path]) -> PreTrainedModel:
    """The model's empty weights in the training precision, then the checkpoint read into them one weight at a
    time with plain reads: the worker holds the model once, never the model plus a memory-mapped checkpoint (which
    from_pretrained maps whole, in the checkpoint's precision) nor a whole weight beside it."""
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
            checkpoint.read_into(found, param)
        for name, buffer in network.named_buffers():
            found = checkpoint.find(name, prefix)
            if found is not None:
                checkpoint.read_into(found, buffer)
    return network.eval()


def _load_partitioned(location: str, auto, dtype, ds_config: dict, options: dict, head: dict, seq_cls: bool,
                      files: list[Path] | None):
    """The model built under deepspeed.zero.Init (each worker keeps 1/world of every weight), its vocabulary-sized
    layers in chunks (scaling_lab/vocab_chunks.py), then each worker reads its own share of every weight from the
    checkpoint straight into its partition: no worker ever holds a whole weight, nothing is gathered or sent,
    and the checkpoint is never mapped into memory."""
    import contextlib

    import deepspeed
    import torch.distributed as dist
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights
    from transformers.integrations import HfDeepSpeedConfig

    from scaling_lab.vocab_chunks import chunk_vocabulary_layers

    context = HfDeepSpeedConfig(ds_config)  # while it lives, transformers builds models under deepspeed.zero.Init
    if files is None:  # no safetensors: transformers' own ZeRO-3 loading (worker 0 reads the whole checkpoint)
        return auto.from_pretrained(location, dtype=dtype, **options, **head), context
    # The checkpoint overwrites every weight but a new classifier head's: the random initialization of the others
    # (under ZeRO-3 a gather of every weight) is skipped.
    with contextlib.nullcontext() if seq_cls else no_init_weights():
        network = auto.from_config(AutoConfig.from_pretrained(location, **options, **head), dtype=dtype)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):  # its dtype from the config, as transformers builds
        chunked = chunk_vocabulary_layers(network, dtype)
    checkpoint = SafetensorsReader(files)
    prefix = getattr(network, "base_model_prefix", "")
    sources = {name: chunked.get(name, (name, 0)) for name, _ in network.named_parameters()}
    found = {name: (checkpoint.find(source, prefix), first_row) for name, (source, first_row) in sources.items()}
    missing = [name for name, (stored, _) in found.items() if stored is None]
    if missing and not seq_cls:  # a classifier's new head is the only weight a checkpoint may lack
        raise ValueError(f"{location}: the checkpoint lacks {len(missing)} weights of the model, e.g. {missing[0]}")
    for name, param in network.named_parameters():
        stored, first_row = found[name]
        if stored is None:
            continue
        offset = first_row * param.ds_shape[-1] if len(param.ds_shape) > 1 else 0
        if not chunked.get(name) and checkpoint.numel(stored) != param.ds_numel:
            raise ValueError(f"{location}: {stored} holds {checkpoint.numel(stored)} elements, the model's {name} "
                             f"{param.ds_numel}")
        start, count = partition_range(param.ds_numel, param.ds_tensor.ds_numel,
                                       dist.get_rank(group=getattr(param, "ds_process_group", None)))
        checkpoint.read_range(stored, offset + start, param.ds_tensor.narrow(0, 0, count))
    return network.eval(), context


def partition_range(numel: int, partition_numel: int, rank: int) -> tuple[int, int]:
    """The first element and the count of a weight's elements in worker `rank`'s ZeRO-3 partition: DeepSpeed
    gives worker r elements r·P ... (r+1)·P-1 of the flattened weight (P = its partition's size), the last
    worker's padded past the weight's end."""
    start = min(numel, rank * partition_numel)
    return start, min(partition_numel, numel - start)
