"""The engine-stream client (captions/live/stream_client.py) that the caption worker's speakers and the
Agents STT share: a slot that comes while its requester has given up is not leaked, events reach the
caller's loop with the frames counted, a waiting client's audio is bounded, and the frame clock's
arithmetic (lead, whole frames, remainder) matches what the engine steps."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from captions.live.slots import SlotQueue
from captions.live.stream_client import KeptAudioBound, StreamClient
from captions.stt.api import FRAME_SIZE, SAMPLE_RATE
from tests.fake_engine import FakeEngine, silence, tone


async def until(condition, what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_a_free_slot_is_granted_at_once_and_its_events_reach_the_loop_with_the_frames_counted():
    engine = FakeEngine(batch_size=1)
    slots = SlotQueue(engine)
    try:
        granted, events = [], []
        client = StreamClient(slots, "room/a", events.append, on_granted=granted.append)
        assert client.request() is True and granted == [client.stream]
        client.push(np.concatenate([tone(0.4), silence(0.4)]))
        assert client.whole_frames == 10 and client.frame_remainder == 0
        client.release()  # flushed: the word comes out, then the end
        await until(lambda: client.ended, "the stream's end on the loop")
        assert [w.text for e in events for w in e.words] == ["w5"]
        assert client.frames == events[-1].frames and client.error is None and client.stepped_all
        assert engine.slots_in_use == 0
    finally:
        slots.close()


async def test_a_waiting_client_is_granted_when_a_slot_frees_and_one_that_gave_up_is_never_granted():
    engine = FakeEngine(batch_size=1)
    slots = SlotQueue(engine, poll_s=0.05)
    try:
        holder = StreamClient(slots, "room/holder", lambda e: None)
        assert holder.request()
        gave_up = StreamClient(slots, "room/gave-up", lambda e: None, since=time.monotonic() - 2)
        waiting = StreamClient(slots, "room/waiting", lambda e: None)
        assert not gave_up.request() and not waiting.request()
        assert slots.waiting() == ["room/gave-up", "room/waiting"]
        gave_up.release()  # leaves the line before its turn
        assert slots.waiting() == ["room/waiting"]
        holder.release()
        stream = await waiting.wait(5)
        assert waiting.stream is stream and gave_up.stream is None
    finally:
        slots.close()


async def test_a_grant_that_arrives_after_the_client_gave_up_frees_its_slot():
    """The queue granted the slot (its dispatcher thread) just as the requester gave up: the hop
    lands on a released client, which aborts the stream instead of holding the slot for nobody."""
    engine = FakeEngine(batch_size=1)
    slots = SlotQueue(engine)
    try:
        events = []
        client = StreamClient(slots, "room/late", events.append)
        stream = engine.open_stream(client._waiter.on_event)  # granted behind the client's back
        client.release()  # not in line any more: nothing to cancel
        client._waiter.on_granted(stream)  # the grant's hop, as the dispatcher makes it
        await until(lambda: client.ended, "the aborted stream's end")
        assert engine.slots_in_use == 0 and client.stream is None
    finally:
        slots.close()


def test_the_kept_audio_bound_asks_for_exactly_the_excess_and_counts_it():
    bound = KeptAudioBound("room/a", max_wait_s=1.0)
    assert bound.excess(SAMPLE_RATE) == 0
    assert bound.excess(SAMPLE_RATE + 480) == 480
    assert bound.excess(SAMPLE_RATE + 24) == 24
    assert bound.dropped == 504


async def test_the_frame_clock_counts_the_lead_the_engine_put_before_the_first_sample():
    engine = FakeEngine(batch_size=1)
    slots = SlotQueue(engine)
    try:
        client = StreamClient(slots, "room/a", lambda e: None)
        client.request()
        client.stream.lead_samples = 720  # as a real engine decides at the first push
        client.push(np.zeros(3 * FRAME_SIZE, dtype=np.float32))
        assert client.whole_frames == 3 and client.frame_remainder == 720
        client.push(np.zeros(FRAME_SIZE - 720, dtype=np.float32))
        assert client.whole_frames == 4 and client.frame_remainder == 0
        client.release(flush=False)
    finally:
        slots.close()
