"""Fine-tuning data: a study's task as its trials read it (load_task), from the modules that make it.

- markov_task.py: the offline synthetic Markov task, also the tiny models' pretraining corpus;
- data_sources.py: files, hub datasets and builtin tasks read in chunks and checked (DataError);
- data_preparation.py: text data prepared once per study and tokenizer (built here under a file lock);
- data_batches.py: the splits (prepared rows memory-mapped) and their seeded batches.
The names other modules use are importable from here as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scaling_lab.build_once import build_once
from scaling_lab.data_batches import IGNORE_INDEX, PreparedRows, Split, Task, TokenTensors, batch_iterator
from scaling_lab.data_preparation import _open_prepared, _prepare, _prepared_dir, _Request
from scaling_lab.data_sources import DataError, validate_data_source
from scaling_lab.markov_task import (
    PRETRAINING_CHAIN_SEED,
    PRETRAINING_LOGIT_SCALE,
    SHIFT_RANK,
    SYNTHETIC_VOCAB_SIZE,
    TASK_EVAL_SAMPLE_SEED,
    TASK_TRAIN_SAMPLE_SEED,
    markov_logits,
    markov_shift_task_logits,
    pretraining_chain_logits,
    sample_markov,
)
from scaling_lab.spec_data import DataSpec
from scaling_lab.spec_training import TrainingSettings

__all__ = [  # load_task and rows_read are defined here; the rest is re-exported for the modules that use it
    "IGNORE_INDEX",
    "PRETRAINING_CHAIN_SEED",
    "PRETRAINING_LOGIT_SCALE",
    "SHIFT_RANK",
    "SYNTHETIC_VOCAB_SIZE",
    "TASK_EVAL_SAMPLE_SEED",
    "TASK_TRAIN_SAMPLE_SEED",
    "DataError",
    "DataSpec",
    "PreparedRows",
    "Split",
    "Task",
    "TokenTensors",
    "batch_iterator",
    "load_task",
    "markov_logits",
    "markov_shift_task_logits",
    "pretraining_chain_logits",
    "rows_read",
    "sample_markov",
    "validate_data_source",
]


def rows_read(training: TrainingSettings) -> tuple[int, int]:
    """The train and held-out rows one trial reads: steps × batch and eval_batches × batch.

    Text data is prepared for exactly these counts, and they are part of what the prepared data is keyed by.
    Every trial of a study shares its training settings (the grid varies models, ranks, α, learning rates,
    seeds and scaling rules only), so all trials of a study that share a tokenizer share one prepared dataset.
    """
    return training.total_steps * training.batch_size, training.eval_batches * training.batch_size


_memo: dict[tuple, Task] = {}


def load_task(
    data: DataSpec, training: TrainingSettings, *, kind: str, tokenizer: Any, vocab_size: int, base_dir: Path,
    cache_dir: Path,
) -> Task:
    """The task as the trials with these training settings read it; text data is prepared in cache_dir first
    unless a trial (in any process sharing cache_dir) already has.

    Memoized per process for the last arguments seen, so a pack of trials loads once.
    """
    base_dir, cache_dir = Path(base_dir).resolve(), Path(cache_dir).expanduser().resolve()
    train_rows, eval_rows = rows_read(training)
    key = (data, kind, _tokenizer_key(tokenizer), vocab_size, training.seq_len, base_dir, cache_dir, train_rows,
           eval_rows)
    if key not in _memo:
        _memo.clear()
        if data.is_synthetic:
            _memo[key] = _synthetic_task(data, kind, vocab_size, training.seq_len)
        elif tokenizer is None:
            raise DataError(f"{data.source}: text data needs a model with a tokenizer (tiny:<size> models have none)")
        else:
            request = _Request(data, kind, tokenizer, vocab_size, training.seq_len, base_dir, train_rows, eval_rows)
            directory = build_once(_prepared_dir(request, cache_dir), lambda staging: _prepare(request, staging))
            _memo[key] = _open_prepared(directory, data.source)
    return _memo[key]


def _tokenizer_key(tokenizer: Any) -> tuple | None:
    """Cheap to compute, for the per-process memo; prepared data on disk is keyed by _tokenizer_fingerprint."""
    if tokenizer is None:
        return None
    return (type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer), tokenizer.pad_token_id,
            tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.chat_template, tokenizer.truncation_side)


def _synthetic_task(data: DataSpec, kind: str, vocab_size: int, seq_len: int) -> Task:
    import torch

    if kind != "causal_lm":
        raise DataError(f"{data.source}: a token-level language-modelling task; it needs a causal_lm model")
    if vocab_size < SYNTHETIC_VOCAB_SIZE:
        raise DataError(
            f"{data.source}: needs a vocabulary of at least {SYNTHETIC_VOCAB_SIZE} tokens, got {vocab_size}"
        )
    logits = markov_shift_task_logits()
    train_generator = torch.Generator().manual_seed(TASK_TRAIN_SAMPLE_SEED)
    eval_generator = torch.Generator().manual_seed(TASK_EVAL_SAMPLE_SEED)
    train_ids = sample_markov(logits, data.train_examples, seq_len, train_generator)
    eval_ids = sample_markov(logits, data.eval_examples, seq_len, eval_generator)
    return Task(name=data.source, train=TokenTensors(train_ids), eval=TokenTensors(eval_ids))
