"""Reading a data source (a local file, a hub dataset or a builtin task) in chunks, never whole in memory, and
checking it: the named columns exist and have no empty values; templates and chat messages laid out as prompt
and completion; the word filters."""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from scaling_lab import text_tasks
from scaling_lab.spec_base import resolve_path
from scaling_lab.spec_data import DataSpec

VALIDATION_ROWS = 100
SOURCE_CHUNK_ROWS = 4096  # rows of a source in memory at once while it is scanned


class DataError(ValueError):
    """Data that cannot be used; the message names the file (or dataset) and what is wrong with it."""


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
