"""Fine-tuning data: the offline synthetic Markov task, local files and hub datasets, and their batches.

The synthetic task and the tiny models' pretraining corpus come from the same random first-order Markov chain
over SYNTHETIC_VOCAB_SIZE tokens: pretraining learns the chain, fine-tuning learns a low-rank shift of its logits.

Text data is prepared once per study and tokenizer (data/<name>-<hash> in the cache directory, built under a file
lock): only the rows the trials read are tokenized, stored as Arrow in the smallest integer type that holds the
vocabulary, and memory-mapped by every trial and worker that reads them; batches are padded to their longest row.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import platform
import re
import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from scaling_lab import text_tasks
from scaling_lab.build_once import build_once
from scaling_lab.spec_base import resolve_path
from scaling_lab.spec_data import DataSpec
from scaling_lab.spec_training import TrainingSettings

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
TRAIN_SUBSET_SEED = 0
IGNORE_INDEX = -100
VALIDATION_ROWS = 100
SOURCE_CHUNK_ROWS = 4096  # rows of a source in memory at once while it is scanned
ENCODE_BATCH_ROWS = 1000
# Bump when preparation changes what it stores: prepared text data is then rebuilt.
PREPARED_FORMAT_VERSION = 1


class DataError(ValueError):
    """Data that cannot be used; the message names the file (or dataset) and what is wrong with it."""


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


# ---- splits and tasks ----


@dataclass(frozen=True)
class TokenTensors:
    """The synthetic task's sequences, all of the same length; every token is a target."""

    input_ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch

        input_ids = self.input_ids[indices]
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


