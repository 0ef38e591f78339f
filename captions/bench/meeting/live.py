"""The live run of `captions bench meeting`: the product's speakers on simulated microphones, one
room host per room, one slot queue and one engine, in real time."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from captions.bench.common import BenchError
from captions.stt.api import FRAME_S, SAMPLE_RATE

SAMPLE_EVERY_S = 0.1
"""Slot occupancy is read this often."""
FLUSH_TIMEOUT_S = 120.0
"""After the meeting: the longest wait for every speaker's last captions."""
CAUGHT_UP_LAG_S = 0.16
"""A stream has caught up with live audio once the engine steps its frames within two frames of their capture."""


@dataclass
class CaptionLog:
    arrival: float
    """time.time() when the room got it."""
    final: bool
    words: list[tuple[str, float, float]]
    """(text, wall start, wall end) of its completed words."""


@dataclass
class TurnLog:
    """One turn of one speaker: the engine stream it got, what went in and what came out."""

    participant: int
    begun_at: float
    start: int
    """Track index where the turn starts (its pre-roll)."""
    immediate: bool = False
    granted_at: float | None = None
    first_push_at: float | None = None
    first_push_samples: int = 0
    closed_at: float | None = None
    ended_at: float | None = None
    error: str | None = None
    stream_id: int | None = None
    lead: int = 0
    parts: list[tuple[int, np.ndarray]] = field(default_factory=list)
    """(track index, int16 samples) of every push, in order."""
    captions: list[CaptionLog] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    """Per engine event: its arrival less the capture time of the end of the audio it covers."""
    caught_up_at: float | None = None
    """When an event first came within CAUGHT_UP_LAG_S of live (the kept audio was stepped)."""
    continues: bool = False
    """The turn goes on from where the speaker's last turn yielded its slot (fair shares)."""


def _live_classes():
    """The benchmark's subclasses of the product's classes (imported late: they load the VAD)."""
    from captions.dev.microphones import SimulatedMicrophone
    from captions.live.speaker import Speaker
    from captions.live.track_audio import IDLE_CHUNK_MS

    idle_chunk = SAMPLE_RATE * IDLE_CHUNK_MS // 1000

    class Microphone(SimulatedMicrophone):
        """Remembers where its first 80 ms stream (the track's kept audio, index 0) starts in the signal."""

        kept_start: int | None = None

        def sample(self, start: int, size: int) -> np.ndarray:
            if size == idle_chunk and self.kept_start is None:
                self.kept_start = start
            return super().sample(start, size)

    class MeetingSpeaker(Speaker):
        """A Speaker that logs its turns, what each pushed to the engine, and its captions."""

        def __init__(self, host, participant: int, source: Microphone):
            self.participant, self.logs, self.event_turn, self._beginning = participant, {}, None, False
            super().__init__(host, f"p{participant:02d}", f"Participant {participant}", f"TR_{participant}", source)

        def log_of(self, turn) -> TurnLog:
            if turn not in self.logs:
                self.logs[turn] = TurnLog(self.participant, time.time(), turn.open_start or 0)
            return self.logs[turn]

        def _begin_turn(self, start: int, since: float | None = None) -> None:
            begun, self._beginning = time.time(), True
            try:
                super()._begin_turn(start, since)
            finally:
                self._beginning = False
            if self.turn is not None:
                log = self.log_of(self.turn)
                log.begun_at, log.start, log.continues = begun, start, since is not None

        def _granted(self, turn, stream) -> None:
            log = self.log_of(turn)
            log.granted_at, log.immediate = time.time(), self._beginning
            super()._granted(turn, stream)

        def _push(self, turn, parts) -> None:
            super()._push(turn, parts)
            if turn.stream is None or not any(pcm.size for _, pcm in parts):
                return
            log = self.log_of(turn)
            if not log.parts:
                log.first_push_at, log.stream_id, log.lead = time.time(), turn.stream.id, turn.stream.lead_samples
                log.first_push_samples = sum(pcm.size for _, pcm in parts)
            log.parts.extend((index, pcm) for index, pcm in parts if pcm.size)

        def _close_turn(self, turn, flush: bool = True) -> None:
            log = self.log_of(turn)
            log.closed_at = log.closed_at or time.time()
            super()._close_turn(turn, flush)

        def _on_event(self, turn, event) -> None:
            log = self.log_of(turn)
            if event.ended:
                log.ended_at, log.error = time.time(), event.error
            elif (audio_s := event.frames * FRAME_S - event.lead_samples / SAMPLE_RATE) > 0:
                now = time.time()
                log.lags.append(now - turn.wall_time(audio_s))
                if log.caught_up_at is None and log.lags[-1] <= CAUGHT_UP_LAG_S:
                    log.caught_up_at = now
            self.event_turn = turn
            try:
                super()._on_event(turn, event)
            finally:
                self.event_turn = None

    return Microphone, MeetingSpeaker


