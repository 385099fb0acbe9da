"""Tier 1: the grid is a pure function of the spec; trial ids hash what changes a result."""

import dataclasses
import math

import numpy as np
import pytest

from scaling_lab import spec as spec_lib
from scaling_lab.grid import TrialConfig, expand
from scaling_lab.objective import effective_scale

SPEC = {
    "name": "g",
    "models": [{"name": "xs", "source": "tiny:xs"}, {"name": "s", "source": "tiny:s"}],
    "grid": {"ranks": [1, 4, 16], "alphas": [1, 8, 64], "seeds": [0, 1], "scaling_rules": ["standard", "rslora"]},
}


def test_grid_is_the_full_product_in_a_stable_order():
    trials = expand(spec_lib.parse(SPEC))
    assert len(trials) == 2 * 2 * 3 * 3 * 2
    assert [t.trial_id for t in trials] == [t.trial_id for t in expand(spec_lib.parse(SPEC))]
    assert len({t.trial_id for t in trials}) == len(trials)
    assert (trials[0].model.name, trials[0].rank, trials[0].alpha) == ("xs", 1, 1.0)


def test_changing_one_axis_value_changes_only_those_ids():
    before = {t.trial_id for t in expand(spec_lib.parse(SPEC))}
    changed = spec_lib.apply_overrides(SPEC, ["grid.ranks=[1, 4, 32]"])
    after = {t.trial_id for t in expand(spec_lib.parse(changed))}
    assert len(before & after) == len(before) * 2 // 3
    assert len(after - before) == len(before) // 3


def test_resources_and_description_do_not_change_ids():
    base = [t.trial_id for t in expand(spec_lib.parse(SPEC))]
    moved = spec_lib.apply_overrides(
        SPEC, ["execution.resources.cpus_per_worker=2", "description=x", "execution.trials_per_group=3"]
    )
    assert [t.trial_id for t in expand(spec_lib.parse(moved))] == base
    retrained = spec_lib.apply_overrides(SPEC, ["training.steps=81"])
    assert not set(base) & {t.trial_id for t in expand(spec_lib.parse(retrained))}


def test_effective_scale_follows_peft_conventions():
    assert effective_scale(16.0, 4, "standard") == 4.0
    assert effective_scale(16.0, 4, "rslora") == 8.0
    assert effective_scale(16.0, 4, "fixed") == 16.0
    with pytest.raises(ValueError, match="unknown scaling rule 'rs'"):
        effective_scale(16.0, 4, "rs")
    # the analysis's array form is the same rule
    assert list(effective_scale(np.array([16.0] * 3), np.array([4] * 3), ["standard", "rslora", "fixed"])) == [4, 8, 16]
    trial = expand(spec_lib.parse(SPEC))[0]
    fixed = dataclasses.replace(trial, scaling_rule="fixed", rank=8, alpha=0.5)
    assert fixed.peft_lora_alpha == 4.0 and math.isclose(fixed.peft_lora_alpha / fixed.rank, fixed.effective_scale)


def test_trial_config_round_trips():
    for trial in expand(spec_lib.parse(SPEC)):
        again = TrialConfig.from_dict(trial.to_dict())
        assert again == trial and again.trial_id == trial.trial_id


def test_settings_left_at_their_defaults_do_not_enter_the_id():
    base = expand(spec_lib.parse(SPEC))[0]
    explicit = expand(spec_lib.parse(spec_lib.apply_overrides(SPEC, ["lora.dropout=0.0", "models.0.num_params=5"])))[0]
    assert explicit.trial_id == base.trial_id
    assert "dropout" not in base.identity().get("lora", {})


def test_published_default_study_keeps_its_trial_ids():
    from pathlib import Path

    from scaling_lab import results
    from scaling_lab.search.space import SearchSpace

    root = Path(__file__).resolve().parents[1]
    grid = results.completed_ids(root / "analysis/default_grid/results")
    expected = {t.trial_id for t in expand(spec_lib.load(root / "studies/default.yaml", ["search.method=grid"]))}
    assert grid and grid <= expected
    adaptive = results.load(root / "analysis/default/results")
    assert len(SearchSpace(spec_lib.load(root / "studies/default.yaml")).rows(adaptive)) == len(adaptive) > 0


def test_a_new_hub_revision_micro_batch_or_deepspeed_key_gives_new_ids():
    hub = spec_lib.apply_overrides(SPEC, ["models.0.source=org/model"])
    base = expand(spec_lib.parse(hub))[0]
    for change in ["models.0.revision=v2", "models.0.revision=0123abcd", "training={steps: 80, micro_batch_size: 4}",
                   "deepspeed.config={zero_optimization: {reduce_bucket_size: 1000}}"]:
        changed = expand(spec_lib.parse(spec_lib.apply_overrides(hub, [change])))[0]
        assert changed.trial_id != base.trial_id, change
        assert TrialConfig.from_dict(changed.to_dict()).trial_id == changed.trial_id
    other = expand(spec_lib.parse(spec_lib.apply_overrides(hub, ["models.0.revision=v3"])))[0]
    pinned = expand(spec_lib.parse(spec_lib.apply_overrides(hub, ["models.0.revision=v2"])))[0]
    assert other.trial_id != pinned.trial_id
