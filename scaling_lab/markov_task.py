"""The offline synthetic task: a random first-order Markov chain over SYNTHETIC_VOCAB_SIZE tokens.

The tiny models' pretraining corpus and the synthetic:markov-shift task come from the same chain: pretraining
learns the chain, fine-tuning learns a low-rank shift of its logits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
