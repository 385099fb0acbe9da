"""The study's trial queue (scaling_lab/trial_queue.py) as plain Python, without its Ray actor."""

import asyncio

from scaling_lab import spec as spec_lib
from scaling_lab.grid import expand
from scaling_lab.trial_queue import TrialQueue

TRIALS = [t.to_dict() for t in expand(spec_lib.parse({
    "name": "q", "models": [{"name": "xs", "source": "tiny:xs"}], "grid": {"ranks": [1, 4], "alphas": [2, 8]},
    "execution": {"backend": "simulated"}}))]


def test_lanes_wait_while_more_may_come_and_end_once_none_can():
    async def scenario():
        queue = TrialQueue({"a": TRIALS[:1]}, open_shapes=("a",))
        assert await queue.take("a", (0, 0)) == TRIALS[0]
        assert await queue.take("a", (0, 0), again=True) == TRIALS[0]  # a restarted worker group: the same trial
        waiting = asyncio.ensure_future(queue.take("a", (0, 1), wait_s=30))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # nothing queued, but the shape is open: the lane waits
        await queue.add({"a": TRIALS[1:3]}, ["a"])
        assert await waiting == TRIALS[1]  # woken by the new trials, not by the timeout
        assert await queue.take("a", (0, 0), wait_s=0) == TRIALS[2]
        assert await queue.take("a", (0, 0), wait_s=0) == "wait"
        assert await queue.start_worker_group("a", (0, 0))  # none queued or taken, but more may come
        assert sorted(await queue.busy()) == sorted(expand_ids(TRIALS[1:2]))  # lane (0, 1) still runs its trial
        await queue.add({}, [])  # the shape is closed
        assert await queue.take("a", (0, 0)) is None and not await queue.start_worker_group("a", (0, 0))

    asyncio.run(scenario())


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_lane_past_its_last_trial_starts_a_fresh_worker_group_only_where_it_would_get_a_trial():
    async def scenario():
        clock = Clock()
        queue = TrialQueue({"a": TRIALS}, open_shapes=(), clock=clock)
        for lane in [(0, 0), (0, 1)]:
            assert await queue.start_worker_group("a", lane)  # no worker group up yet: both start
            await queue.starting(lane)
        clock.now = 10.0  # worker groups take 10 s to start
        assert await queue.take("a", (0, 0), again=True) == TRIALS[0]
        assert await queue.take("a", (0, 1), again=True) == TRIALS[1]
        clock.now = 12.0  # and a trial 2 s
        assert await queue.take("a", (0, 0)) == TRIALS[2]
        clock.now = 14.0
        await queue.release((0, 0))  # lane (0, 0) ran its worker group's last trial; one trial is still queued
        # lane (0, 1), which is up, runs it in about 2 s, long before a fresh worker group would start
        assert not await queue.start_worker_group("a", (0, 0))

        slow = TrialQueue({"a": TRIALS}, clock=clock)
        clock.now = 0.0
        for lane in [(0, 0), (0, 1)]:
            await slow.starting(lane)
        clock.now = 1.0  # a start of 1 s against trials of 20 s: the fresh worker group would take its share
        assert await slow.take("a", (0, 0), again=True) == TRIALS[0]
        assert await slow.take("a", (0, 1), again=True) == TRIALS[1]
        clock.now = 21.0
        assert await slow.take("a", (0, 0)) == TRIALS[2]
        await slow.release((0, 0))
        assert await slow.start_worker_group("a", (0, 0))
        assert await slow.take("a", (0, 1)) == TRIALS[3]  # the last queued trial: none is left for a fresh group
        assert not await slow.start_worker_group("a", (0, 0))
        await slow.release((0, 1))  # no lane is up any more, and none is queued or may come
        assert not await slow.start_worker_group("a", (0, 1))

    asyncio.run(scenario())


def test_a_lane_restarted_after_its_worker_died_starts_to_take_back_its_trial():
    async def scenario():
        queue = TrialQueue({"a": TRIALS[:1]})
        assert await queue.take("a", (0, 0)) == TRIALS[0]
        assert await queue.start_worker_group("a", (0, 0))  # nothing queued and the shape closed, but its trial
        assert await queue.take("a", (0, 0), again=True) == TRIALS[0]

    asyncio.run(scenario())


def test_a_stopped_queue_hands_out_nothing_more():
    async def scenario():
        queue = TrialQueue({"a": TRIALS}, open_shapes=("a",))
        await queue.close(drop_pending=True)
        assert await queue.take("a", (0, 0)) is None and await queue.busy() == []

    asyncio.run(scenario())


def expand_ids(trials: list[dict]) -> list[str]:
    from scaling_lab.grid import TrialConfig

    return [TrialConfig.from_dict(t).trial_id for t in trials]
