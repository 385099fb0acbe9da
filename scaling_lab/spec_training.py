"""How one trial trains: the LoRA adapter, the optimizer, the step budget with evaluation, divergence and early
stopping, and DeepSpeed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from scaling_lab.early_stop import EarlyStopSettings
from scaling_lab.spec_base import require


@dataclass(frozen=True)
class LoraSettings:
    target_modules: str | tuple[str, ...] = "all-linear"
    dropout: float = 0.0
    init: Literal["default", "gaussian"] = "default"  # PEFT's init_lora_weights: True (Kaiming-uniform A) or "gaussian"

    def check(self, path: str) -> None:
        require(0.0 <= self.dropout < 1.0, f"{path}.dropout", "a number in [0, 1)", self.dropout)


@dataclass(frozen=True)
class OptimizerSettings:
    name: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    grad_clip: float | None = 1.0  # the global gradient norm's cap (DeepSpeed's and HF Trainer's default); null: none

    def check(self, path: str) -> None:
        require(self.weight_decay >= 0, f"{path}.weight_decay", "a number >= 0", self.weight_decay)
        require(all(0 <= b < 1 for b in self.betas), f"{path}.betas", "two numbers in [0, 1)", list(self.betas))
        require(self.warmup_steps >= 0, f"{path}.warmup_steps", "an integer >= 0", self.warmup_steps)
        if self.grad_clip is not None:
            require(self.grad_clip > 0, f"{path}.grad_clip", "a number > 0 or null", self.grad_clip)


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
        require((self.steps is None) != (self.tokens is None), f"{path}", "exactly one of steps or tokens", None)
        if self.steps is not None:
            require(self.steps >= 1, f"{path}.steps", "an integer >= 1", self.steps)
        if self.tokens is not None:
            require(self.tokens >= 1, f"{path}.tokens", "an integer >= 1", self.tokens)
        for name in ("batch_size", "seq_len", "eval_every", "eval_batches"):
            require(getattr(self, name) >= 1, f"{path}.{name}", "an integer >= 1", getattr(self, name))
        if self.micro_batch_size is not None:
            require(self.micro_batch_size >= 1, f"{path}.micro_batch_size", "an integer >= 1 or null",
                    self.micro_batch_size)

    def check_split(self, path: str, workers: int, where: str) -> None:
        """The batch splits evenly over `workers` workers, and their shares into micro-batches."""
        require(self.batch_size % workers == 0, f"{path}.batch_size",
                f"a multiple of the {workers} workers of {where}", self.batch_size)
        if self.micro_batch_size is not None:
            require(self.batch_size % (self.micro_batch_size * workers) == 0, f"{path}.micro_batch_size",
                    f"a divisor of batch_size / workers = {self.batch_size // workers} ({where})",
                    self.micro_batch_size)
        require(self.divergence_factor > 1, f"{path}.divergence_factor", "a number > 1", self.divergence_factor)
        require(self.diagnostics_every >= 0, f"{path}.diagnostics_every", "an integer >= 0", self.diagnostics_every)
        require(self.divergence_patience >= 1, f"{path}.divergence_patience", "an integer >= 1",
                self.divergence_patience)
        self.early_stop.check(f"{path}.early_stop")




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
            require(not present, f"{path}.config.{key}", f"it left out (the spec sets it from {field_name})", None)


