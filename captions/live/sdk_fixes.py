"""Our fixes for the livekit SDKs (livekit 1.1.21, pinned by livekit-agents 1.8.9), in one place.

Everything the native library reports reaches Python as one stream of events, which `FfiQueue`
hands to every subscriber whose filter accepts it. The fixes reach into that private layer; they
are here, in one place, so that an SDK upgrade is checked in one place (tests/test_lkffi.py and
tests/test_sdk_fixes.py fail when they stop applying).

Audio, the bulk of those events (every microphone, every 10 or 80 ms), takes a shorter way
(`_AudioRouter`, issue 24): an audio event goes straight to its own stream, found by its handle in
a dict, instead of through every subscriber's filter (O(streams) Python calls per event, O(N^2) per
tick); the events that reach one event loop together are handed over in one wake-up of that loop
(WebRTC delivers every track's audio on the same 10 ms tick); and `audio_chunks` takes the samples
out of the event right there, instead of through the SDK stream's own task and queue. Where the
router cannot be installed (an SDK whose private layer differs), each stream falls back to a
subscription filter narrowed to its own handle, and says so once. `CAPTIONS_HOST_PATH=today`
keeps that fallback on purpose: `captions bench host` measures both side by side.

Captions (`send_text_as`): the SDK's `send_text` sends a whole text stream in one request, which
livekit-ffi sends as one data packet to recipients whose client supports it (header, chunk and
trailer otherwise), where `stream_text` takes three requests and three packets; but it names the
local participant as the sender, and a caption names the speaker.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable

import numpy as np
from livekit import rtc
from livekit.rtc._ffi_client import FfiClient
from livekit.rtc._proto import ffi_pb2

from captions.log import logger

HOST_PATH_ENV = "CAPTIONS_HOST_PATH"
"""`today`: the host path as it was before issue 24's changes (the benchmark's baseline)."""
ROUTED_SDK_VERSIONS = ("1.1.21",)
"""livekit rtc versions whose private FfiQueue and AudioStream layout the router was checked against
(pyproject allows any 1.1.x: another falls back to the SDK's own path, with a warning)."""


def todays_host_path() -> bool:
    """Whether CAPTIONS_HOST_PATH=today asks for the host path without issue 24's changes."""
    return os.environ.get(HOST_PATH_ENV, "").strip().lower() == "today"


def start_livekit_runtime() -> None:
    """Creates the process's livekit FFI client now, before any job thread can. Its lazy singleton
    has no lock: two rooms dispatched at once to a fresh worker each created one, the second
    replaced the first as `FfiClient.instance` (whose queue receives every native event), and the
    room that had subscribed to the first client's queue never saw its connect answer (livekit
    1.1.21; a room left uncaptioned)."""
    FfiClient.instance  # noqa: B018 - the access creates it


def open_audio_stream(track: rtc.Track, *, sample_rate: int, frame_size_ms: int) -> rtc.AudioStream:
    """`rtc.AudioStream.from_track`, woken only by its own track's audio.

    livekit 1.1.21 subscribes every AudioStream to every stream's audio events and drops the others'
    in Python, one event-loop wake-up each: with N speakers in the process, each 10 ms chunk is
    handled N times, and at a few dozen speakers the process falls behind real time (`captions
    bench ingest`, figures in the README). livekit 1.2 filters by stream handle itself, but
    livekit-agents 1.8.9 pins 1.1.21. Here the stream's audio comes through the router (module
    notes: by handle, one loop wake-up per tick), or, where there is none (or with
    CAPTIONS_HOST_PATH=today), through its subscription narrowed to its own handle (still one
    filter call per subscriber and event, on the FFI's thread)."""
    stream = rtc.AudioStream.from_track(track=track, sample_rate=sample_rate, num_channels=1,
                                        frame_size_ms=frame_size_ms)
    router = None if todays_host_path() else audio_router()
    if router is not None and router.route(stream):
        return stream
    if not _narrow_to_own_events(stream):
        logger.warning("livekit %s: could not narrow an audio stream to its own events; every "
                       "speaker's audio wakes every stream (see captions/live/sdk_fixes.py)", rtc.__version__)
    return stream


def _narrow_to_own_events(stream: rtc.AudioStream) -> bool:
    """Replaces the stream's FFI subscription filter with one that also checks the stream handle.
    Events of this stream already queued stay; only other streams' events are kept out."""
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


async def audio_chunks(track: rtc.Track, *, sample_rate: int, frame_size_ms: int) -> AsyncIterator[np.ndarray]:
    """The track's audio as int16 mono chunks of `frame_size_ms`, until the track ends: through
    the router, each chunk is taken out of its event on the loop's one wake-up for the tick (no
    task of the SDK's stream in between); otherwise (no router, or CAPTIONS_HOST_PATH=today)
    from `open_audio_stream`."""
    stream = rtc.AudioStream.from_track(track=track, sample_rate=sample_rate, num_channels=1,
                                        frame_size_ms=frame_size_ms)
    router = None if todays_host_path() else audio_router()
    direct = _DirectFrames(stream)
    try:
        if router is not None and router.route(stream, direct.handle):
            while (pcm := await direct.next()) is not None:
                yield pcm
        else:
            if router is None and not todays_host_path():
                _warn_unrouted()
            if not _narrow_to_own_events(stream):
                logger.warning("livekit %s: could not narrow an audio stream to its own events",
                               rtc.__version__)
            async for event in stream:
                yield np.frombuffer(event.frame.data, dtype=np.int16)
    finally:
        # Unsubscribed whatever happens to aclose: a room's loop torn down with its tasks cancelled
        # (livekit-agents ends a job so) would otherwise leave the route, and with it the stream.
        try:
            await stream.aclose()
        finally:
            FfiClient.instance.queue.unsubscribe(stream._ffi_queue)


_warned: list[bool] = []


def _warn_unrouted() -> None:
    if not _warned:
        _warned.append(True)
        logger.warning("livekit %s: audio events go through the SDK's own dispatch (captions/live/"
                       "sdk_fixes.py could not route them by stream); receiving audio costs more CPU",
                       rtc.__version__)


class _DirectFrames:
    """One stream's audio samples, taken out of its events by the router's hand-over (on the
    stream's loop); the end of the stream is passed on to the SDK's own task, which then ends.

    Audio that reached the SDK's stream before the route was taken (created, then routed: a chunk
    can come in between) is taken from the SDK's queues first, so that nothing is lost or reordered."""

    def __init__(self, stream: rtc.AudioStream):
        self._stream = stream
        self._chunks: deque[np.ndarray] = deque()
        self._ended = False
        self._routed_yet = False
        self._waiter: asyncio.Future | None = None

    def handle(self, event) -> None:
        if not self._routed_yet:
            self._take_early()
            self._routed_yet = True
        self._take(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _take(self, event) -> None:
        audio_event = event.audio_stream_event
        if audio_event.HasField("frame_received"):
            self._chunks.append(_owned_samples(audio_event.frame_received.frame))
        else:  # eos (or anything new): the SDK's stream handles it, and ends on eos
            self._ended = self._ended or audio_event.HasField("eos")
            self._stream._ffi_queue.put_nowait(event)

    def _take_early(self) -> None:
        ring = self._stream._queue._queue  # frames the SDK's task converted already: the oldest
        while ring:
            item = ring.popleft()
            if item is None:
                self._ended = True
            else:
                self._chunks.append(np.frombuffer(item.frame.data, dtype=np.int16))
        queue = self._stream._ffi_queue  # events its task has not taken yet
        early = []
        while not queue.empty():
            early.append(queue.get_nowait())
            queue.task_done()
        for event in early:
            if event.WhichOneof("message") == "audio_stream_event":
                self._take(event)

    async def next(self) -> np.ndarray | None:
        while not self._chunks:
            if not self._routed_yet:
                self._take_early()
                if self._chunks:
                    break
            if self._ended:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._chunks.popleft()


def _owned_samples(owned) -> np.ndarray:
    """The int16 samples of an owned native frame buffer, copied, and the buffer released: what
    `rtc.AudioFrame._from_owned_info` does, without an AudioFrame and a tracked FfiHandle per chunk
    (the SDK's weak set of live handles, and a finaliser, for a handle released at once)."""
    info = owned.info
    size = info.num_channels * info.samples_per_channel
    pcm = np.empty(size, dtype=np.int16)
    ctypes.memmove(pcm.ctypes.data, info.data_ptr, 2 * size)
    ffi = FfiClient._instance
    if ffi is not None and ffi._pid == os.getpid() and not FfiClient._ffi_disposed:
        ffi._ffi_lib.livekit_ffi_drop_handle(owned.handle.id)
    return pcm


class _AudioRouter:
    """Installed once on the process's FfiQueue (module notes): audio events of routed streams go
    to their own stream by handle, batched per event loop; every other event goes through the
    queue's own `put`, to the subscribers still in its list (rooms, unrouted streams)."""

    def __init__(self, ffi_queue) -> None:
        self._lock = ffi_queue._lock
        self._subscribers = ffi_queue._subscribers
        self._put_to_subscribers = ffi_queue.put
        self._unsubscribe_from_queue = ffi_queue.unsubscribe
        self._routes: dict[int, tuple[asyncio.AbstractEventLoop, object, Callable | None]] = {}
        """stream handle -> (its loop, its SDK queue, a handler or None: the queue's put_nowait)."""
        self._handles: dict[int, int] = {}
        """id(SDK queue) -> stream handle, to forget a route when the stream unsubscribes."""
        self._batches: dict[asyncio.AbstractEventLoop, list] = {}
        self._batch_lock = threading.Lock()
        ffi_queue.put = self.put
        ffi_queue.unsubscribe = self.unsubscribe

    def route(self, stream: rtc.AudioStream, handler: Callable | None = None) -> bool:
        """Takes the stream's subscription out of the queue's list: from now on its audio events
        come by handle (to `handler(event)` on its loop, or to its own queue). Events already handed
        to its queue stay there, and come first."""
        try:
            handle, own_queue = stream._ffi_handle.handle, stream._ffi_queue
        except AttributeError:
            return False
        with self._lock:
            for index, (queue, loop, _) in enumerate(self._subscribers):
                if queue is own_queue:
                    del self._subscribers[index]
                    self._routes[handle] = (loop, queue, handler)
                    self._handles[id(queue)] = handle
                    return True
        return False

    def unsubscribe(self, queue) -> None:
        with self._lock:
            handle = self._handles.pop(id(queue), None)
            if handle is not None:
                self._routes.pop(handle, None)
            self._unsubscribe_from_queue(queue)
        with self._batch_lock:  # hand-overs to loops that ended: no drain will ever take them
            for loop in [loop for loop in self._batches if loop.is_closed()]:
                del self._batches[loop]

    def put(self, event) -> None:
        """On the FFI's thread, for every event."""
        with self._lock:  # a route taken meanwhile must not lose the event between the two ways
            if event.WhichOneof("message") == "audio_stream_event":
                route = self._routes.get(event.audio_stream_event.stream_handle)
                if route is not None:
                    self._hand_over(route, event)
                    return
            self._put_to_subscribers(event)

    def _hand_over(self, route, event) -> None:
        loop = route[0]
        if loop.is_closed():  # its streams were never closed (a room's thread ended): nobody reads them
            with self._batch_lock:
                self._batches.pop(loop, None)
            return
        with self._batch_lock:
            batch = self._batches.get(loop)
            first = batch is None
            if first:
                batch = self._batches[loop] = []
            batch.append((route, event))
        if first:
            try:
                loop.call_soon_threadsafe(self._drain, loop)
            except RuntimeError:  # the loop is closed: nobody reads these streams any more
                with self._batch_lock:
                    self._batches.pop(loop, None)

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the streams' loop: every event that came for it since the last drain, in order."""
        with self._batch_lock:
            batch = self._batches.pop(loop, [])
        for (_, queue, handler), event in batch:
            try:
                if handler is None:
                    queue.put_nowait(event)
                else:
                    handler(event)
            except Exception:  # noqa: BLE001 - one stream's failure must not starve the others
                logger.exception("audio event hand-over failed")


_router_lock = threading.Lock()


def audio_router() -> _AudioRouter | None:
    """The router on this process's FfiQueue, installed on first use; None where this SDK's
    private layer is not the one it was written for (the callers fall back, module notes)."""
    from livekit.rtc._ffi_client import FfiQueue

    ffi_queue = FfiClient.instance.queue
    router = getattr(ffi_queue, "_captions_router", None)
    if router is not None:
        return router
    if not rtc.__version__.startswith(ROUTED_SDK_VERSIONS) or not isinstance(ffi_queue, FfiQueue) or not all(
            hasattr(ffi_queue, name) for name in ("_lock", "_subscribers", "put", "unsubscribe")) or not all(
            hasattr(FfiClient, name) for name in ("_instance", "_ffi_disposed")) or not hasattr(
            FfiClient.instance, "_ffi_lib"):
        return None
    with _router_lock:
        router = getattr(ffi_queue, "_captions_router", None)
        if router is None:
            router = _AudioRouter(ffi_queue)
            ffi_queue._captions_router = router
    return router


def worker_connected(server) -> bool:
    """Whether the livekit-agents worker is registered over a live connection now. livekit-agents
    1.8.9 reconnects by itself after a lost connection and says so only in private state: False
    while it connects (at start and after a loss), and once it gave up."""
    return not getattr(server, "_connecting", True) and not getattr(server, "_connection_failed", False)


async def send_text_as(participant: rtc.LocalParticipant, text: str, *, topic: str, sender_identity: str,
                       attributes: dict[str, str]) -> None:
    """`participant.send_text(...)` in `sender_identity`'s name (module notes); raises
    `rtc.StreamError` with livekit-ffi's reason when the stream could not be sent."""
    request = ffi_pb2.FfiRequest()
    request.send_text.local_participant_handle = participant._ffi_handle.handle
    request.send_text.text = text
    options = request.send_text.options
    options.topic = topic
    options.attributes.update(attributes)
    options.sender_identity = sender_identity
    options.compress = True
    queue = FfiClient.instance.queue.subscribe(filter_fn=lambda e: e.WhichOneof("message") == "send_text")
    try:
        response = FfiClient.instance.request(request)
        event = await queue.wait_for(lambda e: e.send_text.async_id == response.send_text.async_id)
    finally:
        FfiClient.instance.queue.unsubscribe(queue)
    if event.send_text.HasField("error"):
        raise rtc.StreamError(event.send_text.error.description)
