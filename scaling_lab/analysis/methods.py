"""How the analysis works, in the words the report uses: each method written once, here.

report.md prints these texts (its Method section and the sections on the learning rate, α and learning rate,
training diagnostics and verification), the terminal and law.json point to them, and the README links here.
Placeholders in braces are filled in by the renderers with the fit's settings.
"""

import re

OPTIMUM = """\
**Optimum per cell.** The metric is averaged over seeds at each α of the grid. A point where any seed diverged
counts as worse than every finite one (never as missing); rows with status error or oom are left out and counted.
Real curves are not symmetric in log α (they are steep towards divergence), so the optimum is the vertex of an
asymmetric bowl fitted by least squares to the best point and its finite neighbours up to two grid points away,
when they make five points or more: the best of four shapes (two half-parabolas with separate curvatures; a
parabola below and an exponential wall above; the mirror of that; a linex, 2·(e^{{λd}} − 1 − λd)/λ²). With four
points, one on a side, any shape fits exactly, so the shape most cells of the model chose is used. With fewer
points the parabola through the best point and its two neighbours is used (it assumes a symmetric bowl, and puts
the optimum about 0.28 grid steps too low on a loss four times steeper above the optimum than below); with a
neighbour missing or diverged, the grid point. The column *estimator* says which each cell used, and the table
after it why. Where the learning rate is an axis, it is optimized the same way at each fixed α, and the metric
plot shows each model at its best learning rate."""

UNCERTAINTY = """\
**Uncertainty of an optimum.** {n_bootstrap} bootstrap resamples of the seeds within each cell (spread corrected
by √(S/(S−1)) for S seeds), each refitted by the same estimator, combined with the grid's resolution: grid
step/√12 for a parabola or a grid point (whose error on an asymmetric bowl reaches a third of a step), a third of
that for a bowl fit (shapes outside its four leave errors of up to about 0.2 steps)."""

# follows UNCERTAINTY in a report whose study has such points (none in a grid study)
SEED_NOISE = """\
**Points with fewer seeds.** A point measured by fewer seeds than the rest of its cell (an adaptive search's
`other_seeds: best_alpha`), which resampling its own seeds cannot move, is drawn in each resample about its mean
with the seed-to-seed standard deviation pooled over the model's points measured by two seeds or more, divided by
√(its seeds)."""

ASYMMETRIC = """\
**asymmetric** (flag): the bowl fit moved the optimum away from the three-point parabola's by more than its own
95% interval. *Suggested α*: for these cells, and for cells where no bowl could be fitted, the two values half a
grid step either side of the optimum. Running them (`study verify`, or the adaptive search) pins the bowl's shape
where it decides the optimum."""

FLAGS = """\
**Flags.** edge_low / edge_high: the best point is the smallest / largest value tried; near_edge_*: over 10% of
resamples put it there; too_few_points: fewer than 3 finite points; all_diverged; not_refined; asymmetric;
flat_to_edge: points within {tolerance:.2%} of the best reach the edge of the range; some_diverged.
{edge_policy}"""

EDGE_OPTIMA_LEFT_OUT = "Edge optima are only bounds, so they are left out of the law fit (--keep-edge includes them)."
EDGE_OPTIMA_KEPT = "Edge optima are included in the law fit (--keep-edge): they are only bounds."

LAW = """\
**Law.** Weighted least squares of log optimum on log r (and log N for the joint law), weights 1/σ². Each 95%
interval is the wider, on each side, of two: the bootstrap percentile interval (the law refitted on every
resample of the optima) and a Student t interval from the residuals, which counts scatter the seeds do not show.
R² is weighted and in log space. It depends on the convention (a law with k near 0 has R² near 0 however well it
fits), so judge the fit by χ²/ν and the residual plot."""

CURVATURE = """\
**Not a power law?** A quadratic term in log r is fitted too; when its interval excludes zero the law is marked
not supported. So is a law from fewer than 3 ranks, or from ranks spanning less than 4×."""

RULES = """\
**Rules.** For each rule (k fixed), its best c is fitted on all ranks but one and scored on the left-out rank:
the metric at the rule's α (linear in log α between measured points) minus the best measured metric of that
cell, averaged over ranks. The fitted law is scored the same way, as a baseline."""

METHOD_PARTS = (OPTIMUM, UNCERTAINTY, ASYMMETRIC, FLAGS, LAW, CURVATURE, RULES)

ESTIMATOR_TABLE = """\
**Estimator per cell** (see Method: optimum per cell, asymmetric). *Suggested {symbol}*: values to add."""

