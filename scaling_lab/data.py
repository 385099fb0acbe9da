"""Fine-tuning data as padded token tensors: the offline synthetic Markov task, local files and hub datasets.

The synthetic task and the tiny models' pretraining corpus come from the same random first-order Markov chain
over SYNTHETIC_VOCAB_SIZE tokens: pretraining learns the chain, fine-tuning learns a low-rank shift of its logits.
"""

from __future__ import annotations

import dataclasses
import math
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pandas as pd
import pyarrow.parquet as pq

from scaling_lab.spec import DataSpec, resolve_path

if TYPE_CHECKING:
    import torch

SYNTHETIC_VOCAB_SIZE = 64
PRETRAINING_CHAIN_SEED = 0
PRETRAINING_LOGIT_SCALE = 2.0
# The task's seeds are constants, independent of any trial seed: every trial sees the same task.
SHIFT_SEED = 1
SHIFT_RANK = 4
SHIFT_STRENGTH = 1.5
TASK_TRAIN_SAMPLE_SEED = 2
TASK_EVAL_SAMPLE_SEED = 3
EVAL_HOLDOUT_SEED = 0
IGNORE_INDEX = -100
VALIDATION_ROWS = 100


class DataError(ValueError):
    """Data that cannot be used; the message names the file (or dataset) and what is wrong with it."""


@dataclass(frozen=True)
class Task:
    """A tokenized fine-tuning task. Tensors are shared between the trials of a process: treat them as read-only."""

    name: str
    train: dict[str, torch.Tensor]
    eval: dict[str, torch.Tensor]


# ---- Markov chains ----


def markov_logits(vocab_size: int, seed: int, scale: float = PRETRAINING_LOGIT_SCALE) -> torch.Tensor:
    """Transition logits [vocab, vocab] of a random first-order chain: row i holds the next-token logits after i."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(vocab_size, vocab_size, generator=generator)


def low_rank_shift(vocab_size: int, rank: int, seed: int, strength: float) -> torch.Tensor:
    """U Vᵀ of the given rank, scaled so that its entries have standard deviation `strength`."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    left = torch.randn(vocab_size, rank, generator=generator)
    right = torch.randn(vocab_size, rank, generator=generator)
    return strength * (left @ right.T) / rank**0.5


def pretraining_chain_logits() -> torch.Tensor:
    return markov_logits(SYNTHETIC_VOCAB_SIZE, PRETRAINING_CHAIN_SEED)


def markov_shift_task_logits() -> torch.Tensor:
    """The chain of synthetic:markov-shift: the pretraining chain plus a low-rank shift of its logits."""
    return pretraining_chain_logits() + low_rank_shift(SYNTHETIC_VOCAB_SIZE, SHIFT_RANK, SHIFT_SEED, SHIFT_STRENGTH)