class PreparedRows:
    """Tokenized rows of one split, memory-mapped from prepared Arrow: token ids of each row's own length (at
    most seq_len) and where its loss starts (causal_lm) or its label (seq_cls). A batch is padded on the right
    to its longest row; labels are made then.

    Rows are read through numpy views of the Arrow buffers, so a batch touches only its own rows' pages (Arrow's
    `take` on a table of many record batches would copy whole columns)."""

    def __init__(self, table: pa.Table, pad_id: int, pad_token_type_id: int = 0):
        self.table, self.pad_id, self.pad_token_type_id = table, pad_id, pad_token_type_id
        self._chunk_starts = np.cumsum([0] + [len(chunk) for chunk in table.column(0).chunks])
        self._lists = {  # per record batch: offsets and values, views into the memory map
            name: [(chunk.offsets.to_numpy(), chunk.values.to_numpy()) for chunk in table.column(name).chunks]
            for name in ("input_ids", "token_type_ids") if name in table.column_names
        }
        self._scalars = {
            name: [chunk.to_numpy() for chunk in table.column(name).chunks]
            for name in ("loss_start", "label") if name in table.column_names
        }

    def __len__(self) -> int:
        return self.table.num_rows

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch

        indices = np.asarray(indices, dtype=np.int64)
        chunks = np.searchsorted(self._chunk_starts, indices, side="right") - 1
        where = list(zip(chunks.tolist(), (indices - self._chunk_starts[chunks]).tolist()))
        input_ids, present = self._padded("input_ids", where, self.pad_id)
        if "label" in self._scalars:
            labels = np.array([self._scalars["label"][c][i] for c, i in where], dtype=np.int64)
        else:
            loss_starts = np.array([self._scalars["loss_start"][c][i] for c, i in where])
            from_loss_start = np.arange(input_ids.shape[1]) >= loss_starts[:, None]
            labels = np.where(present & from_loss_start, input_ids, IGNORE_INDEX)
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(present.astype(np.int64)),
            "labels": torch.from_numpy(labels),
        }
        if "token_type_ids" in self._lists:  # which sentence each token belongs to (BERT)
            batch["token_type_ids"] = torch.from_numpy(self._padded("token_type_ids", where, self.pad_token_type_id)[0])
        return batch

    def _padded(self, name: str, where: list[tuple[int, int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
        """The rows' lists as int64 [rows, longest] padded with `pad`, and where the values are."""
        rows = []
        for chunk, i in where:
            offsets, values = self._lists[name][chunk]
            rows.append(values[offsets[i] : offsets[i + 1]])
        lengths = np.array([len(row) for row in rows])
        present = np.arange(max(1, lengths.max(initial=0))) < lengths[:, None]
        padded = np.full(present.shape, pad, dtype=np.int64)
        padded[present] = np.concatenate(rows)
        return padded, present


Split = TokenTensors | PreparedRows


@dataclass(frozen=True)
class Task:
    """A fine-tuning task's train and eval splits; `split.batch(indices)` gives input_ids, attention_mask and
    labels ([rows, length], or [rows] for seq_cls). Splits are shared between the trials of a process."""

    name: str
    train: Split
    eval: Split


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


# ---- prepared text data: keyed by what it depends on, built once ----


@dataclass(frozen=True)
class _Request:
    data: DataSpec
    kind: str
    tokenizer: Any
    vocab_size: int
    seq_len: int
    base_dir: Path
    train_rows: int
    eval_rows: int

    @property
    def token_type(self) -> pa.DataType:
        return pa.uint16() if max(len(self.tokenizer), self.vocab_size) <= 2**16 else pa.int32()


def _prepared_dir(request: _Request, cache_dir: Path) -> Path:
    """cache_dir/data/<source name>-<hash of everything the prepared rows depend on>."""
    data = request.data
    if data.is_hub:
        source = {"dataset": data.source, "revision": data.revision}
    elif data.is_builtin:  # its rows depend on the Python that generates them
        source = {"builtin": data.source, "python": platform.python_version()}
    else:
        path = resolve_path(data.source, request.base_dir).resolve()
        stat = path.stat() if path.is_file() else None
        source = {"path": str(path), "bytes": stat and stat.st_size, "mtime_ns": stat and stat.st_mtime_ns}
    spec = {k: v for k, v in dataclasses.asdict(data).items() if k not in ("train_examples", "eval_examples")}
    content = {
        "version": PREPARED_FORMAT_VERSION,
        "source": source,
        "data": spec,
        "kind": request.kind,
        "seq_len": request.seq_len,
        "train_rows": request.train_rows,
        "eval_rows": request.eval_rows,
        "token_type": str(request.token_type),
        "tokenizer": _tokenizer_fingerprint(request.tokenizer),
    }
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(data.source.removeprefix("hf:")).stem)[-48:]
    return cache_dir / "data" / f"{name}-{digest}"


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # without the truncation and padding that the last call left set on it (the tokenizer is shared by trials)
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        vocabulary = json.dumps(state, sort_keys=True)
    else:
        vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()))
    settings = {
        "class": type(tokenizer).__name__,
        "special_tokens": tokenizer.special_tokens_map,
        "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "pad_token_type_id": tokenizer.pad_token_type_id,
        "chat_template": tokenizer.chat_template,
        "truncation_side": tokenizer.truncation_side,
        "model_input_names": tokenizer.model_input_names,
    }
    text = vocabulary + json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _open_prepared(directory: Path, name: str) -> Task:
    """The prepared splits, memory-mapped: pages are read (and shared between processes) as batches touch them."""
    meta = json.loads((directory / "prepared.json").read_text())
    splits = {}
    for split in ("train", "eval"):
        table = pa.ipc.open_stream(pa.memory_map(str(directory / f"{split}.arrow"))).read_all()
        splits[split] = PreparedRows(table, meta["pad_id"], meta["pad_token_type_id"])
    return Task(name=name, train=splits["train"], eval=splits["eval"])