class _Host:
    """The room as the speakers see it (speaker.SpeakerHost); captions go to each turn's log."""

    def __init__(self, slots, options, room_name: str = "meeting"):
        from captions.live.segmenter import SegmenterOptions

        self.room_name = room_name
        self.slots = slots
        self.segmenter_options = SegmenterOptions()
        self.speaker_options = options
        self.record_dir = None
        self.timing_attributes = False

    def status_changed(self) -> None:
        pass

    def caption(self, speaker, update, wall_time, timing=None) -> None:
        words = [(w.text, wall_time(w.start), wall_time(w.end)) for w in update.words]
        speaker.log_of(speaker.event_turn).captions.append(CaptionLog(time.time(), update.final, words))


@dataclass
class LiveRun:
    origin: float
    """Wall time of the meeting clock's tick 0."""
    speakers: list
    microphones: list
    occupancy: list[tuple[float, int, int]]
    """(seconds into the meeting, slots in use, speakers waiting), every SAMPLE_EVERY_S."""
    steps: list[tuple[float, int, float]]
    """(wall time, streams stepped, seconds) of every engine step."""
    stopped_at: float = 0.0
    holders: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    """(seconds into the meeting, slots held per room), every SAMPLE_EVERY_S."""


def room_name(room: int) -> str:
    return f"room{room}"


async def _sample_occupancy(engine, slots, run: LiveRun, seconds: float) -> None:
    deadline = time.time() + seconds + FLUSH_TIMEOUT_S
    while time.time() < deadline:
        at = round(time.time() - run.origin, 3)
        run.occupancy.append((at, engine.slots_in_use, len(slots)))
        run.holders.append((at, slots.holders()))
        await asyncio.sleep(SAMPLE_EVERY_S)


def _first_come_queue(engine, poll_s: float):
    """The slot queue as it was before fair shares (for comparison): the first waiter gets a freed
    slot, and nobody is ever asked to yield."""
    from captions.live.slots import SlotQueue

    class FirstCome(SlotQueue):
        def should_yield(self, waiter, long_held: bool = False) -> bool:
            return False

        def _next_waiter(self):
            return self._waiters[0] if self._waiters else None

    return FirstCome(engine, poll_s=poll_s)


async def run_meeting(engine, signals: list[np.ndarray], options, seconds: float,
                      rooms: list[int] | None = None, fair: bool = True) -> LiveRun:
    """The meeting in real time: every participant's Speaker on one clock, until `seconds`, then
    every speaker stops (their last turns are flushed; a waiting one keeps its place). `rooms`:
    each participant's room (default: all in one room), one host per room on the one slot queue.
    Without `fair`, the queue serves first come first served and never asks for a slot back."""
    from captions.dev.microphones import MeetingClock
    from captions.live.slots import SlotQueue

    Microphone, MeetingSpeaker = _live_classes()
    slots = SlotQueue(engine, poll_s=0.05) if fair else _first_come_queue(engine, 0.05)
    clock = MeetingClock(speed=1.0)
    run = LiveRun(time.time() - (time.monotonic() - clock.start), [], [], [], [])
    listener = lambda timings: run.steps.append((time.time(), timings.active, timings.total_s))  # noqa: E731
    engine.step_listeners.append(listener)
    sampler = asyncio.create_task(_sample_occupancy(engine, slots, run, seconds))
    try:
        rooms = rooms or [0] * len(signals)
        hosts = {room: _Host(slots, options, room_name(room) if max(rooms) > 0 else "meeting") for room in set(rooms)}
        run.microphones = [Microphone(signal, clock) for signal in signals]
        run.speakers = [MeetingSpeaker(hosts[rooms[p]], p, mic) for p, mic in enumerate(run.microphones)]
        await asyncio.sleep(max(0.0, clock.start + seconds - time.monotonic()))
        run.stopped_at = time.time()
        for speaker in run.speakers:
            speaker.stop()
        waits = [asyncio.create_task(s.ended.wait()) for s in run.speakers]
        _, pending = await asyncio.wait(waits, timeout=FLUSH_TIMEOUT_S)
        for task in pending:
            task.cancel()
        if pending:
            raise BenchError(f"{len(pending)} speakers were not flushed within {FLUSH_TIMEOUT_S:.0f} s")
        others = asyncio.all_tasks() - {asyncio.current_task(), sampler}
        if others:  # the tracks close (and their VAD)
            await asyncio.wait(others, timeout=5)
    finally:
        sampler.cancel()
        slots.close()
        engine.step_listeners.remove(listener)
    return run


