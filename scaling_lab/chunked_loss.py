"""A causal LM's loss without its whole logits: the model's body runs to its last hidden states, then the LM head and
the cross-entropy run over blocks of (tokens × vocabulary rows), so that only one block's logits exist at a time.
The plain path (transformers' forward) keeps the logits of every token over the whole vocabulary, their fp32 upcast
and the softmax's gradient: at a 128k vocabulary and 2 × 2048 tokens that is 4 × 0.5 G elements, several GB. Blocks
of BLOCK_ELEMENTS keep it at a few times 4 MB; the hidden states' gradient is computed in the forward pass, block by
block, and kept for the backward pass (the size of the hidden states).

Under ZeRO-3 each weight of the head (one per chunk of rows where the head is chunked: scaling_lab/vocab_chunks.py)
is gathered once per forward pass, not once per block of tokens (the plain path gathers it once more for its
backward pass): the vocabulary is the outer loop, the tokens the inner one, with each token's log-sum-exp
accumulated over the vocabulary chunks.

Engaged only where the logits of one forward pass are large (MIN_CHUNKED_LOGITS) and the model is one whose forward
is known to be `head(body(...))` followed by the standard shifted cross-entropy (SUPPORTED_MODEL_TYPES); everything
else (classification, small models such as the embedded tiny family, a head with a LoRA adapter or a bias, logit
scaling or soft-capping) computes exactly what it computed before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from scaling_lab.vocab_chunks import ChunkedHead

IGNORE_INDEX = -100  # transformers' label for positions without a loss
BLOCK_ELEMENTS = 1 << 20  # logits computed at once (tokens × vocabulary rows): 4 MB in fp32
# Logits of one forward pass (tokens × vocabulary) from which the loss is chunked: more than one block. The plain
# path holds about 4 times the fp32 logits at its peak (bf16 logits, their fp32 copy, the log-softmax and its
# gradient): 16 MB here. Below, the plain path is kept, so that small models (the embedded tiny family: 64 words,
# 1,024 tokens a batch, 65 k logits) compute bit for bit what they always computed.
MIN_CHUNKED_LOGITS = BLOCK_ELEMENTS
ROWS_PER_BLOCK = 8192  # vocabulary rows of a block: at most, 128 tokens at once
# Model types whose causal-LM forward is the head on the body's last hidden state, then transformers' shifted
# cross-entropy, with nothing between (no logit scaling or soft-capping, no auxiliary loss).
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "starcoder2", "gpt2"})


@dataclass(frozen=True)
class LMParts:
    """Where a causal LM's loss can be computed in blocks: its body and its LM head's weight, in chunks of rows."""

    causal: nn.Module  # the transformers model, whose forward is replaced for the call
    body: nn.Module  # what that forward runs to the last hidden states
    head_weights: tuple[nn.Parameter, ...]  # the head's weight, as its chunks of rows (ZeRO-3 gathers each alone)

    @property
    def vocab_size(self) -> int:
        return sum(_rows(weight) for weight in self.head_weights)


def lm_parts(model: nn.Module) -> LMParts | None:
    """The body and head of a causal LM (bare, PEFT-wrapped or inside a DeepSpeed engine), or None where its loss is
    to be computed the plain way. Call it outside the forward pass: under ZeRO-3, a weight read inside one is
    gathered and kept for the whole pass."""
    model = getattr(model, "module", model)  # a DeepSpeed engine's model
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model  # under PEFT: the wrapped model
    config = getattr(causal, "config", None)
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES or not hasattr(causal, "get_output_embeddings"):
        return None
    body, head = getattr(causal, "base_model", causal), causal.get_output_embeddings()
    if isinstance(head, ChunkedHead):
        weights = tuple(chunk.weight for chunk in head.chunks)
    elif type(head) is nn.Linear and head.bias is None:  # a PEFT LoRA layer on the head is not an nn.Linear
        weights = (head.weight,)
    else:
        return None
    if body is causal or any(weight.requires_grad for weight in weights):
        return None
    return LMParts(causal, body, weights)


def chunks_loss(parts: LMParts | None, tokens: int, min_logits: int | None = None) -> bool:
    """Whether the loss is computed in blocks: a causal LM whose forward passes of up to `tokens` tokens would have
    `min_logits` logits (by default MIN_CHUNKED_LOGITS) or more. `tokens` must be the same on every worker (a bound
    from the config, not a batch's own length): under ZeRO-3 the two paths gather different weights, and workers
    that chose differently would wait on each other's collectives."""
    min_logits = MIN_CHUNKED_LOGITS if min_logits is None else min_logits
    return parts is not None and tokens * parts.vocab_size >= min_logits


def causal_lm_loss(model: Callable, batch: dict[str, torch.Tensor], tokens: int | None = None,
                   min_logits: int | None = None, parts: LMParts | None = None) -> torch.Tensor:
    """`model(**batch).loss` (the mean cross-entropy of the next tokens), in blocks where the logits are large.
    `model`: a DeepSpeed engine, a PEFT model or a transformers model; `tokens`: the bound chunks_loss decides by
    (by default this batch's, where every worker computes the same batch); `parts`: the model's lm_parts, if known."""
    parts = parts or lm_parts(model)
    if "labels" not in batch or not chunks_loss(parts, batch["input_ids"].numel() if tokens is None else tokens,
                                                min_logits):
        return model(**batch).loss
    with _head_replaced(parts, _mean_cross_entropy):
        return model(**batch).loss


def causal_lm_sums(model: Callable, batch: dict[str, torch.Tensor], parts: LMParts) -> tuple[float, float, int]:
    """Without gradients: the sum of the next tokens' cross-entropy, how many of them are the logits' argmax,
    and how many tokens have a label, computed in blocks."""
    sums: list[torch.Tensor] = []

    def record(hidden: torch.Tensor, labels: torch.Tensor, weights: tuple) -> torch.Tensor:
        sums.extend(_sums(*_labelled(hidden, labels), weights))
        return sums[0]

    with torch.no_grad(), _head_replaced(parts, record):
        model(**batch)
    loss_sum, correct, total = sums
    return loss_sum.item(), correct.item(), total


@contextmanager
def _head_replaced(parts: LMParts, on_hidden: Callable) -> Iterator[None]:
    """The causal LM's forward, for the calls made inside: the body to the last hidden states, then
    `on_hidden(hidden, labels, head_weights)` for the loss. It runs inside the model's own forward (under PEFT and
    DeepSpeed), so that ZeRO-3's hooks gather and release the body's weights as they do in the plain path."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    def forward(input_ids=None, attention_mask=None, labels=None, **kwargs):
        passed = {name: value for name, value in kwargs.items() if value is not None}
        hidden = parts.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **passed)
        return CausalLMOutputWithPast(loss=on_hidden(hidden.last_hidden_state, labels, parts.head_weights))

    parts.causal.forward = forward
    try:
        yield
    finally:
        del parts.causal.forward  # the class's forward again


def _labelled(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states of the positions whose next token has a label, and those labels (transformers' shift)."""
    targets = labels[:, 1:].to(hidden.device)
    mask = targets != IGNORE_INDEX
    return hidden[:, :-1][mask], targets[mask]


def _mean_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, weights: tuple) -> torch.Tensor:
    hidden, targets = _labelled(hidden, labels)
    with_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _BlockedCrossEntropy.apply(hidden, targets, weights, with_grad) / len(targets)  # no labels: nan, as plain