def sample_markov(logits: torch.Tensor, num_sequences: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences [num_sequences, seq_len] from the chain, first tokens uniform; one vectorized step per position."""
    import torch

    vocab_size = logits.shape[0]
    cumulative = torch.softmax(logits.double(), dim=-1).cumsum(dim=-1)
    uniforms = torch.rand(seq_len, num_sequences, 1, generator=generator, dtype=torch.float64)
    tokens = torch.empty(seq_len, num_sequences, dtype=torch.long)
    tokens[0] = torch.randint(vocab_size, (num_sequences,), generator=generator)
    for position in range(1, seq_len):
        drawn = torch.searchsorted(cumulative[tokens[position - 1]], uniforms[position]).squeeze(1)
        tokens[position] = drawn.clamp_max(vocab_size - 1)  # a uniform above a row's rounded total
    return tokens.T.contiguous()


# ---- tasks ----

_memo: dict[tuple, Task] = {}


def load_task(
    data: DataSpec, *, kind: str, tokenizer: Any, vocab_size: int, seq_len: int, base_dir: Path
) -> Task:
    """The task's train and eval splits as tensors input_ids, attention_mask, labels [N, seq_len] ([N] for seq_cls).

    Memoized per process for the last arguments seen, so a pack of trials tokenizes once.
    """
    key = (data, kind, _tokenizer_key(tokenizer), vocab_size, seq_len, Path(base_dir).resolve())
    if key not in _memo:
        _memo.clear()
        _memo[key] = _build_task(data, kind, tokenizer, vocab_size, seq_len, Path(base_dir))
    return _memo[key]


def _tokenizer_key(tokenizer: Any) -> tuple | None:
    if tokenizer is None:
        return None
    return (type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer), tokenizer.pad_token_id)


def _build_task(data: DataSpec, kind: str, tokenizer: Any, vocab_size: int, seq_len: int, base_dir: Path) -> Task:
    if data.is_synthetic:
        return _synthetic_task(data, kind, vocab_size, seq_len)
    if tokenizer is None:
        raise DataError(f"{data.source}: text data needs a model with a tokenizer (tiny:<size> models have none)")
    train_rows, eval_rows = _read_splits(data, base_dir, tokenizer)
    data = _as_prompt_and_completion(data)
    if kind == "seq_cls":
        train_labels, eval_labels = _label_ids(train_rows[data.label_column], eval_rows[data.label_column], data)
        return Task(
            name=data.source,
            train=_encode_classification(train_rows, train_labels, data, tokenizer, seq_len),
            eval=_encode_classification(eval_rows, eval_labels, data, tokenizer, seq_len),
        )
    return Task(
        name=data.source,
        train=_encode_causal(train_rows, data, tokenizer, seq_len),
        eval=_encode_causal(eval_rows, data, tokenizer, seq_len),
    )


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
    return Task(name=data.source, train=_all_tokens_split(train_ids), eval=_all_tokens_split(eval_ids))


def _all_tokens_split(input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    import torch

    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


# ---- reading tables ----


def validate_data_source(data: DataSpec, base_dir: Path) -> None:
    """Check before any compute that a data file is readable, not empty and has the named columns."""
    if data.is_synthetic or data.is_hub:
        return
    path = resolve_path(data.source, base_dir)
    _check_table(_read_table(path, max_rows=VALIDATION_ROWS), data, str(path))


def _read_splits(data: DataSpec, base_dir: Path, tokenizer: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and eval rows, laid out and filtered by word count; at most max_examples rows of each split are
    kept, before any hold-out."""
    if data.is_hub:
        train_rows = _laid_out(_read_hub_split(data, data.train_split), data, tokenizer)
        eval_rows = _laid_out(_read_hub_split(data, data.eval_split), data, tokenizer) if data.eval_split else None
    else:
        path = resolve_path(data.source, base_dir)
        train_rows, eval_rows = _laid_out(_check_table(_read_table(path), data, str(path)), data, tokenizer), None
    if data.max_examples is not None:
        train_rows = train_rows.head(data.max_examples)
        eval_rows = eval_rows.head(data.max_examples) if eval_rows is not None else None
    if eval_rows is None:
        return _hold_out(train_rows, data.eval_fraction, data.source)
    return train_rows, eval_rows


def _read_hub_split(data: DataSpec, split: str) -> pd.DataFrame:
    """`hf:<dataset id>` or `hf:<dataset id>:<config name>` (e.g. hf:nyu-mll/glue:mrpc)."""
    import datasets

    dataset_id, _, config_name = data.source.removeprefix("hf:").partition(":")
    table = datasets.load_dataset(dataset_id, config_name or None, split=split, revision=data.revision).to_pandas()
    return _check_table(table, data, f"{data.source} split {split!r}")


def _read_table(path: Path, max_rows: int | None = None) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: data file does not exist")
    reader = _READERS.get(path.suffix)
    if reader is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(_READERS)}")
    try:
        table = reader(path, max_rows)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: cannot be read as {path.suffix[1:]}: {reason}") from None
    if table.empty:
        raise DataError(f"{path}: has no rows")
    return table


def _read_jsonl(path: Path, max_rows: int | None) -> pd.DataFrame:
    return pd.read_json(path, lines=True, nrows=max_rows, dtype=False)


def _read_json(path: Path, max_rows: int | None) -> pd.DataFrame:
    """A JSON array of records, or JSON lines under a .json name (as many hub exports are)."""
    try:
        table = pd.read_json(path, dtype=False)
    except ValueError:
        table = _read_jsonl(path, None)
    return table.head(max_rows) if max_rows is not None else table


def _read_csv(path: Path, max_rows: int | None) -> pd.DataFrame:
    # Only empty cells are missing: texts such as "NA" or "None" stay text.
    return pd.read_csv(path, nrows=max_rows, keep_default_na=False, na_values=[""])


