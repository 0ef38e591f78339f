"""Simulated microphones: participants' audio handed over as WebRTC hands it to the worker, without
WebRTC, for the speaker tests and `captions bench meeting` (a meeting of 16 bots would need more CPU
than the machine the worker runs on).

Every microphone of a meeting plays its own signal on one shared clock of 10 ms ticks: a stream
opened at any time yields chunks of the requested length, each when its last tick has passed, and
its first chunk differs from the signal (a fresh resampler's output does: track_audio.py).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator

import numpy as np

from captions.stt.api import SAMPLE_RATE

TICK_S = 0.01
TICK = SAMPLE_RATE // 100


class MeetingClock:
    """The shared 10 ms tick of a simulated meeting; `speed` > 1 runs it faster than real time."""

    def __init__(self, speed: float = 1.0, start: float | None = None):
        self.speed = speed
        self.start = time.monotonic() if start is None else start

    def ticks(self) -> float:
        return (time.monotonic() - self.start) * self.speed / TICK_S

    async def wait_tick(self, tick: int) -> None:
        delay = (self.start + tick * TICK_S / self.speed) - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


class SimulatedMicrophone:
    """One participant's `AudioSource` (captions/live/track_audio.py): `signal` (24 kHz int16) from
    the clock's tick 0 on, then silence."""

    def __init__(self, signal: np.ndarray, clock: MeetingClock):
        self.signal = np.asarray(signal, dtype=np.int16)
        self.clock = clock
        self.closed = False

    def sample(self, start: int, size: int) -> np.ndarray:
        out = np.zeros(size, dtype=np.int16)
        part = self.signal[start:start + size]
        out[:part.size] = part
        return out

    async def chunks(self, chunk_ms: int) -> AsyncIterator[np.ndarray]:
        ticks = chunk_ms // 10
        first = math.ceil(self.clock.ticks())
        k = 0
        while not self.closed:
            await self.clock.wait_tick(first + (k + 1) * ticks)
            chunk = self.sample((first + k * ticks) * TICK, ticks * TICK)
            if k == 0:
                chunk = (chunk // 2) + 1  # a cold resampler's first output is not the signal
            yield chunk
            k += 1