def _prepare(request: _Request, directory: Path) -> None:
    """Scan the whole source once (checks, word filters, labels), pick the rows the trials read, tokenize them."""
    started = time.perf_counter()
    data, tokenizer = request.data, request.tokenizer
    train_source = _source(data, request.base_dir, data.train_split)
    eval_source = _source(data, request.base_dir, data.eval_split) if data.is_hub and data.eval_split else None
    with_labels = request.kind == "seq_cls"
    train_scan = _scan(train_source, data, tokenizer, with_labels)
    eval_scan = _scan(eval_source, data, tokenizer, with_labels) if eval_source is not None else None
    if eval_scan is None:
        train_picked, eval_picked = _hold_out(train_scan.kept, data.eval_fraction, request.train_rows,
                                              request.eval_rows, data.source)
        picked = _collect(train_source, data, np.union1d(train_picked, eval_picked))
        train_table, eval_table = picked.loc[train_picked], picked.loc[eval_picked]
    else:
        train_picked = _subset(train_scan.kept, request.train_rows)
        train_table = _collect(train_source, data, train_picked)
        eval_table = _collect(eval_source, data, eval_scan.kept[: request.eval_rows])
    label_ids = None
    if with_labels:
        label_ids = _label_ids(pd.concat([train_scan.labels, eval_scan.labels if eval_scan else None]), data)
    for split, table in (("train", train_table), ("eval", eval_table)):
        _write_encoded(_laid_out(table, data, tokenizer), label_ids, request, directory / f"{split}.arrow")
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    meta = {
        "source": data.source,
        "rows": {"train": len(train_table), "eval": len(eval_table)},
        "source_rows": {"train": train_scan.total, "eval": eval_scan.total if eval_scan else None},
        "pad_id": pad_id,
        "pad_token_type_id": tokenizer.pad_token_type_id,
        "token_type": str(request.token_type),
        "seconds": time.perf_counter() - started,
    }
    (directory / "prepared.json").write_text(json.dumps(meta, indent=2))
    gc.collect()  # datasets' objects hold reference cycles: their Arrow buffers are freed only now ...
    pa.default_memory_pool().release_unused()  # ... and Arrow's allocator would keep them (tens of MB)


def _hold_out(kept: np.ndarray, fraction: float, train_rows: int, eval_rows: int, where: str
              ) -> tuple[np.ndarray, np.ndarray]:
    """A fixed seeded split of the kept rows, the same in every trial and run: the held-out rows are those of the
    whole split (their first eval_rows in source order are evaluated); the train rows are a fixed random
    train_rows of the others (every row if there are fewer). Both in source order."""
    if len(kept) < 2:
        raise DataError(f"{where}: needs at least 2 rows to hold out an eval split, got {len(kept)}")
    num_eval = min(len(kept) - 1, max(1, round(fraction * len(kept))))
    order = np.random.default_rng(EVAL_HOLDOUT_SEED).permutation(len(kept))
    return kept[np.sort(order[num_eval:][:train_rows])], kept[np.sort(order[:num_eval])[:eval_rows]]


def _subset(kept: np.ndarray, rows: int) -> np.ndarray:
    """A fixed random `rows` of the kept rows (all of them if there are fewer), in source order."""
    return kept[np.sort(np.random.default_rng(TRAIN_SUBSET_SEED).permutation(len(kept))[:rows])]


# ---- reading sources in chunks ----


@dataclass(frozen=True)
class _Source:
    """One split of a file or hub dataset, read a chunk of rows at a time so that it is never whole in memory."""

    where: str  # for error messages: the file, or the dataset and split
    chunks: Callable[[int], Iterator[pd.DataFrame]]  # rows per chunk -> the chunks, in order


def validate_data_source(data: DataSpec, base_dir: Path) -> None:
    """Check before any compute that a data file is readable, not empty and has the named columns."""
    if data.is_synthetic or data.is_hub:
        return
    source = _source(data, base_dir, data.train_split)
    first = next(source.chunks(VALIDATION_ROWS), None)
    if first is None or first.empty:
        raise DataError(f"{source.where}: has no rows")
    _check_table(first, data, source.where)


def _source(data: DataSpec, base_dir: Path, split: str) -> _Source:
    if data.is_hub:
        return _hub_source(data, split)
    if data.is_builtin:
        table = text_tasks.builtin_table(data.source)
        return _Source(data.source, lambda rows: (table.iloc[i : i + rows] for i in range(0, len(table), rows)))
    path = resolve_path(data.source, base_dir)
    if not path.is_file():
        raise DataError(f"{path}: data file does not exist")
    reader = _CHUNK_READERS.get(path.suffix)
    if reader is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(_CHUNK_READERS)}")

    def chunks(rows: int) -> Iterator[pd.DataFrame]:
        try:
            yield from reader(path, rows)
        except (OSError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"{path}: cannot be read as {path.suffix[1:]}: {reason}") from None

    return _Source(str(path), chunks)


