"""The live feed joins the kept audio without a seam (captions/live/track_audio.py), on a stepped
10 ms tick: the order of arrivals is fixed, so the cases that depend on it are deterministic."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from captions.live.track_audio import LIVE_CHUNK, TrackAudio
from tests.test_speaker import _GateStub

pytestmark = [pytest.mark.timeout(60)]


class SteppedMicrophone:
    """`signal` on a tick the test advances: a stream opened at tick t yields the audio from t on,
    each chunk once its last tick passed, its first chunk not the signal (a cold resampler's)."""

    def __init__(self, signal: np.ndarray):
        self.signal, self.tick = signal, 0
        self._ticked = asyncio.Event()

    async def step(self) -> None:
        self.tick += 1
        self._ticked.set()
        self._ticked = asyncio.Event()
        for _ in range(5):  # every reader takes what this tick completed
            await asyncio.sleep(0)

    async def chunks(self, chunk_ms: int):
        ticks, first, k = chunk_ms // 10, self.tick, 0
        while True:
            while self.tick < first + (k + 1) * ticks:
                await self._ticked.wait()
            start = (first + k * ticks) * LIVE_CHUNK
            chunk = self.signal[start:start + ticks * LIVE_CHUNK].copy()
            yield chunk // 2 + 1 if k == 0 else chunk
            k += 1


def ticks(n: int, loud: bool, seed: int) -> np.ndarray:
    size = n * LIVE_CHUNK
    return np.random.default_rng(seed).integers(-3000, 3000, size).astype(np.int16) if loud else np.zeros(size, np.int16)


async def test_a_live_feed_that_starts_in_digital_silence_joins_where_it_is_not_at_an_earlier_pause():
    """Speech with pauses of digital silence (a synthetic voice's): the live stream opens just
    before a pause, whose place the kept stream (80 ms chunks) has not delivered yet, while an
    earlier pause is kept. Silence matches silence anywhere: joining at the earlier pause would lose
    the speech after it. The junction is where the live audio's first sound is found."""
    signal = np.concatenate([ticks(30, True, 1), ticks(10, False, 0), ticks(19, True, 2),  # pause at 30-39
                             ticks(11, False, 0), ticks(40, True, 3)])  # the live stream's pause: 59-69
    mic = SteppedMicrophone(signal)
    track = TrackAudio(mic, _GateStub(), on_audio=lambda: None)
    for _ in range(3):
        await asyncio.sleep(0)  # the kept stream opens at tick 0: its indices are the signal's
    for _ in range(58):
        await mic.step()
    assert track.end == 56 * LIVE_CHUNK, "the kept stream lags: its next chunk ends at tick 64"
    junctions, pushes = [], []
    track.start_live(on_junction=junctions.append, on_chunk=lambda pcm, index: pushes.append((index, pcm)))
    for _ in range(3):
        await asyncio.sleep(0)  # the live stream opens at tick 58: its cold chunk is the last of the speech
    for _ in range(40):
        await mic.step()
    await track.aclose()
    assert junctions == [59 * LIVE_CHUNK], "joined where the live stream is, after its cold first chunk"
    assert pushes and pushes[0][0] == junctions[0]
    live = np.concatenate([pcm for _, pcm in pushes])
    assert np.array_equal(live, signal[junctions[0]:junctions[0] + live.size]), "then the signal, without a seam"
    assert junctions[0] + live.size >= 90 * LIVE_CHUNK, "and the speech after the pause"


async def test_a_live_feed_in_a_long_digital_silence_joins_by_time_after_its_patience():
    """No sound to find: after `SPLICE_PATIENCE` of kept audio the live feed joins by its time-based
    guess (silence for silence, harmless), instead of holding the turn's audio back until a sound."""
    signal = np.concatenate([ticks(30, True, 1), ticks(150, False, 0)])
    mic = SteppedMicrophone(signal)
    track = TrackAudio(mic, _GateStub(), on_audio=lambda: None)
    for _ in range(3):
        await asyncio.sleep(0)
    for _ in range(40):
        await mic.step()
    junctions, pushes = [], []
    track.start_live(on_junction=junctions.append, on_chunk=lambda pcm, index: pushes.append((index, pcm)))
    for _ in range(3):
        await asyncio.sleep(0)
    for _ in range(49):
        await mic.step()
    assert not junctions, "waiting for a sound (the kept stream had 40 ticks when the probe came)"
    for _ in range(20):
        await mic.step()
    await track.aclose()
    assert len(junctions) == 1 and 30 * LIVE_CHUNK <= junctions[0] <= 60 * LIVE_CHUNK, "joined in the silence"
    assert pushes and not np.concatenate([pcm for _, pcm in pushes]).any()
