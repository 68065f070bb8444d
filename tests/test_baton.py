"""The baton of an interleaved race (``mpinewton.compare.Baton``): turns in rotation.

Threads that take turns through the baton must run one at a time, in the
rotation's order, skip those that left, and never be left waiting when one
of them fails.
"""

import threading

import pytest

from mpinewton.compare import Abandoned, Baton


def _take_turns(baton, steps, log, fail_at=None):
    """Threads each taking ``steps[i]`` turns, logging ``(i, step)`` while holding it."""
    errors = []

    def taker(i):
        try:
            baton.wait(i)
            for step in range(steps[i]):
                if step:
                    baton.pass_on(i)
                    baton.wait(i)
                if (i, step) == fail_at:
                    raise ValueError("boom")
                log.append((i, step))
            baton.leave(i)
        except Abandoned:
            log.append((i, "abandoned"))
        except ValueError as exc:
            errors.append(exc)
            baton.fail()

    threads = [threading.Thread(target=taker, args=(i,)) for i in range(len(steps))]
    for t in reversed(threads):  # started out of order: the baton sets the order
        t.start()
    for t in threads:
        t.join(timeout=10)
        assert not t.is_alive(), "a taker was left waiting"
    return errors


def test_turns_go_round_in_order_and_skip_those_that_left():
    log = []
    baton = Baton(3)
    assert not _take_turns(baton, [2, 4, 1], log)
    assert log == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (1, 2), (1, 3)]
    assert baton.turn is None  # all have left


def test_one_taker_keeps_the_baton():
    log = []
    assert not _take_turns(Baton(1), [3], log)
    assert log == [(0, 0), (0, 1), (0, 2)]


def test_a_failure_ends_every_wait():
    log = []
    errors = _take_turns(Baton(3), [3, 3, 3], log, fail_at=(1, 1))
    assert [str(e) for e in errors] == ["boom"]
    assert log[:4] == [(0, 0), (1, 0), (2, 0), (0, 1)]
    assert sorted(x for x in log[4:]) == [(0, "abandoned"), (2, "abandoned")]


def test_acting_out_of_turn_is_an_error():
    baton = Baton(2)
    with pytest.raises(RuntimeError, match="taker 1 acted in taker 0's turn"):
        baton.pass_on(1)
    with pytest.raises(ValueError, match="at least one"):
        Baton(0)