def _hub_source(data: DataSpec, split: str) -> _Source:
    """`hf:<dataset id>` or `hf:<dataset id>:<config name>` (e.g. hf:nyu-mll/glue:mrpc), through the Hugging Face
    cache, which memory-maps it."""
    import datasets

    dataset_id, _, config_name = data.source.removeprefix("hf:").partition(":")
    dataset = datasets.load_dataset(dataset_id, config_name or None, split=split, revision=data.revision)
    where = f"{data.source} split {split!r}"
    _check_columns(dataset.column_names, data, where)
    named = dataset.select_columns(sorted(set(_named_columns(data).values())))
    return _Source(where, lambda rows: named.with_format("pandas").iter(batch_size=rows))


def _jsonl_chunks(path: Path, rows: int) -> Iterator[pd.DataFrame]:
    with pd.read_json(path, lines=True, dtype=False, chunksize=rows) as reader:
        yield from reader


def _json_chunks(path: Path, rows: int) -> Iterator[pd.DataFrame]:
    """A JSON array of records, or JSON lines under a .json name (as many hub exports are)."""
    try:
        table = pd.read_json(path, dtype=False)
    except ValueError:
        yield from _jsonl_chunks(path, rows)
        return
    for start in range(0, len(table), rows):
        yield table.iloc[start : start + rows].reset_index(drop=True)


def _csv_chunks(path: Path, rows: int) -> Iterator[pd.DataFrame]:
    # Only empty cells are missing: texts such as "NA" or "None" stay text.
    with pd.read_csv(path, chunksize=rows, keep_default_na=False, na_values=[""]) as reader:
        yield from reader


def _parquet_chunks(path: Path, rows: int) -> Iterator[pd.DataFrame]:
    for batch in pq.ParquetFile(path).iter_batches(batch_size=rows):
        yield batch.to_pandas()


_CHUNK_READERS = {".jsonl": _jsonl_chunks, ".json": _json_chunks, ".parquet": _parquet_chunks, ".csv": _csv_chunks}


@dataclass(frozen=True)
class _Scan:
    total: int  # rows in the source
    kept: np.ndarray  # the row numbers of the rows within the word range, in order; at most max_examples of them
    labels: pd.Series | None  # the label column of the kept rows (seq_cls)


def _scan(source: _Source, data: DataSpec, tokenizer: Any, with_labels: bool) -> _Scan:
    """One pass over the whole source: the named columns exist and have no empty values, and the word filters
    see every row."""
    named = list(dict.fromkeys(_named_columns(data).values()))
    filtered = data.min_words is not None or data.max_words is not None
    total, kept, labels, empty = 0, [], [], {}
    for chunk in source.chunks(SOURCE_CHUNK_ROWS):
        if total == 0:
            _check_columns(chunk.columns, data, source.where)
        chunk = chunk[named].set_axis(pd.RangeIndex(total, total + len(chunk)))
        total += len(chunk)
        for column in named:
            is_missing = chunk[column].isna()
            if is_missing.any():
                count, first = empty.get(column, (0, int(is_missing.idxmax())))
                empty[column] = (count + int(is_missing.sum()), first)
        if empty:
            continue  # reported once the whole source is counted
        if filtered:
            chunk = chunk[_word_mask(_laid_out(chunk, data, tokenizer), data)]
        kept.append(chunk.index.to_numpy())
        if with_labels:
            labels.append(chunk[data.label_column])
    if total == 0:
        raise DataError(f"{source.where}: has no rows")
    for column, (count, first) in empty.items():
        raise DataError(f"{source.where}: column {column!r} has {count} empty values, first in row {first}")
    kept = np.concatenate(kept)
    if len(kept) == 0:
        raise DataError(f"{data.source}: no row holds between {data.min_words} and {data.max_words} words")
    return _Scan(
        total=total,
        kept=kept[: data.max_examples],
        labels=pd.concat(labels).iloc[: data.max_examples] if with_labels else None,
    )


