"""The fine-tuning task a study trains on, and how its rows are read."""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from scaling_lab.spec_base import SpecError, require, resolve_path

DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
SYNTHETIC_TASKS = ("synthetic:markov-shift",)
BUILTIN_TASKS = ("builtin:stdlib-docstrings",)  # real text generated at run time: scaling_lab/text_tasks.py


@dataclass(frozen=True)
class DataSpec:
    """The fine-tuning task: the offline synthetic task, a builtin text task (columns text and label), a local
    JSONL/JSON/Parquet/CSV file, or hf:<dataset id>.

    Columns: text (loss on all tokens); or a prompt (one column, or a template over several) + completion
    (loss on completion tokens only); or chat messages (the last assistant turn is the completion, the turns
    before it are rendered with the tokenizer's chat template); or text + label for sequence classification.
    """

    source: str = "synthetic:markov-shift"
    revision: str | None = None  # of a hub dataset (a branch, tag or commit); null: the hub's default branch
    text_column: str | None = None
    prompt_column: str | None = None
    prompt_template: str | None = None  # e.g. "{instruction}\n{input}\n": fields are column names
    completion_column: str | None = None
    messages_column: str | None = None  # a list of {role, content} per row
    label_column: str | None = None
    min_words: int | None = None  # keep rows whose prompt + completion (or text) hold this many words or more ...
    max_words: int | None = None  # ... and at most this many
    train_split: str = "train"
    eval_split: str | None = None
    eval_fraction: float = 0.1
    max_examples: int | None = None
    train_examples: int = 4096
    eval_examples: int = 256

    @property
    def is_synthetic(self) -> bool:
        return self.source.startswith("synthetic:")

    @property
    def is_hub(self) -> bool:
        return self.source.startswith("hf:")

    @property
    def is_builtin(self) -> bool:
        return self.source.startswith("builtin:")

    def check(self, path: str, base_dir: Path) -> None:
        if self.is_synthetic:
            require(self.source in SYNTHETIC_TASKS, f"{path}.source", f"one of {list(SYNTHETIC_TASKS)}", self.source)
        elif self.is_builtin:
            require(self.source in BUILTIN_TASKS, f"{path}.source", f"one of {list(BUILTIN_TASKS)}", self.source)
        elif not self.is_hub:
            file = resolve_path(self.source, base_dir)
            require(
                file.suffix in DATA_FILE_SUFFIXES,
                f"{path}.source",
                f"synthetic:<task>, builtin:<task>, hf:<dataset id> or a file ending in {'/'.join(DATA_FILE_SUFFIXES)}",
                self.source,
            )
            if not file.is_file():
                raise SpecError(f"{path}.source: data file {str(file)!r} does not exist")
        if self.revision is not None:
            require(self.is_hub, f"{path}.revision", "null unless source is hf:<dataset id>", self.revision)
        if not self.is_synthetic:
            has_prompt = (self.prompt_column is not None) + (self.prompt_template is not None)
            layouts = [
                self.text_column is not None,
                has_prompt == 1 and self.completion_column is not None,
                self.messages_column is not None,
            ]
            require(
                sum(layouts) == 1 and has_prompt <= 1,
                f"{path}",
                "one of: text_column; prompt_column or prompt_template, with completion_column; messages_column",
                None,
            )
        if self.prompt_template is not None:
            parsed = string.Formatter().parse(self.prompt_template)
            fields = [name for _, name, _format_spec, _conversion in parsed if name is not None]
            require(
                bool(fields) and all(name.isidentifier() for name in fields),
                f"{path}.prompt_template",
                "a text with {column} fields naming columns (no indexing, attributes or formats)",
                self.prompt_template,
            )
        for name in ("min_words", "max_words"):
            if getattr(self, name) is not None:
                require(getattr(self, name) >= 0, f"{path}.{name}", "an integer >= 0", getattr(self, name))
        require(0 < self.eval_fraction < 1, f"{path}.eval_fraction", "a number in (0, 1)", self.eval_fraction)
        require(self.train_examples >= 1, f"{path}.train_examples", "an integer >= 1", self.train_examples)
        require(self.eval_examples >= 1, f"{path}.eval_examples", "an integer >= 1", self.eval_examples)
