"""Every shipped study spec validates, plans, and runs scaled down (tiny model, synthetic task, a few steps)."""

from pathlib import Path

import pytest

from scaling_lab import results, spec as spec_lib
from scaling_lab.grid import expand
from scaling_lab.group import GroupSpec
from scaling_lab.study.plan import describe
from scaling_lab.trial import run_group

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "studies").glob("*.yaml"))
SCALED_DOWN = [
    "models=[{name: tiny, source: 'tiny:xs'}]",
    "data={source: 'synthetic:markov-shift', train_examples: 64, eval_examples: 8}",
    "training={steps: 2, batch_size: 4, seq_len: 16, eval_every: 1, eval_batches: 1, diagnostics_every: 1}",
]
LLAMA_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_studies_are_shipped():
    assert {"default.yaml", "smoke.yaml", "determined_code.yaml", "lora_alpha.yaml"} <= {p.name for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_spec_validates_and_plans(path):
    spec = spec_lib.load(path)
    assert spec.name == path.stem
    text = describe(spec, ROOT)
    assert f"{len(expand(spec))} trials" in text and "GPU-hours" in text
    assert "unknown" not in text, "give num_params for hub models so that the plan can estimate the cost offline"


@pytest.mark.real
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_spec_runs_scaled_down(path, tmp_path, tiny_cache):
    """Every shipped spec on a tiny Llama: LoRA on all its linear layers where the spec names another
    architecture's modules (MiniLM's query, key, value)."""
    targets = spec_lib.load(path).lora.target_modules
    on_llama = isinstance(targets, str) or set(targets) <= LLAMA_LINEAR
    spec = spec_lib.load(path, SCALED_DOWN + ([] if on_llama else ["lora.target_modules=all-linear"]))
    trials = expand(spec)
    chosen = [trials[0], trials[-1]] if len(trials) > 1 else trials
    group = GroupSpec(trials=tuple(t.to_dict() for t in chosen), results_dir=str(tmp_path), cache_dir=str(tiny_cache),
                      base_dir=str(ROOT), backend="ray_train", study=spec.name)
    run_group(group)
    frame = results.load(tmp_path)
    assert len(frame) == len(chosen)
    assert frame["status"].isin(["ok", "diverged"]).all(), frame["error"].dropna().tolist()
