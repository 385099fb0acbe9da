"""The skeleton every trial's loop shares, the real one (scaling_lab/train.py) and the simulated one
(scaling_lab/simulated.py): when to evaluate, what the outcome keeps, when a trial diverges or is pruned, when it
may checkpoint. The loops compute the losses; this decides what follows from them, in one order:

    step 0      the held-out loss before training: the curve's first point and the divergence limit
    each step   1. the training loss (the loop's own work)
                2. the held-out loss and accuracy, every eval_every steps and at the last step
                3. the point joins the curve; the best held-out metrics and the last finite training loss are kept
                4. diverged: a non-finite training loss, or divergence_patience steps in a row above
                   divergence_factor × the initial held-out loss
                5. pruned: should_stop(step, held-out loss) says so at an evaluation point
                6. a checkpoint, where one is due, only while no step is over the limit (a resumed trial starts
                   with none over it)
"""

from __future__ import annotations

import math
from collections.abc import Callable

from scaling_lab.grid import TrialConfig
from scaling_lab.outcome import TrainOutcome


class TrialSkeleton:
    def __init__(self, config: TrialConfig, outcome: TrainOutcome,
                 should_stop: Callable[[int, float], bool] | None = None):
        self.training = config.training
        self.tokens_per_step = config.training.batch_size * config.training.seq_len
        self.outcome, self.should_stop = outcome, should_stop
        self.divergence_limit = math.inf
        self.steps_over_limit = 0

    def start(self, eval_loss: float, eval_accuracy: float) -> None:
        """The held-out metrics before the first step."""
        self.outcome.initial_eval_loss = eval_loss
        self.outcome.curve.append({"step": 0, "tokens": 0, "eval_loss": eval_loss, "eval_accuracy": eval_accuracy})
        self.divergence_limit = self.training.divergence_factor * eval_loss

    def steps(self, resumed_at: int = 0) -> range:
        """The steps left to take after step `resumed_at` (0: none taken yet)."""
        return range(resumed_at + 1, self.training.total_steps + 1)

    def evaluates_at(self, step: int) -> bool:
        return step % self.training.eval_every == 0 or step == self.training.total_steps

    def record(self, step: int, learning_rate: float, train_loss: float,
               evaluation: tuple[float, float] | None = None, measured: dict | None = None) -> bool:
        """Record a step's training loss, its held-out (loss, accuracy) where `evaluates_at(step)`, and any other
        measurements of the step; True when the trial ends here (outcome.status says why)."""
        if (evaluation is not None) != self.evaluates_at(step):
            raise ValueError(f"step {step}: a held-out evaluation is due exactly when evaluates_at(step)")
        outcome = self.outcome
        outcome.steps = step
        outcome.tokens += self.tokens_per_step
        outcome.final_train_loss = train_loss
        point = {"step": step, "tokens": outcome.tokens, "learning_rate": learning_rate, "train_loss": train_loss}
        point.update(measured or {})
        if evaluation is not None:
            eval_loss, eval_accuracy = evaluation
            point.update(eval_loss=eval_loss, eval_accuracy=eval_accuracy)
            outcome.final_eval_loss, outcome.final_eval_accuracy = eval_loss, eval_accuracy
            if math.isfinite(eval_loss):
                outcome.best_eval_loss = min(eval_loss, outcome.best_eval_loss or math.inf)
                outcome.best_eval_accuracy = max(eval_accuracy, outcome.best_eval_accuracy or 0.0)
        outcome.curve.append(point)
        if math.isfinite(train_loss):
            outcome.last_finite_train_loss = train_loss
        self.steps_over_limit = self.steps_over_limit + 1 if train_loss > self.divergence_limit else 0
        if not math.isfinite(train_loss) or self.steps_over_limit >= self.training.divergence_patience:
            outcome.status = "diverged"
            return True
        if evaluation is not None and self.should_stop is not None and self.should_stop(step, evaluation[0]):
            outcome.status = "pruned"  # stopped early: scaling_lab/early_stop.py
            return True
        return False

    @property
    def may_checkpoint(self) -> bool:
        """Whether the step just recorded may be checkpointed (where one is due): none is over the limit."""
        return self.steps_over_limit == 0
