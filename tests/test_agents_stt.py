"""KyutaiSTT, the batched engine as a LiveKit Agents STT: its events against the engine's own words.

The model path is real (the tiny checkpoint); the engine's words are proven equal to Kyutai's
reference loop in test_engine.py, so equal to `transcribe_audio` here means equal to the reference.
"""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest
from livekit import rtc
from livekit.agents import APIConnectionError, APIConnectOptions, APIError, stt

from captions.agents import KyutaiSTT, close_shared_engines
from captions.agents.stream import Timeline as _Timeline
from captions.stt.api import SAMPLE_RATE, Word
from captions.stt.audio import read_audio_file
from captions.stt.transcribe import transcribe_audio
from tests.conftest import espeak_wav

pytestmark = pytest.mark.timeout(120)

SENTENCES = [  # short: the fast lane runs this file
    "Good morning everyone, let us start.",
    "The budget looks fine to me.",
    "Bonjour, une question.",
]
Kind = stt.SpeechEventType


@pytest.fixture(scope="module")
def clips(speech_dir) -> list[np.ndarray]:
    voices = ["en", "en-us", "fr"]
    return [read_audio_file(espeak_wav(text, speech_dir / f"agents{i}.wav", voice=voices[i]))
            for i, text in enumerate(SENTENCES)]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    yield str(tiny_checkpoint)
    close_shared_engines()


@pytest.fixture
def kyutai(checkpoint) -> KyutaiSTT:
    """Two slots; every KyutaiSTT of these arguments shares one engine (loaded once, here)."""
    stt_ = KyutaiSTT(model=checkpoint, device="cpu", batch_size=2)
    stt_.load()
    return stt_


@pytest.fixture
async def full_engine(kyutai):
    """Every slot taken by another user of the engine, until the test frees them."""
    engine = (await kyutai.engine()).engine
    await all_slots_free(engine)  # slots are freed on the engine's thread, a moment after a stream ends
    blockers = [engine.open_stream(lambda event: None) for _ in range(engine.batch_size)]
    yield blockers
    for blocker in blockers:
        blocker.abort()
    await all_slots_free(engine)


async def all_slots_free(engine, but: int = 0) -> None:
    async with asyncio.timeout(10):
        while engine.slots_in_use > but:
            await asyncio.sleep(0.01)


def int16(audio: np.ndarray) -> np.ndarray:
    return np.clip(np.round(audio * 32768), -32768, 32767).astype(np.int16)


def frames(audio: np.ndarray, *, chunk: int = 1200, rate: int = SAMPLE_RATE, channels: int = 1) -> list[rtc.AudioFrame]:
    """float mono audio as int16 frames of `chunk` samples per channel (50 ms at 24 kHz: what
    AgentSession's room input hands its STT)."""
    pcm = np.repeat(int16(audio)[:, None], channels, axis=1)
    return [rtc.AudioFrame(pcm[i:i + chunk].tobytes(), rate, channels, len(pcm[i:i + chunk]))
            for i in range(0, len(pcm), chunk)]


def pcm_of(items: list[rtc.AudioFrame]) -> np.ndarray:
    return np.concatenate([np.frombuffer(f.data, np.int16) for f in items]).astype(np.float32) / 32768.0


async def collect(stream: stt.RecognizeStream, items: list[rtc.AudioFrame], *, end: bool = True,
                  pace_s: float = 0.0) -> list[stt.SpeechEvent]:
    """Pushes the frames (optionally paced) and gathers every event until the stream ends."""
    async def push() -> None:
        for frame in items:
            stream.push_frame(frame)
            await asyncio.sleep(pace_s)
        if end:
            stream.end_input()

    pusher = asyncio.create_task(push())
    try:
        events = [event async for event in stream]
    except BaseException:
        # A failed stream refuses further frames: retrieve that, or the pusher's error would be
        # logged (with its traceback) whenever the garbage collector runs.
        pusher.cancel()
        await asyncio.gather(pusher, return_exceptions=True)
        raise
    await pusher
    return events


