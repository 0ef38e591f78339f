"""Review of the frame clock's hold (captions/stt/frame_clock.py; found in commit 72d4609, fixed after).

The hold waits for the group due next; when that group's frames start to arrive, the gather must
still apply (it was anchored at the hold's start, long past), or the hold's count (`coming due >=
ready`) flips once about half the group has arrived and the rest of the group steps on its own
right after: no step saved, and the held stream still pays its wait. Pushes arrive one by one in
the caption worker (one push per speaker) and one receiving process at a time in the engine
process. And a stream one tick after its group must step with it whatever the sub-ms jitter."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from captions.stt.engine import SttEngine
from captions.stt.frame_clock import SEVERAL_PHASES_GATHER_WAIT_S, FrameClock
from tests.engine_drive import FRAME, TICK_SAMPLES, Collector, wait_settled

RATE, CHUNK = 24000, TICK_SAMPLES
TICK = CHUNK / RATE
NOW = 100.0


def arrived(at: float):
    """A live stream whose push at `at` completed a frame (queued, not stepped yet)."""
    return SimpleNamespace(stream=object(), queue=[object()], closing=False, last_chunk=CHUNK,
                           last_push_at=at, buffer=SimpleNamespace(pending=0))


def due(push_at: float):
    """A live stream whose next push, expected at `push_at`, completes its frame."""
    return SimpleNamespace(stream=object(), queue=[], closing=False, last_chunk=CHUNK,
                           last_push_at=push_at - TICK, buffer=SimpleNamespace(pending=FRAME - CHUNK))


def test_a_hold_released_by_its_group_waits_for_the_rest_of_that_group():
    """A held frame (since NOW) waits for a group of 4 due 40 ms later. Two of the group's pushes
    have come in, the other two are due on this same tick (within a ms, as one process's pushes
    come): the step must wait for them, as a step that began now would (the gather)."""
    clock = FrameClock(RATE, FRAME)
    tick_at = NOW + 4 * TICK
    held = arrived(NOW)
    slots = [held, arrived(tick_at), arrived(tick_at), due(tick_at), due(tick_at)]
    now = tick_at + 0.0005
    # The same slots, with no hold under way: the gather waits for the two due.
    assert clock.wait_s(slots[1:], now, tick_at) is not None
    assert clock.wait_s(slots, now, NOW) is not None, \
        "stepped the held frame with half its group; the other half steps alone right after"


def test_a_hold_released_by_one_receiving_process_waits_for_the_other_processs_phase():
    """The engine process: the group's pushes come from two receiving processes 5 ms apart (one
    push_many each); the 8 ms gather exists for exactly this. A held frame must not make the step
    leave the later process's half of the group behind."""
    clock = FrameClock(RATE, FRAME)
    clock.gather_wait_s = SEVERAL_PHASES_GATHER_WAIT_S
    tick_at = NOW + 5 * TICK
    slots = [arrived(NOW), arrived(tick_at), arrived(tick_at), due(tick_at + 0.005), due(tick_at + 0.005)]
    assert clock.wait_s(slots[1:], tick_at, tick_at) is not None  # without a hold: the gather
    assert clock.wait_s(slots, tick_at, NOW) is not None, \
        "stepped the held frame with one process's half of the group; the other half steps alone"


def test_a_stream_ticks_off_steps_with_all_of_its_group_when_pushes_come_one_by_one(tiny_checkpoint, monkeypatch):
    """tests/test_engine_phases.py's held stream, with each stream's push taken on its own (the
    caption worker pushes per speaker; the engine thread runs between pushes). After the leads
    settle, every step should carry all four streams (what the hold is for); before the fix they
    carried 3 and 2: two steps per 80 ms, as without the hold, and the off stream still waited."""
    clock = [1000.0]
    monkeypatch.setattr("captions.stt.engine._now", lambda: clock[0])
    engine = SttEngine.load(str(tiny_checkpoint), device="cpu", batch_size=4)
    engine.start()
    noise = np.random.default_rng(5).normal(0, 0.05, 64 * TICK_SAMPLES).astype(np.float32)
    actives: list[int] = []
    try:
        streams = [engine.open_stream(Collector()) for _ in range(4)]
        wait_settled(engine)  # the prefix silence, out of the clock
        for tick in range(64):
            clock[0] = 1000.0 + 0.01 * tick
            if tick == 24:  # every lead settled, a couple of frames in
                engine.step_listeners.append(lambda timings: actives.append(timings.active))
            for i, stream in enumerate(streams):
                # The off stream's first push: its audio said to be produced 3 ticks early.
                produced = clock[0] - (0.03 if i == 3 and tick == 0 else 0.0)
                stream.push(noise[tick * TICK_SAMPLES:(tick + 1) * TICK_SAMPLES], produced_at=produced)
                wait_settled(engine)
        assert streams[3].lead_samples != streams[0].lead_samples
        for stream in streams:
            stream.abort()
        wait_settled(engine)
    finally:
        engine.close()
    assert actives and all(active == 4 for active in actives), f"steps carried {actives}"


@pytest.mark.parametrize("group_after_ms", [0.5, -0.5])
def test_a_stream_one_tick_behind_its_group_steps_with_it_every_frame_whatever_the_sub_ms_jitter(group_after_ms):
    """The likeliest mis-estimated lead is one tick late: its frame completes 10 ms after the
    group's. With the first hold, sub-ms jitter decided whether it was held (the group's pushes 0.5
    ms after the off stream's, or before). Now the clock picks the phase that costs the least total
    waiting, whatever the jitter: the three wait 10 ms for the one rather than the one 70 ms for the
    three. So the one steps when it is ready, and at the group's next frame the group waits for it:
    one step a frame."""
    clock = FrameClock(RATE, FRAME)
    group_pushed = NOW + group_after_ms / 1000
    group = [SimpleNamespace(stream=object(), queue=[], closing=False, last_chunk=CHUNK, last_push_at=group_pushed,
                             buffer=SimpleNamespace(pending=FRAME - 7 * CHUNK)) for _ in range(3)]
    assert clock.wait_s([arrived(NOW), *group], NOW, NOW) is None, "the one waits 70 ms for the three"
    later = NOW + 7 * TICK  # the group's frames complete; the one's is due a tick on
    late_one = SimpleNamespace(stream=object(), queue=[], closing=False, last_chunk=CHUNK, last_push_at=later,
                               buffer=SimpleNamespace(pending=FRAME - CHUNK))
    wait = clock.wait_s([*(arrived(later + group_after_ms / 1000) for _ in range(3)), late_one], later, later)
    assert wait is not None, "the group steps without the one: two steps a frame"
