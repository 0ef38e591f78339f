"""`KyutaiSTT`: the livekit-agents STT on the shared engine (see the package notes)."""

from __future__ import annotations

import asyncio
import itertools
import threading
import weakref

from livekit.agents import (
    DEFAULT_API_CONNECT_OPTIONS,
    NOT_GIVEN,
    APIConnectOptions,
    APIError,
    NotGivenOr,
    stt,
    utils,
)
from livekit.agents.types import TimedString

from captions.agents.engines import DEFAULT_BATCH_SIZE, SharedEngine, is_loaded, shared_engine
from captions.agents.stream import KyutaiRecognizeStream, granted_stream, model_audio, speech_data
from captions.live.segmenter import SegmenterOptions
from captions.live.stream_client import StreamClient
from captions.log import logger
from captions.stt.api import StreamEvent, Word
from captions.stt.model import DEFAULT_MODEL

MAX_WAIT_AUDIO_S = 60.0
"""Audio kept for a stream waiting for a slot: more than livekit-agents' default retries wait
(4 attempts of 10 s). Beyond it the oldest audio is dropped, with a warning."""


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
        if is_loaded(self._model, self._device, self._batch_size):
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
        audio = model_audio(buffer)
        words: list[Word] = []
        ended: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()

        def on_event(event: StreamEvent) -> None:
            words.extend(event.words)
            if event.ended and not ended.done():
                ended.set_result(event.error)

        client = StreamClient(shared.slots, f"recognize-{next(self._labels)}", on_event)
        try:
            client.request()
            await granted_stream(client, shared, conn_options.timeout)
            if audio.size:
                client.push(audio)
            client.release()  # flushed: every word comes out
            error = await ended
        finally:
            client.release(flush=False)
        if error:
            raise APIError(f"Kyutai STT engine: {error}")
        timed = [TimedString(w.text, start_time=w.start, end_time=w.end) for w in words]
        text = " ".join(w.text for w in words if w.text)
        return stt.SpeechEvent(type=stt.SpeechEventType.FINAL_TRANSCRIPT, alternatives=[speech_data(
            language if utils.is_given(language) else self._language, text, timed)])

    async def aclose(self) -> None:
        """Closes this STT's streams; the shared engine stays for the process's other users."""
        await asyncio.gather(*(s.aclose() for s in list(self._streams)), return_exceptions=True)