def finals(events: list[stt.SpeechEvent]) -> list[stt.SpeechData]:
    return [e.alternatives[0] for e in events if e.type == Kind.FINAL_TRANSCRIPT]


def final_words(events: list[stt.SpeechEvent]) -> list[str]:
    return [str(w) for data in finals(events) for w in data.words]


def lead_of(stream) -> int:
    """Silence the engine put before the stream's audio to share the frame clock (engine.py): it
    is the model's input too, so the expected words are those of lead + audio."""
    return stream._session.stream.lead_samples


async def engine_words(kyutai: KyutaiSTT, audio: np.ndarray, lead: int = 0) -> list[Word]:
    """The engine's words for `lead` samples of silence + `audio`, times in seconds of `audio` (as
    the engine gives a live stream's words: its lead left out)."""
    engine = (await kyutai.engine()).engine
    words = await asyncio.to_thread(transcribe_audio, engine, np.concatenate([np.zeros(lead, np.float32), audio]))
    shift = lead / SAMPLE_RATE  # (times are never negative: engine.py)
    return [Word(w.text, max(0.0, w.start - shift), max(0.0, w.end - shift)) for w in words]


def assert_speech_structure(events: list[stt.SpeechEvent]) -> None:
    """START_OF_SPEECH opens speech before its first transcript, END_OF_SPEECH closes it after its
    last final; interims only inside speech; usage events carry the audio duration."""
    speaking = False
    for event in events:
        if event.type == Kind.START_OF_SPEECH:
            assert not speaking, "two starts in a row"
            speaking = True
        elif event.type == Kind.END_OF_SPEECH:
            assert speaking, "end of speech without a start"
            speaking = False
        elif event.type in (Kind.INTERIM_TRANSCRIPT, Kind.FINAL_TRANSCRIPT) and event.alternatives[0].text:
            assert speaking, f"{event.type} outside speech"
        elif event.type == Kind.RECOGNITION_USAGE:
            assert event.recognition_usage is not None and event.recognition_usage.audio_duration > 0
    assert not speaking, "speech never ended"


async def test_a_stream_gives_the_engines_words_as_finals_with_interims_and_speech_events(kyutai, clips):
    audio = np.concatenate([clips[0], np.zeros(SAMPLE_RATE, np.float32), clips[1]])
    stream = kyutai.stream()
    stream.start_time_offset = 10.0
    events = await collect(stream, frames(audio))
    expected = await engine_words(kyutai, audio, lead_of(stream))

    assert final_words(events) == [w.text for w in expected]
    assert len(expected) >= 6
    assert " ".join(d.text for d in finals(events)) == " ".join(w.text for w in expected)
    # Word times: the engine's, in the caller's audio plus start_time_offset; each final spans its words.
    times = [t for data in finals(events) for w in data.words for t in (w.start_time, w.end_time)]
    assert times == pytest.approx([10.0 + t for w in expected for t in (w.start, w.end)])
    for data in finals(events):
        assert (data.start_time, data.end_time) == (data.words[0].start_time, data.words[-1].end_time)
    # Interims show each segment growing before its final, which repeats the last interim's text.
    kinds = [e.type for e in events]
    assert kinds.count(Kind.INTERIM_TRANSCRIPT) > len(finals(events))
    first_final = kinds.index(Kind.FINAL_TRANSCRIPT)
    assert Kind.INTERIM_TRANSCRIPT in kinds[:first_final]
    assert_speech_structure(events)
    # The second of silence between the sentences is a pause: speech ends and starts again.
    assert kinds.count(Kind.START_OF_SPEECH) >= 2
    usage = sum(e.recognition_usage.audio_duration for e in events if e.type == Kind.RECOGNITION_USAGE)
    assert usage == pytest.approx(len(audio) / SAMPLE_RATE, abs=1e-6)