class _BlockedCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of `hidden @ weightᵀ` against `targets`, and its gradient for `hidden` only (the head
    is frozen), computed in the same pass over the blocks, so that each block's logits are computed once (two matrix
    products a block, as the plain path's forward and backward): the softmax's share of the gradient is accumulated
    relative to each token's log-sum-exp so far and rescaled whenever that grows (as an online softmax does)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, targets: torch.Tensor, weights: tuple, with_grad: bool) -> torch.Tensor:
        log_sum_exp = torch.full((len(hidden),), -torch.inf, device=hidden.device)
        target_logits = torch.zeros(len(hidden), device=hidden.device)
        softmax_part = torch.zeros(hidden.shape, device=hidden.device) if with_grad else None  # Σ softmax · weight
        target_rows = torch.zeros(hidden.shape, device=hidden.device) if with_grad else None  # the targets' rows
        for tokens, first, logits, weight in _blocks(hidden, weights, with_weight=True):
            grown = torch.logaddexp(log_sum_exp[tokens], torch.logsumexp(logits, dim=-1))
            local, inside = _local_targets(targets[tokens], first, logits.shape[1])
            target_logits[tokens] += torch.where(inside, logits.gather(1, local[:, None])[:, 0], 0.0)
            if with_grad:
                softmax_part[tokens] *= torch.exp(log_sum_exp[tokens] - grown)[:, None]
                softmax_part[tokens] += torch.exp(logits - grown[:, None]).to(weight.dtype) @ weight
                target_rows[tokens] += torch.where(inside[:, None], weight[local], 0).float()
            log_sum_exp[tokens] = grown
        if with_grad:
            ctx.save_for_backward((softmax_part - target_rows).to(hidden.dtype))
        return (log_sum_exp - target_logits).sum()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad_of_sum,) = ctx.saved_tensors
        return grad_of_sum * grad_loss.to(grad_of_sum.dtype), None, None, None


