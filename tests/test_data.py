"""Fine-tuning data: the synthetic Markov task, local files with loss masks and labels, batches."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
import torch
from conftest import WORDS

from scaling_lab import data, data_sources
from scaling_lab.data import IGNORE_INDEX, DataError
from scaling_lab.spec import DataSpec, TrainingSettings

SYNTHETIC = DataSpec(train_examples=300, eval_examples=50)
QA_ROWS = [
    {"prompt": "question the cat sat ?", "completion": "yes", "label": "pos"},
    {"prompt": "question the dog ran far ?", "completion": "no no", "label": "neg"},
    {"prompt": "question the cat ran ?", "completion": "yes the cat ran", "label": "pos"},
    {"prompt": "question the mat ?", "completion": "no", "label": "mixed"},
]


def write_table(rows: list[dict], path: Path) -> Path:
    frame = pd.DataFrame(rows)
    if path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return path


def budget(seq_len: int = 12, steps: int = 1000, batch_size: int = 4, eval_batches: int = 1000) -> TrainingSettings:
    """Training settings; by default trials read more rows than these tests' files hold, so every row is kept."""
    return TrainingSettings(seq_len=seq_len, steps=steps, batch_size=batch_size, eval_batches=eval_batches)


def load(spec: DataSpec, tokenizer, tmp_path: Path, kind: str = "causal_lm", seq_len: int = 12,
         training: TrainingSettings | None = None) -> data.Task:
    return data.load_task(
        spec, training or budget(seq_len), kind=kind, tokenizer=tokenizer, vocab_size=len(tokenizer),
        base_dir=tmp_path, cache_dir=tmp_path / "cache",
    )


def synthetic(spec: DataSpec = SYNTHETIC, kind: str = "causal_lm", vocab_size: int = 64) -> data.Task:
    return data.load_task(spec, budget(seq_len=32), kind=kind, tokenizer=None, vocab_size=vocab_size,
                          base_dir=Path("."), cache_dir=Path("unused"))


def whole(split: data.PreparedRows, seq_len: int | None = None) -> dict[str, torch.Tensor]:
    """All rows of a split as one batch; with seq_len, padded further to seq_len (as all rows were once stored)."""
    batch = split.batch(torch.arange(len(split)))
    if seq_len is None:
        return batch
    fill = {"input_ids": split.pad_id, "attention_mask": 0, "labels": IGNORE_INDEX,
            "token_type_ids": split.pad_token_type_id}
    return {name: torch.nn.functional.pad(tensor, (0, seq_len - tensor.shape[1]), value=fill[name])
            if tensor.dim() == 2 else tensor for name, tensor in batch.items()}


def rows_of(task: data.Task, seq_len: int) -> list[tuple]:
    """Every example of both splits, padded to seq_len, as a tuple of (name, values) pairs, to compare as sets."""
    rows = []
    for split in (task.train, task.eval):
        batch = whole(split, seq_len)
        for i in range(len(split)):
            rows.append(tuple((name, tuple(tensor[i].tolist())) for name, tensor in sorted(batch.items())))
    return rows


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(text.split())


def row_lengths(split: data.PreparedRows) -> set[int]:
    return set(whole(split)["attention_mask"].sum(dim=1).tolist())


# ---- Markov chains and the synthetic task ----


def test_sample_markov_follows_the_transition_probabilities():
    logits = data.markov_logits(8, seed=5)
    tokens = data.sample_markov(logits, 2000, 50, torch.Generator().manual_seed(0))
    assert tokens.shape == (2000, 50) and tokens.dtype == torch.long
    counts = torch.zeros(8, 8)
    transitions = (tokens[:, :-1].flatten(), tokens[:, 1:].flatten())
    counts.index_put_(transitions, torch.ones(len(transitions[0])), accumulate=True)
    empirical = counts / counts.sum(dim=1, keepdim=True)
    assert (empirical - torch.softmax(logits, dim=-1)).abs().max() < 0.02


def test_synthetic_task_is_fixed_by_constants():
    task = synthetic()
    expected_train = data.sample_markov(
        data.markov_shift_task_logits(), 300, 32, torch.Generator().manual_seed(data.TASK_TRAIN_SAMPLE_SEED)
    )
    assert task.name == "synthetic:markov-shift"
    batch = task.train.batch(torch.arange(len(task.train)))
    assert torch.equal(task.train.input_ids, expected_train) and torch.equal(batch["input_ids"], expected_train)
    assert torch.equal(batch["labels"], expected_train)
    assert batch["attention_mask"].all() and task.eval.input_ids.shape == (50, 32)
    again = synthetic()
    assert again is task  # memoized: a pack of trials samples once


