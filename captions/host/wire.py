"""The engine channel's framing: what a receiving process and the engine process say to each other
over one Unix stream socket (captions/host/__init__.py).

A frame is a 4-byte big-endian length (of what follows), a 1-byte kind, then the payload:

* `CONTROL`: one message as compact JSON, an object with an "op" (requests, grants, events, ...).
* `AUDIO`: a push of audio to a stream: a header (`AUDIO_HEADER`: the waiter's id, the time the
  last sample was produced or NaN, flags) then the raw float32 samples. No JSON, no copy beyond
  the socket's.

Nothing is pickled: a frame from a broken or hostile peer can at worst raise `WireError`.

`FrameWriter` is the one writer of a socket: callers enqueue frames (never blocking: the engine's
thread enqueues events) and its thread sends everything queued in one `sendall` per wake-up, so
many 10 ms pushes cost one system call.
"""

from __future__ import annotations

import json
import math
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from captions.stt.api import StreamEvent, Word

CONTROL = 1
AUDIO = 2
LENGTH = struct.Struct(">I")
AUDIO_HEADER = struct.Struct("<IdB")
"""wid (uint32), produced_at (float64; NaN: not given), flags (`AUDIO_SYNC`)."""
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


def audio(wid: int, pcm: np.ndarray, produced_at: float | None, sync: bool = False) -> bytes:
    """An AUDIO frame: `pcm` as float32 samples for the stream of waiter `wid`."""
    samples = np.ascontiguousarray(pcm, dtype=np.float32).tobytes()
    header = AUDIO_HEADER.pack(wid, math.nan if produced_at is None else produced_at, AUDIO_SYNC if sync else 0)
    return LENGTH.pack(len(header) + len(samples) + 1) + bytes((AUDIO,)) + header + samples


def parse_audio(payload: bytes) -> tuple[int, np.ndarray, float | None, bool]:
    """(wid, samples, produced_at or None, sync) of an AUDIO payload."""
    if len(payload) < AUDIO_HEADER.size or (len(payload) - AUDIO_HEADER.size) % 4:
        raise WireError(f"malformed audio frame ({len(payload)} bytes)")
    wid, produced_at, flags = AUDIO_HEADER.unpack_from(payload)
    pcm = np.frombuffer(payload, dtype=np.float32, offset=AUDIO_HEADER.size)
    return wid, pcm, None if math.isnan(produced_at) else produced_at, bool(flags & AUDIO_SYNC)


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
    may be given as a function that makes it: it is then made on the writer's thread (the engine's
    thread only enqueues)."""

    def __init__(self, sock: socket.socket, name: str, on_error: Callable[[BaseException], None] | None = None):
        self._sock = sock
        self._cond = threading.Condition()
        self._frames: list[bytes | Callable[[], bytes]] = []
        self._closed = False
        self._on_error = on_error
        self.writes = 0
        """System calls made (each carries every frame queued at its wake-up)."""
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def send(self, frame: bytes | Callable[[], bytes]) -> bool:
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
                    self._sock.sendall(b"".join(f if isinstance(f, bytes) else f() for f in frames))
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
