"""What a study sweeps: its models (with the resources a trial of each takes) and the grid of rank, α, learning
rate, seed and scaling rule."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from scaling_lab.model_sources import check_model_source, is_hub_source
from scaling_lab.spec_base import SpecError, require

SCALING_RULES = ("standard", "rslora", "fixed")
MODEL_KINDS = ("causal_lm", "seq_cls")


@dataclass(frozen=True)
class Resources:
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    custom: dict[str, float] = field(default_factory=dict)

    def check(self, path: str) -> None:
        require(self.workers >= 1, f"{path}.workers", "an integer >= 1", self.workers)
        require(self.cpus_per_worker > 0, f"{path}.cpus_per_worker", "a number > 0", self.cpus_per_worker)
        require(self.gpus_per_worker >= 0, f"{path}.gpus_per_worker", "a number >= 0", self.gpus_per_worker)


@dataclass(frozen=True)
class ModelSpec:
    """One point of the model-size axis: an embedded tiny model (tiny:<size>), a local directory or a hub id.

    Whether the source names a model is checked without loading anything (scaling_lab/model_sources.py).
    """

    name: str
    source: str
    kind: Literal["causal_lm", "seq_cls"] = "causal_lm"
    num_labels: int = 2
    resources: Resources | None = None
    num_params: int | None = None  # for `plan`'s cost estimate when the config cannot be read offline
    revision: str | None = None  # a hub model's branch, tag or commit; part of the trial id

    def check(self, path: str) -> None:
        try:
            check_model_source(self.source)
        except ValueError as exc:
            raise SpecError(f"{path}.source: {exc}") from None
        if self.revision is not None:
            require(is_hub_source(self.source), f"{path}.revision", "null unless the source is a hub id "
                    "(tiny models and local directories have no revisions)", self.revision)
            require(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,254}", self.revision) is not None,
                    f"{path}.revision", "a branch, tag or commit hash", self.revision)
        require(self.num_labels >= 2, f"{path}.num_labels", "an integer >= 2", self.num_labels)
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
    """The axes swept besides the model: rank is the scientific axis, α and learning rate are optimized, seed is
    noise."""

    ranks: tuple[int, ...]
    alphas: tuple[float, ...] | AlphaRange
    learning_rates: tuple[float, ...] = (1e-4,)
    seeds: tuple[int, ...] = (0,)
    scaling_rules: tuple[Literal["standard", "rslora", "fixed"], ...] = ("standard",)

    def alpha_values(self) -> tuple[float, ...]:
        return self.alphas.values() if isinstance(self.alphas, AlphaRange) else self.alphas

    def check(self, path: str) -> None:
        for name in ("ranks", "learning_rates", "seeds", "scaling_rules"):
            require(len(getattr(self, name)) > 0, f"{path}.{name}", "a non-empty list", [])
        for i, rank in enumerate(self.ranks):
            require(rank >= 1, f"{path}.ranks[{i}]", "a positive integer", rank)
        if isinstance(self.alphas, AlphaRange):
            a = self.alphas
            require(a.min > 0 and math.isfinite(a.min), f"{path}.alphas.min", "a finite number > 0", a.min)
            require(a.max >= a.min and math.isfinite(a.max), f"{path}.alphas.max", "a finite number >= min", a.max)
            require(a.num >= 1, f"{path}.alphas.num", "an integer >= 1", a.num)
        else:
            require(len(self.alphas) > 0, f"{path}.alphas", "a non-empty list or {min, max, num}", [])
            for i, alpha in enumerate(self.alphas):
                require(alpha > 0 and math.isfinite(alpha), f"{path}.alphas[{i}]", "a finite number > 0", alpha)
        for i, lr in enumerate(self.learning_rates):
            require(lr > 0 and math.isfinite(lr), f"{path}.learning_rates[{i}]", "a finite number > 0", lr)
        for name in ("ranks", "learning_rates", "seeds", "scaling_rules"):
            values = getattr(self, name)
            require(len(set(values)) == len(values), f"{path}.{name}", "distinct values", list(values))
