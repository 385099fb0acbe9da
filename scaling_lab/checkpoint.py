"""In-trial checkpoints: a retried trial resumes from its last checkpoint instead of from step 0.

Off by default (`execution.checkpoint_every`); worth it for long trials, where a killed worker or node would
otherwise cost the whole trial. Layout, through the results Store so that a retry on another node finds it:

    checkpoints/<trial_id>/step-<n>/...   the files of the checkpoint at step n (each worker writes its own)
    checkpoints/<trial_id>/latest.json    written last: the newest complete checkpoint's step and loop state

A checkpoint cut short by a crash is never used, since latest.json still names the one before. The trial's
checkpoints are deleted once its row is written.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tempfile
import time
from pathlib import Path

from scaling_lab import results
from scaling_lab.outcome import TrainOutcome

DEEPSPEED_TAG = "engine"


class TrialCheckpoints:
    def __init__(self, store: results.Store, trial_id: str, every: int, rank: int = 0):
        self.store, self.every, self.rank = store, every, rank
        self.folder, self.trial_id = f"{results.CHECKPOINTS}/{trial_id}", trial_id
        self.segment_started = time.perf_counter()  # when this attempt began training (set by restore_engine)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def latest(self) -> tuple[int, dict] | None:
        """The step and loop state of the newest complete checkpoint, if any."""
        if not self.store.exists(f"{self.folder}/latest.json"):
            return None
        saved = json.loads(self.store.read_bytes(f"{self.folder}/latest.json"))
        return saved["step"], saved["state"]

    def resume(self) -> tuple[int, dict] | None:
        """The newest complete checkpoint, as `latest`, saying in the worker's log that the trial resumes from it."""
        found = self.latest()
        if found is not None:
            print(f"trial {self.trial_id}: resumed from its checkpoint at step {found[0]}", flush=True)
        return found

    def save(self, step: int, state: dict, files: dict[str, bytes] | None = None) -> None:
        """Every worker writes its files; then worker 0 marks the checkpoint complete and drops the one before."""
        for name, data in (files or {}).items():
            self.store.write(f"{self.folder}/step-{step}/{name}", data)
        _barrier()
        if self.rank == 0:
            previous = self.latest()
            self.store.write(f"{self.folder}/latest.json", json.dumps({"step": step, "state": state}).encode())
            if previous is not None and previous[0] != step:
                self.store.delete_folder(f"{self.folder}/step-{previous[0]}")

    def files(self, step: int) -> dict[str, bytes]:
        folder = f"{self.folder}/step-{step}"
        return {name: self.store.read_bytes(f"{folder}/{name}") for name in self.store.list(folder, "")}

    def delete(self) -> None:
        self.store.delete_folder(self.folder)


def _barrier() -> None:
    try:
        import torch.distributed as dist
    except ImportError:
        return
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def outcome_state(outcome: TrainOutcome) -> dict:
    return dataclasses.asdict(outcome)


def restore_outcome(outcome: TrainOutcome, state: dict) -> None:
    for name, value in state.items():
        setattr(outcome, name, value)


# ---- a loop with no state of its own beyond the outcome (the simulated trial) ----


def resume_outcome(checkpoints: TrialCheckpoints, outcome: TrainOutcome) -> int:
    """Load the newest checkpoint's outcome so far; returns its step (0 when there is none)."""
    found = checkpoints.resume()
    if found is None:
        return 0
    restore_outcome(outcome, found[1])
    return found[0]


def save_outcome(checkpoints: TrialCheckpoints, step: int, outcome: TrainOutcome) -> None:
    """Called after each step; saves the outcome so far at multiples of `every`."""
    if checkpoints.due(step):
        checkpoints.save(step, outcome_state(outcome))


# ---- the real training loop's checkpoints: the DeepSpeed engine (adapter, optimizer, scheduler) + loop state ----


def restore_engine(checkpoints: TrialCheckpoints, engine, outcome: TrainOutcome, batches) -> int:
    """Load the newest checkpoint into the engine, the outcome so far and the batch stream; returns its step
    (0 when there is none). Called by every worker just before the training loop."""
    import torch

    checkpoints.segment_started = time.perf_counter()
    found = checkpoints.resume()
    if found is None:
        return 0
    step, state = found
    files = checkpoints.files(step)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / DEEPSPEED_TAG).mkdir()
        for name, data in files.items():
            (Path(tmp) / DEEPSPEED_TAG / name).write_bytes(data)
        engine.load_checkpoint(tmp, tag=DEEPSPEED_TAG, load_module_strict=False)
    rng = torch.load(io.BytesIO(files[f"rng-{checkpoints.rank}.pt"]))
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"])
    restore_outcome(outcome, state)
    for _ in range(step):
        next(batches)
    return step


def save_engine(checkpoints: TrialCheckpoints, step: int, engine, outcome: TrainOutcome) -> None:
    """Called by every worker after each step; saves at multiples of `every` (only the trainable parameters)."""
    if not checkpoints.due(step):
        return
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True)
        files = {p.name: p.read_bytes() for p in (Path(tmp) / DEEPSPEED_TAG).iterdir() if p.is_file()}
    rng = io.BytesIO()
    cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    torch.save({"cpu": torch.get_rng_state(), "cuda": cuda_rng}, rng)
    files[f"rng-{checkpoints.rank}.pt"] = rng.getvalue()
    state = outcome_state(outcome)
    state["train_time_s"] += time.perf_counter() - checkpoints.segment_started
    checkpoints.save(step, state, files)
