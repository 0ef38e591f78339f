"""The frame clock's decision (captions/stt/frame_clock.py): when a step with ready frames waits for
others, and when it must not. Slots are stand-ins with the fields the clock reads; times in seconds
on the engine's clock. The engine-level behaviour is in tests/test_engine_phases.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from captions.stt.frame_clock import GATHER_WAIT_S, HOLD_S, STALLED_TICKS, FrameClock

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


def test_equal_groups_step_at_the_later_ones_phase_when_it_is_under_half_a_frame_away(clock):
    """Two ready, two due in 30 ms: stepping every frame at the later phase costs the earlier two
    30 ms each; at the earlier phase, the later two 50 ms each. Due in 50 ms, the other way round."""
    assert clock.wait_s([slot(ready=1), slot(ready=1), *(slot(due_in_ticks=3) for _ in range(2))], NOW, NOW) is not None
    other_wait = FrameClock(RATE, FRAME)
    assert other_wait.wait_s([slot(ready=1), slot(ready=1), *(slot(due_in_ticks=5) for _ in range(2))], NOW, NOW) is None


def test_groups_at_every_phase_step_once_a_frame_at_one_phase(clock):
    """Eight streams at each of the eight phases of a frame (as leads misplaced on a starved host can
    leave them). Whichever group is ready, the clock picks the same phase: one group steps when its
    frame is ready, the seven others wait for it, and one step a frame carries all 64 (the rule
    before stepped them in groups chasing each other, 1.7 steps a frame)."""
    steps_at_once = []
    for ready_phase in range(8):
        now = NOW + ready_phase * TICK  # NOW is on a whole frame of the clock: phase 0 is the lowest
        ready = [SimpleNamespace(**{**vars(slot(ready=1)), "last_push_at": now}) for _ in range(8)]
        others = []
        for phase in set(range(8)) - {ready_phase}:
            ticks = (phase - ready_phase) % 8
            others += [SimpleNamespace(**{**vars(slot(due_in_ticks=ticks)), "last_push_at": now}) for _ in range(8)]
        if clock.wait_s([*ready, *others], now, now) is None:
            steps_at_once.append(ready_phase)
    assert steps_at_once == [0]


def test_two_equal_groups_keep_the_phase_they_stepped_at_whatever_a_ms_of_jitter(clock):
    """One stream at each of two phases half a frame apart: either phase costs the same waiting, and
    a ms of jitter tips the sum one way or the other. The clock keeps the phase it last stepped at,
    instead of stepping each stream on its own phase as the jitter goes (two steps a frame)."""
    def at(now, ready_from_ms=None, due_in_ms=None):
        base = SimpleNamespace(stream=object(), closing=False, last_chunk=CHUNK, last_push_at=now)
        if ready_from_ms is not None:
            return SimpleNamespace(**vars(base), queue=[object()], buffer=SimpleNamespace(pending=0))
        ticks, extra_ms = divmod(due_in_ms, 10)
        return SimpleNamespace(**{**vars(base), "last_push_at": now + extra_ms / 1000},
                               queue=[], buffer=SimpleNamespace(pending=FRAME - ticks * CHUNK))

    first = NOW + 0.040  # two ready at phase 40, one due at phase 0: phase 40 is cheaper, it steps
    assert clock.wait_s([at(first, ready_from_ms=0), at(first, ready_from_ms=0), at(first, due_in_ms=40)],
                        first, first) is None
    then = NOW + 0.080  # one ready at phase 0, one due 41 ms on: stepping now would cost 2 ms less
    wait = clock.wait_s([at(then, ready_from_ms=0), at(then, due_in_ms=41)], then, then)
    assert wait is not None  # it waits for phase 40(.x), where the last step was


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


def test_a_gather_never_outlasts_the_hold(clock):
    """A ready frame that came 1 ms before the hold ends, another due 2 ms on (streams from several
    processes keep arriving): the frames held since the wait began step now, not a gather later."""
    now = NOW + HOLD_S
    ready = slot(ready=1, last_push_ago=-(HOLD_S - 0.001))
    due = slot(due_in_ticks=1, last_push_ago=-(HOLD_S - 0.008))
    assert clock.wait_s([slot(ready=1), ready, due], now, NOW) is None


def test_a_group_due_after_the_hold_is_not_waited_for(clock):
    """Due a whole frame later: that is the ready stream's own next tick."""
    assert clock.wait_s([slot(ready=1), *(slot(due_in_ticks=8) for _ in range(3))], NOW, NOW) is None


