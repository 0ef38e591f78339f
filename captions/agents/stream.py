"""A KyutaiSTT stream: audio in, speech events out (see the package notes)."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from livekit import rtc
from livekit.agents import (
    APIConnectionError,
    APIConnectOptions,
    APIError,
    stt,
    utils,
)
from livekit.agents.types import TimedString

from captions.agents.engines import SharedEngine
from captions.live.segmenter import CaptionUpdate, Segmenter
from captions.live.stream_client import KeptAudioBound, StreamClient
from captions.log import logger
from captions.stt.api import SAMPLE_RATE, EngineStream, StreamEvent, Word

if TYPE_CHECKING:
    from captions.agents.stt import KyutaiSTT


def speech_data(language: str, text: str, words: list[TimedString]) -> stt.SpeechData:
    return stt.SpeechData(language=language, text=text, words=words,
                          start_time=float(words[0].start_time) if words else 0.0,
                          end_time=float(words[-1].end_time) if words else 0.0)


def mono(frame: rtc.AudioFrame) -> rtc.AudioFrame:
    """Channels averaged, as Kyutai's reference reads files."""
    if frame.num_channels == 1:
        return frame
    samples = np.frombuffer(frame.data, dtype=np.int16).reshape(-1, frame.num_channels)
    mono = np.round(samples.mean(axis=1)).astype(np.int16)
    return rtc.AudioFrame(mono.tobytes(), frame.sample_rate, 1, frame.samples_per_channel)


def model_audio(buffer: utils.AudioBuffer) -> np.ndarray:
    """A buffer of frames at any rate and channel count as the model's 24 kHz mono float32."""
    frames = buffer if isinstance(buffer, list) else [buffer]
    if not frames:
        return np.zeros(0, dtype=np.float32)
    frame = mono(rtc.combine_audio_frames(frames))
    if frame.sample_rate != SAMPLE_RATE:
        resampler = rtc.AudioResampler(frame.sample_rate, SAMPLE_RATE, quality=rtc.AudioResamplerQuality.HIGH)
        frames = resampler.push(frame) + resampler.flush()
    else:
        frames = [frame]
    pcm = [np.frombuffer(f.data, dtype=np.int16) for f in frames]
    return (np.concatenate(pcm) if pcm else np.zeros(0, np.int16)).astype(np.float32) / 32768.0


# ---- a slot, asked for from an event loop ------------------------------------------------------


class Timeline:
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


async def granted_stream(client: StreamClient, shared: SharedEngine, timeout: float) -> EngineStream:
    """The client's stream once granted; after `timeout` s a retryable APIConnectionError (livekit-agents'
    retry convention), the request staying in line for the retry."""
    try:
        return await client.wait(timeout)
    except asyncio.TimeoutError:
        raise APIConnectionError(
            f"Kyutai STT: no free engine slot for {timeout:g} s ({shared.engine.batch_size} slots, "
            f"{client.waiting} waiting); still in line") from None


