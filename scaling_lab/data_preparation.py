"""Text data prepared once per study and tokenizer: data/<name>-<hash> in the cache directory, keyed by everything
the rows depend on. Only the rows the trials read are tokenized, stored as Arrow in the smallest integer type
that holds the vocabulary, in record batches of up to RECORD_BATCH_BYTES (one for a split under 32 MB)."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from scaling_lab.data_batches import PreparedRows, Task
from scaling_lab.data_sources import (
    COMPLETION,
    PROMPT,
    DataError,
    _as_prompt_and_completion,
    _collect,
    _laid_out,
    _scan,
    _source,
)
from scaling_lab.spec_base import resolve_path
from scaling_lab.spec_data import DataSpec

EVAL_HOLDOUT_SEED = 0
TRAIN_SUBSET_SEED = 0
ENCODE_BATCH_ROWS = 1000
# Opening a split touches a page of metadata per record batch, and the kernel maps the 64 kB around every page it
# touches: datasets' batches of 1,000 rows (86 kB of short rows) made opening map three quarters of the file.
RECORD_BATCH_BYTES = 32 * 2**20
# Bump when preparation changes what it stores: prepared text data is then rebuilt.
PREPARED_FORMAT_VERSION = 2  # 2: record batches of up to RECORD_BATCH_BYTES; text rows without loss_start


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
    """Changes whenever the tokenization would: the backend's whole serialization (vocabulary, merges, normalizer,
    pre-tokenizer, templates, added tokens) hashed as it is written, never parsed: parsing a 32k vocabulary into
    Python objects cost a worker 7 MB that it kept."""
    fingerprint = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        fingerprint.update(_backend_serialization(backend).encode())
    else:
        fingerprint.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    settings = {
        "class": type(tokenizer).__name__,
        "special_tokens": tokenizer.special_tokens_map,
        "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "pad_token_type_id": tokenizer.pad_token_type_id,
        "chat_template": tokenizer.chat_template,
        "truncation_side": tokenizer.truncation_side,
        "model_input_names": tokenizer.model_input_names,
    }
    fingerprint.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return fingerprint.hexdigest()


def _backend_serialization(backend: Any) -> str:
    """The backend tokenizer's JSON (its maps written in a fixed order) without the truncation and padding that the
    last call left set on it: the tokenizer is shared by trials, and transformers sets both again on every call."""
    truncation, padding = backend.truncation, backend.padding
    backend.no_truncation()
    backend.no_padding()
    try:
        return backend.to_str()
    finally:
        if truncation is not None:
            backend.enable_truncation(**truncation)
        if padding is not None:
            backend.enable_padding(**padding)


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


def _label_ids(labels: pd.Series, data: DataSpec) -> dict[str, int] | None:
    """None where integer labels are used as they are; else ids for the labels' texts, numbered in sorted order
    over every kept row of both splits."""
    if pd.api.types.is_integer_dtype(labels) or pd.api.types.is_bool_dtype(labels):
        if (labels < 0).any():
            raise DataError(f"{data.source}: column {data.label_column!r} has negative labels (unlabelled rows?)")
        return None
    return {name: i for i, name in enumerate(sorted(set(labels.astype(str))))}


def _write_encoded(table: pd.DataFrame, label_ids: dict[str, int] | None, request: _Request, path: Path) -> None:
    """Tokenize the rows with datasets' batched map (ids truncated to seq_len), then store them at `path` in
    record batches of up to RECORD_BATCH_BYTES."""
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
        stored = ["input_ids"] + ["loss_start"] * (data.text_column is None)  # text: loss on every token
    rows = datasets.Dataset.from_dict(columns)
    kinds = {"input_ids": datasets.List(datasets.Value(str(request.token_type))), "loss_start": datasets.Value("int32"),
             "label": datasets.Value("int64"), "token_type_ids": datasets.List(datasets.Value("uint8"))}
    features = datasets.Features({name: kinds[name] for name in stored})
    encoded = path.with_name(f"{path.stem}-encoded.arrow")
    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        rows.map(encode, batched=True, batch_size=ENCODE_BATCH_ROWS, remove_columns=rows.column_names,
                 features=features, cache_file_name=str(encoded), new_fingerprint=path.stem)
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    _write_rebatched(encoded, path)
    encoded.unlink()


def _write_rebatched(source: Path, path: Path) -> None:
    """The Arrow stream at `source` written to `path` in record batches of up to RECORD_BATCH_BYTES, built one at
    a time (the source is memory-mapped)."""
    with pa.memory_map(str(source)) as mapped, pa.ipc.open_stream(mapped) as reader:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, reader.schema) as writer:
            pending, size = [], 0
            for batch in reader:
                if pending and size + batch.nbytes > RECORD_BATCH_BYTES:
                    writer.write_batch(pa.concat_batches(pending))
                    pending, size = [], 0
                pending.append(batch)
                size += batch.nbytes
            if pending:
                writer.write_batch(pa.concat_batches(pending))


def _causal_encoder(tokenizer: Any, seq_len: int) -> Callable[[dict[str, list]], dict[str, list]]:
    """Loss on every token of `text` (no loss_start stored), or on the completion tokens (and a closing EOS)
    after `prompt`."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def encode(rows: dict[str, list]) -> dict[str, list]:
        if "text" in rows:
            return {"input_ids": [sequence[:seq_len] for sequence in tokenizer(rows["text"])["input_ids"]]}
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