def test_synthetic_eval_split_is_independent_of_the_train_split():
    small = synthetic()
    larger = synthetic(DataSpec(train_examples=500, eval_examples=50))
    assert torch.equal(small.eval.input_ids, larger.eval.input_ids)
    train_rows = {tuple(row) for row in larger.train.input_ids.tolist()}
    assert not train_rows & {tuple(row) for row in small.eval.input_ids.tolist()}


def test_synthetic_task_is_a_low_rank_shift_away_from_pretraining():
    pretraining, task_logits = data.pretraining_chain_logits(), data.markov_shift_task_logits()
    assert torch.linalg.matrix_rank(task_logits - pretraining) == data.SHIFT_RANK
    task_probabilities = torch.softmax(task_logits, dim=-1)
    kl = (task_probabilities * (task_probabilities.log() - torch.log_softmax(pretraining, dim=-1))).sum(-1).mean()
    assert kl > 0.3

    # The sampled data really comes from the shifted chain: it is much likelier under it than under pretraining's.
    tokens = synthetic().train.input_ids

    def nll(logits):
        return torch.nn.functional.cross_entropy(logits[tokens[:, :-1]].flatten(0, 1), tokens[:, 1:].flatten())

    assert nll(pretraining) - nll(task_logits) > 0.3


def test_synthetic_task_needs_a_causal_lm_with_its_vocabulary():
    with pytest.raises(DataError, match="needs a causal_lm model"):
        synthetic(kind="seq_cls")
    with pytest.raises(DataError, match="at least 64 tokens, got 32"):
        synthetic(vocab_size=32)


# ---- files ----


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_prompt_completion_masks_the_prompt_token_by_token(suffix, tmp_path, causal_tokenizer):
    source = write_table(QA_ROWS, tmp_path / f"qa{suffix}")
    spec = DataSpec(source=source.name, prompt_column="prompt", completion_column="completion", eval_fraction=0.25)
    seq_len = 10  # the third row (11 tokens) loses its EOS
    task = load(spec, causal_tokenizer, tmp_path, seq_len=seq_len)

    bos, eos = causal_tokenizer.bos_token_id, causal_tokenizer.eos_token_id
    expected = []
    for row in QA_ROWS:
        prompt = [bos] + ids(causal_tokenizer, row["prompt"])
        completion = ids(causal_tokenizer, row["completion"]) + [eos]
        tokens = (prompt + completion)[:seq_len]
        padding = seq_len - len(tokens)
        expected.append(
            (
                ("attention_mask", tuple([1] * len(tokens) + [0] * padding)),
                ("input_ids", tuple(tokens + [eos] * padding)),  # padded with EOS: the tokenizer has no pad token
                ("labels", tuple(([IGNORE_INDEX] * len(prompt) + completion)[:seq_len] + [IGNORE_INDEX] * padding)),
            )
        )
    assert len(task.train) == 3 and len(task.eval) == 1
    assert sorted(rows_of(task, seq_len)) == sorted(expected)


def test_text_column_trains_on_every_token_and_truncates(tmp_path, causal_tokenizer):
    rows = [{"text": "the cat sat on the mat"}, {"text": "the dog ran far far far far far"}, {"text": "yes"}]
    write_table(rows, tmp_path / "text.csv")
    spec = DataSpec(source="text.csv", text_column="text", eval_fraction=0.3)
    task = load(spec, causal_tokenizer, tmp_path, seq_len=8)

    expected = []
    for row in rows:
        tokens = ([causal_tokenizer.bos_token_id] + ids(causal_tokenizer, row["text"]))[:8]
        padding = 8 - len(tokens)
        pad = causal_tokenizer.eos_token_id
        expected.append(
            (
                ("attention_mask", tuple([1] * len(tokens) + [0] * padding)),
                ("input_ids", tuple(tokens + [pad] * padding)),
                ("labels", tuple(tokens + [IGNORE_INDEX] * padding)),
            )
        )
    assert sorted(rows_of(task, 8)) == sorted(expected)


