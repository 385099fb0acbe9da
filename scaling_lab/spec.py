"""The study spec: frozen dataclasses loaded from YAML and validated once, with errors that name the field."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import string
import urllib.parse
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from scaling_lab.early_stop import EarlyStopSettings
from scaling_lab.search.proposals import SearchSettings
from scaling_lab.tracking.settings import TrackingSettings

SCALING_RULES = ("standard", "rslora", "fixed")
MODEL_KINDS = ("causal_lm", "seq_cls")
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
SYNTHETIC_TASKS = ("synthetic:markov-shift",)
BUILTIN_TASKS = ("builtin:stdlib-docstrings",)  # real text generated at run time: scaling_lab/text_tasks.py
SAFE_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"


class SpecError(ValueError):
    """A study spec that cannot be run; the message names the field and what was expected."""


@dataclass(frozen=True)
class Resources:
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    custom: dict[str, float] = field(default_factory=dict)

    def check(self, path: str) -> None:
        _require(self.workers >= 1, f"{path}.workers", "an integer >= 1", self.workers)
        _require(self.cpus_per_worker > 0, f"{path}.cpus_per_worker", "a number > 0", self.cpus_per_worker)
        _require(self.gpus_per_worker >= 0, f"{path}.gpus_per_worker", "a number >= 0", self.gpus_per_worker)


@dataclass(frozen=True)
class ModelSpec:
    """One point of the model-size axis: an embedded tiny model (tiny:<size>), a local directory or a hub id."""

    name: str
    source: str
    kind: Literal["causal_lm", "seq_cls"] = "causal_lm"
    num_labels: int = 2
    resources: Resources | None = None
    num_params: int | None = None  # for `plan`'s cost estimate when the config cannot be read offline
    revision: str | None = None  # a hub model's branch, tag or commit; part of the trial id

    def check(self, path: str) -> None:
        from scaling_lab.model_sources import check_model_source, is_hub_source

        try:
            check_model_source(self.source)
        except ValueError as exc:
            raise SpecError(f"{path}.source: {exc}") from None
        if self.revision is not None:
            _require(is_hub_source(self.source), f"{path}.revision", "null unless the source is a hub id "
                     "(tiny models and local directories have no revisions)", self.revision)
            _require(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,254}", self.revision) is not None,
                     f"{path}.revision", "a branch, tag or commit hash", self.revision)
        _require(self.num_labels >= 2, f"{path}.num_labels", "an integer >= 2", self.num_labels)
        if self.resources is not None:
            self.resources.check(f"{path}.resources")


@dataclass(frozen=True)
class AlphaRange:
    """Log-spaced α values from min to max, inclusive."""

    min: float
    max: float
    num: int

    def values(self) -> tuple[float, ...]:
        if self.num == 1:
            return (float(self.min),)
        ratio = math.log(self.max / self.min) / (self.num - 1)
        return tuple(float(f"{self.min * math.exp(ratio * i):.12g}") for i in range(self.num))


@dataclass(frozen=True)
class Grid:
    """The axes swept besides the model: rank is the scientific axis, α and learning rate are optimized, seed is noise."""

    ranks: tuple[int, ...]
    alphas: tuple[float, ...] | AlphaRange
    learning_rates: tuple[float, ...] = (1e-4,)
    seeds: tuple[int, ...] = (0,)
    scaling_rules: tuple[Literal["standard", "rslora", "fixed"], ...] = ("standard",)

    def alpha_values(self) -> tuple[float, ...]:
        return self.alphas.values() if isinstance(self.alphas, AlphaRange) else self.alphas

    def check(self, path: str) -> None:
        for name in ("ranks", "learning_rates", "seeds", "scaling_rules"):
            _require(len(getattr(self, name)) > 0, f"{path}.{name}", "a non-empty list", [])
        for i, rank in enumerate(self.ranks):
            _require(rank >= 1, f"{path}.ranks[{i}]", "a positive integer", rank)
        if isinstance(self.alphas, AlphaRange):
            a = self.alphas
            _require(a.min > 0 and math.isfinite(a.min), f"{path}.alphas.min", "a finite number > 0", a.min)
            _require(a.max >= a.min and math.isfinite(a.max), f"{path}.alphas.max", "a finite number >= min", a.max)
            _require(a.num >= 1, f"{path}.alphas.num", "an integer >= 1", a.num)
        else:
            _require(len(self.alphas) > 0, f"{path}.alphas", "a non-empty list or {min, max, num}", [])
            for i, alpha in enumerate(self.alphas):
                _require(alpha > 0 and math.isfinite(alpha), f"{path}.alphas[{i}]", "a finite number > 0", alpha)
        for i, lr in enumerate(self.learning_rates):
            _require(lr > 0 and math.isfinite(lr), f"{path}.learning_rates[{i}]", "a finite number > 0", lr)
        for name in ("ranks", "learning_rates", "seeds", "scaling_rules"):
            values = getattr(self, name)
            _require(len(set(values)) == len(values), f"{path}.{name}", "distinct values", list(values))


@dataclass(frozen=True)
class LoraSettings:
    target_modules: str | tuple[str, ...] = "all-linear"
    dropout: float = 0.0
    init: Literal["default", "gaussian"] = "default"  # PEFT's init_lora_weights: True (Kaiming-uniform A) or "gaussian"

    def check(self, path: str) -> None:
        _require(0.0 <= self.dropout < 1.0, f"{path}.dropout", "a number in [0, 1)", self.dropout)


@dataclass(frozen=True)
class OptimizerSettings:
    name: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    grad_clip: float | None = 1.0  # the global gradient norm's cap (DeepSpeed's and HF Trainer's default); null: none

    def check(self, path: str) -> None:
        _require(self.weight_decay >= 0, f"{path}.weight_decay", "a number >= 0", self.weight_decay)
        _require(all(0 <= b < 1 for b in self.betas), f"{path}.betas", "two numbers in [0, 1)", list(self.betas))
        _require(self.warmup_steps >= 0, f"{path}.warmup_steps", "an integer >= 0", self.warmup_steps)
        if self.grad_clip is not None:
            _require(self.grad_clip > 0, f"{path}.grad_clip", "a number > 0 or null", self.grad_clip)


@dataclass(frozen=True)
class TrainingSettings:
    """The budget of one fine-tune: steps, or tokens (converted to steps by batch_size × seq_len)."""

    batch_size: int = 32  # sequences per optimizer step, over all workers
    seq_len: int = 32
    # Sequences per forward pass on one worker; the batch is then accumulated over batch_size / (micro_batch_size ×
    # workers) passes. null: the whole batch at once (batch_size / workers per worker).
    micro_batch_size: int | None = None
    steps: int | None = None
    tokens: int | None = None
    eval_every: int = 20
    eval_batches: int = 4
    divergence_factor: float = 1.3  # diverged: loss above this × the initial held-out loss ...
    divergence_patience: int = 3  # ... for this many consecutive steps, or any non-finite loss
    diagnostics_every: int = 20  # norms and Signal-Drift at step 1 and every this many steps; 0 turns them off
    early_stop: EarlyStopSettings = field(default_factory=EarlyStopSettings)  # scaling_lab/early_stop.py

    @property
    def total_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.tokens / (self.batch_size * self.seq_len)))

    def check(self, path: str) -> None:
        _require((self.steps is None) != (self.tokens is None), f"{path}", "exactly one of steps or tokens", None)
        if self.steps is not None:
            _require(self.steps >= 1, f"{path}.steps", "an integer >= 1", self.steps)
        if self.tokens is not None:
            _require(self.tokens >= 1, f"{path}.tokens", "an integer >= 1", self.tokens)
        for name in ("batch_size", "seq_len", "eval_every", "eval_batches"):
            _require(getattr(self, name) >= 1, f"{path}.{name}", "an integer >= 1", getattr(self, name))
        if self.micro_batch_size is not None:
            _require(self.micro_batch_size >= 1, f"{path}.micro_batch_size", "an integer >= 1 or null",
                     self.micro_batch_size)

    def check_split(self, path: str, workers: int, where: str) -> None:
        """The batch splits evenly over `workers` workers, and their shares into micro-batches."""
        _require(self.batch_size % workers == 0, f"{path}.batch_size",
                 f"a multiple of the {workers} workers of {where}", self.batch_size)
        if self.micro_batch_size is not None:
            _require(self.batch_size % (self.micro_batch_size * workers) == 0, f"{path}.micro_batch_size",
                     f"a divisor of batch_size / workers = {self.batch_size // workers} ({where})",
                     self.micro_batch_size)
        _require(self.divergence_factor > 1, f"{path}.divergence_factor", "a number > 1", self.divergence_factor)
        _require(self.diagnostics_every >= 0, f"{path}.diagnostics_every", "an integer >= 0", self.diagnostics_every)
        _require(self.divergence_patience >= 1, f"{path}.divergence_patience", "an integer >= 1",
                 self.divergence_patience)
        self.early_stop.check(f"{path}.early_stop")


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
            _require(self.source in SYNTHETIC_TASKS, f"{path}.source", f"one of {list(SYNTHETIC_TASKS)}", self.source)
        elif self.is_builtin:
            _require(self.source in BUILTIN_TASKS, f"{path}.source", f"one of {list(BUILTIN_TASKS)}", self.source)
        elif not self.is_hub:
            file = resolve_path(self.source, base_dir)
            _require(
                file.suffix in DATA_FILE_SUFFIXES,
                f"{path}.source",
                f"synthetic:<task>, builtin:<task>, hf:<dataset id> or a file ending in {'/'.join(DATA_FILE_SUFFIXES)}",
                self.source,
            )
            if not file.is_file():
                raise SpecError(f"{path}.source: data file {str(file)!r} does not exist")
        if self.revision is not None:
            _require(self.is_hub, f"{path}.revision", "null unless source is hf:<dataset id>", self.revision)
        if not self.is_synthetic:
            has_prompt = (self.prompt_column is not None) + (self.prompt_template is not None)
            layouts = [
                self.text_column is not None,
                has_prompt == 1 and self.completion_column is not None,
                self.messages_column is not None,
            ]
            _require(
                sum(layouts) == 1 and has_prompt <= 1,
                f"{path}",
                "one of: text_column; prompt_column or prompt_template, with completion_column; messages_column",
                None,
            )
        if self.prompt_template is not None:
            fields = [name for _, name, spec, conv in string.Formatter().parse(self.prompt_template) if name is not None]
            _require(
                bool(fields) and all(name.isidentifier() for name in fields),
                f"{path}.prompt_template",
                "a text with {column} fields naming columns (no indexing, attributes or formats)",
                self.prompt_template,
            )
        for name in ("min_words", "max_words"):
            if getattr(self, name) is not None:
                _require(getattr(self, name) >= 0, f"{path}.{name}", "an integer >= 0", getattr(self, name))
        _require(0 < self.eval_fraction < 1, f"{path}.eval_fraction", "a number in (0, 1)", self.eval_fraction)
        _require(self.train_examples >= 1, f"{path}.train_examples", "an integer >= 1", self.train_examples)
        _require(self.eval_examples >= 1, f"{path}.eval_examples", "an integer >= 1", self.eval_examples)


# DeepSpeed config keys that the spec sets from its own fields: deepspeed.config may not set them.
MODELLED_DEEPSPEED_KEYS = {
    "train_batch_size": "training.batch_size",
    "train_micro_batch_size_per_gpu": "training.micro_batch_size",
    "gradient_accumulation_steps": "training.micro_batch_size",
    "gradient_clipping": "optimizer.grad_clip",
    "bf16": "deepspeed.precision",
    "fp16": "deepspeed.precision",
    "optimizer": "optimizer",
    "scheduler": "optimizer.schedule",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.offload_optimizer": "deepspeed.offload",
    "zero_optimization.offload_param": "deepspeed.offload",
}


@dataclass(frozen=True)
class DeepSpeedSettings:
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    offload: bool = False
    gradient_checkpointing: bool = False
    # Further DeepSpeed config (its own JSON keys), merged into the one built from the spec; part of the trial id.
    config: dict[str, Any] = field(default_factory=dict)

    def check(self, path: str) -> None:
        for key, field_name in MODELLED_DEEPSPEED_KEYS.items():
            head, _, rest = key.partition(".")
            inner = self.config.get(head)
            present = head in self.config if not rest else isinstance(inner, dict) and rest in inner
            _require(not present, f"{path}.config.{key}", f"it left out (the spec sets it from {field_name})", None)


@dataclass(frozen=True)
class FaultInjection:
    """A fault injected on purpose into simulated trials: for the reliability tests and the fault benchmark only.

    kind: error (raises), oom (raises MemoryError), nan (the loss turns NaN), explode (the loss grows tenfold a
    step), crash (the worker process kills itself, as if killed from outside). It hits the trials whose rank and
    α are listed (every trial where a list is empty) at step `at_step`, on their first `attempts` attempts (on
    every attempt if null).
    """

    kind: Literal["error", "oom", "nan", "explode", "crash"]
    at_step: int = 1
    ranks: tuple[int, ...] = ()
    alphas: tuple[float, ...] = ()
    attempts: int | None = None

    def check(self, path: str) -> None:
        _require(self.at_step >= 1, f"{path}.at_step", "an integer >= 1", self.at_step)
        if self.attempts is not None:
            _require(self.attempts >= 1, f"{path}.attempts", "an integer >= 1 or null", self.attempts)


@dataclass(frozen=True)
class Execution:
    """How trials are scheduled; nothing here changes what a trial computes."""

    backend: Literal["ray_train", "simulated"] = "ray_train"
    resources: Resources = field(default_factory=Resources)
    max_concurrent: int | None = None
    trials_per_group: int = 16
    max_retries: int = 2
    claim_timeout_s: float = 120.0  # a running trial whose heartbeat is older than this is taken over
    checkpoint_every: int | None = None  # steps between in-trial checkpoints that a retry resumes from; null: none
    simulated_step_time_s: float = 0.0  # the simulated backend sleeps this long per step
    inject_faults: tuple[FaultInjection, ...] = ()  # tests and the fault benchmark only

    def check(self, path: str) -> None:
        self.resources.check(f"{path}.resources")
        if self.max_concurrent is not None:
            _require(self.max_concurrent >= 1, f"{path}.max_concurrent", "an integer >= 1 or null", self.max_concurrent)
        _require(self.trials_per_group >= 1, f"{path}.trials_per_group", "an integer >= 1", self.trials_per_group)
        _require(self.max_retries >= 0, f"{path}.max_retries", "an integer >= 0", self.max_retries)
        _require(self.claim_timeout_s > 0, f"{path}.claim_timeout_s", "a number > 0", self.claim_timeout_s)
        if self.checkpoint_every is not None:
            _require(self.checkpoint_every >= 1, f"{path}.checkpoint_every", "an integer >= 1 or null",
                     self.checkpoint_every)
        _require(self.simulated_step_time_s >= 0, f"{path}.simulated_step_time_s", "a number >= 0",
                 self.simulated_step_time_s)
        for i, fault in enumerate(self.inject_faults):
            fault.check(f"{path}.inject_faults[{i}]")
        _require(not self.inject_faults or self.backend == "simulated", f"{path}.inject_faults",
                 "no faults unless backend is simulated (only simulated trials inject them)", None)


@dataclass(frozen=True)
class StudySpec:
    name: str
    models: tuple[ModelSpec, ...]
    grid: Grid
    description: str = ""
    output_dir: str | None = None
    cache_dir: str = "~/.cache/scaling_lab"
    lora: LoraSettings = field(default_factory=LoraSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    training: TrainingSettings = field(default_factory=lambda: TrainingSettings(steps=80))
    data: DataSpec = field(default_factory=DataSpec)
    metric: Literal["eval_loss", "eval_accuracy"] = "eval_loss"
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    execution: Execution = field(default_factory=Execution)
    search: SearchSettings = field(default_factory=SearchSettings)  # grid or adaptive: scaling_lab/search/proposals.py
    tracking: TrackingSettings = field(default_factory=TrackingSettings)  # live logging: scaling_lab/tracking

    def results_dir(self, base_dir: Path = Path(".")) -> str:
        """A local path (relative ones resolved against base_dir) or a URI such as s3://bucket/prefix."""
        target = self.output_dir or f"results/{self.name}"
        return target if "://" in target else str(resolve_path(target, base_dir))

    def check(self, base_dir: Path) -> None:
        _require(re.fullmatch(SAFE_NAME, self.name) is not None, "name",
                 "a name of letters, digits, '.', '_' and '-' that starts with a letter or digit", self.name)
        if self.output_dir is not None and "://" in self.output_dir:
            _require(not _credentials_in_uri(self.output_dir), "output_dir",
                     "a URI without credentials (they would be written to spec.yaml and logs; let the environment "
                     "or a credentials file supply them)", None)
        _require(len(self.models) > 0, "models", "a non-empty list", [])
        names = [m.name for m in self.models]
        _require(len(set(names)) == len(names), "models", "distinct model names", names)
        for i, model in enumerate(self.models):
            model.check(f"models[{i}]")
        self.grid.check("grid")
        self.lora.check("lora")
        self.optimizer.check("optimizer")
        self.training.check("training")
        for i, model in enumerate(self.models):
            workers = (model.resources or self.execution.resources).workers
            where = f"models[{i}].resources" if model.resources else "execution.resources"
            self.training.check_split("training", workers, where)
        self.deepspeed.check("deepspeed")
        self.data.check("data", base_dir)
        self.execution.check("execution")
        self.search.check("search", self.grid.alpha_values())
        self.tracking.check("tracking")
        if any(m.kind == "seq_cls" for m in self.models):
            _require(
                not self.data.is_synthetic and self.data.label_column is not None,
                "data.label_column",
                "a label column for seq_cls models",
                self.data.label_column,
            )


