"""The study's trials that no lane has taken yet: a small Ray actor the driver owns and fills, and the client the
worker groups (lanes) take their trials through.

Lanes take trials one at a time instead of running a fixed share, so that none idles while another still has
trials ahead of it (trial lengths differ by model size, rank and divergence). The queue lives for a whole Tune run:
the driver adds trials as the grid's wait or the search proposes them, and says for which shapes more may still
come; a lane whose shape has nothing pending waits on the queue while more may come, and ends once none can.
A lane that ended its worker group (after `trials_per_group` trials) starts a fresh one only where that one would
get a trial: not when the lanes of its shape that are up would run every queued trial before it started.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator

from scaling_lab.grid import TrialConfig
from scaling_lab.group import GroupSpec

WAIT_S = 5.0  # how long one take() waits for a trial before the lane asks again


class TrialQueue:
    """Trial configs (plain dicts) by the worker-group shape that runs them, in the order added; the trial each
    lane took last; the shapes to which more trials may still be added; and, measured in this run, how long a
    trial and a worker group's start take per shape."""

    def __init__(self, trials_by_shape: dict[str, list[dict]] | None = None, open_shapes: tuple[str, ...] = (),
                 clock: Callable[[], float] = time.monotonic):
        self.pending: dict[str, deque] = {}
        self.taken: dict[tuple, tuple[str, dict] | None] = {}  # lane → (trial id, config) it took last
        self.open: set[str] = set(open_shapes)
        self.clock = clock
        self.up: dict[tuple, str] = {}  # lane → shape, for the lanes whose worker group is up and taking trials
        self.taken_at: dict[tuple, float] = {}
        self.starting_at: dict[tuple, float] = {}
        self.trial_s: dict[str, list[float]] = {}
        self.start_s: dict[str, list[float]] = {}
        self._changed = asyncio.Event()
        self._add(trials_by_shape or {})

    def _add(self, trials_by_shape: dict[str, list[dict]]) -> None:
        for shape, trials in trials_by_shape.items():
            self.pending.setdefault(shape, deque()).extend((TrialConfig.from_dict(t).trial_id, t) for t in trials)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def add(self, trials_by_shape: dict[str, list[dict]], open_shapes: list[str]) -> None:
        """Queue trials, and say which shapes may still get more (a shape left out is closed)."""
        self._add(trials_by_shape)
        self.open = set(open_shapes)
        self._wake()

    async def close(self, drop_pending: bool = False) -> None:
        """No more trials will come; with `drop_pending`, none of those queued runs either (the study stops)."""
        self.open = set()
        if drop_pending:
            self.pending = {}
        self._wake()

    async def take(self, shape: str, lane: tuple, again: bool = False, wait_s: float = WAIT_S) -> dict | str | None:
        """The next trial for `lane`; None when none is left and none can come; "wait" when none came within
        `wait_s` but more may. With `again`, the trial the lane took last, if any: a worker group restarted after
        its worker died runs that one again first."""
        lane, now = tuple(lane), self.clock()
        if again and lane in self.starting_at:  # a fresh worker group's first take: it is up
            self.start_s.setdefault(shape, []).append(now - self.starting_at.pop(lane))
        self.up[lane] = shape
        if again and self.taken.get(lane) is not None:
            return self.taken[lane][1]
        if lane in self.taken_at:  # the trial it took last is finished
            self.trial_s.setdefault(shape, []).append(now - self.taken_at.pop(lane))
        deadline = time.monotonic() + wait_s
        while not self.pending.get(shape) and shape in self.open and time.monotonic() < deadline:
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break
        pending = self.pending.get(shape)
        self.taken[lane] = pending.popleft() if pending else None
        if self.taken[lane] is None:
            if shape in self.open:
                return "wait"
            self.up.pop(lane, None)  # its worker group ends
            return None
        self.taken_at[lane] = self.clock()
        return self.taken[lane][1]

    async def start_worker_group(self, shape: str, lane: tuple) -> bool:
        """Whether `lane`, with no worker group up, should start one: to take back the trial it took last; while
        none of its shape is queued, if more may come; else unless the other lanes of its shape that are up would
        run every queued trial before a fresh worker group started (by the median trial and start times so far)."""
        lane = tuple(lane)
        self.up.pop(lane, None)
        if self.taken.get(lane) is not None:
            return True
        queued = len(self.pending.get(shape, ()))
        if not queued:
            return shape in self.open
        others_up = sum(1 for other, their_shape in self.up.items() if their_shape == shape)
        if not others_up or not self.trial_s.get(shape) or not self.start_s.get(shape):
            return True
        return queued * statistics.median(self.trial_s[shape]) / others_up > statistics.median(self.start_s[shape])

    async def starting(self, lane: tuple) -> None:
        """`lane` starts a worker group now; its first take says when it is up."""
        self.starting_at[tuple(lane)] = self.clock()

    async def release(self, lane: tuple) -> None:
        """The trial `lane` took last is finished (run, skipped, or recorded as cut short): not taken back. Its
        worker group has ended."""
        lane = tuple(lane)
        self.taken[lane] = None
        self.taken_at.pop(lane, None)
        self.up.pop(lane, None)

    async def busy(self) -> list[str]:
        """The ids of the trials queued or taken by a lane and not yet given back by a next take."""
        return [trial_id for queued in self.pending.values() for trial_id, _ in queued] + [
            taken[0] for taken in self.taken.values() if taken is not None]

    async def last_taken(self, lane: tuple) -> dict | None:
        taken = self.taken.get(tuple(lane))
        return taken[1] if taken is not None else None


def start(name: str, trials_by_shape: dict[str, list[dict]] | None = None, open_shapes: tuple[str, ...] = ()):
    """The queue as a named actor (no CPU of its own), which the lanes look up by name. It lives on the driver's
    node, which the study cannot outlive anyway, and not on a worker node that may go away."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(TrialQueue).options(name=name, scheduling_strategy=here).remote(
        trials_by_shape, open_shapes)


def _actor(group: GroupSpec):
    import ray

    return ray.get_actor(group.queue)


def offered(group: GroupSpec) -> Iterator[dict]:
    """The trials a lane takes from the queue, one at a time, starting with the one it took last if it is a
    restart; while none is queued but more may come, it waits."""
    import ray

    queue, again = _actor(group), True
    while (trial := ray.get(queue.take.remote(group.shape, group.lane, again))) is not None:
        again = False
        if trial != "wait":
            yield trial


def start_worker_group(group: GroupSpec) -> bool:
    import ray

    return ray.get(_actor(group).start_worker_group.remote(group.shape, group.lane))


def starting(group: GroupSpec) -> None:
    import ray

    ray.get(_actor(group).starting.remote(group.lane))


def release(group: GroupSpec) -> None:
    import ray

    ray.get(_actor(group).release.remote(group.lane))


def last_taken(group: GroupSpec) -> dict | None:
    """The trial the lane took last, if any."""
    import ray

    return ray.get(_actor(group).last_taken.remote(group.lane))