def test_string_labels_are_numbered_in_sorted_order(tmp_path, bert_tokenizer):
    write_table(QA_ROWS, tmp_path / "cls.parquet")
    spec = DataSpec(source="cls.parquet", text_column="prompt", label_column="label", eval_fraction=0.25)
    task = load(spec, bert_tokenizer, tmp_path, kind="seq_cls", seq_len=10)

    label_ids = {"mixed": 0, "neg": 1, "pos": 2}
    label_by_tokens = {}
    for split in (task.train, task.eval):
        batch = whole(split, seq_len=10)
        assert batch["labels"].dtype == torch.long and batch["labels"].dim() == 1
        assert "token_type_ids" not in batch
        for tokens, label in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
            label_by_tokens[tuple(tokens)] = label
    for row in QA_ROWS:
        tokens = [bert_tokenizer.cls_token_id] + ids(bert_tokenizer, row["prompt"]) + [bert_tokenizer.sep_token_id]
        tokens += [bert_tokenizer.pad_token_id] * (10 - len(tokens))
        assert label_by_tokens[tuple(tokens)] == label_ids[row["label"]]


def test_sentence_pairs_for_classification_keep_integer_labels(tmp_path, bert_tokenizer):
    rows = [{"premise": "the cat sat", "hypothesis": "the cat ran", "label": 5 * (i % 3)} for i in range(6)]
    write_table(rows, tmp_path / "pairs.jsonl")
    spec = DataSpec(source="pairs.jsonl", prompt_column="premise", completion_column="hypothesis", label_column="label")
    task = load(spec, bert_tokenizer, tmp_path, kind="seq_cls", seq_len=10)

    train = whole(task.train, seq_len=10)
    labels = sorted(train["labels"].tolist() + whole(task.eval)["labels"].tolist())
    assert labels == [0, 0, 5, 5, 10, 10]  # as they are, not renumbered as text
    cls, sep, pad = bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id, bert_tokenizer.pad_token_id
    premise, hypothesis = ids(bert_tokenizer, "the cat sat"), ids(bert_tokenizer, "the cat ran")
    assert train["input_ids"][0].tolist() == [cls, *premise, sep, *hypothesis, sep, pad]
    assert train["token_type_ids"][0].tolist() == [0] * 5 + [1] * 4 + [0]
    assert train["attention_mask"][0].tolist() == [1] * 9 + [0]


def test_negative_labels_are_rejected(tmp_path, bert_tokenizer):
    write_table([{"text": "the cat", "label": -1}, {"text": "the dog", "label": 1}], tmp_path / "unlabelled.csv")
    spec = DataSpec(source="unlabelled.csv", text_column="text", label_column="label")
    with pytest.raises(DataError, match="column 'label' has negative labels"):
        load(spec, bert_tokenizer, tmp_path, kind="seq_cls")


def test_held_out_split_is_fixed_and_disjoint(tmp_path, causal_tokenizer):
    rows = [{"text": " ".join(["the"] * (i + 1))} for i in range(20)]
    write_table(rows, tmp_path / "many.jsonl")
    spec = DataSpec(source="many.jsonl", text_column="text", eval_fraction=0.25)
    task = load(spec, causal_tokenizer, tmp_path, seq_len=24)

    # Every row has its own length, so lengths name rows.
    assert len(row_lengths(task.train)) == 15 and len(row_lengths(task.eval)) == 5
    assert row_lengths(task.train) | row_lengths(task.eval) == set(range(2, 22))
    rebuilt = load(spec, causal_tokenizer, tmp_path, seq_len=25)
    assert row_lengths(rebuilt.eval) == row_lengths(task.eval)

    truncated_spec = DataSpec(source="many.jsonl", text_column="text", max_examples=8)
    truncated = load(truncated_spec, causal_tokenizer, tmp_path, seq_len=24)
    assert row_lengths(truncated.train) | row_lengths(truncated.eval) == set(range(2, 10))


def test_text_data_needs_a_tokenizer(tmp_path):
    write_table(QA_ROWS, tmp_path / "qa.jsonl")
    with pytest.raises(DataError, match="needs a model with a tokenizer"):
        data.load_task(
            DataSpec(source="qa.jsonl", text_column="prompt"), budget(), kind="causal_lm", tokenizer=None,
            vocab_size=64, base_dir=tmp_path, cache_dir=tmp_path,
        )


