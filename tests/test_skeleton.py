"""The trial skeleton both loops share (tier 1): evaluation points, best metrics, divergence, pruning, checkpoints,
driven with planted losses, and the simulated trial through it."""

import math

import pytest

from scaling_lab import checkpoint, results, spec as spec_lib
from scaling_lab.grid import expand
from scaling_lab.outcome import TrainOutcome
from scaling_lab.simulated import simulate
from scaling_lab.skeleton import TrialSkeleton

INITIAL = 2.0  # held-out loss before training; divergence_factor 1.5 puts the limit at 3.0


def config(**training):
    spec = spec_lib.parse({
        "name": "skeleton", "models": [{"name": "xs", "source": "tiny:xs"}],
        "grid": {"ranks": [4], "alphas": [64], "seeds": [0]},
        "training": {"steps": 6, "batch_size": 2, "seq_len": 4, "eval_every": 2, "divergence_factor": 1.5,
                     "divergence_patience": 2, **training},
    })
    return expand(spec)[0]


def run(losses, eval_losses=None, should_stop=None, **training):
    """Drive the skeleton as a loop does, with planted training and held-out losses (held out = training loss
    unless given); returns the outcome and, per step taken, whether it may be checkpointed."""
    outcome = TrainOutcome(status="ok")
    trial = TrialSkeleton(config(**training), outcome, should_stop)
    trial.start(INITIAL, 0.1)
    checkpointable = []
    for step in trial.steps():
        loss = losses[step - 1]
        held_out = (eval_losses or {}).get(step, loss)
        evaluation = (held_out, 1 / held_out) if trial.evaluates_at(step) else None
        ended = trial.record(step, 0.01, loss, evaluation, {"probe_loss": loss})
        checkpointable.append(trial.may_checkpoint)
        if ended:
            break
    return outcome, checkpointable


def test_evaluation_points_best_metrics_and_tokens():
    outcome, checkpointable = run([1.9, 1.5, 1.6, 1.2, 1.1, 1.3], eval_losses={4: 1.4}, steps=5)
    assert outcome.status == "ok" and outcome.steps == 5 and outcome.tokens == 5 * 2 * 4
    assert [p["step"] for p in outcome.curve if "eval_loss" in p] == [0, 2, 4, 5]  # every eval_every, and the last
    assert outcome.curve[0] == {"step": 0, "tokens": 0, "eval_loss": INITIAL, "eval_accuracy": 0.1}
    assert outcome.curve[2] == {"step": 2, "tokens": 16, "learning_rate": 0.01, "train_loss": 1.5, "probe_loss": 1.5,
                                "eval_loss": 1.5, "eval_accuracy": 1 / 1.5}
    assert (outcome.best_eval_loss, outcome.final_eval_loss) == (1.1, 1.1)
    assert outcome.best_eval_accuracy == pytest.approx(1 / 1.1) and outcome.final_train_loss == 1.1
    assert outcome.last_finite_train_loss == 1.1 and all(checkpointable)


def test_a_step_over_the_limit_at_an_evaluation_point_is_evaluated_then_ends_the_trial():
    outcome, _ = run([1.9, 3.5, 3.6, 1.0, 1.0, 1.0])
    assert outcome.status == "diverged" and outcome.steps == 3  # two steps in a row above 1.5 × 2.0
    outcome, checkpointable = run([1.9, 1.5, 3.5, 3.6, 1.0, 1.0])
    assert outcome.status == "diverged" and outcome.steps == 4 and checkpointable == [True, True, False, False]
    assert outcome.curve[-1]["eval_loss"] == 3.6 and outcome.final_eval_loss == 3.6  # evaluated before diverging
    assert outcome.best_eval_loss == 1.5 and outcome.last_finite_train_loss == 3.6


def test_a_non_finite_loss_diverges_at_once_and_is_never_the_best():
    outcome, _ = run([1.9, math.nan, 1.0, 1.0, 1.0, 1.0])
    assert outcome.status == "diverged" and outcome.steps == 2 and math.isnan(outcome.final_eval_loss)
    assert outcome.best_eval_loss is None and outcome.last_finite_train_loss == 1.9


def test_a_step_back_under_the_limit_starts_the_count_again():
    outcome, checkpointable = run([3.5, 1.0, 3.5, 1.0, 3.5, 1.0])
    assert outcome.status == "ok" and checkpointable == [False, True] * 3


def test_pruning_is_asked_at_evaluation_points_only_with_the_held_out_loss():
    asked = []

    def prune_at_step_4(step, eval_loss):
        asked.append((step, eval_loss))
        return step == 4

    outcome, _ = run([1.9, 1.5, 1.6, 1.2, 1.1, 1.0], eval_losses={4: 1.4}, should_stop=prune_at_step_4)
    assert outcome.status == "pruned" and outcome.steps == 4 and asked == [(2, 1.5), (4, 1.4)]


def test_divergence_comes_before_pruning():
    outcome, _ = run([1.9, math.nan, 1.0, 1.0, 1.0, 1.0], should_stop=lambda step, loss: True)
    assert outcome.status == "diverged"


def test_an_evaluation_is_recorded_exactly_where_it_is_due():
    trial = TrialSkeleton(config(), TrainOutcome(status="ok"))
    trial.start(INITIAL, 0.1)
    with pytest.raises(ValueError, match="step 1: a held-out evaluation is due exactly when"):
        trial.record(1, 0.01, 1.9, (1.9, 0.5))
    with pytest.raises(ValueError, match="step 2: "):
        trial.record(2, 0.01, 1.9)
    assert list(trial.steps(4)) == [5, 6]


def test_a_simulated_trial_that_diverges_at_an_evaluation_point_is_evaluated_there():
    """As the real loop does: the diverging step is evaluated, and its finite loss is the last finite one."""
    exploding = spec_lib.build(spec_lib.FaultInjection, {"kind": "explode", "at_step": 4})
    outcome = simulate(config(steps=20, eval_every=5, divergence_factor=1.3, divergence_patience=3),
                       faults=(exploding,))
    assert outcome.status == "diverged" and outcome.steps == 6
    assert outcome.last_finite_train_loss == outcome.final_train_loss == 3000.0
    outcome = simulate(config(steps=20, eval_every=3, divergence_factor=1.3, divergence_patience=3),
                       faults=(exploding,))
    assert outcome.steps == 6 and outcome.curve[-1]["eval_loss"] == outcome.final_eval_loss == 3000.0
    assert outcome.best_eval_loss == min(p["eval_loss"] for p in outcome.curve[:-1] if "eval_loss" in p)


def test_a_simulated_trial_checkpoints_only_while_no_step_is_over_the_limit(tmp_path):
    trial_config = config(steps=20, eval_every=5, divergence_factor=1.3, divergence_patience=3)
    checkpoints = checkpoint.TrialCheckpoints(results.Store(tmp_path), trial_config.trial_id, every=2)
    exploding = spec_lib.build(spec_lib.FaultInjection, {"kind": "explode", "at_step": 4})
    assert simulate(trial_config, faults=(exploding,), checkpoints=checkpoints).status == "diverged"
    assert checkpoints.latest()[0] == 2  # step 4 was over the limit, and step 6 diverged
