"""One microphone in a room: an engine slot while its speaker talks, none while they are silent.

A speaker's *turn* runs from a little before they start talking (the pre-roll, so that the first
word is whole) until they have been silent for `release_after_s`: then the engine flushes their last
words and the slot is free for someone else. A pause shorter than that keeps the slot, so captions
read across it as they would without the gate; segments close at pauses anyway (segmenter.py).

When every slot is taken, the turn waits in the worker's queue (slots.py, in the order people
started talking) and its audio is kept, so nothing is lost: once it has a slot, the kept audio goes
to the engine at once (which steps it faster than real time) and the live audio follows without a
seam (track_audio.py). A wait longer than `max_wait_s` of audio loses its oldest audio, counted in
`captions_frames_dropped_total{reason="waiting_overflow"}` and logged. If the speaker falls silent
while waiting, the turn's audio stops at that pause; if they talk again before the slot comes, the
new speech joins the same turn, without the silence between.

Fair shares (slots.py `should_yield`): while others wait, a turn of a room over its share of the
slots, or held for `max_turn_hold_s`, yields at its next sentence end (a final closed at a pause),
or `yield_within_s` after being asked: its stream is flushed where its live audio stopped, and a
new turn starts at that very sample and waits like any other (audio kept) behind earlier waiters.
Nothing is lost or pushed twice; the new stream starts without the old one's context.

Failures (supervise.py, each logged once with its traceback and counted): the track's reader is
started again (track_audio.py); a live feed that fails closes its turn (what was said is flushed,
the slot is freed) and, if the speaker still talks, a new turn takes over where it stopped; after
`MAX_LIVE_FAILURES` in a row, or once the track's reader gave up, the speaker stops as if the track
went away. If the task that watches the track fails, the speaker ends at once: its turn is dropped
and its slot freed, and `ended` is set (nothing is left waiting on it).

Threads: everything here runs on the room's event loop (granted slots and engine events hop over:
stream_client.py, which also states the frame clock's contract).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from captions.live.metrics import METRICS
from captions.live.recorder import StreamRecorder
from captions.live.segmenter import CaptionUpdate, Segmenter, SegmenterOptions
from captions.live.slots import SlotQueue
from captions.live.stream_client import KeptAudioBound, StreamClient
from captions.live.supervise import supervised
from captions.live.timing import StreamTiming
from captions.live.track_audio import AudioSource, TrackAudio
from captions.live.turn import Turn, TurnState
from captions.live.vad import GateOptions, SpeechGate
from captions.log import logger
from captions.stt.api import (
    FRAME_SIZE,
    LIVE_CHUNK_MS,
    LIVE_CHUNK_MS_CHOICES,
    SAMPLE_RATE,
    EngineStream,
    StreamEvent,
)


@dataclass
class SpeakerOptions:
    pre_roll_s: float = 0.5
    """Audio from before the voice was detected that goes into the turn (the first word stays whole)."""
    release_after_s: float = 3.0
    """Silence that ends a turn and frees its slot; a shorter pause keeps it."""
    max_wait_s: float = 30.0
    """Audio kept for a speaker waiting for a slot; beyond it the oldest is dropped (and counted)."""
    max_turn_hold_s: float = 20.0
    """A turn that has held its slot this long yields it at a sentence end while others wait (slots.py)."""
    yield_within_s: float = 5.0
    """A turn asked to yield that reaches no sentence end within this (seconds of audio) yields anyway."""
    live_chunk_ms: int = LIVE_CHUNK_MS
    """The live stream's chunk (track_audio.py): longer costs the host less, and a frame waits up to a
    chunk less 10 ms for the last of the streams' chunks (frame_clock.py)."""
    gate: GateOptions = field(default_factory=GateOptions)

    def __post_init__(self) -> None:
        if self.live_chunk_ms not in LIVE_CHUNK_MS_CHOICES:
            raise ValueError(f"live chunks of {self.live_chunk_ms} ms: expected one of {LIVE_CHUNK_MS_CHOICES}")