# ---- validation ----


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_missing_column_names_file_and_column(suffix, tmp_path, causal_tokenizer):
    source = write_table(QA_ROWS, tmp_path / f"qa{suffix}")
    spec = DataSpec(source=source.name, prompt_column="prompt", completion_column="answer")
    for check in (lambda: data.validate_data_source(spec, tmp_path), lambda: load(spec, causal_tokenizer, tmp_path)):
        with pytest.raises(DataError) as error:
            check()
        assert str(error.value).startswith(f"{source}: no column 'answer' (data.completion_column)")
        assert "\n" not in str(error.value)


def test_empty_values_are_reported(tmp_path):
    write_table([{"text": "the cat"}, {"text": None}], tmp_path / "gaps.jsonl")
    with pytest.raises(DataError, match=r"gaps.jsonl: column 'text' has 1 empty values, first in row 1"):
        data.validate_data_source(DataSpec(source="gaps.jsonl", text_column="text"), tmp_path)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.csv", "text\n", "has no rows"),
        ("broken.parquet", "not parquet", "cannot be read as parquet"),
        ("broken.jsonl", '{"text": "the"\n', "cannot be read as jsonl"),
        ("missing.csv", None, "data file does not exist"),
    ],
)
def test_unreadable_files_are_reported(name, content, message, tmp_path):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DataError) as error:
        data.validate_data_source(DataSpec(source=name, text_column="text"), tmp_path)
    assert str(error.value).startswith(str(tmp_path / name)) and message in str(error.value)
    assert "\n" not in str(error.value)


def test_synthetic_and_hub_sources_pass_validation(tmp_path):
    data.validate_data_source(DataSpec(), tmp_path)
    data.validate_data_source(DataSpec(source="hf:nyu-mll/glue:mrpc", text_column="sentence1"), tmp_path)


# ---- batches ----


