"""A speaker holds an engine slot while they talk, and loses nothing while they wait for one
(captions/live/speaker.py, with the real voice-activity model, simulated microphones on a shared
clock run 4 times faster than real time, and the fake engine)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from captions.dev.microphones import MeetingClock, SimulatedMicrophone
from captions.dev.speech import speech_samples
from captions.live.metrics import METRICS
from captions.live.segmenter import SegmenterOptions
from captions.live.slots import SlotQueue
from captions.live.speaker import Speaker, SpeakerOptions
from captions.live.track_audio import TrackAudio
from captions.stt.api import SAMPLE_RATE
from tests.fake_engine import FakeEngine

pytestmark = [pytest.mark.timeout(120)]
SPEED = 4.0


@pytest.fixture(scope="module")
def sentence(tmp_path_factory) -> np.ndarray:
    pcm = speech_samples("The quick brown fox jumps over the lazy dog near the river bank.",
                         tmp_path_factory.mktemp("speaker-speech"))
    return (pcm * 32767).astype(np.int16)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.int16)


def noise(seconds: float, level: int = 30) -> np.ndarray:
    return np.random.default_rng(0).integers(-level, level, int(seconds * SAMPLE_RATE)).astype(np.int16)


class Host:
    """A room as speakers see it (speaker.SpeakerHost), collecting their captions."""

    def __init__(self, engine: FakeEngine, options: SpeakerOptions, room_name: str = "room",
                 slots: SlotQueue | None = None):
        self.room_name = room_name
        self.slots = slots if slots is not None else SlotQueue(engine, poll_s=0.05)
        self.segmenter_options = SegmenterOptions()
        self.speaker_options = options
        self.record_dir = None
        self.timing_attributes = False
        self.captions: list[tuple[str, object, float]] = []

    def status_changed(self) -> None:
        pass

    def caption(self, speaker, update, wall_time, timing=None) -> None:
        self.captions.append((speaker.identity, update, wall_time(update.words[0].start) if update.words else 0.0))


def options(**overrides) -> SpeakerOptions:
    values = {"pre_roll_s": 0.5, "release_after_s": 1.0, "max_wait_s": 30.0, **overrides}
    return SpeakerOptions(**values)


async def run(host: Host, signals: dict[str, np.ndarray], seconds: float) -> dict[str, Speaker]:
    clock = MeetingClock(speed=SPEED)
    speakers = {name: Speaker(host, name, name, f"TR_{name}", SimulatedMicrophone(signal, clock))
                for name, signal in signals.items()}
    await asyncio.sleep(seconds / SPEED)
    for speaker in speakers.values():
        speaker.stop()
    await asyncio.wait_for(asyncio.gather(*(s.ended.wait() for s in speakers.values())), 30)
    host.slots.close()
    return speakers


def pushed(engine: FakeEngine, index: int) -> np.ndarray:
    return np.concatenate(engine.opened[index].pushed)


def located(audio: np.ndarray, signal: np.ndarray) -> int:
    """Where the pushed audio (float) is found in the signal, exactly (-1: it is not)."""
    pcm = np.round(audio * 32768).astype(np.int16)
    head = pcm[:64]
    for start in np.flatnonzero(signal[:signal.size - pcm.size + 1] == pcm[0]):
        if np.array_equal(signal[start:start + 64], head) and np.array_equal(signal[start:start + pcm.size], pcm):
            return int(start)
    return -1


async def test_a_turn_carries_the_pre_roll_and_all_the_speech_then_frees_the_slot(sentence):
    signal = np.concatenate([noise(1.5), sentence, noise(3.0)])
    engine = FakeEngine(batch_size=1)
    host = Host(engine, options())
    await run(host, {"alice": signal}, 8.0)
    assert len(engine.opened) == 1, "one turn, one engine stream"
    audio = pushed(engine, 0)
    start = located(audio, signal)
    assert start >= 0, "the engine got the track's audio exactly: kept audio, then live, without a seam"
    speech_starts = int(1.5 * SAMPLE_RATE)
    assert start <= speech_starts - int(0.3 * SAMPLE_RATE), "at least 300 ms of pre-roll before the voice"
    assert start + audio.size >= speech_starts + sentence.size, "the whole sentence went to the engine"
    # (Giving the slot back after the pause, while the microphone stays: test_fairness.py, on a
    # stepped clock; here every speaker is stopped first, so it would hold by construction.)
    assert host.captions, "the turn was captioned"


async def test_a_silent_participant_never_takes_a_slot():
    engine = FakeEngine(batch_size=1)
    await run(Host(engine, options()), {"quiet": noise(4.0)}, 4.0)
    assert engine.opened == []


async def test_a_waiting_speaker_is_captioned_whole_once_a_slot_frees(sentence):
    alice = np.concatenate([noise(0.5), sentence, sentence, noise(3.0)])
    bob = np.concatenate([noise(1.5), sentence, noise(6.0)])
    engine = FakeEngine(batch_size=1)
    host = Host(engine, options())
    await run(host, {"alice": alice, "bob": bob}, 12.0)
    assert [s.id for s in engine.opened] == [1, 2], "alice's turn, then bob's"
    bob_audio = pushed(engine, 1)
    start = located(bob_audio, bob)
    assert start >= 0 and start <= int(1.5 * SAMPLE_RATE), "bob's turn starts before he spoke"
    assert start + bob_audio.size >= int(1.5 * SAMPLE_RATE) + sentence.size, "everything bob said while waiting"
    bob_words = [u for who, u, _ in host.captions if who == "bob" and u.final]
    assert bob_words, "bob's late captions came"


async def test_a_speaker_who_pauses_while_waiting_keeps_one_turn_without_the_silence(sentence):
    alice = np.concatenate([noise(0.2), sentence, sentence, sentence, noise(2.0)])
    bob = np.concatenate([noise(1.0), sentence[:SAMPLE_RATE], noise(3.0), sentence[SAMPLE_RATE:2 * SAMPLE_RATE],
                          noise(8.0)])
    engine = FakeEngine(batch_size=1)
    host = Host(engine, options())
    await run(host, {"alice": alice, "bob": bob}, 16.0)
    bob_audio = np.round(pushed(engine, 1) * 32768).astype(np.int16)
    # Each stretch: 0.5 s pre-roll, 1 s of speech, 1 s of pause until the turn would have ended; the
    # rest of the 3 s pause (and the 8 s after) is not kept: 5 s, where the uncut span is 6.5 s.
    assert bob_audio.size <= 5.3 * SAMPLE_RATE, "the long pause was cut out"
    for part in (sentence[:SAMPLE_RATE], sentence[SAMPLE_RATE:2 * SAMPLE_RATE]):
        middle = part[SAMPLE_RATE // 4: SAMPLE_RATE // 2]
        found = located(middle.astype(np.float32) / 32768, bob_audio) >= 0
        assert found, "both stretches of speech are in the turn"
    times = sorted(t for who, u, t in host.captions if who == "bob" and u.final and u.words)
    assert times == sorted(times)


async def test_a_wait_longer_than_the_bound_drops_the_oldest_audio_and_counts_it(sentence):
    alice = np.concatenate([noise(0.2), sentence, sentence, noise(2.0)])
    bob = np.concatenate([noise(0.6), sentence, noise(6.0)])
    engine = FakeEngine(batch_size=1)
    dropped = METRICS.frames_dropped.labels("waiting_overflow")._value.get()
    host = Host(engine, options(max_wait_s=1.0))
    await run(host, {"alice": alice, "bob": bob}, 12.0)
    assert METRICS.frames_dropped.labels("waiting_overflow")._value.get() > dropped
    bob_audio = pushed(engine, 1)
    assert bob_audio.size <= int(1.0 * SAMPLE_RATE) + 2 * SAMPLE_RATE, "at most the bound, then live"


class _GateStub:
    def feed(self, pcm) -> None:
        pass

    def close(self) -> None:
        pass


async def test_when_a_tracks_audio_was_produced_is_known_even_when_its_chunks_are_handled_late(monkeypatch):
    """The engine puts live speakers on one frame clock by when their audio was produced (WebRTC's
    tick), and a busy worker handles chunks late: a few ms (another room's thread held the GIL), or
    several at once after a stall. The track still tells when each sample was produced, within 2 ms
    (the engine tells ticks 10 ms apart), also while the tick drifts against this machine's clock."""
    rng = np.random.default_rng(3)
    chunk_s, drift = 0.08, 1e-4  # the tick runs 0.1 ms/s slow
    produced = [1000.0 + (k + 1) * chunk_s * (1 + drift) for k in range(400)]  # each chunk's last sample
    handled, free_at = [], 0.0
    for k, at in enumerate(produced):
        if k % 40 == 20:
            free_at = at + 0.06  # the loop stalls 60 ms: what arrives meanwhile is handled at once after
        handled.append(max(at, free_at) + rng.uniform(0.0, 0.001) + (0.008 if rng.random() < 0.2 else 0.0))
    clock = [0.0]
    monkeypatch.setattr("captions.live.track_audio._now", lambda: clock[0])

    class LateSource:
        async def chunks(self, chunk_ms: int):
            for at in handled:
                clock[0] = at
                yield np.zeros(int(chunk_s * SAMPLE_RATE), dtype=np.int16)

    errors = []
    track = TrackAudio(LateSource(), _GateStub(), on_audio=lambda: errors.append(
        track.produced_at(track.end) - produced[len(errors)]))
    await asyncio.wait_for(track.ended.wait(), 10)
    await track.aclose()
    lateness = np.array(handled) - np.array(produced)
    assert lateness.max() > 0.05 and (lateness > 0.005).mean() > 0.15, "the chunks should be handled late"
    assert len(errors) == len(produced)
    assert np.abs(errors[12:]).max() < 0.002, "when the audio was produced, within 2 ms"
