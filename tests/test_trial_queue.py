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
        assert await queue.left("a", (0, 0)) == 1  # none queued or taken; more may come
        assert sorted(await queue.busy()) == sorted(expand_ids(TRIALS[1:2]))  # lane (0, 1) still runs its trial
        await queue.add({}, [])  # the shape is closed
        assert await queue.take("a", (0, 0)) is None and await queue.left("a", (0, 0)) == 0

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
