"""Tokenized splits and their batches: the synthetic task's equal-length sequences, prepared text rows
memory-mapped from Arrow (padded per batch to their longest row), and the endless seeded batch order."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    import torch


IGNORE_INDEX = -100


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
    most seq_len) and where its loss starts (causal_lm on prompt and completion; text rows, stored without it,
    have loss on every token) or its label (seq_cls). A batch is padded on the right to its longest row; labels
    are made then.

    Rows are read through numpy views of the Arrow buffers, so a batch touches only its own rows' pages (Arrow's
    `take` on a table of several record batches would copy whole columns)."""

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
        elif "loss_start" in self._scalars:
            loss_starts = np.array([self._scalars["loss_start"][c][i] for c, i in where])
            from_loss_start = np.arange(input_ids.shape[1]) >= loss_starts[:, None]
            labels = np.where(present & from_loss_start, input_ids, IGNORE_INDEX)
        else:
            labels = np.where(present, input_ids, IGNORE_INDEX)
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


def batch_iterator(split: Split, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches from shuffled epochs; the order depends only on `seed`, never on the global RNG.

    Epochs are concatenated, so every batch is full even when the split is smaller than a batch. A batch's indices
    are a view of its epoch's order, copied only where a batch spans two epochs; one epoch's order is held at a time.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    order, position = torch.empty(0, dtype=torch.long), 0
    while True:
        parts, missing = [], batch_size
        while missing:
            if position == len(order):  # the next epoch: the last one's order is let go before it is drawn
                parts = [part.clone() for part in parts]
                del order
                order, position = torch.randperm(len(split), generator=generator), 0
            part = order[position : position + missing]
            parts.append(part)
            position, missing = position + len(part), missing - len(part)
        yield split.batch(parts[0] if len(parts) == 1 else torch.cat(parts))