def _collect(source: _Source, data: DataSpec, rows: np.ndarray) -> pd.DataFrame:
    """The named columns of the given rows (sorted row numbers), indexed by row number; one more pass."""
    named = list(dict.fromkeys(_named_columns(data).values()))
    parts, start = [], 0
    for chunk in source.chunks(SOURCE_CHUNK_ROWS):
        stop = start + len(chunk)
        wanted = rows[np.searchsorted(rows, start) : np.searchsorted(rows, stop)]
        if len(wanted):
            parts.append(chunk[named].iloc[wanted - start].set_axis(wanted))
        start = stop
        if start > rows[-1]:
            break
    return pd.concat(parts)


# ---- columns, layouts and filters ----


def _named_columns(data: DataSpec) -> dict[str, str]:
    fields = ("text_column", "prompt_column", "completion_column", "messages_column", "label_column")
    named = {field: getattr(data, field) for field in fields if getattr(data, field) is not None}
    if data.prompt_template is not None:
        for _, column, _, _ in string.Formatter().parse(data.prompt_template):
            if column is not None:
                named[f"prompt_template {{{column}}}"] = column
    return named


def _check_columns(columns: Any, data: DataSpec, where: str) -> None:
    for field, column in _named_columns(data).items():
        if column not in columns:
            available = ", ".join(map(str, columns))
            raise DataError(f"{where}: no column {column!r} (data.{field}); columns: {available}")


def _check_table(table: pd.DataFrame, data: DataSpec, where: str) -> None:
    _check_columns(table.columns, data, where)
    for column in _named_columns(data).values():
        empty = table[column].isna()
        if empty.any():
            raise DataError(
                f"{where}: column {column!r} has {int(empty.sum())} empty values, first in row {empty.idxmax()}"
            )


PROMPT, COMPLETION = "prompt", "completion"


def _as_prompt_and_completion(data: DataSpec) -> DataSpec:
    """The spec as seen after `_laid_out`: a template or chat messages have become prompt and completion."""
    if data.prompt_template is None and data.messages_column is None:
        return data
    return dataclasses.replace(
        data, prompt_column=PROMPT, completion_column=COMPLETION, prompt_template=None, messages_column=None
    )


def _laid_out(table: pd.DataFrame, data: DataSpec, tokenizer: Any) -> pd.DataFrame:
    """Rows with the prompt and completion that a template or chat messages make."""
    if data.prompt_template is not None:
        prompts = [data.prompt_template.format_map(row) for row in table.astype(str).to_dict("records")]
        return table.assign(**{PROMPT: prompts, COMPLETION: table[data.completion_column].astype(str)})
    if data.messages_column is not None:
        turns = [_chat_turns(messages, tokenizer, data.source) for messages in table[data.messages_column]]
        return table.assign(**{PROMPT: [prompt for prompt, _ in turns], COMPLETION: [reply for _, reply in turns]})
    return table


def _word_mask(table: pd.DataFrame, data: DataSpec) -> pd.Series:
    """Which laid-out rows hold min_words to max_words whitespace-separated words in their text, or in their prompt
    and completion together."""
    data = _as_prompt_and_completion(data)
    columns = [data.text_column] if data.text_column is not None else [data.prompt_column, data.completion_column]
    words = sum(table[column].astype(str).str.split().str.len() for column in columns)
    return words.between(data.min_words or 0, data.max_words if data.max_words is not None else math.inf)


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


def _label_ids(labels: pd.Series, data: DataSpec) -> dict[str, int] | None:
    """None where integer labels are used as they are; else ids for the labels' texts, numbered in sorted order
    over every kept row of both splits."""
    if pd.api.types.is_integer_dtype(labels) or pd.api.types.is_bool_dtype(labels):
        if (labels < 0).any():
            raise DataError(f"{data.source}: column {data.label_column!r} has negative labels (unlabelled rows?)")
        return None
    return {name: i for i, name in enumerate(sorted(set(labels.astype(str))))}


