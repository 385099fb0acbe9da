"""A fast simulated trial with a known loss surface, for testing orchestration and analysis without training.

Held-out loss is a parabola in log α around α*(r) = C · r^K (in the standard α/r convention), so the law the
analysis should recover is known. α far above the optimum diverges, as real LoRA fine-tunes do.
"""

from __future__ import annotations

import math
import random
import time

from scaling_lab.grid import TrialConfig
from scaling_lab.outcome import TrainOutcome

C = 16.0
K = 0.5
CURVATURE = 0.05
FLOOR_LOSS = 1.0
DIVERGE_ABOVE = 4.0  # in units of log α − log α*: beyond this the trial diverges
SEED_NOISE = 0.002


def optimal_alpha(rank: int, scaling_rule: str = "standard") -> float:
    """α* in the trial's own convention, so that the effective scale at the optimum is the same for all rules."""
    standard_alpha = C * rank**K
    return {"standard": standard_alpha, "rslora": standard_alpha / math.sqrt(rank), "fixed": standard_alpha / rank}[
        scaling_rule
    ]


def simulate(config: TrialConfig, step_time_s: float = 0.0) -> TrainOutcome:
    distance = math.log(config.alpha) - math.log(optimal_alpha(config.rank, config.scaling_rule))
    noise = random.Random(f"{config.trial_id}").gauss(0.0, SEED_NOISE)
    final = FLOOR_LOSS + CURVATURE * distance**2 + noise
    steps = config.training.total_steps
    tokens_per_step = config.training.batch_size * config.training.seq_len
    outcome = TrainOutcome(status="ok", model_params=100_000, trainable_params=1_000 * config.rank)
    initial = FLOOR_LOSS + 2.0
    outcome.initial_eval_loss = initial
    outcome.curve.append({"step": 0, "tokens": 0, "eval_loss": initial, "eval_accuracy": 0.0})
    for step in range(1, steps + 1):
        time.sleep(step_time_s)
        loss = final + (initial - final) * math.exp(-5 * step / steps)
        if distance > DIVERGE_ABOVE and step > steps // 4:
            loss = math.nan
        point = {"step": step, "tokens": step * tokens_per_step, "learning_rate": config.learning_rate}
        point["train_loss"] = loss
        outcome.steps, outcome.tokens, outcome.final_train_loss = step, step * tokens_per_step, loss
        if not math.isfinite(loss):
            outcome.status = "diverged"
            outcome.curve.append(point)
            break
        outcome.last_finite_train_loss = loss
        if step % config.training.eval_every == 0 or step == steps:
            accuracy = math.exp(-loss)
            point.update(eval_loss=loss, eval_accuracy=accuracy)
            outcome.final_eval_loss, outcome.final_eval_accuracy = loss, accuracy
            outcome.best_eval_loss = min(loss, outcome.best_eval_loss or math.inf)
            outcome.best_eval_accuracy = max(accuracy, outcome.best_eval_accuracy or 0.0)
        outcome.curve.append(point)
    outcome.train_time_s = steps * step_time_s
    return outcome