LEARNING_RATE = """\
lr* against rank at the setting as run: one law per scaling rule and α value the grid set (the α column is that
α, not the convention above), so that a study under α/r, α/√r or a fixed scale each gets its lr*(r) law.
μA (Chen, Villar, Hayou, arXiv 2602.06204): with A random and B zero, a multiplier r^-γ on B·A gives
lr* ∝ r^-(1-γ)/2; a fixed α under α/r, α/√r and a fixed scale is γ = 1, 1/2, 0, so lr* ∝ r^0, r^-1/4, r^-1/2."""

EQUIVALENCE_HYPOTHESIS = """\
**Hypothesis.** At a fixed model and rank the metric is a function of α·lr alone: doubling α and halving the
learning rate changes nothing. Why it might be: with B initialised to zero and A independent of α, the multiplier
s on B·A scales B's gradients by s, which Adam's normalisation cancels, so training B at learning rate lr moves s·B
as training it at s·lr would; at a fixed rank s ∝ α. A (which moves at lr itself), Adam's ε, weight decay and
gradient clipping see α and lr apart: they can give α an effect of its own, as LoRA-α claims."""

EQUIVALENCE_TEST = """\
**Test.** In u = log₂(α·lr) and v = log₂ α, the ridge model g(u) (a cubic spline in u) is compared with the full
model g(u) + a·v + b·u·v + c·v², both fitted by least squares to the trials of the finite grid points whose α·lr
is within {window}× the best measured one's. *F-test*: is any α effect detectable (3 degrees of freedom)?
*α slope*: the metric's change per doubling of α at fixed α·lr, at the fitted optimum's α·lr. *Ridge spread*:
along the line α·lr = (α·lr)* through the fitted optimum, over the α range the finite grid covers on it, the
largest minus the smallest value of the α terms: what choosing α costs once α·lr is right. Intervals (95%): on
each side the wider of a bootstrap over seeds and the fit's own covariance (which counts lack of fit)."""

EQUIVALENCE_VERDICT = """\
*Verdict*, an equivalence test on the spread against the near-optimal tolerance ({tolerance:.2%} of the best
metric): **ridge** when the spread's upper bound is below it, **α effect** when its lower bound is above it,
otherwise **undecided**. A small F-test p with a ridge verdict is an α effect too small to matter."""

DIAGNOSTICS = """\
Definitions (ours, from `scaling_lab/diagnostics.py`; the LoRA-α paper's exact ones are not public), measured at
step 1 and every `training.diagnostics_every` steps on a fixed probe batch:
- **signal** S = −⟨∇L_probe, Δθ⟩: the first-order predicted decrease of the probe loss from one step's update Δθ;
- **drift** D = (L_probe(θ + Δθ) − L_probe(θ)) + S: how much the actual change falls short of that prediction
  (½ Δθᵀ H Δθ on a quadratic loss); **drift ratio** D / S: 0 when the step is as good as predicted, 1 when it
  gains nothing on the probe batch, above 1 when it makes the probe loss worse;
- **update norm** ‖s·B·A‖_F summed in squares over the adapted layers: how far the adapters have moved the model;
- **spectral ratio** σ₁(s·B·A) / σ₁(W) per adapted layer at the end of the trial, mean over layers: how large the
  update is against the frozen weight's top direction (below 1: spectrally suppressed).

Each trial's value is taken over its diagnostic steps after step 1 (at step 1 B is still zero): the mean signal
and update norm, and the drift ratio as summed drift over summed signal (a mean of per-step ratios explodes where a
step's signal is near zero); dashed lines show the first logged step after step 1 instead. Then the mean over
seeds; diverged trials count up to their last finite step. How to read it: LoRA-α's claim is that raising α
raises the signal without raising the drift ratio, up to the α where the loss jumps; a drift ratio that climbs
towards 1 as α grows marks where larger steps stop paying."""

VERIFICATION = """\
Each law is fitted without the verified rank and predicts α* there. *held out*: a finished rank of the study,
so no new trials; *new rank*: a bracket of α values around the prediction was trained at that rank (rows of the
study, in its results directory). Verdict: **consistent** when the predicted and measured 95% intervals overlap,
**missed** when they do not, **inconclusive** when the measured optimum is at the edge of the α values tried.
Regret: the metric at the predicted α (linear in log α between measured points) minus the best measured, in the
metric's units, positive when worse; the same for each rule of thumb with its c fitted on the other ranks
(≥: the rule's α lies outside the α values measured there, so the edge value stands, a lower bound)."""


def plain(text: str) -> str:
    """A method text without its markdown emphasis (**bold**, *italic*), for the terminal and law.json; the * of
    α* or (α·lr)* stays."""
    return _EMPHASIS.sub(r"\2", text)


_EMPHASIS = re.compile(r"(?<![^\s(])(\*\*?)([^\s*](?:[^*]*?[^\s*])?)\1(?![\w*])")
