"""A turn: one stretch of a speaker's speech, from its pre-roll until the slot is given back, and
the audio of one engine stream (speaker.py decides when turns start and end; this is what one holds).

A turn's audio comes from its track in pieces: kept audio taken out while it waited (`held`), then
live audio from the junction on; `spans` maps each sample pushed to the engine back to the track's
index, so that word times (in the stream's audio) become capture times (`wall_time`).

Threads: the room's event loop, as the speaker's.
"""

from __future__ import annotations

import time
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

from captions.stt.api import SAMPLE_RATE, EngineStream

if TYPE_CHECKING:
    from captions.live.recorder import StreamRecorder
    from captions.live.segmenter import Segmenter
    from captions.live.speaker import Speaker
    from captions.live.stream_client import KeptAudioBound, StreamClient
    from captions.live.timing import StreamTiming


class TurnState(Enum):
    WAITING = "waiting"
    """Queued for a slot; its audio is kept."""
    JOINING = "joining"
    """Has a slot; the live feed is being joined to the kept audio."""
    LIVE = "live"
    """Live audio goes to the engine as it arrives."""
    CLOSING = "closing"
    """No more audio: the engine is flushing the last words."""


class Turn:
    """One stretch of a speaker's speech: the audio of one engine stream."""

    def __init__(self, speaker: Speaker, start: int):
        self.speaker = speaker
        self.state = TurnState.WAITING
        self.open_start: int | None = start
        """Where the part of the turn still read from the track starts (None: the turn stopped)."""
        self.held: list[tuple[int, np.ndarray]] = []
        """Audio of the turn taken out of the track already: (track index, samples), in order."""
        self.spans: list[tuple[int, int, int]] = []
        """(turn sample, track index, length) of everything pushed: maps word times to capture times."""
        self.pushed = 0
        self.start = start
        """Nothing before this track index goes into the turn (it went to the turn before)."""
        self.since = time.monotonic()
        self.client: StreamClient | None = None
        """The turn's engine stream: asked for, then granted (stream_client.py)."""
        self.bound: KeptAudioBound | None = None
        """How much of the turn's audio is kept while it waits (stream_client.py)."""
        self.granted_end = 0
        """The track's end when the slot came: how long the turn has held it, in audio."""
        self.yield_asked: int | None = None
        """The track's end when the queue first asked the turn to yield (None: not asked)."""
        self.segmenter: Segmenter | None = None
        self.recorder: StreamRecorder | None = None
        self.timing: StreamTiming | None = None

    @property
    def stream(self) -> EngineStream | None:
        return self.client.stream if self.client is not None else None

    @property
    def kept_samples(self) -> int:
        open_part = self.speaker.track.end - self.open_start if self.open_start is not None else 0
        return sum(pcm.size for _, pcm in self.held) + open_part

    def hold_until(self, end: int) -> None:
        """Takes the open part of the turn up to `end` out of the track (it stops there)."""
        if self.open_start is not None and end > self.open_start:
            self.held.append((self.open_start, self.speaker.track.audio(self.open_start, end)))
        self.open_start = None

    def record(self, index: int, size: int) -> None:
        """Notes `size` samples from track index `index` as pushed: a push that continues the last
        one extends its span, so a live turn keeps one span however long it lasts."""
        if size <= 0:
            return
        if self.spans:
            turn_sample, last, length = self.spans[-1]
            if last + length == index and turn_sample + length == self.pushed:
                self.spans[-1] = (turn_sample, last, length + size)
                self.pushed += size
                return
        self.spans.append((self.pushed, index, size))
        self.pushed += size

    def track_index(self, sample: float) -> float:
        """The track's index of position `sample` of the turn's audio (the gaps cut out of a waiting
        turn accounted for)."""
        for turn_sample, index, length in reversed(self.spans):
            if sample >= turn_sample or turn_sample == 0:
                return index + min(sample - turn_sample, length)
        return sample

    def wall_time(self, seconds: float) -> float:
        """Unix capture time of `seconds` into the turn's audio (the gaps cut out of a waiting turn
        and the frame clock's leading silence are accounted for)."""
        return self.speaker.track.capture_time(self.track_index(seconds * SAMPLE_RATE))
