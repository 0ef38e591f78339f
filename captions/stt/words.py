"""Turning a stream's text tokens into timed words, incrementally.

Kyutai STT writes one text token per 80 ms step: padding (3) most of the time, an "end of padding"
token (0) right before a word begins, then the word's pieces. Our rules follow Kyutai's reference
(delayed-streams-modeling scripts/stt_from_file_pytorch.py, `tokens_to_timestamped_text`):

* a segment runs from just after one 0 to the next 0; its decoded text is usually one word, whose
  time is (segment start, segment end); when it holds several words, each takes as many steps as it
  has tokens and the last one takes the rest;
* tokens before the first 0 are not words;
* at the end of the stream the last segment ends at the first end-of-sequence token or one second
  after it started, whichever comes first.

Live captions cannot wait for the next word to learn that the current one ended: the last word
before a pause would hang until the speaker talks again. So once a segment is a second old, its
pending text is emitted at the next padding step, ending one second after the segment began (or at
that step, if later), like the end-of-stream rule; words written later in the same segment start
after that cut. The text is the same as the reference's; times differ only in segments cut this
way (the reference ends a lone word at the next boundary, across the pause, and gives the words of
a several-word segment one step per token from the segment's start).
tests/test_engine.py states both rules independently and compares the engine's words with them.
"""

from __future__ import annotations

import bisect
import math

from captions.stt.api import Word

END_OF_PADDING_ID = 0


class WordDecoder:
    """Per step, constant work whatever the length of a pause: the open segment keeps its text tokens
    (with their offsets) apart from its padding, so nothing re-reads the padding since the last word."""

    def __init__(self, tokenizer, frame_rate: float, time_offset_s: float, padding_id: int = 3):
        self._tokenizer = tokenizer
        self._frame_rate = frame_rate
        self.time_offset_s = time_offset_s
        """Seconds to subtract from step times: the model's delay, plus any silence the engine put
        before the stream's audio."""
        self._padding_id = padding_id
        self._eos_id = tokenizer.eos_id()
        self._pos = 0
        self._seg_start: int | None = None
        self._seg_len = 0
        """Tokens in the open segment (after its 0)."""
        self._seg_text: list[tuple[int, int]] = []
        """The open segment's text tokens (above padding): (offset in the segment, token), in order."""
        self._seg_eos: int | None = None
        """Offset of the open segment's first end-of-sequence token."""
        self._emitted = 0
        """How many of the segment's tokens were already emitted as words (eagerly, after a pause)."""
        self._emitted_text = 0
        """How many of `_seg_text` lie before `_emitted`."""
        self._partial = ""
        """`partial`, kept up to date as tokens arrive: decoding it on every step for every stream
        was most of the engine's host-side work at large batch sizes."""

    def _time(self, position: float) -> float:
        return max(0.0, position / self._frame_rate - self.time_offset_s)

    def _text(self, tokens: list[int]) -> str:
        return self._tokenizer.decode([t for t in tokens if t > self._padding_id])

    def _words(self, start: int, tokens: list[int], end: float) -> list[Word]:
        pieces = self._text(tokens).split()
        words = []
        for piece in pieces[:-1]:
            n_tokens = len(self._tokenizer.encode(piece))
            words.append(Word(piece, self._time(start), self._time(start + n_tokens)))
            start += n_tokens
        if pieces:
            words.append(Word(pieces[-1], self._time(start), self._time(end)))
        return words

    def _emit_open_segment(self, end: float, upto: int | None = None) -> list[Word]:
        assert self._seg_start is not None, "no open segment"
        upto = self._seg_len if upto is None else upto
        last = bisect.bisect_left(self._seg_text, (upto, -1), lo=self._emitted_text)
        tokens = [token for _, token in self._seg_text[self._emitted_text:last]]
        words = self._words(self._seg_start + self._emitted, tokens, end)
        if upto > self._emitted:
            self._emitted, self._emitted_text = upto, last
        return words

    def push(self, token: int) -> list[Word]:
        """Feeds one step's token; returns the words that it completed."""
        words: list[Word] = []
        if token == END_OF_PADDING_ID:
            if self._seg_start is not None:
                words = self._emit_open_segment(end=self._pos)
            self._seg_start, self._seg_len, self._seg_text, self._seg_eos = self._pos + 1, 0, [], None
            self._emitted, self._emitted_text = 0, 0
        elif self._seg_start is not None:
            offset = self._seg_len
            self._seg_len += 1
            if token > self._padding_id:
                self._seg_text.append((offset, token))
            if token == self._eos_id and self._seg_eos is None:
                self._seg_eos = offset
            waited = self._seg_len >= self._frame_rate
            if waited and token <= self._padding_id and self._emitted_text < len(self._seg_text) \
                    and self._open_text():
                words = self._emit_open_segment(end=max(self._seg_start + self._frame_rate, self._pos))
        self._pos += 1
        if words or token == END_OF_PADDING_ID or token > self._padding_id:
            self._partial = self._open_text()
        return words

    def _open_text(self) -> str:
        if self._seg_start is None:
            return ""
        return self._text([token for _, token in self._seg_text[self._emitted_text:]]).strip()

    @property
    def partial(self) -> str:
        """The text of the word being written, not yet emitted."""
        return self._partial

    def finish(self) -> list[Word]:
        """End of stream: the reference's last-segment rule."""
        if self._seg_start is None:
            return []
        if self._seg_eos is not None:
            upto = self._seg_eos
            end: float = self._seg_start + upto
        else:
            end = min(self._pos, self._seg_start + self._frame_rate)
            upto = math.ceil(end - self._seg_start)
        words = self._emit_open_segment(end=end, upto=upto) if upto > self._emitted else []
        self._seg_start, self._partial = None, ""
        return words
