"""The training loop of one trial: a PEFT LoRA fine-tune driven by a DeepSpeed engine, on one or many workers.

Runs inside a Ray Train worker (torch.distributed already initialized) or in a plain process (world of one).
"""

from __future__ import annotations

import gc
import math
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from scaling_lab import checkpoint, data as data_lib, diagnostics, models
from scaling_lab.chunked_loss import causal_lm_loss, causal_lm_sums, chunks_loss, lm_parts
from scaling_lab.deepspeed_setup import (
    clips_outside_deepspeed,
    deepspeed_config,
    destroy_engine,
    import_deepspeed,
    micro_batch_size,
    undo_initial_optimizer_step,
)
from scaling_lab.grid import TrialConfig
from scaling_lab.outcome import TrainOutcome
from scaling_lab.skeleton import TrialSkeleton

# A full collection after each trial frees the finished engine's buffers before the next trial (271 M Llama, 2
# workers: ZeRO-0 bf16 1.46 → 1.37 × the model at the peak). It costs 0.1-5 s, too much beside a tiny model's
# sub-second trials, whose engines weigh little; under ZeRO-3 it is always run (the engine holds the partitions'
# buffers and the optimizer, which DeepSpeed ties to the shared base: deepspeed_setup.destroy_engine).
COLLECT_FROM_PARAMS = 10_000_000


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def ensure_process_group() -> None:
    """A process group of one for runs outside Ray Train (which sets one up itself), as DeepSpeed needs one."""
    if dist.is_initialized():
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)