def _require(ok: bool, path: str, expected: str, got: Any) -> None:
    if not ok:
        raise SpecError(f"{path}: expected {expected}, got {got!r}" if got is not None else f"{path}: expected {expected}")


def _credentials_in_uri(uri: str) -> bool:
    parts = urllib.parse.urlsplit(uri)
    secret_words = ("key", "secret", "token", "password", "credential")
    query_keys = [key.lower() for key, _ in urllib.parse.parse_qsl(parts.query)]
    return "@" in parts.netloc or any(word in key for key in query_keys for word in secret_words)


def resolve_path(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


# ---- building frozen dataclasses from plain data, with errors that name the field ----


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}.get(
        tp, str(tp)
    )


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
        raise SpecError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, path)
            except SpecError:
                continue
        raise SpecError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
            raise SpecError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise SpecError(f"{path}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{path}: expected a mapping, got {value!r}")
        key_type, value_type = typing.get_args(tp)
        return {_convert(k, key_type, path): _convert(v, value_type, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is Any:
        return _plain(value, path)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-4" as a string
        except ValueError:
            pass
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise SpecError(f"{path}: expected {_type_name(tp)}, got {value!r}")


def _plain(value: Any, path: str) -> Any:
    """`value` if it is plain JSON data (mappings with string keys, lists, scalars)."""
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise SpecError(f"{path}: expected string keys, got {key!r}")
        return {k: _plain(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise SpecError(f"{path}: expected plain data (a mapping, list, number, string, true/false or null), got {value!r}")


def build(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and values of the wrong type."""
    where = path or "spec"
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpecError(f"{_join(path, key)}: unknown key{hint}; allowed: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError(f"{_join(path, name)}: required key is missing")
    return cls(**kwargs)


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def to_dict(obj: Any) -> Any:
    """Plain data (lists, dicts, scalars) that `build` turns back into the same object."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ---- loading ----


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a plain spec mapping."""
    data = yaml.safe_load(yaml.safe_dump(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--override {item!r}: expected key.path=value")
        target = data
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
                continue
            if not isinstance(target, dict):
                raise SpecError(f"--override {item!r}: {part!r} is not inside a mapping")
            target = target.setdefault(part, {})
        if isinstance(target, list) and parts[-1].isdigit() and int(parts[-1]) < len(target):
            target[int(parts[-1])] = yaml.safe_load(raw)
        elif isinstance(target, dict):
            target[parts[-1]] = yaml.safe_load(raw)
        else:
            raise SpecError(f"--override {item!r}: {parts[-2] if len(parts) > 1 else key!r} is not a mapping")
    return data


def parse(data: Any, base_dir: Path = Path(".")) -> StudySpec:
    spec = build(StudySpec, data)
    spec.check(base_dir)
    return spec


def load(path: str | Path, overrides: list[str] = ()) -> StudySpec:
    """Load and validate a study spec; relative paths in it are relative to the current directory."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: spec file does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    try:
        return parse(apply_overrides(data, list(overrides)) if overrides else data)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None


def dump(spec: StudySpec) -> str:
    return yaml.safe_dump(to_dict(spec), sort_keys=False)