def test_a_stalled_feed_is_not_waited_for(clock):
    """Its last push a frame older than the others' newest: its feed stopped, theirs did not."""
    stalled = [slot(due_in_ticks=2, last_push_ago=(STALLED_TICKS + 1) * TICK) for _ in range(3)]
    assert clock.wait_s([slot(ready=1), *stalled], NOW, NOW) is None


def test_a_step_in_the_middle_of_a_late_hand_over_gathers_the_streams_not_yet_handed_over(clock):
    """A loop 30 ms late hands three ticks over, stream after stream. The step looks after the first
    three: the other two, three chunks short of a frame, are due those three chunks now, and come
    within the gather, not on a step of their own."""
    behind = [slot(due_in_ticks=3, last_push_ago=3 * TICK) for _ in range(2)]
    assert clock.wait_s([*(slot(ready=1) for _ in range(3)), *behind], NOW, NOW) == pytest.approx(GATHER_WAIT_S)


def test_a_hold_waits_for_a_larger_group_a_few_ticks_behind_in_a_late_hand_over(clock):
    """The group's last pushes are 50 ms older than the ready stream's (the hand-over has not reached
    them yet): not a stalled feed, so the one still waits for the three."""
    group = [slot(due_in_ticks=8, last_push_ago=5 * TICK) for _ in range(3)]
    wait = clock.wait_s([slot(ready=1), *group], NOW, NOW)
    assert wait is not None and 0 < wait <= HOLD_S


def test_a_hand_over_late_for_every_stream_does_not_end_the_hold(clock):
    """One receiving process's loop was late: no stream has pushed for 25 ms, the ready one included.
    The group is not stalled (nobody's feed moved on without it), so the few still wait for the many."""
    late = 0.025
    group = [slot(due_in_ticks=2, last_push_ago=late) for _ in range(3)]
    assert clock.wait_s([slot(ready=1, last_push_ago=late), *group], NOW, NOW - late) is not None


def test_unaligned_frames_never_wait():
    clock = FrameClock(RATE, FRAME, align=False)
    assert clock.wait_s([slot(ready=1), *(slot(due_in_ticks=4) for _ in range(3))], NOW, NOW) is None


def test_an_ended_stream_is_not_kept_waiting_by_a_hold(clock):
    """An aborted (or flushed-out) stream's last event and its slot, which a waiting speaker may need,
    go out at once, with the ready frames."""
    ended = slot(closing=True)
    assert clock.wait_s([slot(ready=1), ended, *(slot(due_in_ticks=4) for _ in range(3))], NOW, NOW) is None


def test_a_stream_of_40_ms_chunks_starting_on_any_tick_ends_its_frames_with_its_chunks_just_after_the_others():
    """Live chunks of 40 ms (`--live-chunk-ms 40`) arrive on WebRTC's 10 ms tick like any other. A
    stream whose first push came 0 to 70 ms after the newest one gets the lead that ends its frames
    with its own chunks (so a frame steps as soon as its chunk is in, holding the newest audio), at
    the first of them not before the others' frame ends: `shift` ticks after them (counted in 10 ms
    ticks, not in 40 ms chunks), which is what it tells the clock."""
    clock = FrameClock(RATE, FRAME)
    chunk = 4 * CHUNK
    clock.pushed(chunk, NOW, 0)  # the others' frames end at NOW
    for ticks_after in range(8):
        size = 3 * FRAME + chunk  # kept audio, then the first live chunk
        lead, shift = clock.lead_for(size, chunk, NOW + ticks_after * TICK + 0.0004)
        assert (lead + size) % chunk == 0, "its frames end with its chunks"
        assert shift == ticks_after % 4 * CHUNK, "as soon after the others' as its chunks allow"
        assert (lead + size + shift) % FRAME == ticks_after * CHUNK, "on the others' frame ends, shifted"