# ---- tokenizing the picked rows ----


def _write_encoded(table: pd.DataFrame, label_ids: dict[str, int] | None, request: _Request, path: Path) -> None:
    """Tokenize the rows with datasets' batched map into an Arrow file at `path`; ids truncated to seq_len."""
    import datasets

    data = _as_prompt_and_completion(request.data)
    if data.text_column is not None:
        columns = {"text": table[data.text_column].astype(str).tolist()}
    else:
        columns = {PROMPT: table[data.prompt_column].astype(str).tolist(),
                   COMPLETION: table[data.completion_column].astype(str).tolist()}
    if request.kind == "seq_cls":
        labels = table[data.label_column]
        ids = labels.to_numpy(dtype="int64") if label_ids is None else labels.astype(str).map(label_ids).to_numpy()
        columns["label_id"] = ids.tolist()
        with_token_types = data.text_column is None and "token_type_ids" in request.tokenizer.model_input_names
        encode = _classification_encoder(request.tokenizer, request.seq_len, with_token_types)
        stored = ["input_ids", "label"] + ["token_type_ids"] * with_token_types
    else:
        encode = _causal_encoder(request.tokenizer, request.seq_len)
        stored = ["input_ids", "loss_start"]
    rows = datasets.Dataset.from_dict(columns)
    kinds = {"input_ids": datasets.List(datasets.Value(str(request.token_type))), "loss_start": datasets.Value("int32"),
             "label": datasets.Value("int64"), "token_type_ids": datasets.List(datasets.Value("uint8"))}
    features = datasets.Features({name: kinds[name] for name in stored})
    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        rows.map(encode, batched=True, batch_size=ENCODE_BATCH_ROWS, remove_columns=rows.column_names,
                 features=features, cache_file_name=str(path), new_fingerprint=path.stem)
    finally:
        if not quiet:
            datasets.enable_progress_bars()


def _causal_encoder(tokenizer: Any, seq_len: int) -> Callable[[dict[str, list]], dict[str, list]]:
    """Loss on every token of `text`, or on the completion tokens (and a closing EOS) after `prompt`."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def encode(rows: dict[str, list]) -> dict[str, list]:
        if "text" in rows:
            sequences = tokenizer(rows["text"])["input_ids"]
            loss_starts = [0] * len(sequences)
        else:
            prompts = tokenizer(rows[PROMPT])["input_ids"]
            completions = tokenizer(rows[COMPLETION], add_special_tokens=False)["input_ids"]
            sequences = [prompt + completion + eos for prompt, completion in zip(prompts, completions)]
            loss_starts = [len(prompt) for prompt in prompts]
        return {"input_ids": [sequence[:seq_len] for sequence in sequences], "loss_start": loss_starts}

    return encode


def _classification_encoder(tokenizer: Any, seq_len: int, with_token_types: bool
                            ) -> Callable[[dict[str, list]], dict[str, list]]:
    """One text, or prompt and completion as a sentence pair (as in GLUE's MNLI, QQP, RTE), with one label;
    pairs keep which sentence each token belongs to where the tokenizer says it (BERT)."""

    def encode(rows: dict[str, list]) -> dict[str, list]:
        is_pair = "text" not in rows
        first, second = (rows[PROMPT], rows[COMPLETION]) if is_pair else (rows["text"], None)
        encoded = tokenizer(first, second, truncation=True, max_length=seq_len)
        columns = {"input_ids": encoded["input_ids"], "label": rows["label_id"]}
        if with_token_types:
            columns["token_type_ids"] = encoded["token_type_ids"]
        return columns

    return encode


# ---- batches ----


def batch_iterator(split: Split, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches from shuffled epochs; the order depends only on `seed`, never on the global RNG.

    Epochs are concatenated, so every batch is full even when the split is smaller than a batch.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    num_examples = len(split)
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(num_examples, generator=generator)])
        indices, pending = pending[:batch_size], pending[batch_size:]
        yield split.batch(indices)
