"""The trials of one round that no worker group has taken yet: a small Ray actor the driver owns.

Worker groups take trials from it one at a time instead of running a fixed share, so that none idles while
another still has trials ahead of it (trial lengths differ by model size, rank and divergence). A worker group
that starts when nothing of its kind is left returns before it builds its workers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator


class TrialQueue:
    """Trial configs (plain dicts) by the worker-group shape that runs them, in the order given, and the trial
    each worker group took last."""

    def __init__(self, trials_by_shape: dict[str, list[dict]]):
        self.pending = {shape: deque(trials) for shape, trials in trials_by_shape.items()}
        self.taken: dict[tuple, dict | None] = {}

    def take(self, shape: str, lane: tuple, again: bool = False) -> dict | None:
        """The next trial for worker group `lane`, None when none is left; with `again`, the trial it took last,
        if any: a worker group restarted after its worker died runs that one again first."""
        lane = tuple(lane)
        if again and self.taken.get(lane) is not None:
            return self.taken[lane]
        pending = self.pending.get(shape)
        self.taken[lane] = pending.popleft() if pending else None
        return self.taken[lane]

    def left(self, shape: str, lane: tuple) -> int:
        """How many trials worker group `lane` may still run (the last one it took counted, if any)."""
        return len(self.pending.get(shape, ())) + (self.taken.get(tuple(lane)) is not None)

    def untaken(self, shape: str) -> int:
        return len(self.pending.get(shape, ()))

    def last_taken(self, lane: tuple) -> dict | None:
        return self.taken.get(tuple(lane))


def start(name: str, trials_by_shape: dict[str, list[dict]]):
    """The queue as a named actor (no CPU of its own), which the worker groups look up by name. It lives on the
    driver's node, which the study cannot outlive anyway, and not on a worker node that may go away."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(TrialQueue).options(name=name, scheduling_strategy=here).remote(trials_by_shape)


def offered(group: dict) -> Iterator[dict]:
    """The trials a worker group takes from its round's queue, one at a time, starting with the one it took
    last if it is a restart."""
    import ray

    queue, again = ray.get_actor(group["queue"]), True
    while (trial := ray.get(queue.take.remote(group["shape"], group["lane"], again))) is not None:
        again = False
        yield trial


def left(group: dict) -> int:
    import ray

    return ray.get(ray.get_actor(group["queue"]).left.remote(group["shape"], group["lane"]))


def pending(group: dict) -> int:
    """How many trials of the group's shape no worker group has taken yet."""
    import ray

    return ray.get(ray.get_actor(group["queue"]).untaken.remote(group["shape"]))


def last_taken(group: dict) -> dict | None:
    """The trial the worker group took last, if any."""
    import ray

    return ray.get(ray.get_actor(group["queue"]).last_taken.remote(group["lane"]))