@dataclass(eq=False)
class EngineSession:
    """One engine stream of a recognize stream (a new one after an engine error). The client counts
    what was pushed (flush silence included: the engine stream's own time) and the frames stepped."""

    client: StreamClient
    segmenter: Segmenter
    timeline: Timeline
    partial: str = ""
    """The word the model is writing, as of the latest event."""
    heard_since_flush: bool = False

    @property
    def stream(self) -> EngineStream:
        return self.client.stream


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
        self._bound = KeptAudioBound(self._label, stt._max_wait_audio_s)
        self._client: StreamClient | None = None
        self._session: EngineSession | None = None
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
        super().push_frame(mono(frame))

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
        excess = self._bound.excess(self._pending_samples)
        while excess > 0 and self._pending:
            item = self._pending.popleft()
            if item is not _FLUSH:
                self._pending_samples -= item.size
                self._consumed += item.size
                excess -= item.size

    # The attempt (livekit-agents calls _run again after a retryable APIError) --------------------

    async def _run(self) -> None:
        shared = await self._kyutai.engine()  # no timeout: loading is not a connection (README)
        if self._session is None:
            if self._client is None:
                self._client = StreamClient(shared.slots, self._label, self._on_engine_event)
                self._client.request()
            stream = await granted_stream(self._client, shared, self._conn_options.timeout)
            self._session = EngineSession(self._client, Segmenter(options=self._kyutai._segmenter_options),
                                           Timeline(self._consumed / SAMPLE_RATE))
            logger.info("%s: recognising in engine slot %d", self._label, stream.slot_index)
        await self._feed(shared, self._session)

    async def _feed(self, shared: SharedEngine, session: EngineSession) -> None:
        while True:
            self._wake.clear()
            if session.client.ended:
                self._fail(session)  # raises: the engine ended the stream on its own (an error)
            if self._pending:
                item = self._pending.popleft()
                if item is _FLUSH:
                    if self._pending or not self._input_done:  # end_input() = flush + close: close does it
                        await self._flush(shared, session)
                elif not self._push(session, item):
                    self._pending.appendleft(item)
                    await self._until(lambda: session.client.ended)
            elif self._input_done:
                session.client.release()  # flushed: the last words come out
                await self._until(lambda: session.client.ended)
                if session.client.error:
                    self._fail(session)
                return
            else:
                await self._wake.wait()

    def _push(self, session: EngineSession, pcm: np.ndarray) -> bool:
        try:
            session.client.push(pcm)
        except RuntimeError:
            return False  # the engine already ended this stream; its last event is on its way
        self._pending_samples -= pcm.size
        session.heard_since_flush = True
        self._consumed += pcm.size
        self._unreported += pcm.size
        return True

    def _push_silence(self, session: EngineSession, samples: int) -> None:
        at_s = session.client.pushed / SAMPLE_RATE
        session.client.push(np.zeros(samples, dtype=np.float32))
        session.timeline.insert(at_s, samples / SAMPLE_RATE)

    async def _flush(self, shared: SharedEngine, session: EngineSession) -> None:
        """The open segment becomes final with every word heard so far (module notes)."""
        if not session.heard_since_flush:
            return
        session.heard_since_flush = False
        engine = shared.engine
        frame = engine.frame_size
        # The model's delay after the last sample, counted from the end of its (completed) frame;
        # the extra frame keeps the stream's frames on the shared clock (stream_client.py).
        silence_frames = engine.model.flush_frames + (1 if session.client.frame_remainder else 0)
        # words.py ends a word after a second of padding that follows its start.
        word_end_frames = math.ceil(engine.frame_rate) + 1
        try:
            self._push_silence(session, silence_frames * frame)
            await self._until(lambda: session.client.stepped_all)
            for _ in range(word_end_frames):
                if not session.partial or session.client.ended:
                    break
                self._push_silence(session, frame)
                await self._until(lambda: session.client.stepped_all)
        except RuntimeError:
            pass  # the engine ended the stream meanwhile (an error): `_feed` reports it
        if session.client.ended:
            return
        self._emit(session, session.segmenter.flush())
        self._end_of_speech()

    async def _until(self, done: Callable[[], bool]) -> None:
        while not done():
            self._wake.clear()
            if done():
                return
            await self._wake.wait()

    def _fail(self, session: EngineSession) -> None:
        self._session, self._client = None, None
        raise APIError(f"Kyutai STT engine: {session.client.error or 'stream ended unexpectedly'}")

    def _on_done(self, _task: asyncio.Task[None]) -> None:
        self._reader.cancel()
        if self._client is not None:
            self._client.release(flush=False)  # leaves the line, or frees the slot of a cancelled stream

    # Engine events -> speech events -------------------------------------------------------------

    def _on_engine_event(self, event: StreamEvent) -> None:
        session = self._session
        if session is None or self._task.done():
            self._wake.set()  # the client has noted the frames and the end
            return
        session.partial = event.partial
        self._emit(session, session.segmenter.feed(event))
        if not session.segmenter.speaking:
            self._end_of_speech()
        if event.ended:
            self._report_usage()
        self._wake.set()

    def _emit(self, session: EngineSession, updates: list[CaptionUpdate]) -> None:
        finals = False
        for update in updates:
            if not update.text and not update.final:
                continue
            if update.text and not self._speaking:
                self._speaking = True
                self._send(stt.SpeechEvent(type=stt.SpeechEventType.START_OF_SPEECH))
            words = [self._timed(session, w) for w in update.words]
            kind = stt.SpeechEventType.FINAL_TRANSCRIPT if update.final else stt.SpeechEventType.INTERIM_TRANSCRIPT
            self._send(stt.SpeechEvent(type=kind, alternatives=[speech_data(self._language, update.text, words)]))
            finals = finals or update.final
        if finals:
            self._report_usage()

    def _timed(self, session: EngineSession, word: Word) -> TimedString:
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
