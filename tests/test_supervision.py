"""No microphone stops being captioned silently: a failure in one of a speaker's long-lived tasks
(the track's reader, its live feed, the task that watches the track) is logged once with its
traceback, counted in captions_task_failures_total, and the speaker recovers or ends visibly
(captions/live/supervise.py; simulated microphones on a clock run 4 times faster than real time,
the fake engine)."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from captions.dev.microphones import MeetingClock, SimulatedMicrophone
from captions.dev.speech import speech_samples
from captions.live import track_audio
from captions.live.metrics import TASK_METRICS
from captions.live.speaker import Speaker
from captions.stt.api import SAMPLE_RATE
from tests.fake_engine import FakeEngine
from tests.test_speaker import SPEED, Host, located, noise, options, pushed

pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def sentence(tmp_path_factory) -> np.ndarray:
    pcm = speech_samples("The quick brown fox jumps over the lazy dog near the river bank.",
                         tmp_path_factory.mktemp("supervision-speech"))
    return (pcm * 32767).astype(np.int16)


class Faulty:
    """A simulated microphone whose stream of `chunk_ms` chunks raises after `after` chunks, on its
    first `times` openings (other streams of the track are untouched)."""

    def __init__(self, mic: SimulatedMicrophone, chunk_ms: int, after: int, times: int = 1):
        self.mic, self.chunk_ms, self.after, self.times = mic, chunk_ms, after, times

    async def chunks(self, chunk_ms: int):
        failing = chunk_ms == self.chunk_ms and self.times > 0
        if failing:
            self.times -= 1
        n = 0
        async for pcm in self.mic.chunks(chunk_ms):
            if failing and n >= self.after:
                raise RuntimeError(f"injected failure of the {chunk_ms} ms stream")
            n += 1
            yield pcm


def failures(task: str) -> float:
    return TASK_METRICS.failures.labels(task)._value.get()


def logged_failures(caplog, task_name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info is not None
            and f"task {task_name}" in r.getMessage()]


async def until(condition, timeout: float = 20.0) -> bool:
    """Waits (bounded) until `condition()` holds; its value then."""
    for _ in range(int(timeout / 0.02)):
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()


async def start(host: Host, source) -> Speaker:
    return Speaker(host, "alice", "Alice", "TR_alice", source)


async def finish(host: Host, speaker: Speaker) -> None:
    speaker.stop()
    await asyncio.wait_for(speaker.ended.wait(), 30)
    host.slots.close()


async def test_a_reader_that_fails_is_restarted_and_the_speech_after_it_is_captioned(sentence, caplog):
    signal = np.concatenate([noise(1.0), sentence, noise(3.0)])
    engine = FakeEngine(batch_size=1)
    host = Host(engine, options())
    before = failures("track_reader")
    mic = Faulty(SimulatedMicrophone(signal, MeetingClock(speed=SPEED)), chunk_ms=80, after=4)  # at 0.32 s
    speaker = await start(host, mic)
    await asyncio.sleep(7.0 / SPEED)
    assert not speaker.ended.is_set(), "the microphone is still captioned"
    await finish(host, speaker)
    assert engine.opened, "the sentence spoken after the failure took a slot"
    audio = pushed(engine, 0)
    start_at = located(audio, signal)
    assert start_at >= 0 and start_at + audio.size >= SAMPLE_RATE + sentence.size, "the whole sentence"
    assert host.captions, "and it was captioned"
    assert failures("track_reader") == before + 1, "the failure is counted"
    assert len(logged_failures(caplog, "track-room/alice")) == 1, "and logged once, with its traceback"


async def test_a_reader_that_keeps_failing_ends_the_speaker_visibly(monkeypatch, caplog):
    monkeypatch.setattr(track_audio, "RESTART_DELAYS_S", (0.0, 0.0))
    engine = FakeEngine(batch_size=1)
    host = Host(engine, options())
    before = failures("track_reader")
    mic = Faulty(SimulatedMicrophone(noise(5.0), MeetingClock(speed=SPEED)), chunk_ms=80, after=1, times=99)
    speaker = await start(host, mic)
    await asyncio.wait_for(speaker.ended.wait(), 20)
    assert failures("track_reader") == before + 3, "each failure counted: two restarts, then it gave up"
    assert any("giving up" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    host.slots.close()


@pytest.mark.parametrize("after_ms", [0, 120], ids=["before-the-junction", "while-live"])
async def test_a_live_feed_that_fails_frees_the_slot_and_a_new_turn_captions_the_rest(sentence, caplog, after_ms):
    """Failing before the junction (the turn was JOINING) or after (LIVE): the turn closes with what
    it had (its slot is freed), and a new turn carries the rest of the sentence."""
    signal = np.concatenate([noise(1.0), sentence, noise(3.0)])
    engine = FakeEngine(batch_size=1)
    host = Host(engine, options())
    before = failures("live_feed")
    live_ms = host.speaker_options.live_chunk_ms  # the live stream's: the kept one reads 80 ms
    mic = Faulty(SimulatedMicrophone(signal, MeetingClock(speed=SPEED)), chunk_ms=live_ms, after=after_ms // live_ms)
    speaker = await start(host, mic)
    assert await until(lambda: len(engine.opened) >= 2), "a second turn took over after the failure"
    assert await until(lambda: engine.slots_in_use == 0), "the slot is free after the sentence and its pause"
    await finish(host, speaker)
    assert failures("live_feed") == before + 1
    assert len(logged_failures(caplog, "live-room/alice")) == 1
    assert len(engine.opened) == 2, "one failure, one more turn"
    second = pushed(engine, 1)
    second_start = located(second, signal)
    assert second_start >= 0, "the second turn's audio is the track's"
    assert second_start + second.size >= SAMPLE_RATE + sentence.size, "it carries the sentence to its end"
    first = pushed(engine, 0)
    first_start = located(first, signal)
    assert first_start >= 0 and first_start + first.size <= second_start + 1, "nothing pushed twice"


async def test_a_watch_that_fails_ends_the_speaker_and_frees_its_slot(sentence, monkeypatch, caplog):
    signal = np.concatenate([noise(1.0), sentence])
    engine = FakeEngine(batch_size=1)
    host = Host(engine, options())
    before = failures("speaker_watch")
    mic = SimulatedMicrophone(signal, MeetingClock(speed=SPEED))
    speaker = await start(host, mic)
    assert await until(lambda: engine.slots_in_use == 1), "alice talks, in a slot"

    def broken_stop(*args, **kwargs):
        raise RuntimeError("injected failure while stopping")

    monkeypatch.setattr(speaker, "stop", broken_stop)
    mic.closed = True  # the track goes away: the watch stops the speaker, which raises
    await asyncio.wait_for(speaker.ended.wait(), 20)
    assert await until(lambda: engine.slots_in_use == 0), "the slot was given back"
    assert failures("speaker_watch") == before + 1
    assert len(logged_failures(caplog, "speaker-TR_alice")) == 1
    host.slots.close()
