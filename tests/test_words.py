"""The word decoder's work per step stays the same however long a pause lasts, and its words are
those of the straightforward algorithm it replaced (which re-read the padding since the last word
on every step: quadratic in the length of a silence)."""

from __future__ import annotations

import math
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from captions.stt.api import Word
from captions.stt.words import END_OF_PADDING_ID, WordDecoder

PADDING = 3
FRAME_RATE = 12.5
PIECES = {4: " the", 5: "qu", 6: "ick", 7: " fox", 8: " ", 9: "es", 10: " jump", 11: "s"}
"""A toy vocabulary: pieces that start words, continue them, and one that is only a space."""


class Tokenizer:
    def __init__(self, eos: int = 2):
        self.eos = eos

    def eos_id(self) -> int:
        return self.eos

    def decode(self, tokens: list[int]) -> str:
        return "".join(PIECES.get(t, "?") for t in tokens)

    def encode(self, text: str) -> list[int]:
        return [4] * (len(text) // 3 + 1)


class ReferenceDecoder:
    """The decoder before it was made incremental (captions/stt/words.py at 5f27bf2), verbatim but
    for names: the reference its words are compared with."""

    def __init__(self, tokenizer, frame_rate: float, time_offset_s: float, padding_id: int = 3):
        self._tokenizer = tokenizer
        self._frame_rate = frame_rate
        self.time_offset_s = time_offset_s
        self._padding_id = padding_id
        self._eos_id = tokenizer.eos_id()
        self._pos = 0
        self._seg_start: int | None = None
        self._seg_tokens: list[int] = []
        self._emitted = 0
        self._partial = ""

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
        upto = len(self._seg_tokens) if upto is None else upto
        tokens = self._seg_tokens[self._emitted:upto]
        words = self._words(self._seg_start + self._emitted, tokens, end)
        self._emitted = max(self._emitted, upto)
        return words

    def push(self, token: int) -> list[Word]:
        words: list[Word] = []
        if token == END_OF_PADDING_ID:
            if self._seg_start is not None:
                words = self._emit_open_segment(end=self._pos)
            self._seg_start, self._seg_tokens, self._emitted = self._pos + 1, [], 0
        elif self._seg_start is not None:
            self._seg_tokens.append(token)
            waited = len(self._seg_tokens) >= self._frame_rate
            if waited and token <= self._padding_id and self._text(self._seg_tokens[self._emitted:]).strip():
                words = self._emit_open_segment(end=max(self._seg_start + self._frame_rate, self._pos))
        self._pos += 1
        if words or token == END_OF_PADDING_ID or token > self._padding_id:
            self._partial = self._open_text()
        return words

    def _open_text(self) -> str:
        if self._seg_start is None:
            return ""
        return self._text(self._seg_tokens[self._emitted:]).strip()

    @property
    def partial(self) -> str:
        return self._partial

    def finish(self) -> list[Word]:
        if self._seg_start is None:
            return []
        if self._eos_id in self._seg_tokens:
            upto = self._seg_tokens.index(self._eos_id)
            end: float = self._seg_start + upto
        else:
            end = min(self._pos, self._seg_start + self._frame_rate)
            upto = math.ceil(end - self._seg_start)
        words = self._emit_open_segment(end=end, upto=upto) if upto > self._emitted else []
        self._seg_start, self._partial = None, ""
        return words


def run(decoder, tokens: list[int]) -> list[tuple[int, list[Word], str]]:
    """Every step's words and partial text, then the end of stream's words (as step -1)."""
    out = [(step, decoder.push(token), decoder.partial) for step, token in enumerate(tokens)]
    return [*out, (-1, decoder.finish(), decoder.partial)]


# Mostly padding (a pause is long runs of it), some word starts (0), text pieces and other specials.
TOKEN = st.one_of(st.just(PADDING), st.just(PADDING), st.just(PADDING), st.just(END_OF_PADDING_ID),
                  st.sampled_from([1, 2]), st.sampled_from(sorted(PIECES)))
TOKENS = st.lists(st.one_of(TOKEN.map(lambda t: [t]), st.integers(10, 60).map(lambda n: [PADDING] * n)),
                  max_size=40).map(lambda runs: [t for run in runs for t in run])


@settings(max_examples=400, deadline=None)
@given(tokens=TOKENS, eos=st.sampled_from([2, 5]), offset=st.sampled_from([0.0, 0.5]))
def test_words_and_partials_equal_the_straightforward_decoder(tokens, eos, offset):
    new = run(WordDecoder(Tokenizer(eos), FRAME_RATE, offset, PADDING), tokens)
    old = run(ReferenceDecoder(Tokenizer(eos), FRAME_RATE, offset, PADDING), tokens)
    assert new == old


def opcodes_of(call) -> int:
    """Bytecode instructions run by `call()` (every function it calls included): work, not time."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        frame.f_trace_opcodes = True
        if event == "opcode":
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        call()
    finally:
        sys.settrace(None)
    return count


def work_after_a_pause(decoder_type, silence_steps: int) -> tuple[int, int]:
    """A word, then `silence_steps` of padding with its segment still open (the speaker paused),
    then the next word: the work of the last padding step, and of the step that starts the word."""
    decoder = decoder_type(Tokenizer(), FRAME_RATE, 0.0, PADDING)
    for token in [PADDING, END_OF_PADDING_ID, 7, 9, *[PADDING] * silence_steps]:
        decoder.push(token)
    padding_step = opcodes_of(lambda: decoder.push(PADDING))
    word_step = opcodes_of(lambda: decoder.push(END_OF_PADDING_ID))
    return padding_step, word_step


def test_a_steps_work_does_not_grow_with_the_length_of_a_silence():
    short, long = work_after_a_pause(WordDecoder, 50), work_after_a_pause(WordDecoder, 5000)
    assert short == long, "a step in a pause costs the same after 4 s of silence as after 400 s"
    # The measure sees the quadratic work it guards against: the former decoder's steps grew.
    old_short, old_long = work_after_a_pause(ReferenceDecoder, 50), work_after_a_pause(ReferenceDecoder, 5000)
    assert old_long[0] > 10 * old_short[0] and old_long[1] > 10 * old_short[1]


def test_a_long_pause_still_ends_the_word_before_it_a_second_in():
    decoder = WordDecoder(Tokenizer(), FRAME_RATE, 0.0, PADDING)
    words = [w for t in [PADDING, END_OF_PADDING_ID, 7, 9, *[PADDING] * 3000] for w in decoder.push(t)]
    assert [(w.text, w.start, w.end) for w in words] == [(" foxes".strip(), 2 / FRAME_RATE, 2 / FRAME_RATE + 1.0)]
    assert decoder.partial == ""
