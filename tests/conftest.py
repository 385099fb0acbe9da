"""Shared fixtures. Heavy libraries are imported inside fixtures, so tests that need no torch never load it."""

from __future__ import annotations

from pathlib import Path

import pytest

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "mat", "far", "question", "answer", "yes", "no", ":", "?"]


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A model cache shared by the session, so each tiny size is pretrained at most once."""
    return tmp_path_factory.mktemp("cache")


def _word_level_tokenizer(specials: list[str], single: str, pair: str, **roles: str):
    """A whitespace word-level tokenizer built offline; special tokens take the first ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(token, vocab[token]) for token in specials if token in single + pair]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", **roles)


@pytest.fixture(scope="session")
def causal_tokenizer():
    """Like a Llama tokenizer: prepends BOS, has EOS, has no pad token."""
    return _word_level_tokenizer(
        ["[UNK]", "<s>", "</s>"], single="<s> $A", pair="<s> $A $B", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="session")
def bert_tokenizer():
    """Like a BERT tokenizer: [CLS] a [SEP] b [SEP], with token type ids and a pad token."""
    return _word_level_tokenizer(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
