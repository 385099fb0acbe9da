"""The study spec: frozen dataclasses loaded from YAML and validated once, with errors that name the field.

The sections live by job in spec_axes (models, grid), spec_training (LoRA, optimizer, budget, DeepSpeed) and
spec_data (the task); SpecError, `build` and `to_dict` in spec_base. All are importable from here.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from scaling_lab.model_sources import TINY_PREFIX
from scaling_lab.search.proposals import SearchSettings
from scaling_lab.spec_axes import (
    MODEL_KINDS,
    SCALING_RULES,
    AlphaRange,
    Grid,
    ModelSpec,
    Resources,
)
from scaling_lab.spec_base import SpecError, build, require, resolve_path, to_dict
from scaling_lab.spec_data import BUILTIN_TASKS, DATA_FILE_SUFFIXES, SYNTHETIC_TASKS, DataSpec
from scaling_lab.spec_training import (
    MODELLED_DEEPSPEED_KEYS,
    DeepSpeedSettings,
    LoraSettings,
    OptimizerSettings,
    TrainingSettings,
)
from scaling_lab.tracking.settings import TrackingSettings

__all__ = [
    "BUILTIN_TASKS", "DATA_FILE_SUFFIXES", "MODEL_KINDS", "MODELLED_DEEPSPEED_KEYS", "SAFE_NAME", "SCALING_RULES",
    "SYNTHETIC_TASKS", "TINY_PREFIX", "AlphaRange", "DataSpec", "DeepSpeedSettings", "Execution", "FaultInjection",
    "Grid", "LoraSettings", "ModelSpec", "OptimizerSettings", "Resources", "SpecError", "StudySpec",
    "TrainingSettings", "apply_overrides", "build", "dump", "load", "parse", "resolve_path", "to_dict",
]

SAFE_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"


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
        require(self.at_step >= 1, f"{path}.at_step", "an integer >= 1", self.at_step)
        if self.attempts is not None:
            require(self.attempts >= 1, f"{path}.attempts", "an integer >= 1 or null", self.attempts)


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
            require(self.max_concurrent >= 1, f"{path}.max_concurrent", "an integer >= 1 or null", self.max_concurrent)
        require(self.trials_per_group >= 1, f"{path}.trials_per_group", "an integer >= 1", self.trials_per_group)
        require(self.max_retries >= 0, f"{path}.max_retries", "an integer >= 0", self.max_retries)
        require(self.claim_timeout_s > 0, f"{path}.claim_timeout_s", "a number > 0", self.claim_timeout_s)
        if self.checkpoint_every is not None:
            require(self.checkpoint_every >= 1, f"{path}.checkpoint_every", "an integer >= 1 or null",
                    self.checkpoint_every)
        require(self.simulated_step_time_s >= 0, f"{path}.simulated_step_time_s", "a number >= 0",
                self.simulated_step_time_s)
        for i, fault in enumerate(self.inject_faults):
            fault.check(f"{path}.inject_faults[{i}]")
        require(not self.inject_faults or self.backend == "simulated", f"{path}.inject_faults",
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
        require(re.fullmatch(SAFE_NAME, self.name) is not None, "name",
                "a name of letters, digits, '.', '_' and '-' that starts with a letter or digit", self.name)
        if self.output_dir is not None and "://" in self.output_dir:
            require(not _credentials_in_uri(self.output_dir), "output_dir",
                    "a URI without credentials (they would be written to spec.yaml and logs; let the environment "
                    "or a credentials file supply them)", None)
        require(len(self.models) > 0, "models", "a non-empty list", [])
        names = [m.name for m in self.models]
        require(len(set(names)) == len(names), "models", "distinct model names", names)
        for i, model in enumerate(self.models):
            model.check(f"models[{i}]")
        self.grid.check("grid")
        self.lora.check("lora")
        self.optimizer.check("optimizer")
        self.training.check("training")
        for i, model in enumerate(self.models):
            resources = model.resources or self.execution.resources
            where = f"models[{i}].resources" if model.resources else "execution.resources"
            self.training.check_split("training", resources.workers, where)
            if self.deepspeed.precision == "fp16":  # DeepSpeed refuses fp16 on CPU, in every trial
                require(resources.gpus_per_worker > 0, "deepspeed.precision",
                        f"bf16 or fp32 for CPU workers ({where}.gpus_per_worker is 0; fp16 runs on GPUs only)", "fp16")
        self.deepspeed.check("deepspeed")
        self.data.check("data", base_dir)
        self.execution.check("execution")
        self.search.check("search", self.grid.alpha_values())
        self.tracking.check("tracking")
        if any(m.kind == "seq_cls" for m in self.models):
            require(
                not self.data.is_synthetic and self.data.label_column is not None,
                "data.label_column",
                "a label column for seq_cls models",
                self.data.label_column,
            )


def _credentials_in_uri(uri: str) -> bool:
    parts = urllib.parse.urlsplit(uri)
    secret_words = ("key", "secret", "token", "password", "credential")
    query_keys = [key.lower() for key, _ in urllib.parse.parse_qsl(parts.query)]
    return "@" in parts.netloc or any(word in key for key in query_keys for word in secret_words)


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