def _read_parquet(path: Path, max_rows: int | None) -> pd.DataFrame:
    if max_rows is None:
        return pd.read_parquet(path)
    file = pq.ParquetFile(path)
    first = next(file.iter_batches(batch_size=max_rows), None)
    return (first if first is not None else file.schema_arrow.empty_table()).to_pandas()


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}


def _named_columns(data: DataSpec) -> dict[str, str]:
    fields = ("text_column", "prompt_column", "completion_column", "messages_column", "label_column")
    named = {field: getattr(data, field) for field in fields if getattr(data, field) is not None}
    if data.prompt_template is not None:
        for _, column, _, _ in string.Formatter().parse(data.prompt_template):
            if column is not None:
                named[f"prompt_template {{{column}}}"] = column
    return named


PROMPT, COMPLETION = "prompt", "completion"


def _as_prompt_and_completion(data: DataSpec) -> DataSpec:
    """The spec as seen after `_laid_out`: a template or chat messages have become prompt and completion."""
    if data.prompt_template is None and data.messages_column is None:
        return data
    return dataclasses.replace(
        data, prompt_column=PROMPT, completion_column=COMPLETION, prompt_template=None, messages_column=None
    )


def _laid_out(table: pd.DataFrame, data: DataSpec, tokenizer: Any) -> pd.DataFrame:
    """Rows with the prompt and completion a template or chat messages make, filtered by min_words / max_words."""
    if data.prompt_template is not None:
        table = _with_template_prompt(table, data)
    elif data.messages_column is not None:
        table = _with_chat_prompt(table, data, tokenizer)
    if data.min_words is None and data.max_words is None:
        return table
    return _within_word_range(table, _as_prompt_and_completion(data))


def _with_template_prompt(table: pd.DataFrame, data: DataSpec) -> pd.DataFrame:
    prompts = [data.prompt_template.format_map(row) for row in table.astype(str).to_dict("records")]
    return table.assign(**{PROMPT: prompts, COMPLETION: table[data.completion_column].astype(str)})


def _with_chat_prompt(table: pd.DataFrame, data: DataSpec, tokenizer: Any) -> pd.DataFrame:
    turns = [_chat_turns(messages, tokenizer, data.source) for messages in table[data.messages_column]]
    return table.assign(**{PROMPT: [prompt for prompt, _ in turns], COMPLETION: [reply for _, reply in turns]})


def _within_word_range(table: pd.DataFrame, data: DataSpec) -> pd.DataFrame:
    """Rows whose text, or prompt and completion together, hold min_words to max_words whitespace-separated words."""
    columns = [data.text_column] if data.text_column is not None else [data.prompt_column, data.completion_column]
    words = sum(table[column].astype(str).str.split().str.len() for column in columns)
    kept = table[words.between(data.min_words or 0, data.max_words if data.max_words is not None else math.inf)]
    if kept.empty:
        raise DataError(f"{data.source}: no row holds between {data.min_words} and {data.max_words} words")
    return kept


def _chat_turns(messages: Any, tokenizer: Any, where: str) -> tuple[str, str]:
    """The conversation before the last assistant turn, rendered with the chat template, and that turn."""
    messages = list(messages)
    if not messages or messages[-1].get("role") != "assistant":
        raise DataError(f"{where}: a conversation does not end with an assistant turn")
    if tokenizer is None or tokenizer.chat_template is None:
        raise DataError(f"{where}: chat messages need a model whose tokenizer has a chat template")
    prompt = tokenizer.apply_chat_template(
        [dict(m) for m in messages[:-1]], tokenize=False, add_generation_prompt=True
    )
    if tokenizer.bos_token and prompt.startswith(tokenizer.bos_token):
        prompt = prompt[len(tokenizer.bos_token) :]  # the tokenizer adds it again when encoding
    return prompt, str(messages[-1]["content"])


def _check_table(table: pd.DataFrame, data: DataSpec, where: str) -> pd.DataFrame:
    for field, column in _named_columns(data).items():
        if column not in table.columns:
            available = ", ".join(map(str, table.columns))
            raise DataError(f"{where}: no column {column!r} (data.{field}); columns: {available}")
        empty = table[column].isna()
        if empty.any():
            raise DataError(
                f"{where}: column {column!r} has {int(empty.sum())} empty values, first in row {empty.idxmax()}"
            )
    return table


