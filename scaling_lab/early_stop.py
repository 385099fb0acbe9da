"""Early stopping of hopeless trials, as a pure rule that cannot move a cell's optimum.

A running trial is pruned at an eval step when both hold:
- it is far behind: its held-out loss exceeds, by more than `margin` (relative), the lowest held-out loss at the
  same step among finished trials of the same cell and seed (same seed: same data order and LoRA initialization,
  so the gap is the effect of α alone);
- the cell's optimum is provably elsewhere: among the α values of the cell whose every seed has finished (without
  being pruned), one lying between this trial's α and some further α has a worse seed-mean final metric than it.

Why the second condition, and what it proves. The analysis takes the best α of the seed-mean metric and refines it
by a bowl fitted to it and up to POINTS_PER_SIDE (two) finished neighbours on each side (scaling_lab/analysis/
bowl.py), so a pruned trial (worse than any finite point, like a diverged one) would move the optimum if it were
the best α or within that reach of it. If the seed-mean final metric is unimodal in α (it falls, then rises), a
point m with F(m) > F(j) for some j further out puts the best α strictly beyond m; then m, and every finished point
between the pruned α and m, lie between the pruned α and the best α. With POINTS_PER_SIDE such points the pruned
α is outside the fit's reach however many α values are added later, and the optimum is the same with or without
pruning. The first condition only decides when pruning is worth it, and keeps trials that look good despite the
argument (a sign that the metric is not unimodal).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from scaling_lab.analysis.bowl import POINTS_PER_SIDE
from scaling_lab.spec_base import SpecError


@dataclass(frozen=True)
class EarlyStopSettings:
    """`training.early_stop` in the spec."""

    enabled: bool = False
    margin: float = 0.05  # prune when the held-out loss is this fraction above the best at the same step ...
    min_step: int = 20  # ... at an eval step no earlier than this

    def check(self, path: str) -> None:
        if not (self.margin >= 0 and math.isfinite(self.margin)):
            raise SpecError(f"{path}.margin: expected a number >= 0, got {self.margin!r}")
        if self.min_step < 1:
            raise SpecError(f"{path}.min_step: expected an integer >= 1, got {self.min_step!r}")


def should_prune(
    alpha: float,
    step: int,
    eval_loss: float,
    best_loss_at_step: float | None,
    finished: Mapping[float, float],
    settings: EarlyStopSettings,
) -> bool:
    """Whether the trial at `alpha` should stop at eval `step` with held-out loss `eval_loss`.

    best_loss_at_step: the lowest held-out loss at `step` among finished trials of the same cell and seed (None
    when there are none). finished: α → seed-mean final metric to minimize (+inf when a seed diverged), for the
    α values of the cell whose every seed finished without being pruned."""
    if step < settings.min_step or best_loss_at_step is None or not math.isfinite(best_loss_at_step):
        return False
    if not eval_loss > best_loss_at_step + settings.margin * abs(best_loss_at_step):
        return False
    return optimum_out_of_reach(alpha, finished)


def optimum_out_of_reach(alpha: float, finished: Mapping[float, float]) -> bool:
    """Whether, if the metric is unimodal in α, POINTS_PER_SIDE finished α lie between `alpha` and the cell's best
    α: on one side of `alpha`, a point worse than a point further out, with the finished points nearer `alpha`
    making POINTS_PER_SIDE in all."""
    for side in (1, -1):
        outward = [finished[a] for a in sorted(finished, key=lambda a: a * side) if (a - alpha) * side > 0]
        best_further_out = math.inf
        for index in range(len(outward) - 1, -1, -1):
            if outward[index] > best_further_out and index + 1 >= POINTS_PER_SIDE:
                return True
            best_further_out = min(best_further_out, outward[index])
    return False
