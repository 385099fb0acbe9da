"""Claims on running trials, so that no two drivers run the same trial and a crashed one's trials are taken over.

A worker claims a trial before running it by creating `claims/<trial_id>.json` exclusively: owner host, pid,
the driver's run id, the attempt number and a heartbeat time that a small thread refreshes while the trial runs.
The claim is removed once the trial's row is written. A claim is stale, and is taken over with attempt + 1, when

- its heartbeat is older than its timeout (a dead process or node anywhere, or a hung one),
- its process is gone (only checkable on the same host), or
- it was taken by the same run, and not by another worker group running beside the one asking (a sibling of
  the same round): then it is an earlier attempt of this very group, retried by Tune or Train after its worker
  died, or a group of an earlier round, all of which have ended.

On the local filesystem claims are taken under an exclusive `flock`, which the kernel releases when a process
dies, so no two processes can take over the same stale claim. Object stores (s3://, gs://) offer neither locks
nor exclusive creation through pyarrow: there a claim is created by exists-then-write, and two drivers started
within the same instant on one study may both run a trial (one row still results: writes replace atomically).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

from scaling_lab import results

DEFAULT_TIMEOUT_S = 120.0
HEARTBEATS_PER_TIMEOUT = 4


def _relative(trial_id: str) -> str:
    return f"{results.CLAIMS}/{trial_id}.json"


@contextlib.contextmanager
def _locked(store: results.Store):
    if not store.local:
        yield
        return
    folder = Path(store.path(results.CLAIMS))
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read(store: results.Store, trial_id: str) -> dict | None:
    """The claim on a trial; an unreadable one reads as a stale first attempt."""
    try:
        data = json.loads(store.read_bytes(_relative(trial_id)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"attempt": 1, "heartbeat_at": None}
    return data if isinstance(data, dict) else {"attempt": 1, "heartbeat_at": None}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process stays a zombie until its parent reaps it
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def is_stale(claim: dict, run_id: str | None = None, lane: tuple[int, int] | None = None) -> bool:
    """Whether a claim may be taken over by worker group `lane` (round, index) of run `run_id`."""
    if run_id is not None and claim.get("run_id") == run_id and not _sibling(claim.get("lane"), lane):
        return True
    heartbeat = claim.get("heartbeat_at")
    if not isinstance(heartbeat, (int, float)) or time.time() - heartbeat > claim.get("timeout_s", DEFAULT_TIMEOUT_S):
        return True
    return claim.get("host") == socket.gethostname() and not _process_alive(claim.get("pid", -1))


def _sibling(theirs, mine: tuple[int, int] | None) -> bool:
    """Whether a claim of this run was taken by another worker group of the same round as `mine`."""
    return isinstance(theirs, list) and mine is not None and theirs != list(mine) and theirs[:1] == [mine[0]]


def held_elsewhere(store: results.Store, trial_ids: list[str], run_id: str) -> list[str]:
    """The trials among `trial_ids` that another driver's worker is running now."""
    claimed = {name.removesuffix(".json") for name in store.list(results.CLAIMS, ".json")}
    held = []
    for trial_id in trial_ids:
        claim = read(store, trial_id) if trial_id in claimed else None
        if claim is not None and not is_stale(claim, run_id):
            held.append(trial_id)
    return held


class Claim:
    """This process's claim on one trial."""

    def __init__(self, store: results.Store, trial_id: str, data: dict):
        self.store, self.trial_id, self.data = store, trial_id, data

    @property
    def attempt(self) -> int:
        return self.data["attempt"]

    def _owned(self) -> bool:
        current = read(self.store, self.trial_id) or {}
        return all(current.get(k) == self.data.get(k) for k in ("host", "pid", "run_id", "lane", "attempt"))

    def _rewrite(self, **changes) -> bool:
        with _locked(self.store):
            if not self._owned():
                return False
            self.data.update(changes)
            self.store.write(_relative(self.trial_id), _encode(self.data))
            return True

    @contextlib.contextmanager
    def heartbeat(self):
        """Refresh the heartbeat while the body runs; stops once another worker has taken the claim over."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.data["timeout_s"] / HEARTBEATS_PER_TIMEOUT):
                try:
                    if not self._rewrite(heartbeat_at=time.time()):
                        return
                except results.ResultsError:
                    continue  # the next beat tries again; past the timeout the claim goes stale

        thread = threading.Thread(target=beat, name=f"claim-{self.trial_id}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    def release(self) -> None:
        """Remove the claim: the trial's row is written (or it turned out to be finished already)."""
        with _locked(self.store):
            if self._owned():
                self.store.delete(_relative(self.trial_id))

    def abandon(self) -> None:
        """Leave the claim stale at once, keeping its attempt count, when this attempt failed without a row."""
        self._rewrite(heartbeat_at=None)


def acquire(store: results.Store, trial_id: str, run_id: str, timeout_s: float = DEFAULT_TIMEOUT_S,
            lane: tuple[int, int] | None = None) -> Claim | None:
    """Claim a trial for this process, a worker of group `lane` of run `run_id`; None when a live claim of
    another run, or of a sibling group, holds it."""
    data = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "run_id": run_id,
        "lane": list(lane) if lane is not None else None,
        "attempt": 1,
        "timeout_s": timeout_s,
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "heartbeat_at": time.time(),
    }
    with _locked(store):
        previous = read(store, trial_id)
        if previous is None:
            return Claim(store, trial_id, data) if store.create_exclusive(_relative(trial_id), _encode(data)) else None
        if not is_stale(previous, run_id, lane):
            return None
        data["attempt"] = int(previous.get("attempt", 1)) + 1
        store.write(_relative(trial_id), _encode(data))
        return Claim(store, trial_id, data)


def _encode(data: dict) -> bytes:
    return json.dumps(data).encode()