def _hold_out(table: pd.DataFrame, fraction: float, where: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A fixed seeded split: the same rows are held out in every trial and every run."""
    import numpy as np

    if len(table) < 2:
        raise DataError(f"{where}: needs at least 2 rows to hold out an eval split, got {len(table)}")
    num_eval = min(len(table) - 1, max(1, round(fraction * len(table))))
    held_out = np.zeros(len(table), dtype=bool)
    held_out[np.random.default_rng(EVAL_HOLDOUT_SEED).permutation(len(table))[:num_eval]] = True
    return table[~held_out], table[held_out]


# ---- tokenizing ----


def _label_ids(train: pd.Series, held_out: pd.Series, data: DataSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer labels as they are; any other labels numbered in sorted order of their text, over both splits."""
    both = pd.concat([train, held_out])
    if pd.api.types.is_integer_dtype(both) or pd.api.types.is_bool_dtype(both):
        if (both < 0).any():
            raise DataError(f"{data.source}: column {data.label_column!r} has negative labels (unlabelled rows?)")
        return _long_tensor(train), _long_tensor(held_out)
    ids = {name: i for i, name in enumerate(sorted(set(both.astype(str))))}
    return _long_tensor(train.astype(str).map(ids)), _long_tensor(held_out.astype(str).map(ids))


def _long_tensor(values: pd.Series) -> torch.Tensor:
    import torch

    return torch.tensor(values.to_numpy(dtype="int64"))


def _texts(table: pd.DataFrame, column: str) -> list[str]:
    return table[column].astype(str).tolist()


def _encode_causal(table: pd.DataFrame, data: DataSpec, tokenizer: Any, seq_len: int) -> dict[str, torch.Tensor]:
    """Loss on every token of `text`, or on the completion tokens (and a closing EOS) after `prompt`."""
    if data.text_column is not None:
        sequences = tokenizer(_texts(table, data.text_column))["input_ids"]
        return _pad_causal(sequences, [0] * len(sequences), tokenizer, seq_len)
    prompts = tokenizer(_texts(table, data.prompt_column))["input_ids"]
    completions = tokenizer(_texts(table, data.completion_column), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    sequences = [prompt + completion + eos for prompt, completion in zip(prompts, completions)]
    return _pad_causal(sequences, [len(prompt) for prompt in prompts], tokenizer, seq_len)


def _pad_causal(
    sequences: list[list[int]], loss_starts: list[int], tokenizer: Any, seq_len: int
) -> dict[str, torch.Tensor]:
    """Right-pad or truncate to seq_len; labels are the tokens from loss_start on, IGNORE_INDEX elsewhere."""
    import torch

    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    input_ids = torch.full((len(sequences), seq_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), seq_len), dtype=torch.long)
    labels = torch.full((len(sequences), seq_len), IGNORE_INDEX, dtype=torch.long)
    for row, (sequence, loss_start) in enumerate(zip(sequences, loss_starts)):
        tokens = torch.tensor(sequence[:seq_len], dtype=torch.long)
        input_ids[row, : len(tokens)] = tokens
        attention_mask[row, : len(tokens)] = 1
        labels[row, loss_start : len(tokens)] = tokens[loss_start:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _encode_classification(
    table: pd.DataFrame, labels: torch.Tensor, data: DataSpec, tokenizer: Any, seq_len: int
) -> dict[str, torch.Tensor]:
    """One text, or prompt and completion as a sentence pair (as in GLUE's MNLI, QQP, RTE), with one label."""
    is_pair = data.text_column is None
    first = _texts(table, data.prompt_column if is_pair else data.text_column)
    second = _texts(table, data.completion_column) if is_pair else None
    encoded = tokenizer(
        first, second, truncation=True, max_length=seq_len, padding="max_length", padding_side="right",
        return_tensors="pt",
    )
    split = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}
    if is_pair and "token_type_ids" in encoded:
        split["token_type_ids"] = encoded["token_type_ids"]  # which sentence each token belongs to (BERT)
    return split


# ---- batches ----


def batch_iterator(split: dict[str, torch.Tensor], batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches from shuffled epochs; the order depends only on `seed`, never on the global RNG.

    Epochs are concatenated, so every batch is full even when the split is smaller than a batch.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    num_examples = len(split["input_ids"])
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(num_examples, generator=generator)])
        indices, pending = pending[:batch_size], pending[batch_size:]
        yield {name: tensor[indices] for name, tensor in split.items()}
