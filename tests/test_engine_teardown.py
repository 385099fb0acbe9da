"""Tier 3: a finished trial's DeepSpeed engine is freed, though the base model it trained on lives on."""

import gc
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

from scaling_lab import models, results, spec as spec_lib, train
from scaling_lab.grid import expand
from scaling_lab.group import GroupSpec
from scaling_lab.trial import run_group

pytestmark = pytest.mark.real
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("zero_stage", "precision"), [(3, "fp32"), (2, "bf16")])
def test_a_trial_leaves_no_engine_behind_for_the_next_trial_of_its_group(zero_stage, precision, tmp_path, tiny_cache,
                                                                         monkeypatch):
    """The trials of a group share one base; under ZeRO-3, DeepSpeed ties each engine to it (scaling_lab/
    deepspeed_setup.py's destroy_engine): every finished trial's engine, PEFT model and optimizer must be freed,
    by the next trial under ZeRO-3 (collected after each trial), by a collection under the other stages (a tiny
    model's trials are not followed by one)."""
    spec = spec_lib.parse({
        "name": "teardown", "models": [{"name": "xs", "source": "tiny:xs"}],
        "grid": {"ranks": [2], "alphas": [16, 64, 256], "seeds": [0]},
        "training": {"steps": 2, "batch_size": 4, "eval_every": 2, "eval_batches": 1},
        "deepspeed": {"zero_stage": zero_stage, "precision": precision},
    })
    trials = expand(spec)
    finished, alive_at_destroy = [], []
    destroy_engine = train.destroy_engine

    def destroy_and_watch(engine):
        alive_at_destroy.append([ref() is not None for refs in finished for ref in refs])  # the trials before
        finished.append((weakref.ref(engine), weakref.ref(engine.module), weakref.ref(engine.optimizer)))
        destroy_engine(engine)

    monkeypatch.setattr(train, "destroy_engine", destroy_and_watch)
    group = GroupSpec(trials=tuple(t.to_dict() for t in trials), results_dir=str(tmp_path), cache_dir=str(tiny_cache),
                      base_dir=str(ROOT), backend="ray_train", study="teardown")
    try:
        run_group(group)
    finally:
        models.forget()  # the ZeRO-3 base and transformers' global ZeRO-3 flag with it: later tests build models
    assert list(results.load(tmp_path)["status"]) == ["ok"] * 3
    if zero_stage == 3:
        assert alive_at_destroy == [[], [False] * 3, [False] * 6]
    gc.collect()
    assert [ref() is not None for refs in finished for ref in refs] == [False] * 9


def test_a_zero3_bf16_trial_loads_no_compiler(tmp_path, tiny_cache):
    """Every ZeRO and bf16 engine imports DeepSpeed's Muon optimizer, whose kernels torch.compile wraps at import:
    torch._dynamo's compiler back-ends and what they import (about 47 MB a worker) would load for kernels no trial
    runs (scaling_lab/deepspeed_setup.py's _import_muon_without_compiling)."""
    spec = {
        "name": "no-compiler", "models": [{"name": "xs", "source": "tiny:xs"}],
        "grid": {"ranks": [2], "alphas": [16], "seeds": [0]},
        "training": {"steps": 1, "batch_size": 4, "eval_every": 1, "eval_batches": 1},
        "deepspeed": {"zero_stage": 3, "precision": "bf16"},
    }
    code = f"""
import sys
from scaling_lab import results, spec as spec_lib
from scaling_lab.grid import expand
from scaling_lab.group import GroupSpec
from scaling_lab.trial import run_group

trials = expand(spec_lib.parse({spec!r}))
run_group(GroupSpec(trials=tuple(t.to_dict() for t in trials), results_dir={str(tmp_path)!r},
                    cache_dir={str(tiny_cache)!r}, base_dir={str(ROOT)!r}, backend="ray_train", study="no-compiler"))
import deepspeed.runtime.zero.muon.original_muon as muon
compiler = [name for name in ("torch._dynamo.repro", "torch._functorch.aot_autograd", "networkx")
            if name in sys.modules]
print(list(results.load({str(tmp_path)!r})["status"]), compiler, muon.muon_update.__name__)
"""
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.split("\n")[-2] == "['ok'] [] muon_update"