async def test_concurrent_streams_share_one_engine_and_each_equals_its_solo_run(kyutai, clips):
    # 100 ms frames: whole frames, so no frame-clock silence, and solo runs are the plain audio.
    clips = clips[:2]
    solo = [[w.text for w in await engine_words(kyutai, audio)] for audio in clips]
    streams = [kyutai.stream() for _ in clips]
    results = await asyncio.gather(*(collect(s, frames(a, chunk=2400), pace_s=0.002)
                                     for s, a in zip(streams, clips, strict=True)))
    assert [final_words(events) for events in results] == solo
    assert len({s._session.stream.slot_index for s in streams}) == 2, "both slots of one engine"
    for events in results:
        assert_speech_structure(events)


async def test_48khz_stereo_frames_are_mixed_down_and_resampled(kyutai, clips):
    audio = clips[0]
    # Frames of 10 ms at 48 kHz, two channels (different, so that a channel mix-up shows).
    pcm48 = np.repeat(audio, 2)  # 2x the rate, sample-and-hold: the words only need to match the resampled input
    left, right = int16(pcm48 * 0.8), int16(pcm48 * 0.4)
    stereo = np.stack([left, right], axis=1)
    items = [rtc.AudioFrame(stereo[i:i + 480].tobytes(), 48000, 2, len(stereo[i:i + 480]))
             for i in range(0, len(stereo), 480)]
    stream = kyutai.stream()
    events = await collect(stream, items)

    # What the stream must have fed the model: the channels' average, resampled as it streams.
    resampler = rtc.AudioResampler(48000, SAMPLE_RATE, quality=rtc.AudioResamplerQuality.HIGH)
    mono = np.round((left.astype(np.int32) + right) / 2).astype(np.int16)
    out = [f for c in range(0, len(mono), 480)
           for f in resampler.push(rtc.AudioFrame(mono[c:c + 480].tobytes(), 48000, 1, len(mono[c:c + 480])))]
    fed = pcm_of(out + resampler.flush())
    expected = await engine_words(kyutai, fed, lead_of(stream))
    assert final_words(events) == [w.text for w in expected]
    assert len(expected) >= 3
    usage = sum(e.recognition_usage.audio_duration for e in events if e.type == Kind.RECOGNITION_USAGE)
    assert usage == pytest.approx(len(audio) / SAMPLE_RATE, abs=0.01)


