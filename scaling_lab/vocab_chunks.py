"""A model's vocabulary-sized layers (the input embedding and an untied LM head) split into chunks of rows, so that
ZeRO-3 gathers one chunk at a time instead of the whole weight: at a 32k vocabulary and hidden size 1024 each of
them is 131 MB in fp32, at Llama-3 8B's 128k × 4096 each is 1 GB in bf16, gathered whole on every worker at every
forward and backward pass. The chunks compute exactly what the whole layer computes (row by row); they are built
under deepspeed.zero.Init, partitioned from the start, and the checkpoint's weight is read into them by rows
(`source_rows`). Small layers (the tiny family's) are left as they are.
"""

from __future__ import annotations

import torch
from torch import nn

CHUNKS = 8
MIN_CHUNKED_ELEMENTS = 1 << 22  # smaller layers are gathered whole: a few MB at most


class _Rows(nn.Module):
    """Rows of a vocabulary-sized weight, frozen. Neither an nn.Linear nor an nn.Embedding, so that PEFT's
    "all-linear" targets do not take it."""

    def __init__(self, rows: int, columns: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, columns, dtype=dtype), requires_grad=False)


class EmbeddingRows(_Rows):
    """ZeRO-3 gathers its weight around each call of its forward, and releases it after."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(input_ids, self.weight)


class HeadRows(_Rows):
    """ZeRO-3 gathers its weight around each call of its forward, and releases it after."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden, self.weight)


class ChunkedEmbedding(nn.Module):
    """An embedding lookup over row chunks: each token's row comes from the one chunk that holds it (the others
    add zeros)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype, chunks: int = CHUNKS):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        # The rows are kept apart: a chunk's weight touched in this module's forward becomes, to ZeRO-3, an
        # "external parameter" of this module, gathered with all the others for the whole lookup.
        self.rows = split(num_embeddings, chunks)
        self.chunks = nn.ModuleList(EmbeddingRows(rows, embedding_dim, dtype) for rows in self.rows)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        output, first = None, 0
        for chunk, rows in zip(self.chunks, self.rows):
            local = input_ids - first
            inside = ((local >= 0) & (local < rows)).unsqueeze(-1)
            looked_up = chunk(local.clamp(0, rows - 1)) * inside
            output = looked_up if output is None else output + looked_up
            first += rows
        return output


class ChunkedHead(nn.Module):
    """An LM head (a linear layer without bias) over row chunks: the logits of each chunk, side by side."""

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype, chunks: int = CHUNKS):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.chunks = nn.ModuleList(HeadRows(rows, in_features, dtype) for rows in split(out_features, chunks))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat([chunk(hidden) for chunk in self.chunks], dim=-1)


def split(total: int, chunks: int) -> list[int]:
    """`total` rows in at most `chunks` chunks of equal size, the last one smaller."""
    size = -(-total // chunks)
    return [min(size, total - start) for start in range(0, total, size)]


def chunk_vocabulary_layers(network: nn.Module, dtype: torch.dtype) -> dict[str, tuple[str, int]]:
    """Replace `network`'s large input embedding and untied LM head by their chunked forms (call it where their
    weights are to be created: under deepspeed.zero.Init). Returns, for each new weight, the name of the weight
    it replaces and the row it starts at, for reading the checkpoint."""
    sources: dict[str, tuple[str, int]] = {}
    names = {module: name for name, module in network.named_modules()}
    embedding, head = network.get_input_embeddings(), network.get_output_embeddings()
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    replacements = []
    if isinstance(embedding, nn.Embedding) and _numel(embedding.weight) >= MIN_CHUNKED_ELEMENTS and not tied:
        shape = _shape(embedding.weight)
        replacements.append((names[embedding], ChunkedEmbedding(shape[0], shape[1], dtype)))
    if (isinstance(head, nn.Linear) and head.bias is None and _numel(head.weight) >= MIN_CHUNKED_ELEMENTS
            and not tied):
        shape = _shape(head.weight)
        replacements.append((names[head], ChunkedHead(shape[0], shape[1], dtype)))
    for name, chunked in replacements:
        _free_partition(network.get_submodule(name).weight)
        network.set_submodule(name, chunked)
        first = 0
        for index, chunk in enumerate(chunked.chunks):
            sources[f"{name}.chunks.{index}.weight"] = (f"{name}.weight", first)
            first += _shape(chunk.weight)[0]
    return sources


def _free_partition(weight: torch.Tensor) -> None:
    """Free the replaced weight's ZeRO-3 partition now: DeepSpeed's closures on the weight form a reference cycle
    that kept it (half a 32k × 1024 weight per worker of 2, in bf16 31 MB each) until a full garbage collection."""
    partition = getattr(weight, "ds_tensor", None)
    if partition is not None:
        partition.data = torch.empty(0, dtype=partition.dtype, device=partition.device)


def _shape(weight: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(weight, "ds_shape", weight.shape))


def _numel(weight: torch.Tensor) -> int:
    return getattr(weight, "ds_numel", weight.numel())
