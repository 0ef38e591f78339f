"""captions/live/sdk_fixes.py's audio router, on the SDK's own FfiQueue with hand-made events (no
server): each audio event reaches its own stream only and in order, whatever thread puts it; other
events still reach the other subscribers; unknown and closed handles are dropped quietly; and where
the router does not apply, the fallback narrows each stream's filter. With a real server:
tests/test_lkffi.py."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest
from livekit import rtc
from livekit.rtc._ffi_client import FfiQueue
from livekit.rtc._proto import ffi_pb2 as proto_ffi

from captions.live import sdk_fixes
from captions.live.sdk_fixes import _AudioRouter, _narrow_to_own_events, todays_host_path


def audio_event(handle: int, seq: int) -> proto_ffi.FfiEvent:
    """An audio-stream event of stream `handle`, numbered `seq` (in its frame's sample count)."""
    event = proto_ffi.FfiEvent()
    event.audio_stream_event.stream_handle = handle
    event.audio_stream_event.frame_received.frame.info.samples_per_channel = seq
    return event


def seq(event: proto_ffi.FfiEvent) -> int:
    return event.audio_stream_event.frame_received.frame.info.samples_per_channel


def room_event() -> proto_ffi.FfiEvent:
    event = proto_ffi.FfiEvent()
    event.room_event.room_handle = 7
    return event


def fake_stream(queue: FfiQueue, handle: int):
    """What the router reads of an rtc.AudioStream: its handle and its subscription, made as the
    SDK's AudioStream makes it (a filter on the event type only)."""
    subscription = queue.subscribe(asyncio.get_running_loop(),
                                   filter_fn=lambda e: e.WhichOneof("message") == "audio_stream_event")
    return SimpleNamespace(_ffi_handle=SimpleNamespace(handle=handle), _ffi_queue=subscription)


def drain(subscription) -> list:
    items = []
    while not subscription.empty():
        items.append(subscription.get_nowait())
    return items


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_each_audio_event_reaches_its_own_stream_only_and_in_order():
    queue = FfiQueue()
    router = _AudioRouter(queue)
    a, b = fake_stream(queue, 11), fake_stream(queue, 22)
    other = queue.subscribe(asyncio.get_running_loop())  # a room: no filter, sees every event it is given
    assert router.route(a) and router.route(b)
    assert len(queue._subscribers) == 1  # only the room is still scanned per event

    def ffi_thread() -> None:  # the FFI's callback thread puts the events, as in the SDK
        for i in range(50):
            queue.put(audio_event(11, i))
            queue.put(audio_event(22, 100 + i))
        queue.put(room_event())

    thread = threading.Thread(target=ffi_thread)
    thread.start()
    thread.join()
    await settle()
    got_a, got_b = drain(a._ffi_queue), drain(b._ffi_queue)
    assert [seq(e) for e in got_a] == list(range(50))
    assert [seq(e) for e in got_b] == list(range(100, 150))
    assert {e.audio_stream_event.stream_handle for e in got_a} == {11}
    assert [e.WhichOneof("message") for e in drain(other)] == ["room_event"]


async def test_events_already_given_to_a_stream_come_before_routed_ones():
    queue = FfiQueue()
    router = _AudioRouter(queue)
    a = fake_stream(queue, 11)
    queue.put(audio_event(11, 0))  # through the SDK's own put, before the route is taken
    router.route(a)
    queue.put(audio_event(11, 1))
    await settle()
    assert [seq(e) for e in drain(a._ffi_queue)] == [0, 1]


async def test_a_handler_gets_the_events_on_the_streams_loop():
    queue = FfiQueue()
    router = _AudioRouter(queue)
    a = fake_stream(queue, 11)
    seen: list[tuple[int, bool]] = []
    loop_thread = threading.get_ident()
    router.route(a, lambda event: seen.append((seq(event), threading.get_ident() == loop_thread)))
    threading.Thread(target=lambda: [queue.put(audio_event(11, i)) for i in range(5)]).start()
    for _ in range(100):
        if len(seen) == 5:
            break
        await asyncio.sleep(0.01)
    assert seen == [(i, True) for i in range(5)]
    assert a._ffi_queue.empty()


async def test_unknown_and_closed_handles_are_dropped_quietly():
    queue = FfiQueue()
    router = _AudioRouter(queue)
    a, b = fake_stream(queue, 11), fake_stream(queue, 22)
    router.route(a)
    router.route(b)
    queue.put(audio_event(99, 0))  # no such stream: nobody gets it, nothing raises
    queue.unsubscribe(a._ffi_queue)  # as the SDK's stream does at its end (eos) or when collected
    queue.put(audio_event(11, 1))
    queue.put(audio_event(22, 2))
    await settle()
    assert drain(a._ffi_queue) == []
    assert [seq(e) for e in drain(b._ffi_queue)] == [2]
    assert 11 not in router._routes and router._routes.keys() == {22}
    queue.unsubscribe(a._ffi_queue)  # twice: no harm


async def test_a_stream_whose_subscription_is_gone_is_not_routed():
    queue = FfiQueue()
    router = _AudioRouter(queue)
    a = fake_stream(queue, 11)
    queue.unsubscribe(a._ffi_queue)
    assert not router.route(a)
    assert not router.route(SimpleNamespace())  # not an AudioStream of this SDK


async def test_a_closed_loop_drops_its_events_and_keeps_the_others_flowing():
    queue = FfiQueue()
    router = _AudioRouter(queue)
    a = fake_stream(queue, 11)
    router.route(a)
    closed = asyncio.new_event_loop()
    closed.close()
    router._routes[33] = (closed, None, None)
    queue.put(audio_event(33, 0))  # must not raise on the FFI's thread
    queue.put(audio_event(11, 1))
    await settle()
    assert [seq(e) for e in drain(a._ffi_queue)] == [1]
    # A loop that closed with a hand-over still pending: its events are not kept piling up.
    closing = asyncio.new_event_loop()
    router._routes[44] = (closing, None, None)
    queue.put(audio_event(44, 0))
    closing.close()
    for i in range(100):
        queue.put(audio_event(44, i))
    assert closing not in router._batches


async def test_the_fallback_narrows_each_streams_filter_to_its_own_handle(monkeypatch):
    queue = FfiQueue()
    monkeypatch.setattr("livekit.rtc._ffi_client.FfiClient.instance", SimpleNamespace(queue=queue), raising=False)
    a, b = fake_stream(queue, 11), fake_stream(queue, 22)
    assert _narrow_to_own_events(a) and _narrow_to_own_events(b)
    queue.put(audio_event(11, 0))
    queue.put(audio_event(22, 1))
    await settle()
    assert [seq(e) for e in drain(a._ffi_queue)] == [0]
    assert [seq(e) for e in drain(b._ffi_queue)] == [1]


async def test_no_router_on_an_sdk_it_was_not_written_for(monkeypatch):
    queue = FfiQueue()
    client = SimpleNamespace(queue=queue, _ffi_lib=object())
    monkeypatch.setattr("livekit.rtc._ffi_client.FfiClient.instance", client, raising=False)
    monkeypatch.setattr(rtc, "__version__", "9.9.9")
    assert sdk_fixes.audio_router() is None
    monkeypatch.setattr(rtc, "__version__", "1.1.21")
    router = sdk_fixes.audio_router()
    assert router is not None and sdk_fixes.audio_router() is router  # installed once
    del client._ffi_lib  # a client of another shape: samples could not be taken out directly
    assert sdk_fixes.audio_router() is router  # (checked before installing only)
    other = FfiQueue()
    monkeypatch.setattr("livekit.rtc._ffi_client.FfiClient.instance", SimpleNamespace(queue=other), raising=False)
    assert sdk_fixes.audio_router() is None


def test_the_sdk_still_scans_every_subscriber_per_event():
    """The reason for the router: when this fails, the SDK dispatches by stream itself (livekit >=
    1.2 filters by handle) and the router may no longer be needed (ROUTED_SDK_VERSIONS)."""
    queue = FfiQueue()
    calls = []
    loop = asyncio.new_event_loop()
    try:
        for handle in (1, 2, 3):
            queue.subscribe(loop, filter_fn=lambda e, h=handle: calls.append(h) or False)
        queue.put(audio_event(1, 0))
    finally:
        loop.close()
    assert calls == [1, 2, 3]


@pytest.mark.parametrize(("value", "today"), [("today", True), ("TODAY ", True), ("new", False), ("", False)])
def test_todays_host_path_switch(monkeypatch, value, today):
    monkeypatch.setenv("CAPTIONS_HOST_PATH", value)
    assert todays_host_path() is today