async def test_flush_gives_a_final_at_once_and_later_times_leave_its_silence_out(kyutai, clips):
    # Cut mid-sentence: speech right up to the flush, so the model is still writing the last words.
    first, second = clips[0][: len(clips[0]) * 6 // 10], clips[1]
    stream = kyutai.stream()
    events: list[stt.SpeechEvent] = []

    async def gather() -> None:
        async for event in stream:
            events.append(event)

    reader = asyncio.create_task(gather())
    for frame in frames(first):
        stream.push_frame(frame)
    stream.flush()
    async with asyncio.timeout(30):
        while not finals(events):
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # nothing else may follow but the usage and the end of speech
    assert [e.type for e in events[-3:]] == [Kind.FINAL_TRANSCRIPT, Kind.RECOGNITION_USAGE, Kind.END_OF_SPEECH]
    # The flush's final holds every word of the audio before it, as if the stream had ended there.
    lead = lead_of(stream)
    assert final_words(events) == [w.text for w in await engine_words(kyutai, first, lead)]
    flushed = len(final_words(events))

    for frame in frames(second):
        stream.push_frame(frame)
    stream.end_input()
    await reader
    assert_speech_structure(events)
    # The model heard the flush's silence between the two parts: the words are those of that input,
    # and their times are in the caller's audio, which has no such silence.
    inserted = stream._session.timeline._inserted
    at, silence = inserted[0][0], sum(duration for _, duration in inserted)
    assert at == len(first) / SAMPLE_RATE and silence >= kyutai_delay(kyutai)
    heard = np.concatenate([first, np.zeros(round(silence * SAMPLE_RATE), np.float32), second])
    expected = await engine_words(kyutai, heard, lead)
    assert final_words(events) == [w.text for w in expected]
    assert len(expected) - flushed >= 3

    def caller_time(t: float) -> float:
        return t if t <= at else max(at, t - silence)

    times = [t for data in finals(events) for w in data.words for t in (w.start_time, w.end_time)]
    assert times == pytest.approx([caller_time(t) for w in expected for t in (w.start, w.end)], abs=1e-3)
    assert max(times) <= (len(first) + len(second)) / SAMPLE_RATE


def kyutai_delay(kyutai: KyutaiSTT) -> float:
    from captions.agents import shared_engine

    return shared_engine(kyutai.model, "cpu", 2).engine.text_delay_s


async def test_a_full_engine_makes_a_stream_wait_then_serves_it_with_all_its_audio(kyutai, full_engine, clips):
    shared = await kyutai.engine()
    stream = kyutai.stream(conn_options=APIConnectOptions(max_retry=0, timeout=20))
    collecting = asyncio.create_task(collect(stream, frames(clips[1])))
    async with asyncio.timeout(10):
        while not shared.slots.waiting():
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # its whole audio is pushed while it waits
    assert not collecting.done()
    full_engine[0].abort()
    events = await collecting
    expected = await engine_words(kyutai, clips[1], lead_of(stream))
    assert final_words(events) == [w.text for w in expected]
    assert len(expected) >= 3


async def test_slot_load_counts_served_and_waiting_streams(kyutai, full_engine, clips):
    shared = await kyutai.engine()
    assert shared.slot_load == 1.0
    full_engine[0].abort()
    await all_slots_free(shared.engine, but=len(full_engine) - 1)
    assert shared.slot_load == pytest.approx(0.5)


async def test_a_wait_longer_than_the_timeout_raises_a_retryable_connection_error(kyutai, full_engine, clips):
    shared = await kyutai.engine()
    errors: list[stt.STTError] = []
    kyutai.on("error", errors.append)
    stream = kyutai.stream(conn_options=APIConnectOptions(max_retry=0, timeout=0.5))
    with pytest.raises(APIConnectionError, match=r"no free engine slot for 0\.5 s"):
        await collect(stream, frames(clips[0]))
    assert len(errors) == 1 and errors[0].error.retryable
    async with asyncio.timeout(5):
        while shared.slots.waiting():  # it left the line
            await asyncio.sleep(0.01)


async def test_a_retried_wait_keeps_its_place_and_its_audio(kyutai, full_engine, clips):
    errors: list[stt.STTError] = []
    kyutai.on("error", errors.append)
    stream = kyutai.stream(conn_options=APIConnectOptions(max_retry=3, timeout=0.4, retry_interval=0.1))
    collecting = asyncio.create_task(collect(stream, frames(clips[2])))
    async with asyncio.timeout(10):
        while not errors:
            await asyncio.sleep(0.01)
    full_engine[0].abort()
    events = await collecting
    assert errors and all(e.recoverable for e in errors)
    expected = await engine_words(kyutai, clips[2], lead_of(stream))
    assert final_words(events) == [w.text for w in expected]


async def test_audio_beyond_the_wait_bound_is_dropped_oldest_first_and_said(checkpoint, kyutai, full_engine,
                                                                            clips, caplog):
    bounded = KyutaiSTT(model=checkpoint, device="cpu", batch_size=2, max_wait_audio_s=1.0)  # the same engine
    items = frames(clips[0])
    stream = bounded.stream(conn_options=APIConnectOptions(max_retry=0, timeout=20))
    collecting = asyncio.create_task(collect(stream, items))
    async with asyncio.timeout(10):
        while not any("dropped the oldest" in r.getMessage() for r in caplog.records):
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    full_engine[0].abort()
    events = await collecting
    # What a 1 s bound keeps: the newest frames that fit in it.
    kept = 0
    while kept < len(items) and sum(f.samples_per_channel for f in items[len(items) - kept - 1:]) <= SAMPLE_RATE:
        kept += 1
    audio = pcm_of(items[len(items) - kept:])
    dropped_s = (sum(f.samples_per_channel for f in items) - audio.size) / SAMPLE_RATE
    expected = await engine_words(kyutai, audio, lead_of(stream))
    assert final_words(events) == [w.text for w in expected] and expected
    # Times stay in the caller's audio: the dropped seconds come first.
    starts = [w.start_time for data in finals(events) for w in data.words]
    assert starts == pytest.approx([dropped_s + w.start for w in expected], abs=1e-3)
    usage = sum(e.recognition_usage.audio_duration for e in events if e.type == Kind.RECOGNITION_USAGE)
    assert usage == pytest.approx(audio.size / SAMPLE_RATE)


@pytest.fixture
def failing_step(kyutai, monkeypatch):
    """The engine's next steps fail (as CUDA out of memory would) once `fail[0]` is set."""
    engine = kyutai.load().engine
    real_encode = engine.model.mimi.encode
    fail = [False]

    def encode(x):
        if fail[0]:
            fail[0] = False
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_encode(x)

    monkeypatch.setattr(engine.model.mimi, "encode", encode)
    return fail


async def test_an_engine_error_is_an_api_error_and_the_retry_carries_on_in_a_new_slot(kyutai, clips, failing_step):
    errors: list[stt.STTError] = []
    kyutai.on("error", errors.append)
    audio = np.concatenate([clips[0], clips[1]])
    stream = kyutai.stream(conn_options=APIConnectOptions(max_retry=1, retry_interval=0.05))
    events: list[stt.SpeechEvent] = []

    async def gather() -> None:
        async for event in stream:
            events.append(event)

    reader = asyncio.create_task(gather())
    items = frames(audio)
    for i, frame in enumerate(items):
        stream.push_frame(frame)
        await asyncio.sleep(0.005)  # ten times real time: most of the audio comes after the failure
        if i == 15:
            failing_step[0] = True
    stream.end_input()
    await reader
    assert len(errors) == 1 and errors[0].recoverable and "out of memory" in str(errors[0].error)
    assert isinstance(errors[0].error, APIError)
    # The words the failed stream had finished were given; the retry recognised the rest of the
    # audio in a new engine stream, its times still in the caller's audio.
    session = stream._session
    resumed_at = round(session.timeline.base_s * SAMPLE_RATE)
    assert 0 < resumed_at < len(audio) // 2
    expected = await engine_words(kyutai, audio[resumed_at:], lead_of(stream))
    said = [w for data in finals(events) for w in data.words]
    earlier, later = said[:-len(expected)], said[-len(expected):]
    assert [str(w) for w in later] == [w.text for w in expected] and len(expected) >= 6
    assert all(w.end_time <= resumed_at / SAMPLE_RATE for w in earlier), "only the failed stream's audio"
    assert [w.start_time for w in later] == pytest.approx([resumed_at / SAMPLE_RATE + w.start for w in expected],
                                                          abs=1e-3)
    assert_speech_structure(events)


async def test_an_engine_error_without_retries_ends_the_stream_with_it(kyutai, clips, failing_step):
    failing_step[0] = True
    stream = kyutai.stream(conn_options=APIConnectOptions(max_retry=0))
    with pytest.raises(APIError, match="out of memory"):
        await collect(stream, frames(clips[0]))


async def test_recognize_gives_one_final_with_every_word(kyutai, clips):
    audio = clips[1]
    event = await kyutai.recognize(frames(audio, chunk=4800))
    expected = await engine_words(kyutai, audio)
    assert event.type == Kind.FINAL_TRANSCRIPT
    data = event.alternatives[0]
    assert data.text == " ".join(w.text for w in expected)
    assert [(str(w), w.start_time, w.end_time) for w in data.words] == [(w.text, w.start, w.end) for w in expected]


async def test_capabilities_are_declared_as_implemented(kyutai):
    caps = kyutai.capabilities
    assert (caps.streaming, caps.interim_results, caps.aligned_transcript, caps.offline_recognize,
            caps.manual_flush, caps.diarization, caps.keyterms) == (True, True, "word", True, True, False, False)
    assert (kyutai.model, kyutai.provider) == (kyutai._model, "kyutai")


def test_timeline_takes_the_inserted_silence_out():
    timeline = _Timeline(base_s=2.0)
    timeline.insert(1.0, 0.5)
    timeline.insert(3.0, 0.25)
    assert [timeline.to_caller(t) for t in (0.5, 1.0, 1.2, 1.5, 2.0, 3.1, 4.0)] == pytest.approx(
        [2.5, 3.0, 3.0, 3.0, 3.5, 4.5, 5.25])


@pytest.mark.livekit
@pytest.mark.timeout(180)
async def test_an_agent_session_hears_a_speaker_in_a_real_room_through_kyutai_stt(kyutai, speech_dir, tmp_path):
    """A voice agent's AgentSession with our STT (no LLM, TTS or VAD; turns from the STT), a bot
    speaking in the room: the session's user transcripts are the engine's words for the audio
    the session received."""
    from livekit.agents import Agent, AgentSession, room_io

    from captions.dev.bots import Publisher, make_token
    from captions.dev.livekit_server import start_dev_server

    heard: list[rtc.AudioFrame] = []

    class ListeningAgent(Agent):
        async def stt_node(self, audio, model_settings):
            async def recorded():
                async for frame in audio:
                    heard.append(frame)
                    yield frame

            async for event in Agent.default.stt_node(self, recorded(), model_settings):
                yield event

    wav = espeak_wav(SENTENCES[1], speech_dir / "agents-room.wav", rate=48000)
    server = start_dev_server(tmp_path / "livekit-server.log")  # no caption worker joins this server
    agent_room, speaker = rtc.Room(), None
    session = AgentSession(stt=kyutai, vad=None, turn_handling={"turn_detection": "stt"})
    transcripts: list = []
    session.on("user_input_transcribed", transcripts.append)
    try:
        await agent_room.connect(server.url, make_token(server, "agents-stt", "agent", agent=True))
        await session.start(agent=ListeningAgent(instructions="Listen."), room=agent_room,
                            room_options=room_io.RoomOptions(
                                participant_identity="speaker", audio_output=False, text_output=False,
                                text_input=False,
                                audio_input=room_io.AudioInputOptions(sample_rate=SAMPLE_RATE,
                                                                      auto_gain_control=False)))
        speaker = await Publisher(server, "agents-stt", "speaker", sample_rate=48000).connect()
        await speaker.play(wav)
        await speaker.silence(2.5)
        # The model's pause ends the speech: a final, then the user's turn ends (END_OF_SPEECH).
        async with asyncio.timeout(30):
            while not (transcripts and transcripts[-1].is_final and session.user_state == "listening"):
                await asyncio.sleep(0.05)
        stream = next(iter(kyutai._streams))
        expected = " ".join(w.text for w in await engine_words(kyutai, pcm_of(list(heard)), lead_of(stream)))
        assert len(expected.split()) >= 3

        def said() -> str:
            return " ".join(t.transcript for t in transcripts if t.is_final)

        # On a loaded machine the engine may still be catching up with the last words.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(20):
                while said() != expected:
                    await asyncio.sleep(0.1)
        assert said() == expected
        assert any(not t.is_final for t in transcripts), "interim transcripts before the final ones"
    finally:
        await asyncio.wait_for(session.aclose(), 10)
        if speaker is not None:
            await speaker.disconnect()
        await agent_room.disconnect()
        server.stop()
