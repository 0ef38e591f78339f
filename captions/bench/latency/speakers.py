"""The speaking bots of `captions bench latency`: publishers in child processes that say speech
clips in real time on one clock, as microphones would (`python -m captions.bench.latency.speakers
CONFIG`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from captions.bench.common import BenchError, run_child_process, speech_streams
from captions.stt.api import SAMPLE_RATE

TICK_S = 0.02
TICK_SAMPLES = 480
"""The bots wake every 20 ms, the Opus packet duration WebRTC sends anyway, and hand over two 10 ms
frames (real-time capture takes 10 ms frames); waking every 10 ms would cost them twice the Python
work for no earlier packet."""
CAPTURE_SAMPLES = 240
PUBLISHER_QUEUE_MS = int(os.environ.get("CAPTIONS_BENCH_PUBLISHER_QUEUE_MS", "0"))
"""0: the bots' AudioSource hands each frame straight to WebRTC (real-time capture, no queue)."""
SUBSCRIBE_TIMEOUT_S = 60.0


class BotFailed(BenchError):
    """A speaker bot process failed."""


# ---- the speaking bots ---------------------------------------------------------------------------

@dataclass
class Voice:
    """One publisher and the speech it will say."""

    publisher: object
    clip: np.ndarray
    """int16 mono 24 kHz speech."""
    clip_onset: int
    """Index of the clip's first sample above the onset threshold."""
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)


