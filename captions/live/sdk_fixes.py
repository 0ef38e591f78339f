"""Fixes for the livekit Python SDK's FFI layer (livekit 1.1.21, pinned by livekit-agents 1.8.9).

Everything the native library reports reaches Python as one stream of events, which `FfiQueue`
hands to every subscriber whose filter accepts it; the native library owns the rooms themselves.
The fixes work around that layer; they are here, in one place, so that an SDK upgrade is checked
in one place (tests/test_lkffi.py fails when they stop applying, or are no longer needed).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from livekit import rtc

from captions.log import logger


def start_livekit_runtime() -> None:
    """Creates the process's livekit FFI client now, before any job thread can. Its lazy singleton
    has no lock: two rooms dispatched at once to a fresh worker each created one, the native library
    kept the second's event callback, and the first room never saw its connect answer (livekit
    1.1.21; a room left uncaptioned)."""
    from livekit.rtc._ffi_client import FfiClient

    FfiClient.instance  # noqa: B018 - the access creates it


def open_audio_stream(track: rtc.Track, *, sample_rate: int, frame_size_ms: int) -> rtc.AudioStream:
    """`rtc.AudioStream.from_track`, woken only by its own track's audio.

    livekit 1.1.21 subscribes every AudioStream to every stream's audio events and drops the others'
    in Python, one event-loop wake-up each: with N speakers in the process, each 10 ms chunk is
    handled N times, and at a few dozen speakers the process falls behind real time (`captions
    bench ingest`, figures in the README). livekit 1.2 filters by
    stream handle itself, but livekit-agents 1.8.9 pins 1.1.21; this narrows the subscription the
    same way."""
    stream = rtc.AudioStream.from_track(track=track, sample_rate=sample_rate, num_channels=1,
                                        frame_size_ms=frame_size_ms)
    if not _narrow_to_own_events(stream):
        logger.warning("livekit %s: could not narrow an audio stream to its own events; every "
                       "speaker's audio wakes every stream (see captions/live/sdk_fixes.py)", rtc.__version__)
    return stream


def _narrow_to_own_events(stream: rtc.AudioStream) -> bool:
    """Replaces the stream's FFI subscription filter with one that also checks the stream handle.
    Events of this stream already queued stay; only other streams' events are kept out."""
    from livekit.rtc._ffi_client import FfiClient

    try:
        handle = stream._ffi_handle.handle
        own_queue = stream._ffi_queue
        ffi_queue = FfiClient.instance.queue
        lock, subscribers = ffi_queue._lock, ffi_queue._subscribers
    except AttributeError:
        return False

    def own_events(event) -> bool:
        return event.WhichOneof("message") == "audio_stream_event" and event.audio_stream_event.stream_handle == handle

    with lock:
        for index, (queue, loop, _) in enumerate(subscribers):
            if queue is own_queue:
                subscribers[index] = (queue, loop, own_events)
                return True
    return False


def register_rpc_method(room: rtc.Room, method: str,
                        handler: Callable[[rtc.RpcInvocationData], Awaitable[str]]) -> None:
    """`room.local_participant.register_rpc_method`, unregistered when the room ends.

    livekit 1.1.21's native library keeps an RPC handler in the room's own RPC server, and the
    handler holds the room: a cycle that nothing breaks when the room ends (livekit-ffi later made
    the handler hold the room weakly). Every room that registered a method then stayed in native
    memory for the life of the process, its RTC engine included: the worker grew by about 0.5 MB
    per room (`captions bench soak`). Unregistering the method breaks the cycle: before this side
    disconnects (livekit-agents ends a job with `room.disconnect()`), or once the server has ended
    the room."""
    participant = room.local_participant
    participant.register_rpc_method(method, handler)
    disconnect = room.disconnect
    released = False

    def release(*_) -> None:
        nonlocal released
        if released:
            return
        released = True
        room.off("disconnected", release)
        try:
            participant.unregister_rpc_method(method)
        except Exception as e:  # noqa: BLE001 - a failed release costs memory, never the room's shutdown
            logger.warning("could not unregister the RPC method %s of room %s: %s", method, room.name, e)

    async def release_then_disconnect(*args, **kwargs) -> None:
        release()
        await disconnect(*args, **kwargs)

    room.on("disconnected", release)
    room.disconnect = release_then_disconnect
