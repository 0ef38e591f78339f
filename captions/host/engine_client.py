"""A receiving process's side of the engine channel: the slot queue and engine streams of the engine
process, as local objects (captions/host/).

`RemoteSlotQueue` has the `SlotQueue` API that rooms use (`request`, `cancel`, `should_yield`,
`closing`, `len`, `close`), and `RemoteStream` the `EngineStream` API (`id`, `slot_index`,
`lead_samples`, `push`, `close`, `abort`). Grants and stream events reach the `Waiter`'s callbacks
from this connection's reader thread, as the local queue and engine call them from theirs, so
`slots.loop_waiter`'s hop onto the room's loop works unchanged.

Round trips, all once per turn: `request` (the answer says whether a slot was free, as the local
call returns the stream) and a stream's first push (the engine decides `lead_samples` there, and the
speaker reads it right after the push). Everything else is sent without waiting: pushes, closes,
`long_held`. `should_yield` answers from what the engine process last sent (engine_server.py).
`time.monotonic()` (the `since` of a waiter, a push's `produced_at`) is one clock for every process
of the machine (Linux CLOCK_MONOTONIC), so they cross as they are.

`EngineClient.translation` is the engine process's one translation engine, when it has one
(translation_client.py: translations cross the same connection).

When the connection to the engine process is lost, every open stream ends with an error event (and
every pending translation fails), no request is ever granted, and `on_lost(cause)` is called once: the receiver stops (worker.py's
engine failure).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from captions.host import wire
from captions.host.translation_client import RemoteTranslationEngine
from captions.live.slots import Waiter
from captions.log import logger
from captions.stt.api import StreamEvent

ROUND_TRIP_TIMEOUT_S = 5.0
"""A request or first push not answered in this long goes on without the answer (and says so)."""
ENGINE_GONE = "the engine process is gone"


class RemoteEngine:
    """What the receiving process knows of the engine: its batch size and VAD heads (from the hello),
    and its slots in use (from the status the engine process sends twice a second)."""

    def __init__(self, batch_size: int, has_vad: bool):
        self.batch_size = batch_size
        self.has_vad = has_vad
        self.slots_in_use = 0
        self.waiting = 0
        """Speakers waiting for a slot, across every receiving process."""

    def close(self) -> None:
        pass


@dataclass(eq=False)
class _Request:
    wid: int
    waiter: Waiter
    stream: RemoteStream | None = None
    answered: threading.Event = field(default_factory=threading.Event)
    blocking: bool = True
    """`request` still waits for the answer (else a grant goes to `waiter.on_granted`)."""
    yielding: bool = False
    long_held: bool = False
    """The `long_held` last sent."""
    frames: int = 0
    """The stream's frames so far (its last event's), for the error event if the engine goes."""


class RemoteStream:
    """An engine stream in the engine process (module notes)."""

    def __init__(self, client: EngineClient, wid: int, stream_id: int, slot_index: int):
        self._client, self._wid = client, wid
        self.id = stream_id
        self._slot_index = slot_index
        self.lead_samples = 0
        self._pushed = False
        self._closed = False
        self._ended = False
        self._lead_answer: threading.Event | None = None

    @property
    def slot_index(self) -> int:
        return self._slot_index

    def push(self, pcm: np.ndarray, produced_at: float | None = None) -> None:
        if self._closed or self._ended:
            raise RuntimeError(f"stream {self.id} is closed")
        # A copy: the writer frames it later, and a caller may reuse its buffer (a local push copies too).
        pcm = np.array(pcm, dtype=np.float32).reshape(-1)
        if self._pushed or pcm.size == 0:
            self._client._send(wire.AudioPush(self._wid, pcm, produced_at))
            return
        # The first push: the engine decides the leading silence now, and callers read it next.
        self._pushed = True
        self._lead_answer = threading.Event()
        self._client._send(wire.AudioPush(self._wid, pcm, produced_at, sync=True))
        if not self._lead_answer.wait(ROUND_TRIP_TIMEOUT_S) and not self._client.lost:
            logger.warning("engine channel: no lead_samples for stream %d in %.0f s (taken as 0)", self.id,
                           ROUND_TRIP_TIMEOUT_S)

    def close(self) -> None:
        if not self._closed and not self._ended:
            self._closed = True
            self._client._send(wire.control({"op": "close", "wid": self._wid}))

    def abort(self) -> None:
        if not self._ended:
            self._closed = True
            self._client._send(wire.control({"op": "abort", "wid": self._wid}))

    def _set_lead(self, lead: int) -> None:
        self.lead_samples = lead
        if self._lead_answer is not None:
            self._lead_answer.set()


class RemoteSlotQueue:
    """The engine process's `SlotQueue`, as the rooms of this process use it (module notes)."""

    def __init__(self, client: EngineClient):
        self._client = client

    def request(self, waiter: Waiter) -> RemoteStream | None:
        """As `SlotQueue.request`: the stream if a slot was free and nobody waited, else None and
        `waiter.on_granted` receives it later."""
        return self._client._request(waiter)

    def cancel(self, waiter: Waiter) -> bool:
        """As `SlotQueue.cancel`; True if the waiter was still waiting as far as this process knows
        (if the engine process granted it meanwhile, the grant still comes to `on_granted`)."""
        return self._client._cancel(waiter)

    def should_yield(self, waiter: Waiter, long_held: bool = False) -> bool:
        """As `SlotQueue.should_yield`, from the engine process's latest answer (no round trip)."""
        return self._client._should_yield(waiter, long_held)

    def closing(self, waiter: Waiter) -> None:
        self._client._send_for(waiter, "closing")

    def __len__(self) -> int:
        return self._client.engine.waiting

    def close(self) -> None:
        self._client.close()


