"""What the driver's feeder queues, and for which shapes it says more trials may still come (pure)."""

from scaling_lab import spec as spec_lib
from scaling_lab.grid import expand
from scaling_lab.group import shape_of
from scaling_lab.study.feeder import to_queue

SPEC = {"name": "f", "grid": {"ranks": [1, 4], "alphas": [2, 8]}, "execution": {"backend": "simulated"},
        "models": [{"name": "xs", "source": "tiny:xs"},
                   {"name": "xs2", "source": "tiny:xs", "resources": {"workers": 2}}]}


def test_trials_a_lane_runs_keep_no_shape_open_and_trials_another_driver_holds_do():
    trials = expand(spec_lib.parse(SPEC))
    one, two = sorted({shape_of(t) for t in trials})
    of_one = [t for t in trials if shape_of(t) == one]
    of_two = [t for t in trials if shape_of(t) == two]
    running_here, queued, held_elsewhere, idle = of_one[0], of_one[1], of_two[0], of_two[1:]

    new, open_shapes = to_queue([running_here, queued, held_elsewhere, *idle], set(),
                                busy={running_here.trial_id, queued.trial_id}, elsewhere={held_elsewhere.trial_id})
    assert new == idle  # neither queued twice nor taken from another driver
    # shape one's last trials are running or queued in this run: no more can come to it, so its lanes may end;
    # the trial another driver holds comes back if that driver abandons it
    assert open_shapes == {two}
    assert to_queue([running_here], {one}, busy={running_here.trial_id}, elsewhere=set())[1] == {one}  # the source's
