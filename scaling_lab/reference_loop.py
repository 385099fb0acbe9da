"""A trial as a plain PyTorch + PEFT loop, without Ray or DeepSpeed: what the platform's training loop must
compute (tests/test_trial_real.py) and what it is timed against (benchmarks/trial_overhead.py,
benchmarks/gpu_throughput.py)."""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from scaling_lab import data, models
from scaling_lab.grid import TrialConfig
from scaling_lab.train import lora_model


@dataclass(frozen=True)
class PlainRun:
    train_losses: list[float]
    loop_s: float  # the training steps and the held-out passes among them, as the platform's train_time_s


def run(config: TrialConfig, cache_dir: Path, base_dir: Path, evaluate: bool = False,
        device: str = "cpu", dtype: torch.dtype | None = None) -> PlainRun:
    """The trial's training losses; with `evaluate`, also the held-out passes the platform's loop makes (at step 0,
    every eval_every steps and at the end), for the same amount of work. `dtype` casts the whole model (bf16 on
    a GPU, as a researcher's own loop would)."""
    shared = models.load_base(config.model, cache_dir)
    base = dataclasses.replace(shared, model=copy.deepcopy(shared.model))  # cast and moved below: a private copy
    task = data.load_task(config.data, config.training, kind="causal_lm", tokenizer=None,
                          vocab_size=base.vocab_size, base_dir=base_dir, cache_dir=cache_dir)
    torch.manual_seed(config.seed)
    model = lora_model(config, base).to(device=device, dtype=dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate)
    batches = data.batch_iterator(task.train, config.training.batch_size, seed=config.seed)
    held_out = task.eval.batch(torch.arange(len(task.eval)))
    held_out = {k: v.to(device) for k, v in held_out.items()}
    total_steps = config.training.total_steps
    if evaluate:
        held_out_loss(model, held_out, config)
    losses = []
    started = time.perf_counter()
    for step in range(1, total_steps + 1):
        loss = model(**{k: v.to(device) for k, v in next(batches).items()}).loss
        loss.backward()
        if config.optimizer.grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable, config.optimizer.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if evaluate and (step % config.training.eval_every == 0 or step == total_steps):
            held_out_loss(model, held_out, config)
    return PlainRun(losses, time.perf_counter() - started)


def held_out_loss(model, split: dict[str, torch.Tensor], config: TrialConfig) -> float:
    batch_size = config.training.batch_size
    count = config.training.eval_batches * batch_size
    model.eval()
    with torch.no_grad():
        losses = [model(**{k: v[i : i + batch_size] for k, v in split.items()}).loss.item()
                  for i in range(0, count, batch_size)]
    model.train()
    return sum(losses) / len(losses)
