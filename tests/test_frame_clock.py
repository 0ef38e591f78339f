"""The frame clock's decision (captions/stt/frame_clock.py): when a step with ready frames waits for
others, and when it must not. Slots are stand-ins with the fields the clock reads; times in seconds
on the engine's clock. The engine-level behaviour is in tests/test_engine_phases.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from captions.stt.frame_clock import GATHER_WAIT_S, HOLD_S, FrameClock

RATE, FRAME, CHUNK = 24000, 1920, 240
TICK = CHUNK / RATE
NOW = 100.0


def slot(ready: int = 0, due_in_ticks: int | None = None, chunk: int = CHUNK, closing: bool = False,
         last_push_ago: float = 0.0):
    """A stream with `ready` frames queued; or none, its next frame completing `due_in_ticks` ticks
    after its last push (`last_push_ago` before NOW)."""
    pending = 0 if due_in_ticks is None else FRAME - due_in_ticks * chunk
    return SimpleNamespace(stream=object(), queue=[object()] * ready, closing=closing, last_chunk=chunk,
                           last_push_at=NOW - last_push_ago, buffer=SimpleNamespace(pending=pending))


def free_slot():
    return SimpleNamespace(stream=None, queue=[], closing=False, last_chunk=0, last_push_at=0.0,
                           buffer=None)


@pytest.fixture
def clock():
    return FrameClock(RATE, FRAME)


def test_a_group_that_is_ready_together_steps_at_once(clock):
    assert clock.wait_s([slot(ready=1) for _ in range(4)] + [free_slot()], NOW, NOW) is None


def test_a_stream_a_few_ticks_off_waits_for_the_larger_group_and_steps_with_it(clock):
    off = slot(ready=1)
    group = [slot(due_in_ticks=4) for _ in range(3)]
    wait = clock.wait_s([off, *group], NOW, NOW)
    assert wait is not None and 0 < wait <= HOLD_S
    # Their frames arrive 40 ms later: one step for all four.
    later = NOW + 4 * TICK
    for s in group:
        s.queue, s.last_push_at = [object()], later
    assert clock.wait_s([off, *group], later, NOW) is None


def test_the_larger_group_never_waits_for_a_stream_that_is_off(clock):
    group = [slot(ready=1) for _ in range(3)]
    assert clock.wait_s([*group, slot(due_in_ticks=4)], NOW, NOW) is None


def test_equal_groups_step_together(clock):
    assert clock.wait_s([slot(ready=1), slot(ready=1), slot(due_in_ticks=3), slot(due_in_ticks=5)], NOW, NOW) is not None


def test_a_step_waits_a_few_ms_for_a_smaller_group_due_on_this_tick(clock):
    """The gather: the later phase of another receiving process, here 3 ms behind."""
    group = [slot(ready=1) for _ in range(3)]
    other = slot(due_in_ticks=1, last_push_ago=TICK - 0.003)
    wait = clock.wait_s([*group, other], NOW, NOW)
    assert wait == pytest.approx(GATHER_WAIT_S)


@pytest.mark.parametrize("ready", [
    pytest.param(slot(ready=2), id="catching-up"),
    pytest.param(slot(ready=1, closing=True), id="closing"),
    pytest.param(slot(ready=1, chunk=FRAME), id="whole-frames"),
])
def test_frames_that_are_not_live_never_wait(clock, ready):
    assert clock.wait_s([ready, *(slot(due_in_ticks=2) for _ in range(3))], NOW, NOW) is None


def test_a_hold_ends_after_hold_s_even_if_the_group_is_late(clock):
    group = [slot(due_in_ticks=4, last_push_ago=0.0) for _ in range(3)]
    assert clock.wait_s([slot(ready=1), *group], NOW + HOLD_S, NOW) is None


def test_a_group_due_after_the_hold_is_not_waited_for(clock):
    """Due a whole frame later: that is the ready stream's own next tick."""
    assert clock.wait_s([slot(ready=1), *(slot(due_in_ticks=8) for _ in range(3))], NOW, NOW) is None


def test_a_stalled_feed_is_not_waited_for(clock):
    stalled = [slot(due_in_ticks=2, last_push_ago=2 * TICK) for _ in range(3)]
    assert clock.wait_s([slot(ready=1), *stalled], NOW, NOW) is None


def test_unaligned_frames_never_wait():
    clock = FrameClock(RATE, FRAME, align=False)
    assert clock.wait_s([slot(ready=1), *(slot(due_in_ticks=4) for _ in range(3))], NOW, NOW) is None


def test_an_ended_stream_is_not_kept_waiting_by_a_hold(clock):
    """An aborted (or flushed-out) stream's last event and its slot, which a waiting speaker may need,
    go out at once, with the ready frames."""
    ended = slot(closing=True)
    assert clock.wait_s([slot(ready=1), ended, *(slot(due_in_ticks=4) for _ in range(3))], NOW, NOW) is None
