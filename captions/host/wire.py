"""The engine channel's framing: what a receiving process and the engine process say to each other
over one Unix stream socket (captions/host/__init__.py).

A frame is a 4-byte big-endian length (of what follows), a 1-byte kind, then the payload:

* `CONTROL`: one message as compact JSON, an object with an "op" (requests, grants, events, ...).
* `AUDIO`: a batch of pushes, to one stream or many: a count (uint32), an entry per push
  (`AUDIO_ENTRY`: the waiter's id, the time its last sample was produced or NaN, its sample count,
  flags), then every push's raw float32 samples, in the entries' order. No JSON; the engine
  process takes a whole batch under one lock (`Engine.push_many`), because per-push work was most
  of its side of the channel (docs/benchmarks/wire.md).

Nothing is pickled: a frame from a broken or hostile peer can at worst raise `WireError`.

`FrameWriter` is the one writer of a socket: callers enqueue frames (never blocking: the engine's
thread enqueues events) and pushes (`AudioPush`), and its thread sends everything queued in one
`sendall` per wake-up, the pushes queued one after another as one `AUDIO` frame: every room's 10 ms
pushes of a tick cost one system call and one frame.
"""

from __future__ import annotations

import json
import math
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from captions.stt.api import StreamEvent, Word

CONTROL = 1
AUDIO = 2
LENGTH = struct.Struct(">I")
COUNT = struct.Struct("<I")
AUDIO_ENTRY = np.dtype([("wid", "<u4"), ("produced_at", "<f8"), ("samples", "<u4"), ("flags", "u1")])
"""One push of an `AUDIO` frame: wid, produced_at (NaN: not given), its sample count, flags (`AUDIO_SYNC`)."""
_ENTRY = struct.Struct("<IdIB")
"""`AUDIO_ENTRY`, to pack one entry."""
AUDIO_SYNC = 1
"""The sender waits for a "pushed" reply carrying the stream's `lead_samples` (a stream's first push)."""
MAX_FRAME = 64 * 1024 * 1024
"""A frame longer than this is a broken peer (kept audio is at most minutes: 30 s is 2.9 MB)."""


class WireError(Exception):
    """A malformed frame, or the peer went away."""


def control(message: dict[str, Any]) -> bytes:
    """A CONTROL frame of `message`."""
    payload = json.dumps(message, separators=(",", ":")).encode()
    return LENGTH.pack(len(payload) + 1) + bytes((CONTROL,)) + payload


class AudioPush(NamedTuple):
    """One push of audio to the stream of waiter `wid`, as `FrameWriter` batches it."""

    wid: int
    pcm: np.ndarray
    """float32 samples, owned by the push (the writer frames them later, on its own thread)."""
    produced_at: float | None = None
    sync: bool = False


def audio(pushes: Sequence[AudioPush]) -> bytes:
    """One AUDIO frame carrying `pushes`, in order."""
    return b"".join(_audio_parts(pushes))


def _audio_parts(pushes: Sequence[AudioPush]) -> list:
    """An AUDIO frame as the pieces to join: the samples are not copied before the one join."""
    entries = b"".join([_ENTRY.pack(p.wid, math.nan if p.produced_at is None else p.produced_at, p.pcm.size,
                                    AUDIO_SYNC if p.sync else 0) for p in pushes])
    size = 1 + COUNT.size + len(entries) + 4 * sum(p.pcm.size for p in pushes)
    return [LENGTH.pack(size), bytes((AUDIO,)), COUNT.pack(len(pushes)), entries, *(p.pcm for p in pushes)]


def parse_audio(payload: bytes) -> list[AudioPush]:
    """The pushes of an AUDIO payload (their samples are views of `payload`)."""
    if len(payload) < COUNT.size:
        raise WireError(f"malformed audio frame ({len(payload)} bytes)")
    (count,) = COUNT.unpack_from(payload)
    start = COUNT.size + count * AUDIO_ENTRY.itemsize
    if count == 0 or start > len(payload):
        raise WireError(f"malformed audio frame: {count} pushes in {len(payload)} bytes")
    entries = np.frombuffer(payload, dtype=AUDIO_ENTRY, count=count, offset=COUNT.size)
    if (len(payload) - start) != 4 * int(entries["samples"].sum(dtype=np.int64)):
        raise WireError("malformed audio frame: its samples do not add up to its entries'")
    if np.isinf(entries["produced_at"]).any():  # it would become the engine's frame clock, and fail every first push
        raise WireError("malformed audio frame: an infinite produced_at")
    samples = np.frombuffer(payload, dtype=np.float32, offset=start)
    pushes, offset = [], 0
    for wid, produced_at, size, flags in entries.tolist():
        pushes.append(AudioPush(wid, samples[offset:offset + size], None if math.isnan(produced_at) else produced_at,
                                bool(flags & AUDIO_SYNC)))
        offset += size
    return pushes


