"""Cutting one speaker's stream of engine events into caption segments (pure logic, no LiveKit).

A segment is what a viewer sees as one caption line: it opens with its first word, is shown while
it grows (interim updates carry its full text so far, the word in progress included), and is
closed (final) when

* the model's semantic VAD predicts a pause (probability of no voice over the next 2 s > 0.5),
  where the checkpoint has VAD heads;
* no word came for `silence_s` seconds of audio (checkpoints without VAD, or a VAD that missed);
* it reached a readable maximum: `max_words` words or `max_duration_s` seconds;
* the stream ended (speaker left, muted, unpublished).

Time is counted in the stream's own audio (event.frames), never the wall clock, so that the same
audio always gives the same segments: live captions match an offline run of the recorded audio.
A segment closes only between words: a word still being written goes to the next segment.

`speaking` follows speech rather than lines: it turns on with a segment's first word (or word in
progress) and off only at a pause, the stream's end or `flush()`, so speech cut into several
lines at the readable maximum is one stretch of speech (LiveKit Agents' start/end of speech).
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field

from captions.stt.api import FRAME_S, SAMPLE_RATE, StreamEvent, Word


@dataclass
class CaptionUpdate:
    """One caption message to publish: an interim update or the final version of a segment."""

    segment_id: str
    text: str
    """The full text of the segment so far (interim) or its final text."""
    final: bool
    words: list[Word] = field(default_factory=list)
    """Completed words, times in seconds of the stream's audio."""


@dataclass
class SegmenterOptions:
    pause_threshold: float = 0.5
    """Close when the VAD's pause probability exceeds this (Kyutai's own end-of-turn rule)."""
    silence_s: float = 1.0
    """Close after this much audio with no new word."""
    max_words: int = 20
    max_duration_s: float = 8.0


def new_segment_prefix() -> str:
    """A prefix unique across streams, rooms and worker restarts."""
    return "SG_" + uuid.uuid4().hex[:12]


class Segmenter:
    """Feeds on one engine stream's events; returns the caption updates each event produces."""

    def __init__(self, prefix: str | None = None, options: SegmenterOptions | None = None):
        self._prefix = prefix or new_segment_prefix()
        self._options = options or SegmenterOptions()
        self._counter = itertools.count()
        self._segment_id: str | None = None
        self._words: list[Word] = []
        self._last_text = ""
        self._last_word_at = 0.0
        self.finished = False
        self.speaking = False
        """Speech since the last pause: on with the first word or word in progress, off at a pause
        (the same rule that closes a segment), at the stream's end, or at `flush()`."""

    @property
    def open_segment_id(self) -> str | None:
        return self._segment_id

    def feed(self, event: StreamEvent) -> list[CaptionUpdate]:
        """The updates this event produces, in publishing order (at most one final, one interim)."""
        assert not self.finished, "the stream already ended"
        now = event.frames * FRAME_S - event.lead_samples / SAMPLE_RATE  # in word time
        updates: list[CaptionUpdate] = []
        if event.words or event.partial:
            self.speaking = True
        if event.words:
            self._ensure_open()
            self._last_word_at = now
            for word in event.words:
                self._words.append(word)
                if self._too_long():
                    updates.append(self._close())
                    self._ensure_open()
        if event.ended:
            return updates + self._finish(event.partial, now)
        if self.speaking and not event.partial and self._pause_detected(event, now):
            # A pause ends the speech even when a length cut already closed its last line.
            self.speaking = False
            if self._words:
                updates.append(self._close())
        interim = self._interim(event.partial)
        if interim is not None:
            updates.append(interim)
        return updates

    def flush(self) -> list[CaptionUpdate]:
        """Closes the open segment now, between words (a caller asked for a final): its completed
        words become final and a word still being written goes to the next segment. Ends `speaking`."""
        assert not self.finished, "the stream already ended"
        self.speaking = False
        return [self._close()] if self._words else []

    def _ensure_open(self) -> None:
        if self._segment_id is None:
            self._segment_id = f"{self._prefix}_{next(self._counter)}"
            self._words = []
            self._last_text = ""

    def _too_long(self) -> bool:
        duration = self._words[-1].end - self._words[0].start
        return len(self._words) >= self._options.max_words or duration >= self._options.max_duration_s

    def _pause_detected(self, event: StreamEvent, now: float) -> bool:
        if event.pause_prob is not None and event.pause_prob > self._options.pause_threshold:
            return True
        return now - self._last_word_at >= self._options.silence_s

    def _interim(self, partial: str) -> CaptionUpdate | None:
        """The open segment's full text, only when it changed (this is the interim throttle)."""
        if partial and self._segment_id is None:
            self._ensure_open()
        if self._segment_id is None:
            return None
        text = _join([w.text for w in self._words] + ([partial] if partial else []))
        if text == self._last_text or not text:
            return None
        self._last_text = text
        return CaptionUpdate(self._segment_id, text, final=False, words=list(self._words))

    def _close(self) -> CaptionUpdate:
        assert self._segment_id is not None and self._words, "closing an empty segment"
        update = CaptionUpdate(self._segment_id, _join([w.text for w in self._words]), True, self._words)
        self._segment_id, self._words, self._last_text = None, [], ""
        return update

    def _finish(self, partial: str, now: float) -> list[CaptionUpdate]:
        """End of stream: whatever is open becomes final; a word left half-written is kept."""
        self.finished = True
        self.speaking = False
        if partial:
            self._ensure_open()
            start = self._words[-1].end if self._words else now
            self._words.append(Word(partial, start, max(start, now)))
        if self._segment_id is None:
            return []
        if not self._words:
            # Interim text was shown (a partial that the engine later dropped): retract it.
            segment_id, self._segment_id = self._segment_id, None
            return [CaptionUpdate(segment_id, "", final=True)] if self._last_text else []
        return [self._close()]


def _join(words: list[str]) -> str:
    return " ".join(w for w in words if w)
