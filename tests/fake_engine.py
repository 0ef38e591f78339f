"""A stand-in for captions.stt.engine.SttEngine with the same API (captions.stt.api's `Engine` and
`EngineStream`, checked by tests/test_fake_engine.py), for unit tests (no torch, no model).

Words come deterministically from the audio: every run of loud 80 ms frames becomes one word,
"w<frames>" (its length in frames), completed at the first quiet frame after it, stamped with the
run's start and end. The word in progress is the partial. Frames are processed synchronously in
`push`/`close` (on the caller's thread), which keeps tests simple and deterministic; `fake_words`
gives the words a stream makes of some audio, so a test can tell what the fake made of the audio it
was pushed. Streams are never padded (`lead_samples` stays 0).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

import numpy as np

from captions.stt.api import FRAME_S, FRAME_SIZE, SAMPLE_RATE, EngineFull, EventCallback, StreamEvent, Word

LOUD_RMS = 0.05


def tone(seconds: float, amplitude: float = 0.3) -> np.ndarray:
    """A loud stretch: one fake word per contiguous tone."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)


def fake_words(pcm: np.ndarray) -> list[str]:
    """The words a fake stream makes of `pcm` pushed in one go and closed."""
    words: list[str] = []
    stream = FakeStream(FakeEngine(batch_size=1), 0, 0, lambda event: words.extend(w.text for w in event.words))
    stream.push(pcm)
    stream.close()
    return words


class FakeStream:
    def __init__(self, engine: FakeEngine, stream_id: int, slot_index: int, on_event: EventCallback):
        self.id = stream_id
        self._slot_index = slot_index
        self._engine = engine
        self._on_event = on_event
        self._buffer = np.zeros(0, dtype=np.float32)
        self._frames = 0
        self._run_start: int | None = None
        self.pushed: list[np.ndarray] = []
        self.ended = False
        self.lead_samples = 0

    @property
    def slot_index(self) -> int:
        return self._slot_index

    def push(self, pcm: np.ndarray, produced_at: float | None = None) -> None:
        assert not self.ended, "push after the stream ended"
        pcm = np.asarray(pcm, dtype=np.float32)
        self.pushed.append(pcm.copy())
        self._buffer = np.concatenate([self._buffer, pcm])
        while self._buffer.size >= FRAME_SIZE:
            frame, self._buffer = self._buffer[:FRAME_SIZE], self._buffer[FRAME_SIZE:]
            self._on_event(self._step(frame))

    def _step(self, frame: np.ndarray) -> StreamEvent:
        loud = float(np.sqrt(np.mean(frame**2))) > LOUD_RMS
        words: list[Word] = []
        if loud and self._run_start is None:
            self._run_start = self._frames
        elif not loud and self._run_start is not None:
            words.append(self._word(self._frames))
            self._run_start = None
        self._frames += 1
        partial = f"w{self._frames - self._run_start}" if self._run_start is not None else ""
        pause = None if not self._engine.has_vad else (0.0 if loud else 0.9)
        return StreamEvent(self.id, self._frames, words, partial, pause)

    def _word(self, end_frame: int) -> Word:
        assert self._run_start is not None
        return Word(f"w{end_frame - self._run_start}", self._run_start * FRAME_S, end_frame * FRAME_S)

    def close(self) -> None:
        """Flush: the word in progress is completed, then the last event says ended."""
        if self.ended:
            return
        words = [self._word(self._frames)] if self._run_start is not None else []
        self._run_start = None
        self._finish(StreamEvent(self.id, self._frames, words, "", None, ended=True))

    def abort(self) -> None:
        if not self.ended:
            self._finish(StreamEvent(self.id, self._frames, [], "", None, ended=True))

    def _finish(self, event: StreamEvent) -> None:
        self.ended = True
        self._engine._release(self)
        self._on_event(event)
        self._engine._notify_freed()


class FakeEngine:
    sample_rate = SAMPLE_RATE
    frame_size = FRAME_SIZE
    frame_rate = 12.5
    text_delay_s = 0.0

    def __init__(self, batch_size: int = 2, has_vad: bool = False):
        self.batch_size = batch_size
        self.has_vad = has_vad
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._streams: dict[int, FakeStream] = {}
        self._listeners: list[Callable[[], None]] = []
        self.opened: list[FakeStream] = []

    @property
    def slots_in_use(self) -> int:
        with self._lock:
            return len(self._streams)

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def add_slot_freed_listener(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def open_stream(self, on_event: EventCallback, live_chunk: int | None = None) -> FakeStream:
        with self._lock:
            if len(self._streams) >= self.batch_size:
                raise EngineFull(f"all {self.batch_size} slots are taken")
            used = {s.slot_index for s in self._streams.values()}
            slot_index = min(set(range(self.batch_size)) - used)
            stream = FakeStream(self, next(self._ids), slot_index, on_event)
            self._streams[stream.id] = stream
            self.opened.append(stream)
            return stream

    def push_many(self, pushes) -> None:
        for stream, pcm, produced_at in pushes:
            if not stream.ended:
                stream.push(pcm, produced_at)

    def _release(self, stream: FakeStream) -> None:
        with self._lock:
            self._streams.pop(stream.id, None)

    def _notify_freed(self) -> None:
        for callback in self._listeners:
            callback()