class EngineClient:
    """One receiving process's connection to the engine process at `path`. `engine` and `slots`
    stand for the engine process's; `on_lost(cause)` runs once (reader or writer thread) if the
    connection ends before `close`."""

    def __init__(self, path: str, index: int = 0, on_lost: Callable[[str], None] | None = None,
                 connect_timeout: float = 10.0):
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(connect_timeout)
        self._sock.connect(path)
        self._frames = wire.read_frames(self._sock)
        kind, hello = next(self._frames)
        if kind != wire.CONTROL or hello.get("op") != "hello":
            raise wire.WireError(f"expected the engine's hello, got {hello!r}")
        self._sock.settimeout(None)
        self.engine = RemoteEngine(int(hello["batch_size"]), bool(hello["has_vad"]))
        self.slots = RemoteSlotQueue(self)
        self._on_lost = on_lost
        self._lock = threading.Lock()
        self._by_wid: dict[int, _Request] = {}
        self._by_waiter: dict[Waiter, _Request] = {}
        self._wids = itertools.count(1)
        self.lost: str | None = None
        """Why the connection ended (None while it serves)."""
        self._closing = False
        self.metrics_source: Callable[[], list] | None = None
        """This process's metrics (captions/host/metrics.py's `snapshot`), reported once more on `close`."""
        self._metrics_lock = threading.Lock()
        self._metrics_final = False
        """The last report is sent: a periodic one still on its way (an older snapshot) must not follow it."""
        self._writer = wire.FrameWriter(self._sock, "engine-client-writer",
                                        on_error=lambda e: self._lose(f"{ENGINE_GONE} ({e})"))
        translation = hello.get("translation")
        self.translation: RemoteTranslationEngine | None = None
        """The engine process's translation engine (translation_client.py); None: it has none."""
        if translation is not None:
            available = translation.get("available")
            self.translation = RemoteTranslationEngine(self._writer.send,
                                                       None if available is None else tuple(available))
        self._send(wire.control({"op": "hello", "index": index, "pid": os.getpid()}))
        self._reader = threading.Thread(target=self._read_forever, name="engine-client-reader", daemon=True)
        self._reader.start()

    @property
    def writes(self) -> int:
        """Socket writes so far (each carries every frame queued when the writer woke)."""
        return self._writer.writes

    def report_ready(self, missing: list[str]) -> None:
        """Tells the engine process what keeps this receiver from being ready (its /readyz)."""
        self._send(wire.control({"op": "ready", "missing": missing}))

    def report_metrics(self, families: list) -> None:
        """Sends this process's metrics to the engine process, which serves them (captions/host/metrics.py)."""
        with self._metrics_lock:
            if not self._metrics_final:
                self._send(wire.control({"op": "metrics", "families": families}))

    def close(self) -> None:
        """Ends the connection (the engine process frees what is still held), after a last metrics
        report: what the rooms counted while they closed is kept."""
        if self.metrics_source is not None and self.lost is None and not self._closing:
            with self._metrics_lock:
                try:
                    self._send(wire.control({"op": "metrics", "families": self.metrics_source()}))
                except Exception:  # noqa: BLE001 - a last report is not worth a failed stop
                    logger.exception("engine channel: the last metrics report failed")
                self._metrics_final = True
        self._closing = True
        if self.translation is not None:
            self.translation.close()
        self._writer.close()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._reader.join(timeout=2)
        self._sock.close()

    # ---- for RemoteSlotQueue and RemoteStream ---------------------------------------------------

    def _send(self, frame: bytes | wire.AudioPush) -> None:
        self._writer.send(frame)  # dropped once the connection is lost: nothing is served any more

    def _send_for(self, waiter: Waiter, op: str) -> None:
        request = self._by_waiter.get(waiter)
        if request is not None:
            self._send(wire.control({"op": op, "wid": request.wid}))

    def _request(self, waiter: Waiter) -> RemoteStream | None:
        if self.lost is not None:
            return None  # never granted: this receiver is stopping
        request = _Request(next(self._wids), waiter)
        with self._lock:
            self._by_wid[request.wid] = request
            self._by_waiter[waiter] = request
        self._send(wire.control({"op": "request", "wid": request.wid, "label": waiter.label, "room": waiter.room,
                                 "since": waiter.since, "live_chunk": waiter.live_chunk}))
        answered = request.answered.wait(ROUND_TRIP_TIMEOUT_S)
        with self._lock:
            request.blocking = False
            stream = request.stream
        if not answered and self.lost is None:
            logger.warning("engine channel: no answer to %s's request in %.0f s: it waits", waiter.label,
                           ROUND_TRIP_TIMEOUT_S)
        return stream

    def _cancel(self, waiter: Waiter) -> bool:
        with self._lock:
            request = self._by_waiter.get(waiter)
            if request is None or request.stream is not None:
                return False
            self._forget(request)
        self._send(wire.control({"op": "cancel", "wid": request.wid}))
        return True

    def _should_yield(self, waiter: Waiter, long_held: bool) -> bool:
        request = self._by_waiter.get(waiter)
        if request is None or request.stream is None:
            return False
        if long_held != request.long_held:
            request.long_held = long_held
            self._send(wire.control({"op": "long_held", "wid": request.wid, "v": long_held}))
        return request.yielding

    def _forget(self, request: _Request) -> None:
        """Under the lock."""
        self._by_wid.pop(request.wid, None)
        if self._by_waiter.get(request.waiter) is request:
            del self._by_waiter[request.waiter]

    # ---- the reader thread ----------------------------------------------------------------------

    def _read_forever(self) -> None:
        why = "the engine process closed the connection"
        try:
            for kind, message in self._frames:
                if kind == wire.CONTROL:
                    self._handle(message)
        except (OSError, wire.WireError) as e:
            why = f"the connection failed: {e}"
        except Exception as e:  # noqa: BLE001 - any bug here ends the channel visibly
            logger.exception("engine channel: a message from the engine process failed")
            why = f"{type(e).__name__}: {e}"
        self._lose(f"{ENGINE_GONE} ({why})")

    def _handle(self, message: dict) -> None:
        op = message["op"]
        if op == "events":
            for wid, fields in message["e"]:
                self._event(wid, wire.event_from_wire(fields))
        elif op == "yield":
            request = self._by_wid.get(message["wid"])
            if request is not None:
                request.yielding = bool(message["v"])
        elif op == "status":
            self.engine.slots_in_use, self.engine.waiting = int(message["slots_in_use"]), int(message["waiting"])
        elif op in ("requested", "granted"):
            self._granted(message["wid"], message["stream"])
        elif op == "pushed":
            request = self._by_wid.get(message["wid"])
            if request is not None and request.stream is not None:
                request.stream._set_lead(int(message["lead"]))
        elif op == "translated" and self.translation is not None:
            self.translation.on_result(message)
        elif op == "engine_failed":
            self._lose(str(message.get("cause", "?")), failed=True)
        else:
            logger.warning("engine channel: unknown message %r", op)

    def _granted(self, wid: int, described: list[int] | None) -> None:
        with self._lock:
            request = self._by_wid.get(wid)
            if described is None:  # "requested": it waits
                if request is not None:
                    request.answered.set()
                return
            stream_id, slot_index = described
            stream = RemoteStream(self, wid, stream_id, slot_index)
            if request is None:  # cancelled meanwhile: as SlotQueue's on_granted refused, the slot is freed
                self._send(wire.control({"op": "abort", "wid": wid}))
                return
            request.stream = stream
            request.answered.set()
            if request.blocking:
                return  # `request` returns it
        try:
            request.waiter.on_granted(stream)
        except Exception:  # noqa: BLE001 - whatever went wrong, the slot must not leak
            logger.exception("engine channel: %s could not take its stream; freeing it", request.waiter.label)
            stream.abort()

    def _event(self, wid: int, event: StreamEvent) -> None:
        request = self._by_wid.get(wid)
        if request is None:
            return
        request.frames = event.frames
        if event.ended:
            with self._lock:
                self._forget(request)
            if request.stream is not None:
                request.stream._ended = True
        request.waiter.on_event(event)

    def _lose(self, cause: str, failed: bool = False) -> None:
        """The channel ended: `cause` is why (`failed`: the engine process's engine failed, and
        `cause` is the engine's own reason, as a local engine's failure reads)."""
        with self._lock:
            if self.lost is not None:
                return
            self.lost = cause
            requests = list(self._by_wid.values())
            self._by_wid.clear()
            self._by_waiter.clear()
        self._writer.close(timeout=0)
        if self.translation is not None:
            self.translation.lose(cause)
        for request in requests:
            request.answered.set()
            stream = request.stream
            if stream is None:
                continue  # never granted now
            stream._ended = True
            stream._set_lead(stream.lead_samples)
            with contextlib.suppress(Exception):
                request.waiter.on_event(StreamEvent(stream.id, request.frames, [], "", None, ended=True,
                                                    error=f"engine failed: {cause}" if failed else cause))
        if self._closing:
            return
        logger.error("engine channel: %s%s: this receiving process stops", "the engine failed: " if failed else "",
                     cause)
        if self._on_lost is not None:
            self._on_lost(cause)
