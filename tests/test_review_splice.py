"""Review of the live feed's splice (8dea2f6): a microphone that sends digital silence, then speech."""

from __future__ import annotations

import numpy as np
import pytest

from captions.stt.api import TICK
from tests.test_track_audio import SteppedMicrophone, _arrival_clock, splice, ticks  # noqa: F401 - the fixture

pytestmark = [pytest.mark.timeout(60)]


@pytest.mark.parametrize("chunk_ms", [10, 40])  # live chunks of a tick, and the worker's default
@pytest.mark.parametrize("open_at", range(31, 39))  # every phase of the kept stream's 80 ms chunks
@pytest.mark.parametrize("silent_ticks", [5, 30, 45, 49, 50, 51, 55, 60, 120])  # around SPLICE_PATIENCE (50)
async def test_speech_after_digital_silence_reaches_the_engine_once_and_whole(silent_ticks, open_at, chunk_ms):
    """Speech, digital silence in which the live stream opens, then speech: what the speaker pushes
    (kept audio up to the junction, then the live chunks) is the speech before, silence, and the
    speech after, once and whole; and each live chunk is the signal at the index it is given."""
    before, after = ticks(30, True, 1), ticks(60, True, 2)
    signal = np.concatenate([before, ticks(silent_ticks, False, 0), after])
    junctions, pushes = await splice(SteppedMicrophone(signal), open_at, silent_ticks + 70, chunk_ms)
    assert len(junctions) == 1 and pushes and pushes[0][0] == junctions[0]
    for index, pcm in pushes:
        assert np.array_equal(pcm, signal[index:index + pcm.size]), f"the live audio at {index} is not the signal's"
    engine = np.concatenate([signal[:junctions[0]], *(pcm for _, pcm in pushes)])
    assert np.array_equal(engine[:before.size], before), "the speech before, once"
    rest = engine[before.size:]
    sound = np.flatnonzero(rest)
    assert sound.size, "the speech after the silence never reached the engine"
    start = before.size + silent_ticks * TICK + int(np.flatnonzero(after)[0])
    heard = rest[sound[0]:]
    assert np.array_equal(heard, signal[start:start + heard.size]) and heard.size >= 50 * TICK, \
        "the speech after the silence, once and whole"


class LaggingMicrophone(SteppedMicrophone):
    """As SteppedMicrophone, with the kept (80 ms) stream's chunks handled `lag` ticks late (the
    event loop's order of wake-ups, another room's thread holding the GIL)."""

    def __init__(self, signal: np.ndarray, lag: int):
        super().__init__(signal)
        self.lag = lag

    async def chunks(self, chunk_ms: int):
        step, first, k = chunk_ms // 10, self.tick, 0
        late = self.lag if chunk_ms == 80 else 0
        while True:
            while self.tick < first + (k + 1) * step + late:
                await self._ticked.wait()
            start = (first + k * step) * TICK
            chunk = self.signal[start:start + step * TICK].copy()
            yield chunk // 2 + 1 if k == 0 else chunk
            k += 1


@pytest.mark.parametrize("chunk_ms", [10, 40])
@pytest.mark.parametrize("lag", range(0, 12, 2))
@pytest.mark.parametrize("open_at", range(37, 42))
async def test_a_short_word_after_a_short_pause_is_kept_when_the_live_feed_joins_by_time(lag, open_at, chunk_ms):
    """Speech, a 40 ms pause of digital silence, a 30 ms word, then a long silence in which the live
    stream opens (a synthetic voice's pauses are exact zeros). After SPLICE_PATIENCE the feed joins by
    time with a silent probe, which also matches the short pause; with the kept stream a few ticks
    late, that pause was nearer the guess, and the word between it and the live stream was never
    pushed. The live stream was silent all along, so its place is followed by as much silence in
    the kept audio: the short pause is not it."""
    word = ticks(3, True, 5)
    signal = np.concatenate([ticks(30, True, 1), ticks(4, False, 0), word, ticks(100, False, 0), ticks(30, True, 2)])
    # The whole signal, and the live stream's last chunk.
    junctions, pushes = await splice(LaggingMicrophone(signal, lag), open_at, 200 - open_at, chunk_ms)
    assert len(junctions) == 1
    engine = np.concatenate([signal[:junctions[0]], *(pcm for _, pcm in pushes)])
    at = 34 * TICK
    assert np.array_equal(engine[:at + word.size], signal[:at + word.size]), "the word after the short pause, lost"
    assert not engine[at + word.size:engine.size - 30 * TICK].any(), "then silence"
    assert np.array_equal(engine[-30 * TICK:], signal[-30 * TICK:]), "then the speech after it, once"