def _sums(hidden: torch.Tensor, targets: torch.Tensor, weights: tuple) -> tuple[torch.Tensor, torch.Tensor, int]:
    log_sum_exp = torch.full((len(hidden),), -torch.inf, device=hidden.device)
    target_logits = torch.zeros(len(hidden), device=hidden.device)
    best = torch.full((len(hidden),), -torch.inf, device=hidden.device)
    best_index = torch.zeros(len(hidden), dtype=torch.long, device=hidden.device)
    for tokens, first, logits in _blocks(hidden, weights):
        log_sum_exp[tokens] = torch.logaddexp(log_sum_exp[tokens], torch.logsumexp(logits, dim=-1))
        local, inside = _local_targets(targets[tokens], first, logits.shape[1])
        target_logits[tokens] += torch.where(inside, logits.gather(1, local[:, None])[:, 0], 0.0)
        block_best, block_index = logits.max(dim=-1)
        better = block_best > best[tokens]  # strictly: the first of equal maxima, as argmax takes it
        best[tokens] = torch.where(better, block_best, best[tokens])
        best_index[tokens] = torch.where(better, block_index + first, best_index[tokens])
    return (log_sum_exp - target_logits).sum(), (best_index == targets).sum(), len(targets)


def _blocks(hidden: torch.Tensor, weights: tuple, with_weight: bool = False) -> Iterator[tuple]:
    """(token slice, first vocabulary row, fp32 logits) of every block: each weight gathered once (under ZeRO-3;
    every worker gathers every weight, even one without tokens), in slices of at most ROWS_PER_BLOCK rows, its tokens
    in slices of BLOCK_ELEMENTS logits."""
    from deepspeed.runtime.zero import GatheredParameters

    first = 0
    for weight in weights:
        with GatheredParameters([weight]):  # a no-op for weights that ZeRO-3 does not partition
            for row in range(0, len(weight), ROWS_PER_BLOCK):
                rows = weight[row : row + ROWS_PER_BLOCK]
                step = max(1, BLOCK_ELEMENTS // len(rows))
                for start in range(0, len(hidden), step):
                    tokens = slice(start, start + step)
                    # As the plain path: the logits in the model's precision, then in fp32 for the loss.
                    logits = nn.functional.linear(hidden[tokens], rows).float()
                    yield (tokens, first + row, logits, rows) if with_weight else (tokens, first + row, logits)
            first += len(weight)


def _local_targets(targets: torch.Tensor, first: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The targets as rows of a block that starts at vocabulary row `first`, and which of them fall inside it."""
    local = targets - first
    inside = (local >= 0) & (local < rows)
    return local.clamp(0, rows - 1), inside


def _rows(weight: torch.Tensor) -> int:
    return getattr(weight, "ds_shape", weight.shape)[0]