def test_a_stream_joining_a_shifted_one_aligns_with_the_clock_not_with_the_shift():
    """A stream whose frames end 20 ms after the clock's tells the clock so (`pushed`'s shift): the
    next stream aligns with the clock's frame ends, not 20 ms later (which would drift the group's
    frame ends later with every join)."""
    clock = FrameClock(RATE, FRAME)
    chunk = 4 * CHUNK
    clock.pushed(chunk, NOW, 0)
    lead, shift = clock.lead_for(2 * chunk, chunk, NOW + 2 * TICK)
    assert shift == 2 * CHUNK
    clock.pushed(chunk, NOW + 2 * TICK, (lead + 2 * chunk) % FRAME, shift)  # its first push
    # Another stream, on the clock's own tick phase: no shift, its frames end on the clock's.
    lead, shift = clock.lead_for(chunk, chunk, NOW + 4 * TICK)
    assert shift == 0 and (lead + chunk) % FRAME == 4 * CHUNK


def test_the_first_stream_of_40_ms_chunks_ends_its_frames_with_its_chunks():
    clock = FrameClock(RATE, FRAME)
    lead, shift = clock.lead_for(FRAME + 3 * CHUNK, 4 * CHUNK, NOW)  # kept audio of 110 ms: 1.5 chunks over
    assert shift == 0 and (lead + FRAME + 3 * CHUNK) % (4 * CHUNK) == 0 and lead == CHUNK


def test_10_ms_chunks_get_no_shift():
    clock = FrameClock(RATE, FRAME)
    assert clock.lead_for(3 * CHUNK, CHUNK, NOW) == (0, 0)
    clock.pushed(CHUNK, NOW, 5 * CHUNK)
    lead, shift = clock.lead_for(CHUNK, CHUNK, NOW + 2 * TICK)
    assert shift == 0 and (lead + CHUNK) % FRAME == 7 * CHUNK


def test_40_ms_streams_at_every_tick_phase_step_once_a_frame_when_the_last_chunk_is_in():
    """Four streams of 40 ms chunks at the four tick phases of a chunk, frame ends aligned: each frame
    completes with the chunk that holds its end, 0 to 30 ms after it. The first ready waits for the
    three others (a hold, not a step each)."""
    clock = FrameClock(RATE, FRAME)
    chunk = 4 * CHUNK
    ready = slot(ready=1, chunk=chunk)
    coming = [slot(due_in_ticks=k, chunk=chunk, last_push_ago=(4 - k) * TICK) for k in (1, 2, 3)]
    for s, k in zip(coming, (1, 2, 3)):
        s.buffer.pending = FRAME - chunk + (4 - k) * CHUNK  # its next chunk holds the frame end, k ticks on
    wait = clock.wait_s([ready, *coming], NOW, NOW)
    assert wait is not None and 0 < wait <= HOLD_S
    for k, s in zip((1, 2, 3), coming):
        s.queue, s.last_push_at, s.buffer.pending = [object()], NOW + k * TICK, (4 - k) * CHUNK
        done = clock.wait_s([ready, *coming], NOW + k * TICK, NOW)
        assert (done is None) == (k == 3), k


def test_a_40_ms_stream_a_chunk_behind_the_newest_push_is_not_stalled(clock):
    """Streams of 40 ms chunks push 40 ms apart: one whose last push is 100 ms older than the newest
    is still coming (a frame and some of its chunk spacing: not a stall, with 10 ms chunks it would
    be); 120 ms older, a frame and more than a chunk's spacing, it has stalled."""
    chunk = 4 * CHUNK
    coming = slot(due_in_ticks=1, chunk=chunk, last_push_ago=(STALLED_TICKS + 2) * TICK)
    assert clock.wait_s([slot(ready=1, chunk=chunk), coming], NOW, NOW) is not None
    stalled = slot(due_in_ticks=1, chunk=chunk, last_push_ago=(STALLED_TICKS + 4) * TICK)
    assert FrameClock(RATE, FRAME).wait_s([slot(ready=1, chunk=chunk), stalled], NOW, NOW) is None
