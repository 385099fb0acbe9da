"""What one fine-tune returns, whichever backend ran it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainOutcome:
    status: str
    error: str | None = None
    curve: list[dict] = field(default_factory=list)
    initial_eval_loss: float | None = None
    final_eval_loss: float | None = None
    best_eval_loss: float | None = None
    final_eval_accuracy: float | None = None
    best_eval_accuracy: float | None = None
    final_train_loss: float | None = None
    last_finite_train_loss: float | None = None
    steps: int = 0
    tokens: int = 0
    train_time_s: float = 0.0
    model_params: int = 0
    trainable_params: int = 0
    peak_memory_mb: float | None = None
    setup_time_s: float | None = None  # loading the base model and preparing the data (a later trial of a
    data_time_s: float | None = None  # group reuses both); of which preparing the data
    model_commit: str | None = None  # the hub commit of the base model's weights, where the hub names one
    spectral_ratio_mean: float | None = None
    spectral_ratio_max: float | None = None
