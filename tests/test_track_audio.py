"""The live feed joins the kept audio without a seam (captions/live/track_audio.py), on a stepped
10 ms tick: the order of arrivals is fixed, so the cases that depend on it are deterministic."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from captions.live import track_audio
from captions.live.track_audio import TrackAudio
from captions.stt.api import TICK
from tests.test_speaker import _GateStub

pytestmark = [pytest.mark.timeout(60)]


@pytest.fixture(autouse=True)
def _arrival_clock(monkeypatch):
    """Restores track_audio's clock of arrivals after a test whose microphone drove it."""
    monkeypatch.setattr(track_audio, "_now", track_audio._now)


class SteppedMicrophone:
    """`signal` on a tick the test advances: a stream opened at tick t yields the audio from t on,
    each chunk once its last tick passed, its first chunk not the signal (a cold resampler's).
    Arrivals are timed by the tick (track_audio's clock), as WebRTC's are by the wall clock."""

    def __init__(self, signal: np.ndarray):
        self.signal, self.tick = signal, 0
        self._ticked = asyncio.Event()
        track_audio._now = lambda: self.tick / 100

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
            start = (first + k * ticks) * TICK
            chunk = self.signal[start:start + ticks * TICK].copy()
            yield chunk // 2 + 1 if k == 0 else chunk
            k += 1


async def open_live(mic: SteppedMicrophone, open_at: int, chunk_ms: int):
    """A track on `mic` whose live feed opens at tick `open_at`: the track, its junctions and its
    pushes (index, samples) so far."""
    track = TrackAudio(mic, _GateStub(), on_audio=lambda: None)
    for _ in range(3):
        await asyncio.sleep(0)  # the kept stream opens at tick 0: its indices are the signal's
    for _ in range(open_at):
        await mic.step()
    junctions, pushes = [], []
    track.start_live(on_junction=junctions.append, on_chunk=lambda pcm, index: pushes.append((index, pcm)),
                     chunk_ms=chunk_ms)
    for _ in range(3):
        await asyncio.sleep(0)  # the live stream opens at tick `open_at`
    return track, junctions, pushes


async def splice(mic: SteppedMicrophone, open_at: int, steps: int, chunk_ms: int):
    """`open_live`, then `steps` ticks on: the junctions and pushes."""
    track, junctions, pushes = await open_live(mic, open_at, chunk_ms)
    for _ in range(steps):
        await mic.step()
    await track.aclose()
    return junctions, pushes


def ticks(n: int, loud: bool, seed: int) -> np.ndarray:
    size = n * TICK
    return np.random.default_rng(seed).integers(-3000, 3000, size).astype(np.int16) if loud else np.zeros(size, np.int16)


@pytest.mark.parametrize("chunk_ms", [10, 40])
async def test_a_live_feed_that_starts_in_digital_silence_joins_where_it_is_not_at_an_earlier_pause(chunk_ms):
    """Speech with pauses of digital silence (a synthetic voice's): the live stream opens just
    before a pause, whose place the kept stream (80 ms chunks) has not delivered yet, while an
    earlier pause is kept. Silence matches silence anywhere: joining at the earlier pause would lose
    the speech after it. The junction is where the live audio's first sound is found."""
    signal = np.concatenate([ticks(30, True, 1), ticks(10, False, 0), ticks(19, True, 2),  # pause at 30-39
                             ticks(11, False, 0), ticks(40, True, 3)])  # the live stream's pause: 59-69
    mic = SteppedMicrophone(signal)
    track, junctions, pushes = await open_live(mic, 58, chunk_ms)  # its cold chunk: the last of the speech
    assert track.end == 56 * TICK, "the kept stream lags: its next chunk ends at tick 64"
    for _ in range(40):
        await mic.step()
    await track.aclose()
    assert junctions == [(58 + chunk_ms // 10) * TICK], "joined where the live stream is, after its cold first chunk"
    assert pushes and pushes[0][0] == junctions[0]
    live = np.concatenate([pcm for _, pcm in pushes])
    assert np.array_equal(live, signal[junctions[0]:junctions[0] + live.size]), "then the signal, without a seam"
    assert junctions[0] + live.size >= 90 * TICK, "and the speech after the pause"


@pytest.mark.parametrize("chunk_ms", [10, 40])
async def test_a_live_feed_in_a_long_digital_silence_joins_by_time_after_its_patience(chunk_ms):
    """No sound to find: after `SPLICE_PATIENCE` of kept audio the live feed joins by its time-based
    guess (silence for silence, harmless), instead of holding the turn's audio back until a sound."""
    signal = np.concatenate([ticks(30, True, 1), ticks(150, False, 0)])
    mic = SteppedMicrophone(signal)
    track, junctions, pushes = await open_live(mic, 40, chunk_ms)
    for _ in range(49):
        await mic.step()
    assert not junctions, "waiting for a sound (the kept stream had 40 ticks when the probe came)"
    for _ in range(20):
        await mic.step()
    await track.aclose()
    assert len(junctions) == 1 and 30 * TICK <= junctions[0] <= 60 * TICK, "joined in the silence"
    assert pushes and not np.concatenate([pcm for _, pcm in pushes]).any()


@pytest.mark.parametrize("chunk_ms", [20, 40])
@pytest.mark.parametrize("open_at", [41, 58, 63])
async def test_longer_live_chunks_join_on_the_tick_where_the_live_stream_is(chunk_ms, open_at):
    """Live chunks of 20 or 40 ms (`--live-chunk-ms`) still start on any 10 ms tick of the kept
    stream: the feed joins right after its cold first chunk, and the engine gets the signal from there
    on without a seam, whatever tick the stream opened on (not only a multiple of its chunk)."""
    signal = np.concatenate([ticks(60, True, 1), ticks(8, False, 0), ticks(60, True, 2)])
    junctions, pushes = await splice(SteppedMicrophone(signal), open_at, 128 - open_at, chunk_ms)
    assert junctions == [(open_at + chunk_ms // 10) * TICK], "after the cold first chunk, on its tick"
    assert [index for index, _ in pushes][1:] == [junctions[0] + sum(p.size for _, p in pushes[:k])
                                                  for k in range(1, len(pushes))], "each chunk where the last ended"
    live = np.concatenate([pcm for _, pcm in pushes])
    assert np.array_equal(live, signal[junctions[0]:junctions[0] + live.size]), "the signal, without a seam"
    assert junctions[0] + live.size >= 120 * TICK, "to the end of the speech"
    assert all(p.size % (chunk_ms // 10 * TICK) == 0 for _, p in pushes), "in whole chunks"


async def test_a_live_chunk_the_frame_clock_cannot_align_is_refused():
    track = TrackAudio(SteppedMicrophone(ticks(10, True, 1)), _GateStub(), on_audio=lambda: None)
    with pytest.raises(ValueError, match="30 ms"):
        track.start_live(on_junction=lambda index: None, on_chunk=lambda pcm, index: None, chunk_ms=30)
    await track.aclose()
