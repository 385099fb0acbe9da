"""A fast simulated trial with a known loss surface, for testing orchestration and analysis without training.

Held-out loss is a parabola in log α around α*(r) = C · r^K (in the standard α/r convention), so the law the
analysis should recover is known. α far above the optimum diverges, as real LoRA fine-tunes do.
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
from collections.abc import Callable

from scaling_lab import checkpoint
from scaling_lab.grid import TrialConfig
from scaling_lab.outcome import TrainOutcome
from scaling_lab.spec import FaultInjection

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


def simulate(config: TrialConfig, step_time_s: float = 0.0, faults: tuple[FaultInjection, ...] = (), attempt: int = 1,
             checkpoints: checkpoint.TrialCheckpoints | None = None, *,
             should_stop: Callable[[int, float], bool] | None = None, noise_seed: int | None = None,
             noise_sd: float = SEED_NOISE) -> TrainOutcome:
    """should_stop(step, eval_loss) prunes at an eval step (scaling_lab/early_stop.py); noise_seed and noise_sd
    draw another seed noise than the default, for benchmarks."""
    faults = tuple(f for f in faults if _hits(f, config, attempt))
    distance = math.log(config.alpha) - math.log(optimal_alpha(config.rank, config.scaling_rule))
    noise_key = config.trial_id if noise_seed is None else f"{noise_seed}:{config.trial_id}"
    noise = random.Random(noise_key).gauss(0.0, noise_sd)
    final = FLOOR_LOSS + CURVATURE * distance**2 + noise
    steps = config.training.total_steps
    tokens_per_step = config.training.batch_size * config.training.seq_len
    outcome = TrainOutcome(status="ok", model_params=100_000, trainable_params=1_000 * config.rank)
    initial = FLOOR_LOSS + 2.0
    outcome.initial_eval_loss = initial
    outcome.curve.append({"step": 0, "tokens": 0, "eval_loss": initial, "eval_accuracy": 0.0})
    resumed = checkpoints.resume() if checkpoints else None
    if resumed:
        checkpoint.restore_outcome(outcome, resumed[1])
    start_step = resumed[0] if resumed else 0
    steps_over_limit = 0  # checkpoints are saved only while this is 0, as in the training loop
    for step in range(start_step + 1, steps + 1):
        time.sleep(step_time_s)
        loss = final + (initial - final) * math.exp(-5 * step / steps)
        if distance > DIVERGE_ABOVE and step > steps // 4:
            loss = math.nan
        loss = _inject(faults, step, loss, initial)
        point = {"step": step, "tokens": step * tokens_per_step, "learning_rate": config.learning_rate}
        point["train_loss"] = loss
        outcome.steps, outcome.tokens, outcome.final_train_loss = step, step * tokens_per_step, loss
        steps_over_limit = steps_over_limit + 1 if loss > config.training.divergence_factor * initial else 0
        if not math.isfinite(loss) or steps_over_limit >= config.training.divergence_patience:
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
        if should_stop is not None and "eval_loss" in point and should_stop(step, loss):
            outcome.status = "pruned"
            break
        if checkpoints and checkpoints.due(step) and steps_over_limit == 0:
            checkpoints.save(step, checkpoint.outcome_state(outcome))
    outcome.train_time_s = steps * step_time_s
    return outcome


def _hits(fault: FaultInjection, config: TrialConfig, attempt: int) -> bool:
    return (
        (not fault.ranks or config.rank in fault.ranks)
        and (not fault.alphas or any(math.isclose(config.alpha, a) for a in fault.alphas))
        and (fault.attempts is None or attempt <= fault.attempts)
    )


def _inject(faults: tuple[FaultInjection, ...], step: int, loss: float, initial: float) -> float:
    for fault in faults:
        if step < fault.at_step:
            continue
        if fault.kind == "nan":
            loss = math.nan
        elif fault.kind == "explode":
            loss = initial * 10.0 ** (step - fault.at_step + 1)
        elif step == fault.at_step and fault.kind == "error":
            raise RuntimeError(f"injected error at step {step}")
        elif step == fault.at_step and fault.kind == "oom":
            raise MemoryError(f"injected out-of-memory at step {step}")
        elif step == fault.at_step and fault.kind == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
    return loss
