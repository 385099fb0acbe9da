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
from scaling_lab.skeleton import TrialSkeleton
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
    outcome = TrainOutcome(status="ok", model_params=100_000, trainable_params=1_000 * config.rank)
    trial = TrialSkeleton(config, outcome, should_stop)
    initial = FLOOR_LOSS + 2.0
    trial.start(initial, 0.0)
    steps = config.training.total_steps
    start_step = checkpoint.resume_outcome(checkpoints, outcome) if checkpoints else 0
    for step in trial.steps(start_step):
        time.sleep(step_time_s)
        loss = final + (initial - final) * math.exp(-5 * step / steps)
        if distance > DIVERGE_ABOVE and step > steps // 4:
            loss = math.nan
        loss = _inject(faults, step, loss, initial)
        evaluation = (loss, math.exp(-loss)) if trial.evaluates_at(step) else None  # held out = training loss
        if trial.record(step, config.learning_rate, loss, evaluation):
            break
        if checkpoints and trial.may_checkpoint:
            checkpoint.save_outcome(checkpoints, step, outcome)
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