def read_frames(sock: socket.socket):
    """Yields (kind, payload) until the peer closes the socket; raises WireError on a bad frame."""
    reader = sock.makefile("rb", buffering=256 * 1024)
    try:
        while True:
            head = reader.read(LENGTH.size)
            if not head:
                return
            if len(head) < LENGTH.size:
                raise WireError("connection closed inside a frame")
            (size,) = LENGTH.unpack(head)
            if not 1 <= size <= MAX_FRAME:
                raise WireError(f"bad frame length {size}")
            body = reader.read(size)
            if len(body) < size:
                raise WireError("connection closed inside a frame")
            kind, payload = body[0], body[1:]
            if kind == CONTROL:
                yield kind, parse_control(payload)
            elif kind == AUDIO:
                yield kind, payload
            else:
                raise WireError(f"unknown frame kind {kind}")
    finally:
        reader.close()


def parse_control(payload: bytes) -> dict[str, Any]:
    try:
        message = json.loads(payload)
    except ValueError as e:
        raise WireError(f"malformed control frame: {e}") from None
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise WireError("a control frame is a JSON object with an op")
    return message


class WireEvent(NamedTuple):
    """A stream event for waiter `wid`, as `FrameWriter` batches it: the events queued one after
    another (a step's, for every slot of this connection) cross as one "events" control message."""

    wid: int
    event: StreamEvent


def event_to_wire(event: StreamEvent) -> list:
    return [event.stream_id, event.frames, [[w.text, w.start, w.end] for w in event.words], event.partial,
            event.pause_prob, event.token, event.ended, event.error, event.step_started, event.step_ended,
            event.lead_samples]


def event_from_wire(fields: list) -> StreamEvent:
    (stream_id, frames, words, partial, pause_prob, token, ended, error, step_started, step_ended,
     lead_samples) = fields
    return StreamEvent(stream_id, frames, [Word(text, start, end) for text, start, end in words], partial,
                       pause_prob, token=token, ended=ended, error=error, step_started=step_started,
                       step_ended=step_ended, lead_samples=lead_samples)


class FrameWriter:
    """The one writer of a socket (module notes). `send` never blocks; `on_error(exc)` runs once,
    on the writer's thread, if a write fails (the peer is gone) or a frame cannot be made. A frame
    may be given as an `AudioPush` or a `WireEvent`: it is then made on the writer's thread (the
    engine's thread only enqueues), the pushes (events) queued one after another into one frame."""

    def __init__(self, sock: socket.socket, name: str, on_error: Callable[[BaseException], None] | None = None):
        self._sock = sock
        self._cond = threading.Condition()
        self._frames: list[bytes | AudioPush | WireEvent] = []
        self._closed = False
        self._on_error = on_error
        self.writes = 0
        """System calls made (each carries every frame queued at its wake-up)."""
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def send(self, frame: bytes | AudioPush | WireEvent) -> bool:
        """Queues `frame`; False once the writer is closed (the frame is dropped)."""
        with self._cond:
            if self._closed:
                return False
            self._frames.append(frame)
            self._cond.notify()
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Sends what is queued (up to `timeout`), then stops the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._frames and not self._closed:
                    self._cond.wait()
                frames, self._frames = self._frames, []
                closed = self._closed
            if frames:
                try:
                    self._sock.sendall(b"".join(_made(frames)))
                    self.writes += 1
                except Exception as e:  # noqa: BLE001 - a frame that cannot be made fails the channel, visibly
                    # The peer gone (OSError), or a frame made on this thread failed: either way the
                    # channel stops here and its owner hears of it, rather than frames piling up unsent.
                    with self._cond:
                        self._closed, self._frames = True, []
                    if self._on_error is not None:
                        self._on_error(e)
                    return
            if closed:
                return


def _made(frames: list):
    """The bytes of `frames`, in order, as pieces to join: each run of pushes as one AUDIO frame, each
    run of events as one "events" control frame; a run that would exceed `MAX_FRAME` (all that was
    queued while a write was blocked) as several, since the peer drops the connection on a longer one."""
    run: list = []
    size = 0
    for frame in frames:
        if run and type(frame) is not type(run[0]):
            yield from _run_parts(run)
            run = []
        if isinstance(frame, AudioPush):
            entry = AUDIO_ENTRY.itemsize + 4 * frame.pcm.size
            if run and 1 + COUNT.size + size + entry > MAX_FRAME:
                yield from _run_parts(run)
                run = []
            size = (size if run else 0) + entry
            run.append(frame)
        elif isinstance(frame, WireEvent):
            run.append(frame)
        else:
            yield frame
    if run:
        yield from _run_parts(run)


def _run_parts(run: list) -> list:
    if isinstance(run[0], AudioPush):
        return _audio_parts(run)
    frame = control({"op": "events", "e": [[item.wid, event_to_wire(item.event)] for item in run]})
    if len(frame) - LENGTH.size > MAX_FRAME and len(run) > 1:  # too many events queued: in halves
        return _run_parts(run[:len(run) // 2]) + _run_parts(run[len(run) // 2:])
    return [frame]
