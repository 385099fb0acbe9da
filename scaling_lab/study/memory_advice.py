"""What to change when trials run out of memory, worked out from the study's own settings (for `status`)."""

from __future__ import annotations

from scaling_lab.spec import StudySpec


def oom_advice(spec: StudySpec, models: set[str]) -> list[str]:
    """Changes that lower a worker's memory, for the named models' trials, as --override arguments with the
    reason for each, the most effective first."""
    lines = []
    for model in spec.models:
        if model.name not in models:
            continue
        resources = model.resources or spec.execution.resources
        where = f"models.{spec.models.index(model)}.resources" if model.resources else "execution.resources"
        micro = spec.training.micro_batch_size or spec.training.batch_size // resources.workers
        prefix = f"{model.name}: " if len(spec.models) > 1 else ""
        if spec.deepspeed.zero_stage < 3:
            lines.append(f"{prefix}--override deepspeed.zero_stage=3   each of the {resources.workers} worker(s) "
                         f"then holds 1/{resources.workers} of the weights instead of all of them (more workers, "
                         "smaller shares)")
        if resources.gpus_per_worker > 0 and not spec.deepspeed.offload:
            lines.append(f"{prefix}--override deepspeed.offload=true   ZeRO-2/3 keep optimizer state (and at ZeRO-3 "
                         "the weights) in CPU memory instead of GPU memory")
        if micro > 1:
            lines.append(f"{prefix}--override training.micro_batch_size={micro // 2}   half the activations per "
                         "forward pass; the batch stays the same, accumulated over more passes")
        if not spec.deepspeed.gradient_checkpointing:
            lines.append(f"{prefix}--override deepspeed.gradient_checkpointing=true   activations recomputed in the "
                         "backward pass instead of kept")
        lines.append(f"{prefix}--override {where}.cpus_per_worker={resources.cpus_per_worker * 2:g}   fewer workers "
                     "share a node's memory (or execution.max_concurrent=1: fewer groups at once)")
    return lines


def advice_text(spec: StudySpec, models: set[str]) -> str:
    lines = oom_advice(spec, models)
    return "\n".join(
        ["  out of memory; to fit, change one of these (run then re-runs the trials whose id changes; for the others, "
         "add --retry-failed):"] + [f"    {line}" for line in lines]
    )