MAX_LIVE_FAILURES = 3
"""Live feeds failed in a row (no live audio delivered between) after which the speaker stops."""

class SpeakerHost(Protocol):
    """What a speaker needs from its room (room.py's RoomCaptioner; the meeting benchmark's stand-in)."""

    room_name: str
    slots: SlotQueue
    segmenter_options: SegmenterOptions
    speaker_options: SpeakerOptions
    record_dir: Path | None
    timing_attributes: bool

    def status_changed(self) -> None: ...

    def caption(self, speaker: Speaker, update: CaptionUpdate, wall_time: Callable[[float], float],
                timing: dict | None = None) -> None: ...


class Speaker:
    """One remote microphone while it is subscribed and unmuted."""

    def __init__(self, host: SpeakerHost, identity: str, name: str, track_sid: str, source: AudioSource):
        self.host = host
        self.identity, self.name, self.track_sid = identity, name, track_sid
        self.options = host.speaker_options
        self.gate = SpeechGate(self.options.gate)
        self.track = TrackAudio(source, self.gate, self._on_audio, label=f"{host.room_name}/{identity}")
        self.turn: Turn | None = None
        """The turn being captioned or waiting (at most one; a closing one may still be flushing)."""
        self._closing: set[Turn] = set()
        self._stopped = False
        self.ended = asyncio.Event()
        """Set once the speaker stopped and its last turn's captions are out."""
        self._track_closed: asyncio.Task | None = None
        self._live_failures = 0
        """Live feeds failed in a row (module notes)."""
        self._resume_from = 0
        """A new turn starts no earlier (the audio before went to a turn whose live feed failed)."""
        self._watch = supervised(self._watch_track(), "speaker_watch", f"speaker-{track_sid}", self._watch_failed)

    @property
    def waiting(self) -> bool:
        return self.turn is not None and self.turn.state is TurnState.WAITING

    def _samples(self, seconds: float) -> int:
        return int(seconds * SAMPLE_RATE)

    # ---- the kept audio, judged every 80 ms ---------------------------------------------------

    def _on_audio(self) -> None:
        if self._stopped:
            return
        gate, track, turn = self.gate, self.track, self.turn
        silent_for = track.end - (gate.last_speech or 0)
        ended = not gate.speaking and silent_for >= self._samples(self.options.release_after_s)
        if turn is None:
            if gate.speaking:
                onset = gate.onset or track.end
                self._begin_turn(max(track.kept_from, onset - self._samples(self.options.pre_roll_s),
                                     self._resume_from))
            else:  # idle: keep just enough for a pre-roll (the gate judges a little late)
                track.keep_from(track.end - self._samples(self.options.pre_roll_s + 0.5))
            return
        if turn.state is TurnState.WAITING:
            self._keep_waiting(turn, ended)
        elif turn.state is TurnState.LIVE:
            track.keep_from(track.end - self._samples(self.options.pre_roll_s + 0.5))
            if ended:
                logger.info("room %s: %s paused: turn ends, slot %d free after the flush", self.host.room_name,
                            self.identity, turn.stream.slot_index)
                self._close_turn(turn)
            else:
                self._judge_yield(turn)

    def _keep_waiting(self, turn: Turn, ended: bool) -> None:
        gate, track = self.gate, self.track
        if turn.open_start is None and gate.speaking:
            # Talking again before the slot came: the same turn, without the silence between.
            held_end = turn.held[-1][0] + turn.held[-1][1].size if turn.held else 0
            turn.open_start = max(track.kept_from, held_end, turn.start,
                                  (gate.onset or track.end) - self._samples(self.options.pre_roll_s))
        elif turn.open_start is not None and ended:
            turn.hold_until(min(track.end, (gate.last_speech or track.end) + self._samples(self.options.release_after_s)))
        excess = turn.bound.excess(turn.kept_samples)
        if excess > 0:
            self._drop_oldest(turn, excess)
        keep = turn.open_start if turn.open_start is not None else track.end - self._samples(
            self.options.pre_roll_s + 0.5)
        track.keep_from(keep)

    def _drop_oldest(self, turn: Turn, samples: int) -> None:
        METRICS.frame_dropped("waiting_overflow", -(-samples // FRAME_SIZE))
        while samples > 0 and turn.held:
            index, pcm = turn.held[0]
            cut = min(samples, pcm.size)
            turn.held[0] = (index + cut, pcm[cut:])
            if turn.held[0][1].size == 0:
                turn.held.pop(0)
            samples -= cut
        if samples > 0 and turn.open_start is not None:
            turn.open_start += samples

    # ---- turns and slots ------------------------------------------------------------------------

    def _begin_turn(self, start: int, since: float | None = None) -> None:
        """A new turn from track index `start`, asking for a slot as someone who started talking at
        `since` (default: when `start` was captured)."""
        turn = Turn(self, start)
        self.turn = turn
        if since is None:
            since = time.monotonic() - (self.track.end - start) / SAMPLE_RATE
        turn.bound = KeptAudioBound(f"room {self.host.room_name}: {self.identity}", self.options.max_wait_s)
        turn.client = StreamClient(self.host.slots, f"{self.host.room_name}/{self.identity}",
                                   on_granted=lambda stream: self._granted(turn, stream),
                                   on_event=lambda event: self._on_event(turn, event), since=since,
                                   live_chunk=SAMPLE_RATE * self.options.live_chunk_ms // 1000,
                                   room=self.host.room_name)
        if not turn.client.request():
            logger.info("room %s: %s talks and waits for a slot", self.host.room_name, self.identity)
            self.host.status_changed()

    def _granted(self, turn: Turn, stream: EngineStream) -> None:
        METRICS.observe_slot_wait(time.monotonic() - turn.since)
        turn.granted_end = self.track.end
        turn.segmenter = Segmenter(options=self.host.segmenter_options)
        if self.host.record_dir is not None:
            turn.recorder = StreamRecorder(self.host.record_dir, self.host.room_name, self.identity, stream.id)
        if self.host.timing_attributes:
            turn.timing = StreamTiming()
        self.host.status_changed()
        logger.info("room %s: captioning %s (track %s) in engine slot %d, stream %d", self.host.room_name,
                    self.identity, self.track_sid, stream.slot_index, stream.id)
        if self._stopped or turn.open_start is None:
            self._push_held(turn)  # the speaker left or fell silent: what was said, then the flush
            self._close_turn(turn)
            return
        turn.state = TurnState.JOINING
        self.track.start_live(on_junction=lambda index: self._joined(turn, index),
                              on_chunk=lambda pcm, index: self._live_chunk(turn, pcm, index),
                              on_failure=lambda error: self._live_failed(turn),
                              chunk_ms=self.options.live_chunk_ms)

    def _live_failed(self, turn: Turn) -> None:
        """The live feed failed (logged and counted): the turn ends with what it has, freeing its
        slot; the next kept chunk starts a new one where it stopped if the speaker still talks."""
        if turn is not self.turn or turn.state not in (TurnState.JOINING, TurnState.LIVE):
            return
        self._live_failures += 1
        self._resume_from = max(self.track.end, turn.open_start or 0)
        logger.warning("room %s: %s's live audio failed: turn closed, slot %d free after the flush",
                       self.host.room_name, self.identity, turn.stream.slot_index)
        self._push_held(turn)
        self._close_turn(turn)
        if self._live_failures >= MAX_LIVE_FAILURES:
            logger.error("room %s: %s's live audio failed %d times in a row; no more captions for this "
                         "microphone", self.host.room_name, self.identity, self._live_failures)
            self.stop()

    def _joined(self, turn: Turn, junction: int) -> None:
        """The live feed starts at `junction`: what the turn kept before it goes with the first live chunk."""
        if turn is not self.turn or turn.state is not TurnState.JOINING:
            return
        turn.hold_until(junction)
        turn.open_start = junction
        turn.state = TurnState.LIVE

    def _live_chunk(self, turn: Turn, pcm: np.ndarray, index: int) -> None:
        if turn.state is not TurnState.LIVE or turn is not self.turn:
            return
        self._live_failures = 0
        if index < turn.start:  # joined before where the turn starts (a yield's): that went to the last turn
            pcm, index = pcm[turn.start - index:], max(index, turn.start)
        if turn.held:  # the first push: the kept audio and this chunk, on this chunk's tick
            parts = [*turn.held, (index, pcm)]
            turn.held = []
            self._push(turn, parts)
        else:
            self._push(turn, [(index, pcm)])
        turn.open_start = index + pcm.size

    def _push_held(self, turn: Turn) -> None:
        if turn.open_start is not None:
            turn.hold_until(self.track.end)
        parts, turn.held = turn.held, []
        if parts:
            self._push(turn, parts)

    def _push(self, turn: Turn, parts: list[tuple[int, np.ndarray]]) -> None:
        pcm16 = parts[0][1] if len(parts) == 1 else np.concatenate([pcm for _, pcm in parts])
        if pcm16.size == 0 or turn.stream is None:
            return
        index, pcm = parts[-1]
        pcm32 = pcm16.astype(np.float32)
        pcm32 *= 1 / 32768
        turn.client.push(pcm32, produced_at=self.track.produced_at(index + pcm.size))
        for index, pcm in parts:
            turn.record(index, pcm.size)
        if turn.recorder is not None:
            turn.recorder.write(pcm16, turn.client.lead_samples)
        if turn.timing is not None:
            turn.timing.record(pcm16, time.time())

    def _close_turn(self, turn: Turn, flush: bool = True) -> None:
        """No more audio for this turn: the engine flushes it (or drops it) and frees the slot."""
        if turn is self.turn:
            self.turn = None
            self.track.stop_live()
        if turn.state is TurnState.CLOSING:
            return
        turn.state = TurnState.CLOSING
        if turn.stream is None:  # never got a slot (one on its way is aborted when it comes)
            turn.client.release()
            METRICS.frame_dropped("shutdown", -(-turn.kept_samples // FRAME_SIZE))
            self.host.status_changed()
            self._turn_done(turn)
            return
        self._closing.add(turn)
        turn.client.release(flush)

    # ---- fair shares: yielding a slot ----------------------------------------------------------

    def _long_held(self, turn: Turn) -> bool:
        return self.track.end - turn.granted_end >= self._samples(self.options.max_turn_hold_s)

    def _judge_yield(self, turn: Turn) -> None:
        """Every 80 ms of a live turn: whether the queue asks it to yield; past the bound, it does."""
        asked = turn.client.should_yield(self._long_held(turn))
        if not asked:
            turn.yield_asked = None
            return
        if turn.yield_asked is None:
            turn.yield_asked = self.track.end
            logger.info("room %s: %s is asked to give slot %d back (others wait): at the next sentence end",
                        self.host.room_name, self.identity, turn.stream.slot_index)
        elif self.track.end - turn.yield_asked >= self._samples(self.options.yield_within_s):
            self._yield(turn, f"no sentence end within {self.options.yield_within_s:g} s")

    def _yield(self, turn: Turn, why: str) -> None:
        """Gives the slot back where the live audio stopped: the turn is flushed, and a new turn
        from the next sample waits for a slot behind those who waited (module notes)."""
        if turn is not self.turn or turn.state is not TurnState.LIVE or self._stopped:
            return
        if not turn.client.should_yield(self._long_held(turn)):
            turn.yield_asked = None  # served meanwhile: no need any more
            return
        start = turn.open_start if turn.open_start is not None else self.track.end
        if start < self.track.kept_from:  # not expected: the live feed is never 1 s behind the kept one
            METRICS.frame_dropped("waiting_overflow", -(-(self.track.kept_from - start) // FRAME_SIZE))
            logger.warning("room %s: %s yields with %d samples no longer kept", self.host.room_name,
                           self.identity, self.track.kept_from - start)
        logger.info("room %s: %s gives slot %d back (%s) after %.1f s and waits again", self.host.room_name,
                    self.identity, turn.stream.slot_index, why, (self.track.end - turn.granted_end) / SAMPLE_RATE)
        self._close_turn(turn)
        self._begin_turn(start, since=time.monotonic())

    # ---- engine events --------------------------------------------------------------------------

    def _on_event(self, turn: Turn, event: StreamEvent) -> None:
        if turn.segmenter is None:
            return
        now = time.time()
        for word in event.words:  # Metrics: end of each new word's audio -> its caption now
            METRICS.observe_caption_latency(now - turn.wall_time(word.end))
        timing = turn.timing.for_event(event) if turn.timing is not None else None
        updates = turn.segmenter.feed(event)
        for update in updates:
            self.host.caption(self, update, turn.wall_time, timing)
        if event.ended:
            self._stream_ended(turn, event.error)
        elif turn.yield_asked is not None and not turn.segmenter.speaking and any(u.final for u in updates):
            self._yield(turn, "at a sentence end")

    def _stream_ended(self, turn: Turn, error: str | None) -> None:
        if turn.recorder is not None:
            turn.recorder.close()
        if error:
            METRICS.error("stream")
            logger.warning("room %s: engine stream %d of %s failed: %s", self.host.room_name, turn.stream.id,
                           self.identity, error)
        else:
            logger.info("room %s: %s's stream %d ended, slot %d free", self.host.room_name, self.identity,
                        turn.stream.id, turn.stream.slot_index)
        was_current = turn is self.turn
        if was_current:  # the engine ended it on its own (an error): a new turn takes over if still talking
            self.turn = None
            self.track.stop_live()
        self._turn_done(turn)
        if was_current and not self._stopped:
            self._on_audio()

    def _turn_done(self, turn: Turn) -> None:
        self._closing.discard(turn)
        if self._stopped and self.turn is None and not self._closing:
            self.ended.set()

    # ---- the end --------------------------------------------------------------------------------

    async def _watch_track(self) -> None:
        await self.track.ended.wait()
        if self.track.error is not None:
            logger.error("room %s: %s's microphone could not be read; no more captions for it",
                         self.host.room_name, self.identity)
        self.stop()  # the track went away (the publisher left): same as a stop

    def _watch_failed(self, error: BaseException) -> None:
        """Watching the track (or the stop after it) failed, logged and counted: the speaker ends
        now, without flushing, so that its slot is freed and nothing waits on it."""
        self._stopped = True
        turn = self.turn
        if turn is not None:
            if turn.state is TurnState.CLOSING:
                self.turn = None
            else:
                self._close_turn(turn, flush=False)
        if self._track_closed is None:
            self._track_closed = asyncio.create_task(self.track.aclose(), name=f"close-{self.track_sid}")
        self.ended.set()

    def stop(self, flush: bool = True, wait_for_slot: bool = True) -> None:
        """End of this microphone (leave, mute, unpublish). What was said is still captioned: a
        live turn is flushed, a waiting one keeps its place in the queue (unless `wait_for_slot` is
        False: the worker shuts down). Without `flush`, nothing more is captioned."""
        if self._stopped:
            return
        self._stopped = True
        turn = self.turn
        if turn is not None:
            if turn.state is TurnState.WAITING and wait_for_slot and flush:
                turn.hold_until(self.track.end)  # granted later: pushed whole, then flushed
            elif turn.state is TurnState.JOINING and flush:
                self.track.stop_live()
                self._push_held(turn)
                self._close_turn(turn)
            else:
                self._close_turn(turn, flush=flush)
        self._track_closed = asyncio.create_task(self.track.aclose(), name=f"close-{self.track_sid}")
        self._turn_done_check()

    def _turn_done_check(self) -> None:
        if self.turn is None and not self._closing:
            self.ended.set()