def _all_reduce_sum(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    if world()[1] > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def lora_model(config: TrialConfig, base: models.BaseModel):
    from peft import LoraConfig, TaskType, get_peft_model
    from peft.tuners.lora import LoraLayer

    lora_config = LoraConfig(
        task_type=TaskType.SEQ_CLS if config.model.kind == "seq_cls" else TaskType.CAUSAL_LM,
        r=config.rank,
        lora_alpha=config.peft_lora_alpha,
        use_rslora=config.use_rslora,
        lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules
        if isinstance(config.lora.target_modules, str)
        else list(config.lora.target_modules),
        init_lora_weights="gaussian" if config.lora.init == "gaussian" else True,
    )
    # The adapter in the base's precision, as DeepSpeed casts every weight (keeping fp32 copies in the optimizer):
    # under ZeRO-3 it casts none of a model built under zero.Init, and PEFT's fp32 adapter then made each LoRA layer
    # copy its input to fp32 and train in another precision than at ZeRO-0.
    model = get_peft_model(base.model, lora_config, autocast_adapter_dtype=False)
    applied = {scale for m in model.modules() if isinstance(m, LoraLayer) for scale in m.scaling.values()}
    if not applied or not all(math.isclose(s, config.effective_scale, rel_tol=1e-9) for s in applied):
        raise RuntimeError(f"PEFT applied scale {applied}, expected {config.effective_scale}")
    return model


def lr_lambda(config: TrialConfig, total_steps: int):
    warmup, schedule = config.optimizer.warmup_steps, config.optimizer.schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if schedule == "linear":
            return 1 - progress
        return 1.0

    return factor


def evaluate(engine, split: data_lib.Split, config: TrialConfig, device) -> tuple[float, float]:
    """Held-out loss (mean per token, or per example for classification) and accuracy, over this worker's shard."""
    rank, world_size = world()
    count = min(len(split), config.training.eval_batches * config.training.batch_size)
    loss_sum = correct = total = 0.0
    parts = lm_parts(engine) if config.model.kind == "causal_lm" else None
    in_blocks = chunks_loss(parts, -(-config.training.batch_size // world_size) * config.training.seq_len)
    engine.eval()
    with torch.no_grad():
        for start in range(0, count, config.training.batch_size):
            # Every worker takes a share of every batch, so all run the same forward passes (ZeRO-3 gathers
            # parameters collectively in each); a worker left without rows scores one fully masked row.
            rows = torch.arange(start, min(start + config.training.batch_size, count)).tensor_split(world_size)[rank]
            batch = {k: v.to(device) for k, v in split.batch(rows if len(rows) else torch.tensor([start])).items()}
            labels = batch["labels"] if len(rows) else torch.full_like(batch["labels"], -100)
            if in_blocks:  # large logits: the sums in blocks (scaling_lab/chunked_loss.py)
                sums = causal_lm_sums(engine, {**batch, "labels": labels}, parts)
                loss_sum, correct, total = loss_sum + sums[0], correct + sums[1], total + sums[2]
                continue
            logits = engine(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
            if config.model.kind == "causal_lm":
                logits, labels = logits[:, :-1], labels[:, 1:]
            mask = labels != -100
            loss_sum += torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum").item()
            correct += (logits[mask].argmax(-1) == labels[mask]).sum().item()
            total += mask.sum().item()
    engine.train()
    loss_sum, correct, total = _all_reduce_sum([loss_sum, correct, total])
    return loss_sum / max(total, 1), correct / max(total, 1)


def _probe_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss of the fixed probe batch, without dropout, so that only the parameters change it."""
    model.eval()
    try:
        return causal_lm_loss(model, batch)
    finally:
        model.train()


@contextmanager
def fresh_adapter(config: TrialConfig, base: models.BaseModel) -> Iterator:
    """The trial's LoRA adapter on the process's shared base, taken off again at the end, so that the next trial
    starts from the base as loaded; after a failure the base is dropped instead, and the next trial reloads it."""
    model = lora_model(config, base)
    try:
        yield model
    except BaseException:
        models.forget()
        raise
    models.remove_adapter(base, model)


def worker_micro_batches(batch: dict[str, torch.Tensor], rank: int, world_size: int,
                         micro: int) -> list[dict[str, torch.Tensor]]:
    """This worker's share of a global batch, in micro-batches of `micro` sequences."""
    share = len(batch["input_ids"]) // world_size
    return [{k: v[start : start + micro] for k, v in batch.items()}
            for start in range(rank * share, (rank + 1) * share, micro)]


def fine_tune(config: TrialConfig, cache_dir: Path, base_dir: Path,
              checkpoints: checkpoint.TrialCheckpoints | None = None,
              should_stop: Callable[[int, float], bool] | None = None) -> TrainOutcome:
    with setup(config, cache_dir, base_dir) as run:
        outcome = train(run, checkpoints, should_stop)
    if config.deepspeed.zero_stage == 3 or outcome.model_params >= COLLECT_FROM_PARAMS:
        del run  # the destroyed engine is left in reference cycles: freed now, not at the next full collection
        gc.collect()
    return outcome


@dataclass
class Run:
    """What the training loop needs, as setup() builds it."""

    config: TrialConfig
    engine: Any  # a DeepSpeed engine around the PEFT model
    scheduler: torch.optim.lr_scheduler.LambdaLR
    trainable: list[torch.nn.Parameter]
    task: data_lib.Task
    batches: Iterator[dict[str, torch.Tensor]]
    device: torch.device
    rank: int
    world_size: int
    micro: int  # sequences per forward pass on this worker
    clip_here: float | None  # the gradient-norm cap, where torch clips rather than DeepSpeed
    diagnostics_every: int
    adapters: list
    signal_drift: diagnostics.SignalDrift
    full_grad: Callable  # DeepSpeed's whole gradient of a parameter, however ZeRO holds it
    outcome: TrainOutcome  # so far: what the set-up knows (sizes, commit, times)


@contextmanager
def setup(config: TrialConfig, cache_dir: Path, base_dir: Path) -> Iterator[Run]:
    """The trial's components in dependency order; on leaving, the engine is freed and the adapter taken off."""
    started_setup = time.perf_counter()
    deepspeed = import_deepspeed()
    ensure_process_group()
    # DeepSpeed's own view of the process group: a ZeRO-3 base loads before the engine that would set it up.
    deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
    rank, world_size = world()
    micro = micro_batch_size(config, world_size)
    if config.training.batch_size % (micro * world_size):
        raise ValueError(f"training.batch_size {config.training.batch_size} does not split into micro-batches of "
                         f"{micro} on {world_size} workers")
    device = torch.device(deepspeed.get_accelerator().device_name())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    # The base is loaded before seeding; the seed then fixes LoRA's initialization and dropout's draws.
    # Under ZeRO-3 it is loaded partitioned, as the engine's config says; that config's buffers are then sized to it.
    loading_config = deepspeed_config(config, world_size)
    base = models.load_base(config.model, cache_dir, config.deepspeed.precision,
                            loading_config if config.deepspeed.zero_stage == 3 else None)
    ds_config = deepspeed_config(config, world_size, model_params=base.num_params)
    # The data is tokenized with the base's tokenizer, or drawn over its vocabulary.
    started_data = time.perf_counter()
    task = data_lib.load_task(config.data, config.training, kind=config.model.kind, tokenizer=base.tokenizer,
                              vocab_size=base.vocab_size, base_dir=base_dir, cache_dir=cache_dir)
    data_time_s = time.perf_counter() - started_data
    setup_time_s = time.perf_counter() - started_setup
    torch.manual_seed(config.seed)
    with fresh_adapter(config, base) as model:
        if config.deepspeed.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        trainable = [p for p in model.parameters() if p.requires_grad]
        if config.optimizer.name == "adamw":
            optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, betas=config.optimizer.betas,
                                          weight_decay=config.optimizer.weight_decay)
        else:
            optimizer = torch.optim.SGD(trainable, lr=config.learning_rate, weight_decay=config.optimizer.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, config.training.total_steps))
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config)
        undo_initial_optimizer_step(engine)
        if world_size == 1 and config.deepspeed.zero_stage == 0:
            engine.enable_backward_allreduce = False  # an average over one worker: skip flattening and copying back

        # Diagnostics need the full adapter tensors, which ZeRO-3 partitions across workers: there they are left out.
        probe_rows = torch.arange(min(len(task.eval), config.training.batch_size))
        probe_batch = {k: v.to(device) for k, v in task.eval.batch(probe_rows).items()}
        yield Run(
            config=config,
            engine=engine,
            scheduler=scheduler,
            trainable=trainable,
            task=task,
            batches=data_lib.batch_iterator(task.train, config.training.batch_size, seed=config.seed),
            device=device,
            rank=rank,
            world_size=world_size,
            micro=micro,
            clip_here=config.optimizer.grad_clip if clips_outside_deepspeed(config) else None,
            diagnostics_every=config.training.diagnostics_every if config.deepspeed.zero_stage < 3 else 0,
            adapters=diagnostics.adapters(engine.module),
            signal_drift=diagnostics.SignalDrift(lambda: _probe_loss(engine.module, probe_batch), trainable),
            full_grad=deepspeed.utils.safe_get_full_grad,
            outcome=TrainOutcome(
                status="ok",
                model_params=base.num_params,
                trainable_params=sum(getattr(p, "ds_numel", p.numel()) for p in trainable),
                model_commit=base.commit,
                setup_time_s=setup_time_s,
                data_time_s=data_time_s,
            ),
        )
        destroy_engine(engine)


def train(run: Run, checkpoints: checkpoint.TrialCheckpoints | None = None,
          should_stop: Callable[[int, float], bool] | None = None) -> TrainOutcome:
    """The training loop; what follows from each step's losses (evaluation, divergence, pruning, checkpoints)
    is the trial skeleton's (scaling_lab/skeleton.py)."""
    config, engine, outcome = run.config, run.engine, run.outcome
    trial = TrialSkeleton(config, outcome, should_stop)
    trial.start(*evaluate(engine, run.task.eval, config, run.device))
    start_step = checkpoint.restore_engine(checkpoints, engine, outcome, run.batches) if checkpoints else 0
    parts = lm_parts(engine)  # the body and head of a causal LM, found outside the forward pass
    started = time.perf_counter()
    for step in trial.steps(start_step):
        micro_batches = worker_micro_batches(next(run.batches), run.rank, run.world_size, run.micro)
        learning_rate = run.scheduler.get_last_lr()[0]
        diagnose = run.diagnostics_every > 0 and (step == 1 or step % run.diagnostics_every == 0)
        if diagnose:
            run.signal_drift.before()
        measured, micro_losses = {}, []
        for micro_batch in micro_batches:
            # engine(**batch).loss, with the LM head and the loss in blocks where the logits are large
            loss = causal_lm_loss(engine, {k: v.to(run.device) for k, v in micro_batch.items()},
                                  tokens=run.micro * config.training.seq_len, parts=parts)
            engine.backward(loss)  # DeepSpeed divides by the accumulation steps, and averages over workers
            micro_losses.append(loss.item())
            if engine.is_gradient_accumulation_boundary():  # the last micro-batch: the gradients are whole
                if diagnose:
                    measured = diagnostics.norms(run.adapters, run.full_grad)
                if run.clip_here:
                    torch.nn.utils.clip_grad_norm_(run.trainable, run.clip_here)
            engine.step()  # the optimizer steps at the boundary only
        if diagnose:
            measured.update(run.signal_drift.after())
        (train_loss,) = _all_reduce_sum([sum(micro_losses) / (len(micro_losses) * run.world_size)])
        evaluation = evaluate(engine, run.task.eval, config, run.device) if trial.evaluates_at(step) else None
        if trial.record(step, learning_rate, train_loss, evaluation, measured):
            break
        if checkpoints and trial.may_checkpoint:
            checkpoint.save_engine(checkpoints, step, engine, outcome)
    outcome.train_time_s += time.perf_counter() - started
    if run.device.type == "cuda":
        outcome.peak_memory_mb = torch.cuda.max_memory_allocated() / 2**20
    if run.diagnostics_every:
        ratios = diagnostics.spectral_ratios(run.adapters)
        outcome.spectral_ratio_mean, outcome.spectral_ratio_max = sum(ratios) / len(ratios), max(ratios)
    return outcome
