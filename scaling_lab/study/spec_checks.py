"""Checks of a loaded spec that `run`, `plan` and `submit` make before anything runs."""

from __future__ import annotations

from scaling_lab import spec as spec_lib


def check_deepspeed_config(spec: spec_lib.StudySpec) -> None:
    """DeepSpeed validates the config of every shape of trial before anything runs (only where deepspeed.config
    adds keys of its own: this imports DeepSpeed)."""
    if not spec.deepspeed.config:
        return
    from scaling_lab.deepspeed_setup import check_deepspeed_config as check
    from scaling_lab.grid import expand

    shapes = {trial.resources.workers: trial for trial in expand(spec)}
    for workers, trial in shapes.items():
        try:
            check(trial, workers)
        except ValueError as exc:
            raise spec_lib.SpecError(str(exc)) from None
