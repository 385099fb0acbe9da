"""The DeepSpeed side of a trial: importing DeepSpeed (and building its CPU op once per environment), the config
a trial's engine runs with, and DeepSpeed's own validation of it before any compute."""

from __future__ import annotations

import functools
import os
import shutil
import sys

from scaling_lab.grid import TrialConfig


def import_deepspeed():
    """DeepSpeed, set up so that the op it compiles on first use (its CPU comm op, about a minute) is built once
    per Python environment: into the environment, not torch's ~/.cache/torch_extensions that all environments
    share, and by the environment's own ninja (a DeepSpeed dependency), not whichever ninja comes first on PATH:
    two ninja versions rebuild each other's output."""
    if os.access(sys.prefix, os.W_OK):
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    scripts = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if shutil.which("ninja", path=scripts) and not path.startswith(scripts + os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + path
    import deepspeed  # imported late: importing it where no accelerator is set up has crashed some versions

    _gather_in_place_on_gloo()
    _import_muon_without_compiling()
    return deepspeed


def _import_muon_without_compiling() -> None:
    """Every ZeRO and bf16 engine imports DeepSpeed's Muon optimizer (to ask whether the optimizer is Muon), and that
    module wraps its kernels in torch.compile as it is imported, which loads the compiler's back-ends (AOT
    autograd, networkx, much of torch._inductor): about 47 MB in every worker, for kernels only Muon runs. Imported
    here with each kernel compiled at its first call instead."""
    if "deepspeed.runtime.zero.muon.original_muon" in sys.modules:
        return
    from deepspeed.runtime import compiler

    compile_now = compiler.compile

    def compile_at_first_call():
        def decorate(function):
            compiled = None

            @functools.wraps(function)
            def call(*args, **kwargs):
                nonlocal compiled
                compiled = compiled or compile_now()(function)
                return compiled(*args, **kwargs)

            return call

        return decorate

    compiler.compile = compile_at_first_call
    try:
        import deepspeed.runtime.zero.muon.original_muon  # noqa: F401
    finally:
        compiler.compile = compile_now


class _Works:
    """The handles of several asynchronous collectives, awaited as one (what DeepSpeed awaits of an all-gather)."""

    def __init__(self, works: list):
        self.works = works

    def wait(self) -> bool:
        for work in self.works:
            work.wait()
        return True

    def is_completed(self) -> bool:
        return all(work.is_completed() for work in self.works)


def _gather_in_place_on_gloo() -> None:
    """ZeRO-3 gathers each weight with all_gather_into_tensor; on gloo (CPU workers) that stages the whole gathered
    weight in a second buffer, so every gather of a large weight (a 32k-vocabulary embedding or LM head) cost twice
    its size at the peak. There, each worker broadcasts its partition straight into its place in the output
    instead (gloo broadcasts in place). NCCL and other backends gather as before."""
    import torch.distributed as dist
    from deepspeed.comm.torch import TorchBackend

    gather = TorchBackend.all_gather_into_tensor
    if getattr(gather, "in_place_on_gloo", False):
        return

    def all_gather_into_tensor(self, output_tensor, input_tensor, group=None, async_op=False):
        if dist.get_backend(group) != "gloo" or output_tensor.device.type != "cpu":
            return gather(self, output_tensor, input_tensor, group=group, async_op=async_op)
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        chunks = output_tensor.view(-1).chunk(size)
        if chunks[rank].data_ptr() != input_tensor.data_ptr():
            chunks[rank].copy_(input_tensor.view(-1))
        works = [dist.broadcast(chunk, src=dist.get_global_rank(group, source) if group is not None else source,
                                group=group, async_op=True) for source, chunk in enumerate(chunks)]
        handle = _Works(works)
        if async_op:
            return handle
        handle.wait()
        return None

    all_gather_into_tensor.in_place_on_gloo = True
    TorchBackend.all_gather_into_tensor = all_gather_into_tensor


def build_deepspeed_ops() -> None:
    """Build now what the first trial would otherwise build (`make install` runs this)."""
    import_deepspeed()
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


def clips_outside_deepspeed(config: TrialConfig) -> bool:
    """At ZeRO-0 in fp32, DeepSpeed clips parameter by parameter in Python (about 4% of a tiny trial);
    torch's clip_grad_norm_ does the same to the full gradients, which DeepSpeed's backward has averaged."""
    return config.deepspeed.zero_stage == 0 and config.deepspeed.precision == "fp32"


def micro_batch_size(config: TrialConfig, world_size: int) -> int:
    """Sequences per forward pass on one worker."""
    return config.training.micro_batch_size or config.training.batch_size // world_size


def deepspeed_config(config: TrialConfig, world_size: int, model_params: int | None = None) -> dict:
    """The trial's DeepSpeed config; with `model_params` (the base's size), ZeRO-3's buffers sized to the model."""
    batch, stage = config.training.batch_size, config.deepspeed.zero_stage
    micro = micro_batch_size(config, world_size)
    zero: dict = {"stage": stage}
    if config.deepspeed.offload and stage >= 2:
        zero["offload_optimizer"] = {"device": "cpu"}
    if config.deepspeed.offload and stage == 3:
        zero["offload_param"] = {"device": "cpu"}
    if stage == 3 and model_params:
        # DeepSpeed's defaults (1e9 live parameters, 5e8-element buckets) keep a model of a few billion parameters
        # whole on every worker between its forward and backward pass, and add a 2 GB gradient bucket: at most an
        # eighth of the model is gathered at once here (sized by the model, as transformers' "auto" values are).
        # A weight is released as soon as its module is done (no reuse distance): otherwise the chunks of the LM
        # head (scaling_lab/vocab_chunks.py), used again a few chunks later in the backward pass, all stay gathered.
        # The gradient bucket holds only the adapter's gradients: 5e6 elements (20 MB in fp32) at most.
        # Prefetching is off: with fewer live parameters it left weights in flight (an assertion in DeepSpeed 0.19).
        live = max(model_params // 8, 10**6)
        bucket = min(max(model_params // 16, 10**6), 5 * 10**6)
        zero.update(stage3_max_live_parameters=live, stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=0,
                    reduce_bucket_size=bucket)
    ds = {
        "train_batch_size": batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": batch // (micro * world_size),
        "zero_optimization": zero,
        "bf16": {"enabled": config.deepspeed.precision == "bf16"},
        "fp16": {"enabled": config.deepspeed.precision == "fp16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # DeepSpeed clips at 1.0 where this is left out
        "gradient_clipping": 0.0 if clips_outside_deepspeed(config) else config.optimizer.grad_clip or 0.0,
    }
    if "offload_optimizer" in zero:
        # Keep the trial's own torch optimizer, so that offloading does not change the update; it steps only
        # the small LoRA tensors, where DeepSpeed's CPU Adam would save little.
        ds["zero_force_ds_cpu_optimizer"] = False
    return merged(ds, config.deepspeed.config)


def merged(base: dict, extra: dict) -> dict:
    """`base` with `extra`'s keys added, mappings merged key by key (the spec has refused keys it sets itself)."""
    result = dict(base)
    for key, value in extra.items():
        both_mappings = isinstance(value, dict) and isinstance(result.get(key), dict)
        result[key] = merged(result[key], value) if both_mappings else value
    return result


def check_deepspeed_config(config: TrialConfig, world_size: int) -> None:
    """DeepSpeed's own validation of the config a trial would use (with deepspeed.config merged in), before any
    compute; raises ValueError naming deepspeed.config."""
    if not config.deepspeed.config:
        return
    import_deepspeed()
    from deepspeed.runtime.config import DeepSpeedConfig

    ds_config = deepspeed_config(config, world_size)
    ds_config["train_batch_size"] //= world_size  # checked here in a world of one process
    try:
        DeepSpeedConfig(ds_config)
    except Exception as exc:  # DeepSpeed raises pydantic errors, AssertionError, ValueError, KeyError ...
        reason = " ".join(str(exc).split())[:300]
        raise ValueError(f"deepspeed.config: DeepSpeed rejects it: {type(exc).__name__}: {reason}") from None


def undo_initial_optimizer_step(engine) -> None:
    """Undo the zero-gradient step that DeepSpeed's optimizer for ZeRO-0 in bf16 or fp16 (FP16_UnfusedOptimizer around
    the trial's torch optimizer) takes as it is built, to create the optimizer's state. AdamW counts that step, so
    every update used the next step's bias correction (the first 0.74 × the update of an unwrapped AdamW, then 0.86,
    0.91, ... towards 1), and decoupled weight decay shrank the fp32 master weights once; DeepSpeed 0.19's ZeRO-1 to 3
    take no such step. Here the master weights are copied again from the model's and the optimizer's state emptied."""
    wrapper = engine.optimizer
    if type(wrapper).__name__ != "FP16_UnfusedOptimizer":
        return
    for masters, weights in zip(wrapper.fp32_groups, wrapper.fp16_groups, strict=True):
        for master, weight in zip(masters, weights, strict=True):
            master.data.copy_(weight.data)
    wrapper.optimizer.state.clear()


def destroy_engine(engine) -> None:
    """Free a trial's engine: `engine.destroy()`, and what DeepSpeed 0.19 leaves behind under ZeRO-3.

    The trials of a group share one base model (models.load_base); everything below hangs off it or off a global,
    and each keeps the finished trial's engine, PEFT model and optimizer (with its fp32 partitions) alive:
    - `parameter_offload.FWD_MODULE_STACK`, a global list: the engine's top module (the PEFT model) is pushed on it
      at set-up and never popped;
    - the lru_cache of `PartitionedParameterCoordinator.__params_to_release` (one for the class, not one per
      engine): its keys hold the engine's parameter coordinator and the modules it released, the PEFT model among them;
    - on every module of the base, `pre_bwd_fn` / `post_bwd_fn` (autograd functions whose closures hold the engine's
      ZeRO-3 offload manager) and `ds_inflight_param_registry`: a later engine finds them set and reuses them
      instead of making its own, so its backward pass would run through the finished engine's manager;
    - on every parameter, `_z3_optimizer`, the engine's ZeRO-3 optimizer.
    The engine is then left in reference cycles that only the garbage collector frees (train.fine_tune runs it).
    """
    engine.destroy()
    module = engine.module
    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    if offload is not None:
        offload.FWD_MODULE_STACK[:] = [entry for entry in offload.FWD_MODULE_STACK if entry is not module]
    coordinator_module = sys.modules.get("deepspeed.runtime.zero.partitioned_param_coordinator")
    if coordinator_module is not None:
        instrumented = vars(coordinator_module.PartitionedParameterCoordinator).get(
            "_PartitionedParameterCoordinator__params_to_release")
        # instrument_w_nvtx wraps the cached function without functools.wraps: it is found in the closure.
        # Clearing it costs any other engine in the process only the recomputation.
        for cell in getattr(instrumented, "__closure__", None) or ():
            if hasattr(cell.cell_contents, "cache_clear"):
                cell.cell_contents.cache_clear()
    for submodule in module.modules():
        for name in ("pre_bwd_fn", "post_bwd_fn", "ds_inflight_param_registry"):
            submodule.__dict__.pop(name, None)
    for parameter in module.parameters():
        parameter.__dict__.pop("_z3_optimizer", None)
