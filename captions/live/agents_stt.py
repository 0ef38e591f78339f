"""Kyutai STT inside any LiveKit Agents voice agent: the batched engine as a `livekit.agents.stt.STT`.

    from captions.live.agents_stt import KyutaiSTT
    session = AgentSession(stt=KyutaiSTT(), vad=None, turn_handling={"turn_detection": "stt"}, ...)

Every `KyutaiSTT` and every stream of a process share one engine per (model, device, batch size):
one model, B slots, every session's audio advanced in the same batched step (engine.py). A stream
takes a slot through the fair queue the captions use (slots.py). While it waits, the audio pushed
to it is kept (up to `max_wait_audio_s`) and fed once it has a slot; a wait longer than
`conn_options.timeout` raises a retryable `APIConnectionError`, livekit-agents' own retry
convention, and the stream keeps its place in line for the retry.

Events, from the caption segmenter (segmenter.py), so that captions and agents cut speech alike:

* START_OF_SPEECH before the first interim after a pause;
* INTERIM_TRANSCRIPT: the open segment's full text, the word being written included;
* FINAL_TRANSCRIPT when a segment closes (a pause, the readable maximum, a flush, the end), with
  its words' times in seconds of the caller's audio plus `start_time_offset`;
* END_OF_SPEECH at a pause (VAD heads, or the silence rule), a flush, or the end of input;
* RECOGNITION_USAGE: the audio recognised since the previous one, after each final and at the end.

A flush ends the current segment with a final. The model writes a word about its text delay after
hearing it, so the flush feeds that much silence; the last word's end is only known after a
second of padding following its start (words.py), so while a word is still being written a little
more silence follows, one frame at a time. Then the open segment closes. The silence exists only
for the model: a `_Timeline` takes it out of the times reported.

Threads: the slot grant (slot queue thread) and engine events (engine thread) hop to the stream's
event loop with `call_soon_threadsafe`; everything else runs on that loop. The caption worker does
not import this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import threading
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from livekit import rtc
from livekit.agents import (
    DEFAULT_API_CONNECT_OPTIONS,
    NOT_GIVEN,
    APIConnectionError,
    APIConnectOptions,
    APIError,
    NotGivenOr,
    stt,
    utils,
)
from livekit.agents.types import TimedString

from captions.live.segmenter import CaptionUpdate, Segmenter, SegmenterOptions
from captions.live.slots import SlotQueue, Waiter
from captions.log import logger
from captions.stt.api import SAMPLE_RATE, EngineStream, StreamEvent, Word
from captions.stt.engine import SttEngine
from captions.stt.model import DEFAULT_MODEL

__all__ = ["KyutaiRecognizeStream", "KyutaiSTT", "SharedEngine", "close_shared_engines", "shared_engine"]

DEFAULT_BATCH_SIZE = 8
MAX_WAIT_AUDIO_S = 60.0
"""Audio kept for a stream waiting for a slot: more than livekit-agents' default retries wait
(4 attempts of 10 s). Beyond it the oldest audio is dropped, with a warning."""


# ---- one engine per process --------------------------------------------------------------------

@dataclass(eq=False)
class SharedEngine:
    """One loaded engine and its fair slot queue, shared by every KyutaiSTT of the process."""

    engine: SttEngine
    slots: SlotQueue

    @property
    def slot_load(self) -> float:
        """Streams served or waiting over the slots, at most 1: a worker's `load_fnc`, so that
        LiveKit dispatches new sessions to the workers with free slots."""
        return min(1.0, (self.engine.slots_in_use + len(self.slots)) / self.engine.batch_size)

    def close(self) -> None:
        self.slots.close()
        self.engine.close()


_registry_lock = threading.Lock()
_engines: dict[tuple[str, str, int], SharedEngine] = {}
_load_locks: dict[tuple[str, str, int], threading.Lock] = {}


def shared_engine(model: str = DEFAULT_MODEL, device: str = "auto",
                  batch_size: int = DEFAULT_BATCH_SIZE) -> SharedEngine:
    """The process's engine for this checkpoint, device and batch size, loaded and started on first
    use. Blocking (seconds; minutes for a first download): call it off the event loop."""
    key = (model, device, batch_size)
    with _registry_lock:
        load_lock = _load_locks.setdefault(key, threading.Lock())
    with load_lock:  # one load per key; other callers wait for it instead of loading twice
        with _registry_lock:
            if key in _engines:
                return _engines[key]
        engine = SttEngine.load(model, device=device, batch_size=batch_size)
        engine.start()
        shared = SharedEngine(engine, SlotQueue(engine))
        with _registry_lock:
            _engines[key] = shared
        return shared


def close_shared_engines() -> None:
    """Stops and forgets every shared engine (for tests: a worker keeps its engine for life)."""
    with _registry_lock:
        engines = list(_engines.values())
        _engines.clear()
    for shared in engines:
        shared.close()


# ---- the STT -----------------------------------------------------------------------------------

class KyutaiSTT(stt.STT):
    """Kyutai streaming STT, run in this process on the shared batched engine.

    `model`: a Hugging Face repo id or a local checkpoint directory (as `captions --model`);
    `device`: auto, cpu, cuda or cuda:N; `batch_size`: the engine's slots, i.e. the streams it
    serves at once in this process; `language`: reported with transcripts (the model does not say:
    stt-1b-en_fr writes English or French, stt-2.6b-en English); `segmenter`: when a segment
    closes (the captions' rules by default); `max_wait_audio_s`: audio kept while waiting for a slot.
    """

    def __init__(self, *, model: str = DEFAULT_MODEL, device: str = "auto", batch_size: int = DEFAULT_BATCH_SIZE,
                 language: str = "en", segmenter: SegmenterOptions | None = None,
                 max_wait_audio_s: float = MAX_WAIT_AUDIO_S):
        super().__init__(capabilities=stt.STTCapabilities(
            streaming=True, interim_results=True, diarization=False, aligned_transcript="word",
            offline_recognize=True, keyterms=False, chat_context=False, manual_flush=True))
        self._model = model
        self._device = device
        self._batch_size = batch_size
        self._language = language
        self._segmenter_options = segmenter or SegmenterOptions()
        self._max_wait_audio_s = max_wait_audio_s
        self._streams: weakref.WeakSet[KyutaiRecognizeStream] = weakref.WeakSet()
        self._labels = itertools.count(1)

    @property
    def model(self) -> str:
        return self._model

    @property
    def provider(self) -> str:
        return "kyutai"

    def load(self) -> SharedEngine:
        """Loads the shared engine now (blocking), at start-up in the worker's main process, so
        that no session waits for it (a job process's setup function gets only 10 s)."""
        return shared_engine(self._model, self._device, self._batch_size)

    def prewarm(self) -> None:
        """Starts loading the shared engine in the background (livekit-agents calls this on its
        event loop, which must not block)."""
        with _registry_lock:
            if (self._model, self._device, self._batch_size) in _engines:
                return

        def load_in_background() -> None:
            try:
                self.load()
            except Exception:  # noqa: BLE001 - a stream retries the load and reports the error
                logger.exception("could not load the STT engine %s", self._model)

        threading.Thread(target=load_in_background, name="stt-prewarm", daemon=True).start()

    async def engine(self) -> SharedEngine:
        """The shared engine, loaded off the event loop if needed; a failed load is an APIError."""
        try:
            return await asyncio.to_thread(self.load)
        except Exception as e:
            raise APIError(f"cannot load the STT engine {self._model}: {e}", retryable=False) from e

    def stream(self, *, language: NotGivenOr[str] = NOT_GIVEN,
               conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS) -> KyutaiRecognizeStream:
        stream = KyutaiRecognizeStream(stt=self, conn_options=conn_options,
                                       language=language if utils.is_given(language) else self._language)
        self._streams.add(stream)
        return stream

    async def _recognize_impl(self, buffer: utils.AudioBuffer, *, language: NotGivenOr[str] = NOT_GIVEN,
                              conn_options: APIConnectOptions) -> stt.SpeechEvent:
        """The whole buffer through one engine stream: one final with every word."""
        shared = await self.engine()
        audio = _model_audio(buffer)
        words: list[Word] = []
        ended: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()

        def on_event(event: StreamEvent) -> None:
            words.extend(event.words)
            if event.ended and not ended.done():
                ended.set_result(event.error)

        request = _SlotRequest(shared, f"recognize-{next(self._labels)}", on_event)
        try:
            stream = await request.wait(conn_options.timeout)
            if audio.size:
                stream.push(audio)
            stream.close()
            error = await ended
        finally:
            request.release()
        if error:
            raise APIError(f"Kyutai STT engine: {error}")
        timed = [TimedString(w.text, start_time=w.start, end_time=w.end) for w in words]
        text = " ".join(w.text for w in words if w.text)
        return stt.SpeechEvent(type=stt.SpeechEventType.FINAL_TRANSCRIPT, alternatives=[_speech_data(
            language if utils.is_given(language) else self._language, text, timed)])

    async def aclose(self) -> None:
        """Closes this STT's streams; the shared engine stays for the process's other users."""
        await asyncio.gather(*(s.aclose() for s in list(self._streams)), return_exceptions=True)


def _speech_data(language: str, text: str, words: list[TimedString]) -> stt.SpeechData:
    return stt.SpeechData(language=language, text=text, words=words,
                          start_time=float(words[0].start_time) if words else 0.0,
                          end_time=float(words[-1].end_time) if words else 0.0)


def _mono(frame: rtc.AudioFrame) -> rtc.AudioFrame:
    """Channels averaged, as Kyutai's reference reads files."""
    if frame.num_channels == 1:
        return frame
    samples = np.frombuffer(frame.data, dtype=np.int16).reshape(-1, frame.num_channels)
    mono = np.round(samples.mean(axis=1)).astype(np.int16)
    return rtc.AudioFrame(mono.tobytes(), frame.sample_rate, 1, frame.samples_per_channel)


def _model_audio(buffer: utils.AudioBuffer) -> np.ndarray:
    """A buffer of frames at any rate and channel count as the model's 24 kHz mono float32."""
    frames = buffer if isinstance(buffer, list) else [buffer]
    if not frames:
        return np.zeros(0, dtype=np.float32)
    frame = _mono(rtc.combine_audio_frames(frames))
    if frame.sample_rate != SAMPLE_RATE:
        resampler = rtc.AudioResampler(frame.sample_rate, SAMPLE_RATE, quality=rtc.AudioResamplerQuality.HIGH)
        frames = resampler.push(frame) + resampler.flush()
    else:
        frames = [frame]
    pcm = [np.frombuffer(f.data, dtype=np.int16) for f in frames]
    return (np.concatenate(pcm) if pcm else np.zeros(0, np.int16)).astype(np.float32) / 32768.0


# ---- a slot, asked for from an event loop ------------------------------------------------------

class _SlotRequest:
    """One request for an engine slot. The grant (slot queue thread) and the stream's events
    (engine thread) hop to the requesting loop, where `on_event` runs."""

    def __init__(self, shared: SharedEngine, label: str, on_event: Callable[[StreamEvent], None]):
        self._shared = shared
        self._loop = asyncio.get_running_loop()
        self._on_event = on_event
        self._granted: asyncio.Future[EngineStream] = self._loop.create_future()
        self._released = False
        self._waiter = Waiter(label, self._on_event_threadsafe, self._on_granted_threadsafe)
        stream = shared.slots.request(self._waiter)
        if stream is not None:
            self._granted.set_result(stream)

    async def wait(self, timeout: float) -> EngineStream:
        """The stream once granted; after `timeout` seconds a retryable APIConnectionError, the
        request staying in line (call `wait` again to keep waiting)."""
        try:
            return await asyncio.wait_for(asyncio.shield(self._granted), timeout)
        except asyncio.TimeoutError:
            slots = self._shared.slots
            raise APIConnectionError(
                f"Kyutai STT: no free engine slot for {timeout:g} s ({self._shared.engine.batch_size} slots, "
                f"{len(slots)} waiting); still in line") from None

    def release(self) -> None:
        """Leaves the line, or frees the slot (without flushing) if the stream is still running."""
        if self._released:
            return
        self._released = True
        if not self._granted.done():
            # If the queue granted it meanwhile, `_on_granted` (still to run) aborts the stream.
            self._shared.slots.cancel(self._waiter)
            self._granted.cancel()
        elif not self._granted.cancelled():
            self._granted.result().abort()  # a no-op once the stream has ended

    def _on_granted_threadsafe(self, stream: EngineStream) -> None:
        # A closed loop raises here, and the slot queue then frees the slot.
        self._loop.call_soon_threadsafe(self._on_granted, stream)

    def _on_granted(self, stream: EngineStream) -> None:
        if self._released or self._granted.done():
            stream.abort()
            return
        self._granted.set_result(stream)

    def _on_event_threadsafe(self, event: StreamEvent) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            self._loop.call_soon_threadsafe(self._deliver, event)

    def _deliver(self, event: StreamEvent) -> None:
        if not self._released:
            self._on_event(event)


# ---- the recognize stream ----------------------------------------------------------------------

class _Timeline:
    """Maps an engine stream's audio time (flush silence included, lead silence not: engine.py)
    to the caller's audio time: silence a flush inserted is taken out; a time inside it becomes
    the moment the flush began."""

    def __init__(self, base_s: float):
        self.base_s = base_s
        """Caller's audio that went before this engine stream (earlier streams, dropped audio)."""
        self._inserted: list[tuple[float, float]] = []

    def insert(self, at_s: float, duration_s: float) -> None:
        self._inserted.append((at_s, duration_s))

    def to_caller(self, t: float) -> float:
        shift = 0.0
        for at, duration in self._inserted:
            if t <= at:
                break
            shift += min(duration, t - at)
        return self.base_s + t - shift


@dataclass(eq=False)
class _EngineSession:
    """One engine stream of a recognize stream (a new one after an engine error)."""

    stream: EngineStream
    segmenter: Segmenter
    timeline: _Timeline
    pushed: int = 0
    """Samples pushed, flush silence included (the engine stream's own time)."""
    frames: int = 0
    """Frames the engine has stepped (its events' `frames`)."""
    partial: str = ""
    """The word the model is writing, as of the latest event."""
    heard_since_flush: bool = False
    ended: bool = False
    error: str | None = None


_FLUSH = object()
"""A flush, in order among the pending audio."""


class KyutaiRecognizeStream(stt.RecognizeStream):
    """One caller's audio through one engine slot (see the module notes)."""

    def __init__(self, *, stt: KyutaiSTT, conn_options: APIConnectOptions, language: str):
        super().__init__(stt=stt, conn_options=conn_options, sample_rate=SAMPLE_RATE)
        self._kyutai = stt
        self._language = language
        self._label = f"agents-stt-{next(stt._labels)}"
        self._pending: deque[np.ndarray | object] = deque()
        self._pending_samples = 0
        self._input_done = False
        self._wake = asyncio.Event()
        self._origin_s = 0.0
        """`start_time_offset` as the caller set it. livekit-agents also raises the offset by the
        wall time before each attempt (a few ms even for the first), but our times already count
        all of the caller's audio, so only the caller's value moves them."""
        self._consumed = 0
        """Caller's samples pushed into an engine stream or dropped while waiting."""
        self._unreported = 0
        """Caller's samples pushed since the last usage event."""
        self._request: _SlotRequest | None = None
        self._session: _EngineSession | None = None
        self._speaking = False
        self._reader = asyncio.create_task(self._read_input(), name=f"{self._label}-input")
        self._task.add_done_callback(self._on_done)

    @property
    def start_time_offset(self) -> float:
        return self._start_time_offset

    @start_time_offset.setter
    def start_time_offset(self, value: float) -> None:
        stt.RecognizeStream.start_time_offset.fset(self, value)  # its check of the value
        self._origin_s = value

    def push_frame(self, frame: rtc.AudioFrame) -> None:
        # Mixed down first: the base class resamples with a mono resampler whatever the channels.
        super().push_frame(_mono(frame))

    # Input ------------------------------------------------------------------------------------

    async def _read_input(self) -> None:
        """Moves the input into `_pending` at once, so that it is kept (within the bound) while
        the stream waits for a slot or a flush completes."""
        async for item in self._input_ch:
            if isinstance(item, self._FlushSentinel):
                self._pending.append(_FLUSH)
            else:
                pcm = np.frombuffer(item.data, dtype=np.int16).astype(np.float32) / 32768.0
                self._pending.append(pcm)
                self._pending_samples += pcm.size
                self._drop_beyond_bound()
            self._wake.set()
        self._input_done = True
        self._wake.set()

    def _drop_beyond_bound(self) -> None:
        limit = self._kyutai._max_wait_audio_s * SAMPLE_RATE
        dropped = 0
        while self._pending_samples > limit and self._pending:
            item = self._pending.popleft()
            if item is not _FLUSH:
                self._pending_samples -= item.size
                dropped += item.size
        if dropped:
            self._consumed += dropped
            logger.warning("%s: still no engine slot: dropped the oldest %.2f s of audio (kept: %.0f s)",
                           self._label, dropped / SAMPLE_RATE, self._kyutai._max_wait_audio_s)

    # The attempt (livekit-agents calls _run again after a retryable APIError) --------------------

    async def _run(self) -> None:
        shared = await self._kyutai.engine()  # no timeout: loading is not a connection (README)
        if self._session is None:
            if self._request is None:
                self._request = _SlotRequest(shared, self._label, self._on_engine_event)
            stream = await self._request.wait(self._conn_options.timeout)
            self._session = _EngineSession(stream, Segmenter(options=self._kyutai._segmenter_options),
                                           _Timeline(self._consumed / SAMPLE_RATE))
            logger.info("%s: recognising in engine slot %d", self._label, stream.slot_index)
        await self._feed(shared, self._session)

    async def _feed(self, shared: SharedEngine, session: _EngineSession) -> None:
        while True:
            self._wake.clear()
            if session.ended:
                self._fail(session)  # raises: the engine ended the stream on its own (an error)
            if self._pending:
                item = self._pending.popleft()
                if item is _FLUSH:
                    if self._pending or not self._input_done:  # end_input() = flush + close: close does it
                        await self._flush(shared, session)
                elif not self._push(session, item):
                    self._pending.appendleft(item)
                    await self._until(lambda: session.ended)
            elif self._input_done:
                session.stream.close()
                await self._until(lambda: session.ended)
                if session.error:
                    self._fail(session)
                return
            else:
                await self._wake.wait()

    def _push(self, session: _EngineSession, pcm: np.ndarray) -> bool:
        try:
            session.stream.push(pcm)
        except RuntimeError:
            return False  # the engine already ended this stream; its last event is on its way
        self._pending_samples -= pcm.size
        session.pushed += pcm.size
        session.heard_since_flush = True
        self._consumed += pcm.size
        self._unreported += pcm.size
        return True

    def _push_silence(self, session: _EngineSession, samples: int) -> None:
        session.stream.push(np.zeros(samples, dtype=np.float32))
        session.timeline.insert(session.pushed / SAMPLE_RATE, samples / SAMPLE_RATE)
        session.pushed += samples

    async def _flush(self, shared: SharedEngine, session: _EngineSession) -> None:
        """The open segment becomes final with every word heard so far (module notes)."""
        if not session.heard_since_flush:
            return
        session.heard_since_flush = False
        engine = shared.engine
        frame = engine.frame_size
        pending = (session.stream.lead_samples + session.pushed) % frame
        # The model's delay after the last sample, counted from the end of its (completed) frame;
        # the extra frame keeps the stream's frames on the shared clock (engine.py).
        silence_frames = engine.model.flush_frames + (1 if pending else 0)
        # words.py ends a word after a second of padding that follows its start.
        word_end_frames = math.ceil(engine.frame_rate) + 1
        try:
            self._push_silence(session, silence_frames * frame)
            await self._until_stepped(session, frame)
            for _ in range(word_end_frames):
                if not session.partial or session.ended:
                    break
                self._push_silence(session, frame)
                await self._until_stepped(session, frame)
        except RuntimeError:
            pass  # the engine ended the stream meanwhile (an error): `_feed` reports it
        if session.ended:
            return
        self._emit(session, session.segmenter.flush())
        self._end_of_speech()

    async def _until_stepped(self, session: _EngineSession, frame_size: int) -> None:
        """Until the engine has stepped every whole frame pushed so far."""
        target = (session.stream.lead_samples + session.pushed) // frame_size
        await self._until(lambda: session.ended or session.frames >= target)

    async def _until(self, done: Callable[[], bool]) -> None:
        while not done():
            self._wake.clear()
            if done():
                return
            await self._wake.wait()

    def _fail(self, session: _EngineSession) -> None:
        self._session, self._request = None, None
        raise APIError(f"Kyutai STT engine: {session.error or 'stream ended unexpectedly'}")

    def _on_done(self, _task: asyncio.Task[None]) -> None:
        self._reader.cancel()
        if self._request is not None:
            self._request.release()  # leaves the line, or frees the slot of a cancelled stream

    # Engine events -> speech events -------------------------------------------------------------

    def _on_engine_event(self, event: StreamEvent) -> None:
        session = self._session
        if session is None or self._task.done():
            return
        session.frames, session.partial = event.frames, event.partial
        self._emit(session, session.segmenter.feed(event))
        if not session.segmenter.speaking:
            self._end_of_speech()
        if event.ended:
            session.ended, session.error = True, event.error
            self._report_usage()
        self._wake.set()

    def _emit(self, session: _EngineSession, updates: list[CaptionUpdate]) -> None:
        finals = False
        for update in updates:
            if not update.text and not update.final:
                continue
            if update.text and not self._speaking:
                self._speaking = True
                self._send(stt.SpeechEvent(type=stt.SpeechEventType.START_OF_SPEECH))
            words = [self._timed(session, w) for w in update.words]
            kind = stt.SpeechEventType.FINAL_TRANSCRIPT if update.final else stt.SpeechEventType.INTERIM_TRANSCRIPT
            self._send(stt.SpeechEvent(type=kind, alternatives=[_speech_data(self._language, update.text, words)]))
            finals = finals or update.final
        if finals:
            self._report_usage()

    def _timed(self, session: _EngineSession, word: Word) -> TimedString:
        origin = self._origin_s
        return TimedString(word.text, start_time=origin + session.timeline.to_caller(word.start),
                           end_time=origin + session.timeline.to_caller(word.end), start_time_offset=origin)

    def _end_of_speech(self) -> None:
        if self._speaking:
            self._speaking = False
            self._send(stt.SpeechEvent(type=stt.SpeechEventType.END_OF_SPEECH))

    def _report_usage(self) -> None:
        if self._unreported:
            usage = stt.RecognitionUsage(audio_duration=self._unreported / SAMPLE_RATE)
            self._unreported = 0
            self._send(stt.SpeechEvent(type=stt.SpeechEventType.RECOGNITION_USAGE, recognition_usage=usage))

    def _send(self, event: stt.SpeechEvent) -> None:
        with contextlib.suppress(utils.aio.ChanClosed):  # the stream was closed meanwhile
            self._event_ch.send_nowait(event)
