"""The grid: a pure function from a study spec to trial configs, each identified by a hash of its content."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass

from scaling_lab.objective import effective_scale
from scaling_lab.spec import (
    DataSpec,
    DeepSpeedSettings,
    LoraSettings,
    ModelSpec,
    OptimizerSettings,
    Resources,
    StudySpec,
    TrainingSettings,
    build,
    to_dict,
)

TRIAL_ID_LENGTH = 16


@dataclass(frozen=True)
class TrialConfig:
    """Everything one fine-tune depends on. `resources` says where it runs, not what it computes."""

    model: ModelSpec
    rank: int
    alpha: float
    scaling_rule: str
    learning_rate: float
    seed: int
    lora: LoraSettings
    optimizer: OptimizerSettings
    training: TrainingSettings
    data: DataSpec
    deepspeed: DeepSpeedSettings
    resources: Resources

    @property
    def effective_scale(self) -> float:
        """The multiplier applied to B·A."""
        return effective_scale(self.alpha, self.rank, self.scaling_rule)

    @property
    def peft_lora_alpha(self) -> float:
        """The `lora_alpha` handed to PEFT; `fixed` is expressed through PEFT's standard α/r."""
        return self.alpha * self.rank if self.scaling_rule == "fixed" else self.alpha

    @property
    def use_rslora(self) -> bool:
        return self.scaling_rule == "rslora"

    def identity(self) -> dict:
        """The fields that change a trial's result; the trial id hashes exactly these.

        Settings left at their defaults are omitted, so that a setting added later (whose default keeps the
        old behaviour) does not change the ids of trials that already ran.
        """
        data = _non_default(self)
        data.pop("resources", None)
        data["model"].pop("resources", None)
        data["model"].pop("num_params", None)
        # Early stopping only cuts trials that cannot move an optimum: turning it on re-runs nothing.
        data.get("training", {}).pop("early_stop", None)
        return data

    @property
    def trial_id(self) -> str:
        canonical = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:TRIAL_ID_LENGTH]

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrialConfig:
        return build(cls, data)


def _non_default(obj):
    if not dataclasses.is_dataclass(obj):
        return to_dict(obj)
    kept = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        if f.default_factory is not dataclasses.MISSING and value == f.default_factory():
            continue
        kept[f.name] = _non_default(value)
    return kept


def expand(spec: StudySpec) -> list[TrialConfig]:
    """All trials of a study in a deterministic order: model, scaling rule, rank, learning rate, seed, α."""
    grid = spec.grid
    trials = []
    for model, rule, rank, lr, seed, alpha in itertools.product(
        spec.models, grid.scaling_rules, grid.ranks, grid.learning_rates, grid.seeds, grid.alpha_values()
    ):
        trials.append(
            TrialConfig(
                model=model,
                rank=rank,
                alpha=alpha,
                scaling_rule=rule,
                learning_rate=lr,
                seed=seed,
                lora=spec.lora,
                optimizer=spec.optimizer,
                training=spec.training,
                data=spec.data,
                deepspeed=spec.deepspeed,
                resources=model.resources or spec.execution.resources,
            )
        )
    ids = [t.trial_id for t in trials]
    if len(set(ids)) != len(ids):
        raise ValueError("two grid points have the same content; remove the duplicate model entry")
    return trials