def test_batch_iterator_depends_only_on_its_seed():
    split = data.TokenTensors(torch.arange(10).unsqueeze(1))

    def take(seed, count):
        batches = data.batch_iterator(split, batch_size=5, seed=seed)
        return [next(batches)["labels"].flatten().tolist() for _ in range(count)]

    first = take(0, 4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(99)
        assert take(0, 4) == first
    assert take(1, 4) != first
    assert sorted(first[0] + first[1]) == list(range(10)) == sorted(first[2] + first[3])  # whole epochs


def test_batch_iterator_cuts_consecutive_batches_from_the_seeded_epochs():
    for rows, batch_size in ((7, 3), (6, 3), (3, 8)):  # batches across epochs, epochs of whole batches, tiny split
        generator = torch.Generator().manual_seed(5)
        epochs = torch.cat([torch.randperm(rows, generator=generator) for _ in range(8 * batch_size // rows + 1)])
        batches = data.batch_iterator(data.TokenTensors(torch.arange(rows).unsqueeze(1)), batch_size, seed=5)
        for start in range(0, 8 * batch_size, batch_size):  # the order the published studies were trained in
            assert next(batches)["input_ids"].flatten().tolist() == epochs[start : start + batch_size].tolist()


def test_batch_iterator_fills_batches_larger_than_the_split():
    split = data.TokenTensors(torch.arange(3).unsqueeze(1))
    batch = next(data.batch_iterator(split, batch_size=8, seed=0))
    assert batch["input_ids"].shape == (8, 1)


# ---- prompt templates, chat messages and word filters ----

INSTRUCTION_ROWS = [
    {"instruction": "question", "input": "the cat sat ?", "response": "yes"},
    {"instruction": "question", "input": "the dog ran far on the mat ?", "response": "no the dog sat"},
    {"instruction": "question", "input": "?", "response": "no"},
]


def test_prompt_template_joins_columns_and_word_filter_keeps_the_range(tmp_path, causal_tokenizer):
    source = write_table(INSTRUCTION_ROWS, tmp_path / "sql.jsonl")
    spec = DataSpec(source=source.name, prompt_template="{instruction}\n{input}\n", completion_column="response",
                    min_words=4, max_words=13, eval_fraction=0.5)
    task = load(spec, causal_tokenizer, tmp_path, seq_len=16)
    # words: 6, 13 and 2: the third row is filtered out
    bos, eos = causal_tokenizer.bos_token_id, causal_tokenizer.eos_token_id
    expected_labels = set()
    for row in INSTRUCTION_ROWS[:2]:
        prompt = [bos] + ids(causal_tokenizer, f"{row['instruction']} {row['input']}")
        completion = ids(causal_tokenizer, row["response"]) + [eos]
        padding = 16 - len(prompt) - len(completion)
        expected_labels.add(tuple([IGNORE_INDEX] * len(prompt) + completion + [IGNORE_INDEX] * padding))
    assert {dict(row)["labels"] for row in rows_of(task, 16)} == expected_labels
    with pytest.raises(data.DataError, match="no row holds between 40 and 50 words"):
        load(DataSpec(source=source.name, prompt_template="{instruction}{input}", completion_column="response",
                      min_words=40, max_words=50), causal_tokenizer, tmp_path)


def test_template_columns_are_checked_before_compute(tmp_path):
    source = write_table(INSTRUCTION_ROWS, tmp_path / "sql.csv")
    spec = DataSpec(source=source.name, prompt_template="{instruction} {context}", completion_column="response")
    with pytest.raises(data.DataError, match=r"no column 'context' \(data.prompt_template \{context\}\)"):
        data.validate_data_source(spec, tmp_path)


def test_chat_messages_train_on_the_last_assistant_turn(tmp_path, causal_tokenizer):
    chat = copy.deepcopy(causal_tokenizer)
    chat.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}answer : {% endif %}"
    )
    rows = [
        {"messages": [{"role": "user", "content": "the cat sat ?"}, {"role": "assistant", "content": "yes"}]},
        {"messages": [{"role": "user", "content": "the dog ?"}, {"role": "assistant", "content": "no the dog ran"}]},
    ]
    source = write_table(rows, tmp_path / "chat.jsonl")
    task = load(DataSpec(source=source.name, messages_column="messages", eval_fraction=0.5), chat, tmp_path, seq_len=12)
    bos, eos = chat.bos_token_id, chat.eos_token_id
    expected = set()
    for row in rows:
        user, assistant = row["messages"]
        prompt = [bos] + ids(chat, f"{user['content']} answer :")  # one BOS: the template's is not doubled
        completion = ids(chat, assistant["content"]) + [eos]
        tokens = prompt + completion
        expected.add(tuple(tokens + [eos] * (12 - len(tokens))))
    assert {dict(row)["input_ids"] for row in rows_of(task, 12)} == expected

    unanswered = write_table([{"messages": [{"role": "user", "content": "the cat ?"}]}] * 2, tmp_path / "open.jsonl")
    with pytest.raises(data.DataError, match="does not end with an assistant turn"):
        load(DataSpec(source=unanswered.name, messages_column="messages"), chat, tmp_path)


def test_word_filter_counts_the_named_prompt_column(tmp_path, causal_tokenizer):
    rows = [{"prompt": "the cat sat on the mat far far", "question": "the cat ?", "answer": "yes"}] * 2
    rows += [{"prompt": "the", "question": "the dog ran far on the mat ?", "answer": "no"}] * 2
    source = write_table(rows, tmp_path / "columns.jsonl")
    spec = DataSpec(source=source.name, prompt_column="question", completion_column="answer", max_words=5)
    task = load(spec, causal_tokenizer, tmp_path, seq_len=12)
    assert row_lengths(task.train) | row_lengths(task.eval) == {1 + 3 + 1 + 1}  # BOS, question, answer, EOS


# ---- prepared once, only the rows trials read, padded per batch ----


def numbered_rows(count: int) -> list[dict]:
    """Rows whose text spells their number in base len(WORDS) (three words); every fourth row is two words longer."""
    base = len(WORDS)
    return [{"text": f"{WORDS[i // base**2]} {WORDS[i // base % base]} {WORDS[i % base]}"
             + (" far far" if i % 4 == 0 else "")} for i in range(count)]


def row_numbers(split: data.PreparedRows, tokenizer) -> list[int]:
    batch = whole(split)
    numbers = []
    for tokens, present in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        words = tokenizer.convert_ids_to_tokens([t for t, p in zip(tokens, present) if p])[1:4]  # after BOS
        numbers.append(sum(WORDS.index(w) * len(WORDS) ** (2 - i) for i, w in enumerate(words)))
    return numbers


class TokenizerCalls:
    """Counts the texts a tokenizer class is asked to encode."""

    def __init__(self, monkeypatch, tokenizer):
        self.texts = 0
        original = type(tokenizer).__call__

        def counting(tok, text, *args, **kwargs):
            self.texts += len(text) if isinstance(text, list) else 1
            return original(tok, text, *args, **kwargs)

        monkeypatch.setattr(type(tokenizer), "__call__", counting)


def test_only_the_rows_trials_read_are_tokenized_after_filters_see_every_row(tmp_path, causal_tokenizer,
                                                                           monkeypatch):
    monkeypatch.setattr(data_sources, "SOURCE_CHUNK_ROWS", 64)  # the source is scanned in many chunks
    write_table(numbered_rows(2000), tmp_path / "numbered.jsonl")
    spec = DataSpec(source="numbered.jsonl", text_column="text", min_words=5)  # keeps every fourth row: 500 rows
    everything = load(spec, causal_tokenizer, tmp_path, seq_len=8)
    assert len(everything.train) == 450 and len(everything.eval) == 50  # eval_fraction 0.1 of the 500 kept

    calls = TokenizerCalls(monkeypatch, causal_tokenizer)
    training = budget(seq_len=8, steps=3, batch_size=4, eval_batches=2)
    assert data.rows_read(training) == (12, 8)
    task = load(spec, causal_tokenizer, tmp_path, training=training)
    assert calls.texts == 12 + 8 and len(task.train) == 12 and len(task.eval) == 8
    train, held_out = row_numbers(task.train, causal_tokenizer), row_numbers(task.eval, causal_tokenizer)
    # The held-out rows are the whole split's, so that evaluation reads the rows it read before: its first ones.
    assert held_out == row_numbers(everything.eval, causal_tokenizer)[:8]
    assert len(set(train)) == 12 and set(train) <= set(row_numbers(everything.train, causal_tokenizer))
    assert all(number % 4 == 0 for number in train + held_out)
    stored = task.train.table.schema  # text rows have loss on every token: no loss_start is stored
    assert stored.names == ["input_ids"] and stored.field("input_ids").type.value_type == pa.uint16()


def test_prepared_data_is_reused_by_later_loads_and_keyed_by_the_rows_read(tmp_path, causal_tokenizer,
                                                                          monkeypatch):
    write_table(numbered_rows(300), tmp_path / "numbered.parquet")
    spec = DataSpec(source="numbered.parquet", text_column="text")
    first = load(spec, causal_tokenizer, tmp_path, training=budget(steps=5))
    (prepared,) = (tmp_path / "cache" / "data").glob("numbered-*/")
    written = {path.name: path.stat().st_mtime_ns for path in prepared.iterdir()}
    assert set(written) == {"train.arrow", "eval.arrow", "prepared.json"}

    calls = TokenizerCalls(monkeypatch, causal_tokenizer)
    data._memo.clear()  # as in another process
    again = load(spec, causal_tokenizer, tmp_path, training=budget(steps=5))
    assert calls.texts == 0 and again is not first
    assert {path.name: path.stat().st_mtime_ns for path in prepared.iterdir()} == written
    assert torch.equal(whole(again.train)["input_ids"], whole(first.train)["input_ids"])

    load(spec, causal_tokenizer, tmp_path, training=budget(steps=6))  # more rows read: prepared anew
    assert calls.texts == 6 * 4 + 30 and len(list((tmp_path / "cache" / "data").glob("numbered-*/"))) == 2


def test_prepared_splits_are_read_as_tokenized_from_few_record_batches(tmp_path, causal_tokenizer, monkeypatch):
    from scaling_lab import data_preparation

    rows = [{"prompt": f"question {' '.join(WORDS[: 1 + i % 7])} ?", "completion": "yes " * (i % 3) + "no"}
            for i in range(300)]
    write_table(rows, tmp_path / "lengths.jsonl")
    spec = DataSpec(source="lengths.jsonl", prompt_column="prompt", completion_column="completion")
    monkeypatch.setattr(data_preparation, "ENCODE_BATCH_ROWS", 16)  # datasets writes a record batch per 16 rows
    encoded = {}
    rebatch = data_preparation._write_rebatched

    def keeping_what_was_tokenized(source: Path, path: Path) -> None:
        encoded[path.name] = pa.ipc.open_stream(pa.memory_map(str(source))).read_all().to_pylist()
        rebatch(source, path)

    monkeypatch.setattr(data_preparation, "_write_rebatched", keeping_what_was_tokenized)
    first = load(spec, causal_tokenizer, tmp_path, seq_len=16)
    assert first.train.table.column("input_ids").num_chunks == 1 and len(first.train) == 270
    (prepared,) = (tmp_path / "cache" / "data").glob("lengths-*/")
    assert {path.name for path in prepared.iterdir()} == {"train.arrow", "eval.arrow", "prepared.json"}

    monkeypatch.setattr(data_preparation, "RECORD_BATCH_BYTES", 1000)
    data._memo.clear()  # a later worker: reads what the first prepared
    later = load(spec, causal_tokenizer, tmp_path, seq_len=16)
    assert later.train.table.column("input_ids").num_chunks == 1
    for name, split in (("train.arrow", later.train), ("eval.arrow", later.eval)):
        assert split.table.to_pylist() == encoded[name]
    monkeypatch.setattr(data_preparation, "_write_rebatched", rebatch)
    data._memo.clear()  # prepared anew in small record batches: the same batches
    small = data.load_task(spec, budget(16), kind="causal_lm", tokenizer=causal_tokenizer,
                           vocab_size=len(causal_tokenizer), base_dir=tmp_path, cache_dir=tmp_path / "other")
    chunks = small.train.table.column("input_ids").chunks
    assert 1 < len(chunks) < 270 // 16 and all(chunk.nbytes <= 1000 for chunk in chunks[:-1])
    spanning = torch.tensor([269, 0, 100, 17, 16, 15, 200, 31, 32, 1])
    for name, tensor in small.train.batch(spanning).items():
        assert torch.equal(tensor, later.train.batch(spanning)[name])
    assert small.train.table.to_pylist() == later.train.table.to_pylist()


def test_the_stored_layout_is_part_of_the_prepared_datas_key(tmp_path, causal_tokenizer, monkeypatch):
    from scaling_lab import data_preparation

    write_table(numbered_rows(20), tmp_path / "numbered.jsonl")
    request = data_preparation._Request(DataSpec(source="numbered.jsonl", text_column="text"), "causal_lm",
                                        causal_tokenizer, len(causal_tokenizer), 8, tmp_path, 12, 4)
    current = data_preparation._prepared_dir(request, tmp_path)
    monkeypatch.setattr(data_preparation, "PREPARED_FORMAT_VERSION", data_preparation.PREPARED_FORMAT_VERSION - 1)
    assert data_preparation._prepared_dir(request, tmp_path) != current  # data prepared before is prepared again


def test_a_directory_is_built_once_by_concurrent_callers(tmp_path):
    import threading
    import time

    from scaling_lab.build_once import build_once

    builds = []

    def build(staging: Path) -> None:
        builds.append(staging)
        time.sleep(0.2)
        (staging / "done").write_text("yes")

    threads = [threading.Thread(target=build_once, args=(tmp_path / "built", build)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and (tmp_path / "built" / "done").read_text() == "yes"
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == ["built"]


def test_batches_are_padded_to_their_longest_row(tmp_path, causal_tokenizer):
    rows = [{"prompt": "question " + "the " * i + "?", "completion": "yes " * (i % 3) + "no"} for i in range(12)]
    write_table(rows, tmp_path / "lengths.jsonl")
    spec = DataSpec(source="lengths.jsonl", prompt_column="prompt", completion_column="completion")
    task = load(spec, causal_tokenizer, tmp_path, seq_len=16)
    lengths = whole(task.train)["attention_mask"].sum(dim=1)
    shortest = lengths.argsort()[:3]
    batch = task.train.batch(shortest)
    assert batch["input_ids"].shape == (3, int(lengths[shortest].max())) and lengths.max() > lengths[shortest].max()
    padded = whole(task.train, seq_len=16)
    for name, tensor in batch.items():  # the same rows as padding every row to seq_len, up to the padding
        assert torch.equal(tensor, padded[name][shortest][:, : tensor.shape[1]])
    assert lengths.max() == 16  # the longest rows are truncated to seq_len


def test_padding_per_batch_gives_the_loss_of_padding_to_seq_len(tmp_path, causal_tokenizer, bert_tokenizer):
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    rows = [{"prompt": "question " + "the cat " * (i % 5) + "?", "completion": "yes no " * (i % 3) + "no",
             "label": i % 2} for i in range(16)]
    write_table(rows, tmp_path / "pairs.jsonl")
    causal = LlamaForCausalLM(LlamaConfig(vocab_size=len(causal_tokenizer), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4))
    classifier = BertForSequenceClassification(BertConfig(
        vocab_size=len(bert_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    spec = DataSpec(source="pairs.jsonl", prompt_column="prompt", completion_column="completion")
    for model, tokenizer, kind, seq_len in ((causal, causal_tokenizer, "causal_lm", 24),
                                            (classifier, bert_tokenizer, "seq_cls", 32)):
        spec = dataclasses.replace(spec, label_column="label" if kind == "seq_cls" else None)
        split = load(spec, tokenizer, tmp_path, kind=kind, seq_len=seq_len).train
        model.eval()
        with torch.no_grad():
            for rows_ in torch.arange(len(split)).split(4):
                per_batch = split.batch(rows_)
                to_seq_len = {k: v[rows_] for k, v in whole(split, seq_len).items()}
                assert per_batch["input_ids"].shape[1] < seq_len
                assert model(**per_batch).loss.item() == pytest.approx(model(**to_seq_len).loss.item(), rel=1e-5)


def test_empty_values_anywhere_in_the_source_are_reported_with_their_row(tmp_path, causal_tokenizer, monkeypatch):
    monkeypatch.setattr(data_sources, "SOURCE_CHUNK_ROWS", 64)
    rows = numbered_rows(300)
    rows[150]["text"] = rows[250]["text"] = None
    write_table(rows, tmp_path / "gaps.jsonl")
    with pytest.raises(DataError) as error:
        load(DataSpec(source="gaps.jsonl", text_column="text"), causal_tokenizer, tmp_path,
             training=budget(steps=1))
    assert str(error.value) == f"{tmp_path / 'gaps.jsonl'}: column 'text' has 2 empty values, first in row 150"
    assert not [path for path in (tmp_path / "cache" / "data").iterdir() if path.is_dir()]  # nothing half-built


def test_hub_datasets_with_an_eval_split_number_labels_over_both(tmp_path, bert_tokenizer, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    (tmp_path / "hub").mkdir()
    train = [{"text": f"the {word}", "label": label} for word, label in zip(WORDS[:6], "ababab")]
    held_out = [{"text": "the mat", "label": "c"}, {"text": "the cat", "label": "a"}, {"text": "on", "label": "b"}]
    write_table(train, tmp_path / "hub" / "train.jsonl")
    write_table(held_out, tmp_path / "hub" / "test.jsonl")
    spec = DataSpec(source=f"hf:{tmp_path / 'hub'}", text_column="text", label_column="label", eval_split="test")
    task = load(spec, bert_tokenizer, tmp_path, kind="seq_cls", training=budget(steps=1, batch_size=2, eval_batches=1))
    assert len(task.train) == 2 and len(task.eval) == 2  # steps × batch, and eval_batches × batch
    evaluated = whole(task.eval)
    assert evaluated["labels"].tolist() == [2, 0]  # the first held-out rows, in order; "c" numbered with "a", "b"
    assert evaluated["input_ids"][0, 1:3].tolist() == ids(bert_tokenizer, "the mat")
    assert set(whole(task.train)["labels"].tolist()) <= {0, 1}


def test_tokenizer_fingerprint_follows_the_tokenization_not_the_last_calls_settings(bert_tokenizer):
    from tokenizers import normalizers

    from scaling_lab.data_preparation import _tokenizer_fingerprint

    tokenizer = copy.deepcopy(bert_tokenizer)
    fingerprint = _tokenizer_fingerprint(tokenizer)
    tokenizer(["the cat sat on the mat"], truncation=True, max_length=4, padding="max_length")
    left_set = (tokenizer.backend_tokenizer.truncation, tokenizer.backend_tokenizer.padding)
    assert None not in left_set and _tokenizer_fingerprint(tokenizer) == fingerprint
    assert (tokenizer.backend_tokenizer.truncation, tokenizer.backend_tokenizer.padding) == left_set  # restored

    lowercased = copy.deepcopy(bert_tokenizer)
    lowercased.backend_tokenizer.normalizer = normalizers.Lowercase()
    grown = copy.deepcopy(bert_tokenizer)
    grown.add_tokens(["cow"])
    templated = copy.deepcopy(bert_tokenizer)
    templated.chat_template = "{{ messages }}"
    variants = {_tokenizer_fingerprint(t) for t in (lowercased, grown, templated)}
    assert len(variants) == 3 and fingerprint not in variants
