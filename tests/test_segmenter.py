"""Segmenting engine events into interim and final captions (pure logic)."""

from __future__ import annotations

from captions.live.segmenter import CaptionUpdate, Segmenter, SegmenterOptions
from captions.stt.api import StreamEvent, Word


def event(frames: int, words=(), partial: str = "", pause: float | None = None, ended: bool = False):
    return StreamEvent(1, frames, list(words), partial, pause, ended=ended)


def word(text: str, start: float, end: float | None = None) -> Word:
    return Word(text, start, start + 0.3 if end is None else end)


def feed_all(segmenter: Segmenter, events) -> list[CaptionUpdate]:
    return [u for e in events for u in segmenter.feed(e)]


def finals(updates: list[CaptionUpdate]) -> list[str]:
    return [u.text for u in updates if u.final]


def test_interim_updates_carry_the_full_text_then_one_final():
    updates = feed_all(Segmenter("S"), [
        event(1, partial="hel"),
        event(2, [word("hello", 0.0)]),
        event(3, partial="wor"),
        event(4, [word("world", 0.3)]),
        event(5, ended=True),
    ])
    assert [(u.text, u.final) for u in updates] == [
        ("hel", False), ("hello", False), ("hello wor", False), ("hello world", False),
        ("hello world", True),
    ]
    assert len({u.segment_id for u in updates}) == 1
    assert [w.text for w in updates[-1].words] == ["hello", "world"]


def test_unchanged_text_sends_no_new_interim():
    updates = feed_all(Segmenter("S"), [event(1, [word("a", 0)]), event(2), event(3), event(4)])
    assert [u.text for u in updates] == ["a"]


def test_vad_pause_closes_the_segment_and_the_next_word_opens_a_new_one():
    seg = Segmenter("S")
    updates = feed_all(seg, [
        event(1, [word("one", 0.0)], pause=0.1),
        event(2, pause=0.7),
        event(3, [word("two", 0.5)], pause=0.1),
        event(4, ended=True),
    ])
    assert finals(updates) == ["one", "two"]
    closed = [u for u in updates if u.final]
    assert closed[0].segment_id != closed[1].segment_id


def test_vad_pause_waits_for_the_word_in_progress():
    updates = feed_all(Segmenter("S"), [
        event(1, [word("one", 0.0)]),
        event(2, partial="tw", pause=0.9),
        event(3, [word("two", 0.2)], pause=0.9),
    ])
    assert finals(updates) == ["one two"]


def test_silence_without_vad_closes_after_one_second_of_audio():
    seg = Segmenter("S", SegmenterOptions(silence_s=1.0))
    updates = feed_all(seg, [event(1, [word("one", 0.0)])] + [event(f) for f in range(2, 14)])
    assert finals(updates) == []
    updates = seg.feed(event(14))
    assert finals(updates) == ["one"]


def test_long_speech_is_cut_at_the_maximum_word_count():
    seg = Segmenter("S", SegmenterOptions(max_words=3, max_duration_s=100))
    words = [word(f"w{i}", i * 0.2) for i in range(7)]
    updates = feed_all(seg, [event(i + 1, [w]) for i, w in enumerate(words)] + [event(9, ended=True)])
    assert finals(updates) == ["w0 w1 w2", "w3 w4 w5", "w6"]


def test_long_speech_is_cut_at_the_maximum_duration():
    seg = Segmenter("S", SegmenterOptions(max_words=100, max_duration_s=2.0))
    words = [word(f"w{i}", i * 0.5, i * 0.5 + 0.4) for i in range(8)]
    updates = feed_all(seg, [event(i + 1, [w]) for i, w in enumerate(words)] + [event(20, ended=True)])
    assert finals(updates) == ["w0 w1 w2 w3 w4", "w5 w6 w7"]


def test_end_of_stream_keeps_a_half_written_word():
    updates = feed_all(Segmenter("S"), [event(1, [word("one", 0.0)]), event(2, partial="tw", ended=True)])
    assert finals(updates) == ["one tw"]


def test_end_of_stream_retracts_an_interim_that_produced_no_word():
    updates = feed_all(Segmenter("S"), [event(1, partial="uh"), event(2, ended=True)])
    assert [(u.text, u.final) for u in updates] == [("uh", False), ("", True)]


def test_silence_only_produces_nothing():
    assert feed_all(Segmenter("S"), [event(i, pause=0.9) for i in range(1, 30)] + [event(30, ended=True)]) == []


def test_every_word_lands_in_exactly_one_final_segment_in_order():
    seg = Segmenter("S", SegmenterOptions(max_words=4))
    events, frames = [], 0
    for i in range(30):
        frames += 1
        events.append(event(frames, [word(f"w{i}", frames * 0.08)], pause=0.9 if i % 7 == 6 else 0.1))
        if i % 5 == 4:
            frames += 20
            events.append(event(frames))
    updates = feed_all(seg, events + [event(frames + 1, ended=True)])
    assert " ".join(finals(updates)).split() == [f"w{i}" for i in range(30)]
    closed_ids = [u.segment_id for u in updates if u.final]
    assert len(closed_ids) == len(set(closed_ids))
    for update in updates:
        if not update.final:
            assert update.segment_id in closed_ids, "every interim segment is closed eventually"


def test_segment_ids_differ_between_segmenters():
    a = Segmenter().feed(event(1, [word("x", 0)]))[0].segment_id
    b = Segmenter().feed(event(1, [word("x", 0)]))[0].segment_id
    assert a != b


def test_speaking_spans_length_cuts_and_ends_at_the_pause():
    seg = Segmenter("S", SegmenterOptions(max_words=2, max_duration_s=100))
    assert not seg.speaking
    seen = []
    for e in [event(1, partial="w"), event(2, [word("w0", 0.0)]), event(3, [word("w1", 0.1)]),
              event(4, pause=0.1), event(5, pause=0.9), event(6, pause=0.9)]:
        updates = seg.feed(e)
        seen.append((finals(updates), seg.speaking))
    # The length cut at w1 closes a line but not the speech; the pause that follows ends it even
    # though no word is left open to close.
    assert seen == [([], True), ([], True), (["w0 w1"], True), ([], True), ([], False), ([], False)]


def test_flush_closes_the_open_segment_between_words():
    seg = Segmenter("S")
    updates = feed_all(seg, [event(1, [word("one", 0.0)]), event(2, [word("two", 0.3)], partial="thr")])
    flushed = seg.flush()
    assert [(u.text, u.final) for u in flushed] == [("one two", True)]
    assert flushed[0].segment_id == updates[-1].segment_id
    assert not seg.speaking
    # The word that was being written opens the next segment, so it is never in two finals.
    later = feed_all(seg, [event(3, [word("three", 0.6)]), event(4, ended=True)])
    assert finals(later) == ["three"]
    assert later[-1].segment_id != flushed[0].segment_id
    assert seg.finished


def test_flush_with_nothing_open_gives_nothing():
    seg = Segmenter("S")
    assert seg.flush() == []
    seg.feed(event(1, [word("one", 0.0)]))
    assert finals(seg.flush()) == ["one"]
    assert seg.flush() == []