class Chorus:
    """Drives every publisher from one clock: silence until `start_speech`, then each its clip,
    then silence. One loop for all (one timer per bot would cost more than the bots' audio)."""

    def __init__(self, voices: list[Voice], tail_s: float):
        self.voices = voices
        self.tail_ticks = round(tail_s / TICK_S)
        self.origin_wall = 0.0
        self.speech_tick: int | None = None
        self.lateness: list[float] = []
        self.handed_at: list[float] = []
        """Wall time at which each 20 ms of speech (from the clip's start) was handed to WebRTC."""
        self._end_tick: int | None = None
        self._silence = np.zeros(TICK_SAMPLES, dtype=np.int16)

    @property
    def speech_started_at(self) -> float:
        """Wall time at which clip sample 0 was captured (the microphone's timeline)."""
        assert self.speech_tick is not None
        return self.origin_wall + self.speech_tick * TICK_S

    def start_speech(self, after_s: float, at_tick: int) -> None:
        self.speech_tick = at_tick + round(after_s / TICK_S)
        longest = max(v.clip.size for v in self.voices)
        self._end_tick = self.speech_tick + -(-longest // TICK_SAMPLES) + self.tail_ticks

    def _chunk(self, voice: Voice, tick: int) -> np.ndarray:
        if self.speech_tick is None or tick < self.speech_tick:
            return self._silence
        offset = (tick - self.speech_tick) * TICK_SAMPLES
        chunk = voice.clip[offset:offset + TICK_SAMPLES]
        if chunk.size < TICK_SAMPLES:
            chunk = np.concatenate([chunk, np.zeros(TICK_SAMPLES - chunk.size, np.int16)])
        return chunk

    async def run(self, ready: asyncio.Future, deadline: float) -> None:
        """Plays until the tail after the speech ends; `ready` resolves (to the lead-in in seconds)
        once the agent has subscribed to every bot."""
        from livekit import rtc

        origin = time.monotonic()
        self.origin_wall = time.time() - (time.monotonic() - origin)
        tick = 0
        while self._end_tick is None or tick < self._end_tick:
            if time.monotonic() > deadline:
                raise BenchError("the speakers did not finish in time (is the machine overloaded?)")
            if self.speech_tick is None and ready.done():
                self.start_speech(ready.result(), tick)
            # Frame `tick` is complete at the end of its 20 ms; a microphone hands it over then.
            due = origin + (tick + 1) * TICK_S
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.speech_tick is not None and tick >= self.speech_tick:
                self.lateness.append(time.monotonic() - due)
                self.handed_at.append(time.time())
            # All bots at once: the FFI round trips overlap rather than add up.
            await asyncio.gather(*(self._capture(rtc, v, self._chunk(v, tick)) for v in self.voices))
            tick += 1

    @staticmethod
    async def _capture(rtc, voice: Voice, chunk: np.ndarray) -> None:
        for start in range(0, chunk.size, CAPTURE_SAMPLES):
            part = chunk[start:start + CAPTURE_SAMPLES]
            frame = rtc.AudioFrame(part.tobytes(), SAMPLE_RATE, 1, part.size)
            await voice.publisher.source.capture_frame(frame)


def onset_of(pcm16: np.ndarray) -> int | None:
    from captions.live.timing import ONSET_THRESHOLD

    loud = np.flatnonzero(np.abs(pcm16.astype(np.int32)) > ONSET_THRESHOLD)
    return int(loud[0]) if loud.size else None


def speech_clips(count: int, seconds: float) -> list[np.ndarray]:
    """`count` different int16 speech clips (espeak-ng voices and sentences, see bench_engine)."""
    streams = speech_streams(count, seconds)
    return [np.clip(np.round(s * 32767.0), -32768, 32767).astype(np.int16) for s in streams]


# ---- the speaker bots (a child process) -----------------------------------------------------------

async def _speak(config: dict) -> None:
    """Connects the publishers of clips `indices`, waits until the agent subscribed to them all,
    then speaks; writes each speaker's result. The livekit FFI hands every event to every room of a
    process, so many bots in one process cost quadratically more (see `--bots-per-process`)."""
    from captions.dev.bots import Publisher, server_from_config
    from captions.protocol import TOPIC_TRANSCRIPTION

    server = server_from_config(config)
    with np.load(config["clips"]) as archive:
        clips = {i: archive[f"arr_{i}"] for i in config["indices"]}
    deadline = time.monotonic() + config["timeout_s"]
    voices: list[Voice] = []
    try:
        for i, clip in clips.items():
            publisher = await Publisher(server, config["room"], f"speaker-{i:02d}", auto_subscribe=False,
                                        queue_size_ms=PUBLISHER_QUEUE_MS).connect()
            onset = onset_of(clip)
            if onset is None:
                raise BenchError(f"speech clip {i} is silent")
            voice = Voice(publisher, clip, onset)
            # The agent is the only one that subscribes to the bots' microphones.
            publisher.room.on("local_track_subscribed", lambda _track, v=voice: v.subscribed.set())
            # Participants' clients receive the captions too (and would log each one unread).
            publisher.room.register_text_stream_handler(TOPIC_TRANSCRIPTION, _drain)
            voices.append(voice)
        chorus = Chorus(voices, config["tail_s"])
        ready: asyncio.Future = asyncio.get_running_loop().create_future()
        playing = asyncio.create_task(chorus.run(ready, deadline))
        try:
            await _wait_for_agent(voices, playing)
            ready.set_result(config["lead_in_s"])
            await playing
        finally:
            if not playing.done():
                playing.cancel()
                with contextlib.suppress(asyncio.CancelledError, BenchError):
                    await playing
        ended_at = time.time()
        for i, voice in zip(clips, voices):
            result = {"identity": voice.publisher.identity, "track_sid": voice.publisher.track_sid,
                      "clip_onset": voice.clip_onset, "speech_started_at": chorus.speech_started_at,
                      "ended_at": ended_at, "lateness": chorus.lateness, "handed_at": chorus.handed_at}
            (Path(config["out_dir"]) / f"speaker-{i:02d}.json").write_text(json.dumps(result))
    finally:
        for voice in voices:
            with contextlib.suppress(Exception):
                await voice.publisher.disconnect()


def _drain(reader, _identity: str) -> None:
    task = asyncio.ensure_future(reader.read_all())
    _DRAINING.add(task)
    task.add_done_callback(_DRAINING.discard)


_DRAINING: set[asyncio.Future] = set()


async def _wait_for_agent(voices: list[Voice], playing: asyncio.Task) -> None:
    """Until the agent has subscribed to every microphone (the bots send silence meanwhile)."""
    waiting = asyncio.ensure_future(asyncio.gather(*(v.subscribed.wait() for v in voices)))
    done, _ = await asyncio.wait({waiting, playing}, timeout=SUBSCRIBE_TIMEOUT_S,
                                 return_when=asyncio.FIRST_COMPLETED)
    if playing in done:
        waiting.cancel()
        playing.result()  # raises what stopped the bots
    if waiting not in done:
        waiting.cancel()
        missing = sum(not v.subscribed.is_set() for v in voices)
        raise BenchError(f"the agent did not subscribe to {missing} of {len(voices)} speakers within "
                         f"{SUBSCRIBE_TIMEOUT_S:.0f} s")


if __name__ == "__main__":
    raise SystemExit(run_child_process(_speak, sys.argv[1], "speaker bots"))
