"""`study plan`: what a spec would run and roughly what it would cost, without running anything."""

from __future__ import annotations

from pathlib import Path

from scaling_lab import results
from scaling_lab.grid import expand
from scaling_lab.search.space import plan_line
from scaling_lab.spec import ModelSpec, StudySpec

# Stated throughput assumptions for the cost estimate: LoRA training costs about 4·N FLOPs per token
# (forward 2N, backward through frozen weights 2N, no weight gradients for them).
FLOPS_PER_PARAM_TOKEN = 4
GPU_PEAK_FLOPS = 989e12  # H100 SXM dense bf16
GPU_UTILIZATION = 0.35
CPU_FLOPS_PER_CORE = 2e10


def parameter_count(model: ModelSpec) -> int | None:
    """The spec's num_params if given, else base parameters from the model's config alone (meta device, no
    weights); None when the config cannot be read."""
    if model.num_params is not None:
        return model.num_params
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

        from scaling_lab.model_sources import TINY_FAMILY, model_location

        if model.source.startswith("tiny:"):
            config = LlamaConfig(**TINY_FAMILY[model.source.removeprefix("tiny:")])
        else:
            config = AutoConfig.from_pretrained(model_location(model.source))
        auto = AutoModelForSequenceClassification if model.kind == "seq_cls" else AutoModelForCausalLM
        with torch.device("meta"):
            built = auto.from_config(config)
        return sum(p.numel() for p in built.parameters())
    except (OSError, ValueError, ImportError):
        return None


def describe(spec: StudySpec, base_dir: Path) -> str:
    trials = expand(spec)
    results_dir = spec.results_dir(base_dir)
    done = results.completed_ids(results_dir)
    left = [t for t in trials if t.trial_id not in done]
    grid = spec.grid
    lines = [
        f"study {spec.name!r}: {len(trials)} trials ({len(trials) - len(left)} finished, {len(left)} to run)",
        f"  results: {results_dir}",
        f"  models: {', '.join(f'{m.name} ({m.source})' for m in spec.models)}",
        f"  ranks: {list(grid.ranks)}",
        f"  alphas: {[float(f'{a:.4g}') for a in grid.alpha_values()]}",
        f"  scaling rules: {list(grid.scaling_rules)}   learning rates: {list(grid.learning_rates)}   "
        f"seeds: {list(grid.seeds)}",
        f"  training: {spec.training.total_steps} steps × {spec.training.batch_size} × {spec.training.seq_len} tokens, "
        f"{spec.optimizer.name} {spec.optimizer.schedule}, data {spec.data.source}",
        f"  execution: {spec.execution.backend}, {spec.execution.resources.workers} worker(s) per trial, "
        f"ZeRO-{spec.deepspeed.zero_stage} {spec.deepspeed.precision}",
    ]
    if spec.search.method == "adaptive":
        lines.insert(1, plan_line(spec))
    tokens_per_trial = spec.training.total_steps * spec.training.batch_size * spec.training.seq_len
    flops = 0.0
    for model in spec.models:
        count = parameter_count(model)
        n_trials = sum(1 for t in left if t.model.name == model.name)
        if count is None:
            lines.append(f"  {model.name}: parameter count unknown offline; no cost estimate")
            continue
        model_flops = FLOPS_PER_PARAM_TOKEN * count * tokens_per_trial * n_trials
        flops += model_flops
        lines.append(f"  {model.name}: {count / 1e6:.3g}M parameters, {n_trials} trials to run, "
                     f"{model_flops:.3g} FLOPs")
    gpu_hours = flops / (GPU_PEAK_FLOPS * GPU_UTILIZATION) / 3600
    cpu_hours = flops / CPU_FLOPS_PER_CORE / 3600
    lines.append(
        f"  estimated cost: {flops:.3g} FLOPs ≈ {gpu_hours:.3g} GPU-hours at {GPU_UTILIZATION:.0%} of an H100's "
        f"{GPU_PEAK_FLOPS / 1e12:.0f} TFLOP/s bf16, or ≈ {cpu_hours:.3g} CPU core-hours at "
        f"{CPU_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s per core (small models are dominated by per-step overhead instead)"
    )
    return "\n".join(lines)
