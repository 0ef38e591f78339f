"""What callers need of the engine, without importing torch: the audio format, stream events, the
stream and engine interfaces, and the error a full engine raises.

Threads: `Engine.open_stream`'s callback and the slot-freed listeners run on the engine's own thread;
`EngineStream.push`, `close` and `abort` may be called from any thread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

SAMPLE_RATE = 24000
"""Kyutai STT (Mimi) takes 24 kHz mono float32 audio in [-1, 1]."""
FRAME_SIZE = 1920
"""Samples per model step: one 80 ms frame (the model runs at 12.5 Hz)."""
FRAME_S = FRAME_SIZE / SAMPLE_RATE
TICK = SAMPLE_RATE // 100
"""WebRTC's 10 ms tick: live audio is produced, and a track's streams start, on it (frame_clock.py)."""
LIVE_CHUNK_MS_CHOICES = (10, 20, 40)
"""Live chunk lengths the frame clock aligns: whole ticks that divide a frame (a chunk of a whole frame
would leave it nothing to align)."""
LIVE_CHUNK_MS = 40
"""The caption worker's live chunk by default (`captions worker --live-chunk-ms`, track_audio.py): a
third less host CPU per talker than 10 ms chunks, for up to 30 ms of waiting per frame
(docs/benchmarks/host.md, "Live chunks of 40 ms")."""


class EngineFull(Exception):
    """Every slot is taken; the caller decides whether to queue or refuse."""


@dataclass
class Word:
    text: str
    start: float
    """Seconds; stream-relative inside the engine, Unix epoch seconds once published."""
    end: float


@dataclass
class StreamEvent:
    """What one engine step produced for one stream (or its end)."""

    stream_id: int
    frames: int
    """Frames consumed so far, the leading silence of `lead_samples` included (time = frames * FRAME_S)."""
    words: list[Word]
    """Words completed at this step; times in seconds of the stream's audio."""
    partial: str
    """Text of the word being written, not yet in `words`."""
    pause_prob: float | None
    """Probability of no voice activity over the next 2 s; None without VAD heads."""
    token: int = -1
    """The raw text token of this step (-1: none yet); for tests and diagnostics."""
    ended: bool = False
    error: str | None = None
    step_started: float = 0.0
    """Unix time (time.time()) at which the step that produced this event started (0: no step)."""
    step_ended: float = 0.0
    """Unix time at which that step's tokens were decoded, just before its events were delivered."""
    lead_samples: int = 0
    """Silence the engine put before the stream's first sample to align its frames with the other
    streams' (see engine.py): `frames` count it, word times do not."""


@dataclass
class StepTimings:
    """Seconds spent in one step. On a GPU, encode and LM are only separated when the engine runs
    with `profile=True` (which synchronises between them)."""

    active: int
    encode_s: float
    lm_s: float
    host_s: float
    total_s: float


EventCallback = Callable[[StreamEvent], None]


class EngineStream(Protocol):
    """A caller's handle on one engine slot."""

    id: int
    lead_samples: int
    """Silence the engine put before this stream's audio (known after the first push)."""

    @property
    def slot_index(self) -> int: ...

    def push(self, pcm, produced_at: float | None = None) -> None:
        """Queues 24 kHz mono float32 audio of any length (a numpy array). A live caller (chunks of
        `live_chunk`) passes `produced_at`, the time.monotonic() at which its last sample was
        produced (WebRTC's 10 ms tick), if it knows it better than the moment of this call: the
        engine aligns live streams' frames by it (captions/stt/engine.py)."""

    def close(self) -> None:
        """End of audio: the model's delay is flushed so the last words come out, then the slot is
        freed; the last event has `ended=True`."""

    def abort(self) -> None:
        """Frees the slot without flushing (the last event still has `ended=True`)."""


class Engine(Protocol):
    """The batched engine as its callers see it (captions.stt.engine.SttEngine; tests use a fake)."""

    batch_size: int
    has_vad: bool

    @property
    def slots_in_use(self) -> int: ...

    def open_stream(self, on_event: EventCallback, live_chunk: int | None = None) -> EngineStream:
        """Takes a free slot or raises EngineFull. `on_event` runs on the engine's thread.
        `live_chunk`: a live stream's chunk size when its first push is larger (kept audio first)."""

    def add_slot_freed_listener(self, callback: Callable[[], None]) -> None:
        """`callback()` runs on the engine's thread each time a slot becomes free."""

    def push_many(self, pushes: Sequence[tuple[EngineStream, Any, float | None]]) -> None:
        """`stream.push(pcm, produced_at)` for each of `pushes`, in order, at once (the engine
        channel's batches: captions/host/wire.py); a push to a stream that has ended is dropped."""
