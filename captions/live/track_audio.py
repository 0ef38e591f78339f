"""One microphone's audio: always kept and judged cheaply, and live in shorter chunks only while it
holds an engine slot.

Receiving audio costs the worker per chunk (Python, one event each), and a meeting's microphones
are silent most of the time. So each track is always read in 80 ms chunks (`IDLE_CHUNK_MS`): the
audio is kept (the pre-roll before someone speaks, and everything a waiting speaker says) and
judged by the voice-activity gate (vad.py). When the speaker gets an engine slot, a second stream
of the same track in shorter chunks (40 ms by default, 10 to 40: `SpeakerOptions.live_chunk_ms`)
feeds the engine, whose frame clock aligns frames on WebRTC's own 10 ms tick (captions/stt/engine.py).
Each chunk is an event and a push, so a longer chunk costs a talker less (`captions bench ingest`),
and a frame may wait for the chunk that completes it (up to a chunk less a tick).

The two streams resample the same decoded audio, so from its second chunk on, the live stream's
samples equal the kept ones exactly (its first chunk differs: the resampler starts cold). Both start
on a tick (`TICK`, 10 ms), so the live stream sits at a whole number of ticks into the kept one;
`_splice` finds that offset by comparing samples and the engine gets kept audio up to the junction,
then live audio from it: one continuous signal. Digital silence matches any silence kept (the live
stream's place may not be kept yet: an earlier pause would match, and the speech after it be lost),
so the live audio compared runs on to its first sound; the time-based guess (`_place_by_time`)
decides only after `SPLICE_PATIENCE` of silence.

All sample indices here count the kept (80 ms) stream's 24 kHz samples from its first one.

When a sample was produced (`produced_at`: the engine aligns live streams by it) is read from the
kept stream's arrivals: WebRTC produces every track's audio 10 ms per tick, so a chunk's last sample
was produced at `origin + index / 24 kHz`, and it is handled later by however long this thread and
event loop took to take it. The earliest arrivals show the origin (a lower envelope, which creeps
up slowly so that it follows the tick if it drifts); the moment any one chunk is handled can be
many ms late (another room's thread held the GIL, or the loop was busy).

Failures (supervise.py): a reader that raises is logged, counted and started again (after
`RESTART_DELAYS_S`; the audio missed meanwhile is kept as silence, so that sample indices still tell
time); after as many failures in a row, the track ends with `error` set. A live feed that raises is
logged, counted and reported to `start_live`'s `on_failure` (the speaker closes the turn, freeing
its slot).

Threads: everything runs on the room's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from captions.live.supervise import supervised
from captions.live.vad import SpeechGate
from captions.log import logger
from captions.stt.api import LIVE_CHUNK_MS, LIVE_CHUNK_MS_CHOICES, SAMPLE_RATE, TICK

IDLE_CHUNK_MS = 80
SPLICE_TICKS = 3
"""Live audio (after the cold first chunk) compared with the kept audio to find the junction: at
least this many ticks, in whole chunks."""
SPLICE_PATIENCE = SAMPLE_RATE // 2
"""Kept audio awaited after the probe without a match before joining by time: the kept stream can
lag the live one (its 80 ms chunks, and the event loop's order of wake-ups at a track's start).
As much is awaited for live audio that is not digital silence before matching silence by time."""
_now = time.monotonic
"""The clock of arrivals (a test drives it by hand)."""
ORIGIN_CREEP_S = 0.0001
"""The most a chunk that came late moves the production-time origin later: a lower envelope that
follows a tick drifting up to 1.25 ms/s, which a stall (chunks handled many ms late) barely moves."""
RESTART_DELAYS_S = (0.0, 1.0, 5.0)
"""Waits before each restart of a reader that failed; one failure more in a row ends the track."""
HEALTHY_SAMPLES = 10 * SAMPLE_RATE
"""Audio read since a restart after which the next failure no longer counts as one in a row."""
MAX_GAP_SAMPLES = 30 * SAMPLE_RATE
"""The most silence that stands in for the audio missed while a failed reader restarted."""


class AudioSource(Protocol):
    """A microphone, readable as 24 kHz mono int16 chunks of a given length (rtc tracks in the
    worker; simulated participants in `captions bench meeting`)."""

    def chunks(self, chunk_ms: int) -> AsyncIterator[np.ndarray]: ...


@dataclass
class _Kept:
    start: int
    pcm: np.ndarray


class TrackAudio:
    """Reads one source; keeps its audio from `keep_from` on; feeds the gate; runs the live feed."""

    def __init__(self, source: AudioSource, gate: SpeechGate, on_audio: Callable[[], None],
                 label: str = ""):
        """`on_audio()` runs after each kept chunk was judged (the caller's state machine)."""
        self.source, self.gate, self.label = source, gate, label
        self._on_audio = on_audio
        self._kept: list[_Kept] = []
        self.end = 0
        """Index after the last sample received."""
        self.first_captured: float | None = None
        """Unix time at which sample 0 was captured (its chunk's arrival less its length)."""
        self._origin: float | None = None
        """time.monotonic() at which sample 0 was produced, as the earliest arrivals show it."""
        self._live: _LiveFeed | None = None
        self.ended = asyncio.Event()
        """Set when the source ended (the track went away), or its reader failed for good (`error`)."""
        self.error: BaseException | None = None
        """What ended the track, when its reader failed too many times in a row."""
        self._failures = 0
        """Reader failures in a row (module notes)."""
        self._restarted_at: int | None = None
        """`end` when the reader was last restarted (None: the running reader is the first)."""
        self._gap_pending = False
        self._closed = False
        self._task = supervised(self._read(), "track_reader", f"track-{label}", self._reader_failed)

    # ---- the kept audio ---------------------------------------------------------------------

    @property
    def kept_from(self) -> int:
        return self._kept[0].start if self._kept else self.end

    def keep_from(self, index: int) -> None:
        """Forgets the audio before `index`."""
        while self._kept and self._kept[0].start + self._kept[0].pcm.size <= index:
            self._kept.pop(0)
        if self._kept and self._kept[0].start < index:
            first = self._kept[0]
            self._kept[0] = _Kept(index, first.pcm[index - first.start:])

    def audio(self, start: int, end: int) -> np.ndarray:
        """The kept samples [start, end) (clipped to what is kept)."""
        parts = [k.pcm[max(0, start - k.start):max(0, end - k.start)] for k in self._kept
                 if k.start < end and k.start + k.pcm.size > start]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)

    def capture_time(self, index: float) -> float:
        """Unix time at which sample `index` was captured (as this worker received it)."""
        return (self.first_captured or time.time()) + index / SAMPLE_RATE

    def produced_at(self, index: int) -> float | None:
        """time.monotonic() at which the sample before `index` was produced (None before any audio)."""
        return None if self._origin is None else self._origin + index / SAMPLE_RATE

    def _arrived(self) -> None:
        """Notes that the samples up to `end` arrived now (the origin's lower envelope)."""
        origin = _now() - self.end / SAMPLE_RATE
        if self._origin is None or origin < self._origin:
            self._origin = origin
        else:
            self._origin += min(origin - self._origin, ORIGIN_CREEP_S)

    async def _read(self, delay_s: float = 0.0) -> None:
        try:
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            async for pcm in self.source.chunks(IDLE_CHUNK_MS):
                if self.first_captured is None:
                    self.first_captured = time.time() - pcm.size / SAMPLE_RATE
                if self._gap_pending:
                    self._fill_gap(pcm.size)
                self._take(pcm)
                self._arrived()
                self._on_audio()
        except asyncio.CancelledError:
            self.ended.set()
            raise
        self.ended.set()  # the source ended: the track went away

    def _take(self, pcm: np.ndarray) -> None:
        self._kept.append(_Kept(self.end, pcm))
        self.end += pcm.size
        self.gate.feed(pcm)

    def _fill_gap(self, size: int) -> None:
        """The first chunk after a restart: the audio missed meanwhile is kept as silence."""
        self._gap_pending = False
        if self._origin is None:
            return
        gap = min(int((_now() - self._origin) * SAMPLE_RATE) - self.end - size, MAX_GAP_SAMPLES)
        gap -= gap % TICK  # the live stream joins on a tick
        if gap > 0:
            self._take(np.zeros(gap, dtype=np.int16))

    def _reader_failed(self, error: BaseException) -> None:
        """The reader raised (logged and counted already): read again, or end the track."""
        if self._closed:
            self.ended.set()
            return
        if self._restarted_at is not None and self.end - self._restarted_at >= HEALTHY_SAMPLES:
            self._failures = 0
        if self._failures >= len(RESTART_DELAYS_S):
            self.error = error
            logger.error("%s: the microphone's audio failed %d times in a row; giving up on it",
                         self.label, self._failures + 1)
            self.ended.set()
            return
        delay = RESTART_DELAYS_S[self._failures]
        self._failures += 1
        self._restarted_at, self._gap_pending = self.end, True
        logger.warning("%s: reading the microphone's audio again in %.0f s", self.label, delay)
        self._task = supervised(self._read(delay), "track_reader", f"track-{self.label}", self._reader_failed)

    # ---- the live feed ------------------------------------------------------------------------

    def start_live(self, on_junction: Callable[[int], None], on_chunk: Callable[[np.ndarray, int], None],
                   on_failure: Callable[[BaseException], None] = lambda error: None,
                   chunk_ms: int = LIVE_CHUNK_MS) -> None:
        """Opens the live stream, in chunks of `chunk_ms` (`LIVE_CHUNK_MS_CHOICES`). Once the junction
        is found, `on_junction(index)` is called (the caller takes the kept audio before it), then
        `on_chunk(pcm, index)` with the live audio from the junction on, in order: what was received
        meanwhile as one array, then each chunk. If the stream fails (logged and counted already), it
        is closed and `on_failure(error)` is called."""
        if chunk_ms not in LIVE_CHUNK_MS_CHOICES:
            raise ValueError(f"live chunks of {chunk_ms} ms: expected one of {LIVE_CHUNK_MS_CHOICES}")
        self.stop_live()
        self._live = _LiveFeed(self, on_junction, on_chunk, on_failure, chunk_ms)

    def _live_failed(self, feed: _LiveFeed, error: BaseException) -> None:
        if self._live is feed:
            self._live = None
            feed.on_failure(error)

    def stop_live(self) -> None:
        if self._live is not None:
            self._live.close()
            self._live = None

    @property
    def live(self) -> bool:
        return self._live is not None

    async def aclose(self) -> None:
        self._closed = True
        self.stop_live()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.gate.close()


