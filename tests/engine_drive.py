"""Driving the engine in tests: collecting a stream's events, a stream run alone, and a speaker's
turns fed as the speech gate feeds them on a hand-driven clock. Imports nothing of pytest's
fixtures, so that bench/gpu_check.py can use it on a machine without the test dependencies."""

from __future__ import annotations

import itertools
import threading
import time
import unittest.mock

import numpy as np

from captions.stt.engine import StreamEvent, SttEngine

FRAME = 1920
TICK_SAMPLES = 240  # WebRTC hands 10 ms of every remote track per tick, on one tick for all tracks


class Collector:
    """Gathers one stream's events (they arrive on the engine thread)."""

    def __init__(self):
        self.events: list[StreamEvent] = []
        self.done = threading.Event()

    def __call__(self, event: StreamEvent) -> None:
        self.events.append(event)
        if event.ended:
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [e.token for e in self.events if not e.ended]

    @property
    def pauses(self) -> list[float | None]:
        """Each step's pause probability (the VAD head; None without one)."""
        return [e.pause_prob for e in self.events if not e.ended]

    @property
    def words(self) -> list[tuple[str, float, float]]:
        return [(w.text, w.start, w.end) for e in self.events for w in e.words]


def run_solo(engine: SttEngine, audio: np.ndarray) -> Collector:
    collector = Collector()
    stream = engine.open_stream(collector)
    stream.push(audio)
    stream.close()
    assert collector.done.wait(60), "stream never ended"
    return collector


def wait_settled(engine: SttEngine, timeout: float = 30.0) -> None:
    """After the test moved the engine's clock (`_now`) or pushed: every frame that can step by then has
    (the engine's frame clock may hold ready frames for others due later)."""
    engine.wake()
    deadline = time.monotonic() + timeout
    while not engine.settled:
        assert time.monotonic() < deadline, "engine did not settle"
        time.sleep(0.002)


SPURT_CLOCK_STARTS = itertools.count(1000.0, 1000.0)
"""Each `drive_spurts` starts its clock far past the last one's: the engine's shared frame clock from
an earlier call is stale, so the leads depend on the call's own inputs (Hypothesis replays exactly)."""


def drive_spurts(engine: SttEngine, spurts: list[np.ndarray], start_ticks: list[int], backlogs: list[int]):
    """Each spurt is a stream as the speech gate feeds one: opened at its start tick, its first push
    `backlog` ticks of kept audio (pre-roll, or a wait for a slot) with that tick's chunk, then 10 ms
    per tick, then closed (flushed). The clock moves 10 ms per tick; the engine drains between ticks."""
    clock = [next(SPURT_CLOCK_STARTS)]
    collectors = [Collector() for _ in spurts]
    streams: list = [None] * len(spurts)
    offsets = [0] * len(spurts)
    with unittest.mock.patch("captions.stt.engine._now", side_effect=lambda: clock[0]):
        for tick in range(max(start_ticks) + max(s.size for s in spurts) // TICK_SAMPLES + 3):
            clock[0] += 0.01
            for i, spurt in enumerate(spurts):
                if tick < start_ticks[i] or offsets[i] > spurt.size:
                    continue
                if streams[i] is None:
                    streams[i] = engine.open_stream(collectors[i], live_chunk=TICK_SAMPLES)
                    size = TICK_SAMPLES * (backlogs[i] + 1)
                else:
                    size = TICK_SAMPLES
                if offsets[i] >= spurt.size:
                    streams[i].close()
                    offsets[i] += 1
                    continue
                streams[i].push(spurt[offsets[i]:offsets[i] + size])
                offsets[i] = min(offsets[i] + size, spurt.size)
            wait_settled(engine)
    for collector in collectors:
        assert collector.done.wait(30), "stream never ended"
    return collectors
