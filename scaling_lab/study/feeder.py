"""What keeps a run's lanes busy: a Ray Tune callback on the driver that, a few times a second, adds to the
study's queue the trials its source wants run (the grid's unfinished trials, or the search's proposals) and
tells the queue for which shapes more may still come; lanes end once none can.

A trial goes into the queue once: not while it is queued or a lane runs it, not when it is finished, and not
while another driver's worker holds its claim (it is queued again if that driver abandons it).
"""

from __future__ import annotations

import time

from ray.tune import Callback

from scaling_lab import claims, results
from scaling_lab.grid import TrialConfig
from scaling_lab.group import shape_of
from scaling_lab.study.grouping import TrialSource, longest_first, trials_by_shape

FEED_EVERY_S = 0.5


def to_queue(wanted: list[TrialConfig], open_shapes: set[str], busy: set[str],
             elsewhere: set[str]) -> tuple[list[TrialConfig], set[str]]:
    """The wanted trials to add to the queue (none queued or taken by a lane, none another driver holds), and the
    shapes to which more may still come: the source's, and those of trials another driver holds (they are queued
    if it abandons them). A trial that a lane of this run took never goes to another lane (the lane takes it back
    after a restart, or records it as cut short), so it keeps no shape open: a lane that reaches its worker
    group's last trial while others finish theirs ends, instead of starting a fresh worker group to find none."""
    new = [t for t in wanted if t.trial_id not in busy and t.trial_id not in elsewhere]
    return new, open_shapes | {shape_of(t) for t in wanted if t.trial_id in elsewhere}


class QueueFeeder(Callback):
    def __init__(self, queue, source: TrialSource, store: results.Store, run_id: str):
        self.queue, self.source, self.store, self.run_id = queue, source, store, run_id
        self.fed_at = 0.0
        self.failed = False

    def feed(self) -> bool:
        """Queue what the source wants run; whether more may still come."""
        import ray

        self.fed_at = time.monotonic()
        busy = set(ray.get(self.queue.busy.remote()))  # before the rows: a trial is busy or finished, never neither
        wanted, open_shapes = self.source.poll(results.completed_ids(self.store))
        elsewhere = set(claims.held_elsewhere(self.store, [t.trial_id for t in wanted], self.run_id))
        new, open_shapes = to_queue(wanted, open_shapes, busy, elsewhere)
        ray.get(self.queue.add.remote({shape: [t.to_dict() for t in members]
                                       for shape, members in trials_by_shape(longest_first(new)).items()},
                                      sorted(open_shapes)))
        return bool(open_shapes)

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if not self.failed and time.monotonic() - self.fed_at >= FEED_EVERY_S:
            self.feed()

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        """A lane failed past its retries: nothing more is queued, the other lanes run what is queued and end, and
        the study then stops with the lane's failure (its trial stays without a row)."""
        import ray

        self.failed = True
        ray.get(self.queue.close.remote())