class _LiveFeed:
    def __init__(self, track: TrackAudio, on_junction: Callable[[int], None],
                 on_chunk: Callable[[np.ndarray, int], None], on_failure: Callable[[BaseException], None],
                 chunk_ms: int):
        self._track, self._chunk_ms = track, chunk_ms
        self._chunk = SAMPLE_RATE * chunk_ms // 1000
        self._probe_chunks = -(-SPLICE_TICKS * TICK // self._chunk)
        self._on_junction, self._on_chunk, self.on_failure = on_junction, on_chunk, on_failure
        self._pending: list[np.ndarray] = []
        """Live chunks received and not yet delivered."""
        self._received = 0
        self._guess = 0
        """Where the live stream starts by time: the earliest of the places its chunks' arrivals say
        (each chunk is handled when or after its last sample was produced, at the track's origin +
        index / rate), or by the kept stream's end when it arrived while the track has no origin."""
        self._guessed_by_time = False
        self._offset: int | None = None
        """Index of the live stream's sample 0 in the kept stream, once found."""
        self._tried_at: int | None = None
        """The kept stream's end at the first try to splice."""
        self._probe_end: int | None = None
        """The kept stream's end when the live chunks compared had all arrived."""
        self._task = supervised(self._read(), "live_feed", f"live-{track.label}",
                                lambda error: track._live_failed(self, error))

    async def _read(self) -> None:
        async for pcm in self._track.source.chunks(self._chunk_ms):
            self._pending.append(pcm)
            self._received += 1
            if self._offset is None:  # tried on live chunks only: the first push must be on one's tick
                self._place_by_time()
                self._splice()
            else:
                self._deliver()

    def _place_by_time(self) -> None:
        """The live stream's start as this arrival says (`_guess`). Not where the kept stream is: its
        80 ms chunks end up to 70 ms before the live stream's (a tick's guess with 10 ms chunks, many
        with longer ones)."""
        origin = self._track.produced_at(0)
        if origin is None:  # no kept audio yet: where the kept stream is (a later origin replaces it)
            self._guess, self._guessed_by_time = self._track.end - self._received * self._chunk, False
            return
        place = round((_now() - origin) * SAMPLE_RATE) - self._received * self._chunk
        self._guess = min(self._guess, place) if self._guessed_by_time else place
        self._guessed_by_time = True

    def _splice(self) -> None:
        chunk = self._chunk
        if self._received < 1 + self._probe_chunks:
            return
        track = self._track
        if self._tried_at is None:
            self._tried_at = track.end
        probe = self._probe()
        if probe is None:  # digital silence so far: it would match any silence kept
            if track.end < self._tried_at + SPLICE_PATIENCE:
                return
            probe = np.concatenate(self._pending[1:1 + self._probe_chunks])  # a long silence: by the guess
        if self._probe_end is None:
            self._probe_end = track.end
        # Where the live stream starts by time, to the nearest tick.
        guess = (self._guess + TICK // 2) // TICK * TICK
        first = track.kept_from + (-track.kept_from) % TICK
        kept = track.audio(first, track.end)
        sound = np.flatnonzero(probe)
        at = int(sound[0]) if sound.size else 0  # a sample to sift the places by: sound, if any
        # Where the probe may lie: after the cold first chunk, on a tick.
        starts = np.arange(chunk, kept.size - probe.size + 1, TICK)
        starts = starts[kept[starts + at] == probe[at]]
        if not sound.size:  # all the live audio is silence so far, so is the kept audio after its place (as
            # far as kept): a short pause followed by sound is not it, though it matches the probe
            loud = np.concatenate([[0], np.cumsum(kept != 0)])
            ends = np.minimum(starts + (len(self._pending) - 1) * chunk, kept.size)
            starts = starts[loud[ends] == loud[starts]]
        matches = sorted((first + int(start) - chunk for start in starts
                          if np.array_equal(kept[start:start + probe.size], probe)), key=lambda c: abs(c - guess))
        if matches:
            offset = matches[0]  # the nearest the guess (several only in digital silence)
        elif track.end < self._probe_end + SPLICE_PATIENCE:
            return  # the kept stream has not delivered that audio yet: look again when it has
        else:
            offset = max(guess, track.kept_from)
            logger.warning("%s: the live audio did not match the kept audio; joined by time", track.label)
        self._offset = offset
        self._pending.pop(0)  # the cold first chunk: the kept audio stands in for it
        self._on_junction(offset + chunk)
        self._deliver()

    def _probe(self) -> np.ndarray | None:
        """The live audio to look for in the kept audio: `SPLICE_TICKS` (in whole chunks) after the
        cold first chunk, or more, up to the first chunk that is not digital silence (None: none is yet)."""
        chunks = self._pending[1:]
        for n, pcm in enumerate(chunks):
            if pcm.any():
                return np.concatenate(chunks[:max(n + 1, self._probe_chunks)])
        return None

    def _deliver(self) -> None:
        """Hands over the chunks received, as one: those that waited for the junction arrived on
        earlier ticks, and the engine places a stream's first push on the tick of its newest chunk."""
        assert self._offset is not None
        if self._pending:
            first = self._received - len(self._pending)
            pcm = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
            self._pending.clear()
            self._on_chunk(pcm, self._offset + first * self._chunk)

    def close(self) -> None:
        self._task.cancel()


class RtcTrackSource:
    """An `rtc.Track` as an `AudioSource`: one `rtc.AudioStream` per `chunks()` call, its events
    routed to it by handle (captions/live/sdk_fixes.py)."""

    def __init__(self, track) -> None:
        self._track = track

    def chunks(self, chunk_ms: int) -> AsyncIterator[np.ndarray]:
        from captions.live.sdk_fixes import audio_chunks

        return audio_chunks(self._track, sample_rate=SAMPLE_RATE, frame_size_ms=chunk_ms)
