"""One trial: config in, result row out; and a group of trials run one after another in one worker group.

Grouping amortizes the start-up of a Ray Train worker group (about 15 s on 2 cores) over many short trials;
every trial still runs the same training function from a fresh model, seeded by its own config only.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import resource
import socket
import traceback
from pathlib import Path

from scaling_lab import results
from scaling_lab.grid import TrialConfig
from scaling_lab.outcome import TrainOutcome

PROVENANCE_PACKAGES = ["scaling_lab", "torch", "transformers", "peft", "deepspeed", "ray", "pyarrow"]
MAX_ERROR_CHARS = 4000


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _node() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return socket.gethostname()


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name()}"
    return f"cpu:{os.cpu_count()} cores"


def _claim(store: results.Store, trial_id: str) -> int:
    """Mark the trial as running; returns the attempt number (one more than a crashed earlier claim's)."""
    relative = f"{results.CLAIMS}/{trial_id}.json"
    attempt = 1
    if store.exists(relative):
        try:
            attempt = json.loads(store.read_bytes(relative)).get("attempt", 0) + 1
        except (OSError, ValueError):
            attempt = 2
    claim = {"attempt": attempt, "owner": f"{socket.gethostname()}:{os.getpid()}", "started_at": _now().isoformat()}
    store.write(relative, json.dumps(claim).encode())
    return attempt


def execute(config: TrialConfig, backend: str, cache_dir: Path, base_dir: Path, step_time_s: float) -> TrainOutcome:
    """Run one fine-tune; any exception becomes an outcome with status error or oom."""
    try:
        if backend == "simulated":
            from scaling_lab.simulated import simulate

            return simulate(config, step_time_s)
        from scaling_lab.train import fine_tune

        return fine_tune(config, cache_dir, base_dir)
    except Exception as exc:  # a failed trial is data, not a crash of the study
        oom = isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
        text = "".join(traceback.format_exception_only(exc)).strip() + "\n" + traceback.format_exc()
        return TrainOutcome(status="oom" if oom else "error", error=text[-MAX_ERROR_CHARS:])


def result_row(config: TrialConfig, outcome: TrainOutcome, *, study: str, attempt: int, num_workers: int,
               started_at: dt.datetime, git_commit: str | None, device: str) -> dict:
    finished_at = _now()
    return {
        "trial_id": config.trial_id,
        "study": study,
        "model": config.model.name,
        "rank": config.rank,
        "alpha": config.alpha,
        "learning_rate": config.learning_rate,
        "seed": config.seed,
        "scaling_rule": config.scaling_rule,
        "effective_scale": config.effective_scale,
        "peft_lora_alpha": config.peft_lora_alpha,
        "use_rslora": config.use_rslora,
        "model_source": config.model.source,
        "model_params": outcome.model_params or None,
        "trainable_params": outcome.trainable_params or None,
        "task": config.data.source,
        "target_modules": json.dumps(config.lora.target_modules),
        "lora_init": config.lora.init,
        "optimizer": config.optimizer.name,
        "schedule": config.optimizer.schedule,
        "batch_size": config.training.batch_size,
        "seq_len": config.training.seq_len,
        "steps_planned": config.training.total_steps,
        "status": outcome.status,
        "error": outcome.error,
        "final_eval_loss": outcome.final_eval_loss,
        "best_eval_loss": outcome.best_eval_loss,
        "final_eval_accuracy": outcome.final_eval_accuracy,
        "best_eval_accuracy": outcome.best_eval_accuracy,
        "initial_eval_loss": outcome.initial_eval_loss,
        "spectral_ratio_mean": outcome.spectral_ratio_mean,
        "spectral_ratio_max": outcome.spectral_ratio_max,
        "final_train_loss": outcome.final_train_loss,
        "last_finite_train_loss": outcome.last_finite_train_loss,
        "steps": outcome.steps,
        "tokens": outcome.tokens,
        "wall_time_s": (finished_at - started_at).total_seconds(),
        "train_time_s": outcome.train_time_s,
        "tokens_per_s": outcome.tokens / outcome.train_time_s if outcome.train_time_s > 0 else None,
        "peak_memory_mb": outcome.peak_memory_mb or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "attempts": attempt,
        "zero_stage": config.deepspeed.zero_stage,
        "precision": config.deepspeed.precision,
        "num_workers": num_workers,
        "node": _node(),
        "device": device,
        "git_commit": git_commit,
        "versions": results.versions_json(PROVENANCE_PACKAGES),
        "started_at": started_at,
        "finished_at": finished_at,
        "config": json.dumps(config.to_dict(), sort_keys=True),
    }


def run_group(group: dict) -> None:
    """Run a group of trials in order, skipping finished ones; every worker of the group calls this.

    `group` holds plain data: trials (config dicts), results_dir, cache_dir, base_dir, backend, study,
    git_commit, step_time_s.
    """
    if group["backend"] == "simulated":
        rank, world_size = 0, 1
    else:
        from scaling_lab.train import world

        rank, world_size = world()
    store = results.Store(group["results_dir"])
    cache_dir, base_dir = Path(group["cache_dir"]), Path(group["base_dir"])
    device = "simulated" if group["backend"] == "simulated" else _device()
    for trial_dict in group["trials"]:
        config = TrialConfig.from_dict(trial_dict)
        if _agreed_done(store, config.trial_id, world_size):
            continue
        started_at = _now()
        attempt = _claim(store, config.trial_id) if rank == 0 else 0
        outcome = execute(config, group["backend"], cache_dir, base_dir, group.get("step_time_s", 0.0))
        if rank == 0:
            row = result_row(config, outcome, study=group["study"], attempt=attempt, num_workers=world_size,
                             started_at=started_at, git_commit=group.get("git_commit"), device=device)
            results.write_trial(store, row, outcome.curve)
            store.delete(f"{results.CLAIMS}/{config.trial_id}.json")


def _agreed_done(store: results.Store, trial_id: str, world_size: int) -> bool:
    """Whether the trial is finished, as seen by worker 0, so that all workers skip or run it together."""
    done = store.exists(f"{results.TRIALS}/{trial_id}.parquet")
    if world_size > 1:
        import torch.distributed as dist

        decision = [done]
        dist.broadcast_object_list(decision, src=0)
        done = decision[0]
    return done


def train_worker_loop(group: dict) -> None:
    """The Ray Train per-worker entry point: one worker group runs a whole group of trials."""
    import torch

    torch.set_num_threads(max(1, int(group["cpus_per_worker"])))
    run_group(group)
