"""The room's translation lane (issue 26) with a fake translation engine and the real publisher on a
fake LiveKit participant: every final is translated and signed as a translation, interims at a
bounded rate, a failed or slow translation goes out as the original and says why, the originals
never wait, the languages are those configured that someone reads, and a speaker's translations go
out in the order of their originals."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest

from captions.live.publisher import CaptionPublisher, OutgoingCaption
from captions.live.reading import parse_languages, room_settings
from captions.live.segmenter import CaptionUpdate
from captions.live.translation import (
    UNTRANSLATED_TIMEOUT,
    RoomTranslator,
    TranslationOptions,
)
from captions.protocol import (
    ATTR_LANGUAGE,
    ATTR_READING,
    ATTR_SEGMENT_ID,
    ATTR_SEQ,
    ATTR_SOURCE_LANGUAGE,
    ATTR_SOURCE_SEGMENT,
    ATTR_TRANSCRIPTION_FINAL,
    ATTR_TRANSLATED,
    ATTR_UNTRANSLATED,
    CaptionSigner,
    FinalSegment,
    translation_segment_id,
    verify_caption,
)
from tests.test_publisher import FakeParticipant, send_through_fake

pytestmark = pytest.mark.asyncio(loop_scope="function")


class FakeEngine:
    """`TranslationEngine`'s interface: each job on a worker thread after `delay(text)` seconds;
    "hang" never answers, "fail" raises."""

    def __init__(self, mode: str = "translate", delay: Callable[[str], float] = lambda text: 0.0) -> None:
        self.mode, self.delay = mode, delay
        self.submitted: list[tuple[str, str, str, bool]] = []
        self.busy: dict[str, int] = {}
        """Interims being translated now, by target."""
        self.most_busy = 0
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(4)

    def submit(self, text: str, source: str, target: str, *, final: bool,
               key=None) -> concurrent.futures.Future[str]:
        self.submitted.append((text, source, target, final))
        if self.mode == "hang":
            return concurrent.futures.Future()
        if not final:
            with self._lock:
                self.busy[target] = self.busy.get(target, 0) + 1
                self.most_busy = max(self.most_busy, self.busy[target])
        return self._pool.submit(self._work, text, target, final)

    def _work(self, text: str, target: str, final: bool) -> str:
        try:
            time.sleep(self.delay(text))
            if self.mode == "fail":
                raise RuntimeError("the model failed")
            return f"<{target}> {text}"
        finally:
            if not final:
                with self._lock:
                    self.busy[target] -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class FakeRoom:
    """What the publisher and the translator use of `rtc.Room`."""

    def __init__(self, readers: dict[str, str] | None = None, metadata: str = "") -> None:
        self.name, self.metadata = "r", metadata
        self.local_participant = FakeParticipant()
        self.remote_participants = {"alice": participant("alice"), "bob": participant("bob")}
        for identity, reading in (readers or {}).items():
            self.remote_participants[identity] = participant(identity, reading)
        self._handlers: dict[str, list[Callable]] = {}

    def on(self, event: str, handler: Callable) -> None:
        self._handlers.setdefault(event, []).append(handler)

    def off(self, event: str, handler: Callable) -> None:
        self._handlers[event].remove(handler)

    def emit(self, event: str, *args: object) -> None:
        for handler in list(self._handlers.get(event, ())):
            handler(*args)

    def set_reading(self, identity: str, reading: str) -> None:
        if identity not in self.remote_participants:
            self.remote_participants[identity] = participant(identity)
            self.emit("participant_connected", self.remote_participants[identity])
        self.remote_participants[identity].attributes[ATTR_READING] = reading
        self.emit("participant_attributes_changed", {ATTR_READING: reading}, self.remote_participants[identity])

    def leave(self, identity: str) -> None:
        self.emit("participant_disconnected", self.remote_participants.pop(identity))


def participant(identity: str, reading: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(identity=identity, attributes={} if reading is None else {ATTR_READING: reading})


class Lane:
    """A room's publisher with its translator, as the RoomCaptioner wires them."""

    def __init__(self, room: FakeRoom, engine: FakeEngine, targets=("de", "es"), detect=lambda text, c: "en",
                 **options: float) -> None:
        self.room, self.engine, self.signer = room, engine, CaptionSigner()
        self.publisher = CaptionPublisher(room, self.signer, send=send_through_fake)
        self.written: list[FinalSegment] = []
        self.translator = RoomTranslator(room, engine, self.publisher, TranslationOptions(targets, **options),
                                         write=self.written.append, detect=detect)
        self.publisher.on_numbered = self.translator.on_numbered
        self.translator.start()
        self.task = asyncio.create_task(self.publisher.run())

    def say(self, identity: str, segment: str, text: str, final: bool = False) -> None:
        record = FinalSegment(segment, identity, identity.title(), f"TR_{identity}", text, 1.0, 2.0,
                              [[text, 1.0, 2.0]]) if final else None
        self.publisher.put(OutgoingCaption(identity, f"TR_{identity}", CaptionUpdate(segment, text, final),
                                           segment=record))

    async def settle(self, timeout: float = 5.0) -> None:
        assert await self.publisher.drain(timeout)
        assert await self.translator.drain(timeout)
        assert await self.publisher.drain(timeout)

    def sent(self, translated: bool | None = None, language: str | None = None) -> list[tuple[str, str, dict]]:
        return [(who, text, a) for who, text, a in self.room.local_participant.sent
                if (translated is None or (a.get(ATTR_TRANSLATED) == "true") == translated)
                and (language is None or a.get(ATTR_LANGUAGE) == language)]

    def close(self) -> None:
        self.translator.close()
        self.task.cancel()
        self.engine.close()


def is_final(attributes: dict) -> bool:
    return attributes[ATTR_TRANSCRIPTION_FINAL] == "true"


@pytest.fixture
def engine():
    engine = FakeEngine()
    yield engine
    engine.close()


async def test_every_final_is_translated_into_each_language_read_signed_as_a_translation(engine):
    lane = Lane(FakeRoom({"relay": "de,es"}), engine)
    for n in range(3):
        for who in ("alice", "bob"):
            lane.say(who, f"SG_{who}{n}", f"{who} says {n}")
            lane.say(who, f"SG_{who}{n}", f"{who} says {n} again", final=True)
    await lane.settle()
    originals = sorted(((who, a) for who, _, a in lane.sent(translated=False) if is_final(a)),
                       key=lambda sent: sent[1][ATTR_SEGMENT_ID])
    assert len(originals) == 6
    for language in ("de", "es"):
        # (Each speaker's lane is in order; the two speakers' lanes interleave.)
        finals = sorted(((who, text, a) for who, text, a in lane.sent(True, language) if is_final(a)),
                        key=lambda sent: sent[2][ATTR_SOURCE_SEGMENT])
        assert [(who, a[ATTR_SOURCE_SEGMENT]) for who, _, a in finals] == \
            [(who, a[ATTR_SEGMENT_ID]) for who, a in originals], "a final was not translated, or under another name"
        for (who, text, a), (_, original) in zip(finals, originals, strict=True):
            assert text == f"<{language}> {original[ATTR_SEGMENT_ID][3:-1]} says {original[ATTR_SEGMENT_ID][-1]} again"
            assert a[ATTR_SEGMENT_ID] == translation_segment_id(original[ATTR_SEGMENT_ID], language)
            assert a[ATTR_SEQ] == original[ATTR_SEQ], "a translation carries its original's number"
            assert a[ATTR_SOURCE_LANGUAGE] == "en" and a[ATTR_UNTRANSLATED] == ""
            assert verify_caption(lane.signer.public_key, "r", who, a, text)
            assert not verify_caption(lane.signer.public_key, "r", who, a, text + "!"), "a forged text verified"
            assert not verify_caption(lane.signer.public_key, "r", "bob" if who == "alice" else "alice", a, text)
    # Every translated final is in the transcript, after its original's record, naming it.
    assert {(s.language, s.translation_of) for s in lane.written} == \
        {(language, a[ATTR_SEGMENT_ID]) for _, a in originals for language in ("de", "es")}
    assert all(s.segment_id == translation_segment_id(s.translation_of, s.language) and s.start == 1.0
               and s.participant_name in ("Alice", "Bob") and s.words == [] for s in lane.written)
    assert lane.translator.counts.translated == 12 and lane.translator.counts.untranslated == 0
    lane.close()


async def test_interims_go_at_a_bounded_rate_one_at_a_time_and_the_latest_text_wins():
    engine = FakeEngine(delay=lambda text: 0.15)
    lane = Lane(FakeRoom({"relay": "de"}), engine, interim_interval_s=0.3)
    started = time.monotonic()
    for n in range(1, 31):  # 1.5 s of interims, one every 50 ms
        lane.say("alice", "SG_a", " ".join(["word"] * n))
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - started
    lane.say("alice", "SG_a", "the final words", final=True)
    await lane.settle()
    interims = [text for text, _, target, final in engine.submitted if not final]
    # One at once, every 0.3 s at most (one more may go between the last interim and the final).
    assert 3 <= len(interims) <= elapsed / 0.3 + 2, f"{len(interims)} interims in {elapsed:.2f} s"
    assert engine.most_busy == 1, "two interims of one segment were in flight at once"
    assert len(interims[-1].split()) >= 20, "the newest text did not win"
    sent = lane.sent(True, "de")
    assert [int(a[ATTR_SEQ]) for _, _, a in sent] == sorted(int(a[ATTR_SEQ]) for _, _, a in sent)
    assert is_final(sent[-1][2]) and sent[-1][1] == "<de> the final words"
    assert sum(is_final(a) for _, _, a in sent) == 1
    lane.close()


@pytest.mark.parametrize("mode", ["fail", "hang"])
async def test_a_failed_or_slow_translation_publishes_the_original_text_and_says_why(mode, caplog):
    engine = FakeEngine(mode)
    lane = Lane(FakeRoom({"relay": "de"}), engine, final_timeout_s=0.3)
    lane.say("alice", "SG_a", "bonjour tout le monde", final=True)
    await lane.settle()
    ((who, text, a),) = lane.sent(True, "de")
    assert who == "alice" and text == "bonjour tout le monde" and is_final(a)
    reason = a[ATTR_UNTRANSLATED]
    assert reason == UNTRANSLATED_TIMEOUT if mode == "hang" else reason.startswith("error")
    assert verify_caption(lane.signer.public_key, "r", "alice", a, text)
    assert not verify_caption(lane.signer.public_key, "r", "alice", {**a, ATTR_UNTRANSLATED: ""}, text), \
        "an untranslated caption could pass for a translation"
    assert lane.translator.counts.untranslated == 1 and "published untranslated" in caplog.text
    assert [s.text for s in lane.written] == ["bonjour tout le monde"], "the transcript misses it"
    assert lane.written[0].untranslated == reason, "a late viewer's backlog would show it as translated"
    lane.close()


async def test_originals_never_wait_for_an_engine_that_hangs():
    engine = FakeEngine("hang")
    lane = Lane(FakeRoom({"relay": "de,es"}), engine, final_timeout_s=5.0)
    started = time.monotonic()
    for n in range(20):
        lane.say("alice", f"SG_{n}", f"sentence {n}")
        lane.say("alice", f"SG_{n}", f"sentence {n} done", final=True)
    assert await lane.publisher.drain(1.0), "originals waited for translations"
    assert time.monotonic() - started < 1.0
    assert len(lane.sent(translated=False)) >= 20 and not lane.sent(translated=True)
    assert len([s for s in engine.submitted if s[3]]) == 40, "every final was submitted in each language"
    lane.close()


async def test_reading_languages_are_parsed_defensively():
    assert parse_languages("de, ES ,pt_BR,de,,x,klingon!,<script>,fr") == ("de", "es", "pt-br", "fr")
    assert parse_languages("de," * 1000) == ("de",)
    assert len(parse_languages(",".join(f"a{chr(97 + i % 26)}{chr(97 + i // 26)}" for i in range(100)))) == 16
    assert parse_languages(["de", 5, None, "es"]) == ("de", "es")
    assert parse_languages({"de": 1}) == () and parse_languages(None) == ()


async def test_only_configured_languages_that_someone_reads_are_translated(engine):
    room = FakeRoom({"viewer-1": "de,fr,zz,!!"})
    lane = Lane(room, engine, targets=("de", "es"))
    assert lane.translator.wanted == {"de"}, "a reader made the worker translate into an unconfigured language"
    room.set_reading("viewer-2", "es, ja, " + "x" * 5000)
    assert lane.translator.wanted == {"de", "es"}
    room.leave("viewer-1")
    assert lane.translator.wanted == {"es"}
    lane.say("alice", "SG_a", "hello", final=True)
    await lane.settle()
    assert {a[ATTR_LANGUAGE] for _, _, a in lane.sent(True)} == {"es"}
    room.set_reading("viewer-2", "")
    assert lane.translator.wanted == frozenset()
    # The server API may set it on the captioner itself (readers behind a hidden participant).
    room.local_participant.attributes = {ATTR_READING: "de"}
    room.emit("participant_attributes_changed", {ATTR_READING: "de"}, room.local_participant)
    assert lane.translator.wanted == {"de"}
    room.local_participant.attributes = {}
    room.emit("participant_attributes_changed", {ATTR_READING: ""}, room.local_participant)
    assert lane.translator.wanted == frozenset()
    lane.say("alice", "SG_b", "nobody reads this", final=True)
    await lane.settle()
    assert len(engine.submitted) == 1
    lane.close()


async def test_a_language_nobody_reads_any_more_still_gets_its_open_segments_final(engine):
    room = FakeRoom({"relay": "de"})
    lane = Lane(room, engine, interim_interval_s=0.0)
    lane.say("alice", "SG_a", "half a")
    await lane.settle()
    room.leave("relay")
    lane.say("alice", "SG_a", "half a sentence", final=True)
    lane.say("alice", "SG_b", "another one", final=True)
    await lane.settle()
    assert [(text, is_final(a)) for _, text, a in lane.sent(True, "de")] == \
        [("<de> half a", False), ("<de> half a sentence", True)]
    lane.close()


async def test_the_room_metadata_replaces_the_configured_languages_and_may_set_the_source(engine):
    assert room_settings('{"captions": {"translate_to": ["es", "JA"], "source_language": "fr"}}', ("de",)) == \
        (("es", "ja"), "fr")
    assert room_settings('{"captions": {"translate_to": "es,ja"}}', ("de",)) == (("es", "ja"), None)
    for other in ("", "not json", "[1, 2]", '{"captions": 5}', '{"theme": "dark"}', '{"captions": {"x": 1}}',
                  '{"captions": {"translate_to": 7, "source_language": "not a code"}}', "[" * 100000):
        assert room_settings(other, ("de",)) == (("de",), None), other
    room = FakeRoom({"relay": "de,es"}, metadata="{not json")
    lane = Lane(room, engine, targets=("de",), detect=lambda text, candidates: "en")
    assert lane.translator.wanted == {"de"}
    room.metadata = '{"captions": {"translate_to": ["es"], "source_language": "fr"}}'
    room.emit("room_metadata_changed", "{not json", room.metadata)
    assert lane.translator.wanted == {"es"}
    lane.say("alice", "SG_a", "salut", final=True)
    await lane.settle()
    assert engine.submitted == [("salut", "fr", "es", True)], "the room's source language was not used"
    room.metadata = '{"captions": {"translate_to": []}}'
    room.emit("room_metadata_changed", "", room.metadata)
    assert lane.translator.wanted == frozenset()
    lane.close()
    # A room picks among what the worker's model translates into.
    room = FakeRoom({"relay": "de,es,ja"}, metadata='{"captions": {"translate_to": ["es", "ja"]}}')
    lane = Lane(room, FakeEngine(), targets=("de",), available=("de", "es"))
    assert lane.translator.wanted == {"es"}
    lane.close()


async def test_a_segment_already_in_the_target_language_is_not_translated(engine):
    """...but its reader still gets it as its translation: a page that waits for a translation that
    never comes marks the line "not translated" (every English line of an English-French meeting)."""
    languages = {"SG_de": "de", "SG_en": "en"}
    lane = Lane(FakeRoom({"relay": "de"}), engine, interim_interval_s=0.0,
                detect=lambda text, candidates: "de" if "deutsch" in text else "en")
    lane.say("alice", "SG_de", "deutsch ist schön", final=True)
    lane.say("alice", "SG_en", "english words", final=True)
    await lane.settle()
    assert [source for _, source, _, _ in engine.submitted] == [languages["SG_en"]]
    sent = {a[ATTR_SOURCE_SEGMENT]: (text, a) for _, text, a in lane.sent(True)}
    assert set(sent) == {"SG_de", "SG_en"}
    text, a = sent["SG_de"]
    assert text == "deutsch ist schön" and a[ATTR_UNTRANSLATED] == "" and a[ATTR_SOURCE_LANGUAGE] == "de"
    assert verify_caption(lane.signer.public_key, "r", "alice", a, text)
    # A segment whose interims were translated gets its final even if it turns out to be German:
    # the original text, so that its translated line is closed at every viewer.
    lane.say("bob", "SG_b", "this starts")
    await lane.settle()
    lane.say("bob", "SG_b", "deutsch am ende", final=True)
    await lane.settle()
    ((_, text, a),) = [(w, t, a) for w, t, a in lane.sent(True) if w == "bob" and is_final(a)]
    assert text == "deutsch am ende" and a[ATTR_UNTRANSLATED] == "" and a[ATTR_SOURCE_LANGUAGE] == "de"
    lane.close()


async def test_a_speakers_translations_go_out_in_the_order_of_their_originals():
    # The first final is slow to translate, the next ones quick; an interim's result comes after its
    # segment's final was taken.
    delays = {"first final": 1.0, "slow interim": 0.5}
    engine = FakeEngine(delay=lambda text: delays.get(text, 0.01))
    lane = Lane(FakeRoom({"relay": "de"}), engine, interim_interval_s=0.0)
    lane.say("alice", "SG_1", "first final", final=True)
    lane.say("alice", "SG_2", "second final", final=True)
    lane.say("alice", "SG_3", "slow interim")
    await asyncio.sleep(0.1)
    lane.say("alice", "SG_3", "third final", final=True)
    lane.say("bob", "SG_b", "bob is not held back by alice", final=True)
    for _ in range(80):
        if lane.sent(True):
            break
        await asyncio.sleep(0.01)
    assert [text for who, text, _ in lane.sent(True)] == ["<de> bob is not held back by alice"]
    await lane.settle()
    assert [text for who, text, _ in lane.sent(True) if who == "alice"] == \
        ["<de> first final", "<de> second final", "<de> third final"], "out of order, or an interim after its final"
    lane.close()


async def test_closing_stops_translating_and_publishes_nothing_more():
    engine = FakeEngine(delay=lambda text: 0.3)
    lane = Lane(FakeRoom({"relay": "de"}), engine)
    lane.say("alice", "SG_a", "late", final=True)
    assert await lane.publisher.drain(1.0)
    await asyncio.sleep(0.05)
    lane.translator.close()
    await asyncio.sleep(0.5)
    assert not lane.sent(True)
    lane.say("alice", "SG_b", "after", final=True)
    await lane.settle()
    assert len(engine.submitted) == 1
    lane.close()


async def test_a_transcript_with_translations_serves_each_language_its_own_backlog(tmp_path):
    """The room's file holds every language; the backlog's limit counts the segments a viewer gets
    (the originals and their language's translations), not every language's."""
    from captions.live.transcripts import TranscriptStore, recent_segments

    store = TranscriptStore(tmp_path / "room.jsonl")
    now = time.time()
    for n in range(3):
        original = FinalSegment(f"SG_{n}", "alice", "Alice", "TR_a", f"hello {n}", now - 10 + n, now - 9 + n)
        store.append(original)
        for language in ("de", "es"):
            store.append(FinalSegment(translation_segment_id(original.segment_id, language), "alice", "Alice",
                                      "TR_a", f"<{language}> hello {n}", original.start, original.end,
                                      language=language, translation_of=original.segment_id))
    store.close()
    german = recent_segments(tmp_path / "room.jsonl", limit=4,
                             keep=lambda s: not s.translation_of or s.language == "de")
    assert [s.segment_id for s in german] == ["SG_1", "SG_1~de", "SG_2", "SG_2~de"]
    assert len(recent_segments(tmp_path / "room.jsonl")) == 9


async def test_the_worker_loads_one_engine_for_its_targets_and_none_without_them(tiny_translation_model, monkeypatch):
    """--translate-to and --translation-model flow into the rooms' options and the one shared engine
    (the speech model is not needed for that part of the worker's start)."""
    import argparse

    from captions.live import worker

    for name in ("CAPTIONS_TRANSLATE_TO", "CAPTIONS_TRANSLATION_MODEL", "CAPTIONS_TRANSLATION_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    parser = argparse.ArgumentParser()
    worker.configure_parser(parser)
    off = parser.parse_args([])
    assert off.translate_to == () and worker._load_translation(off) == (None, TranslationOptions())
    args = parser.parse_args(["--device", "cpu", "--translate-to", "DE,es", "--translation-model",
                              str(tiny_translation_model)])
    engine, options = await asyncio.to_thread(worker._load_translation, args)
    try:
        assert options.targets == ("de", "es") and set(options.available) == {"de", "es"}
        future = engine.submit("hello there, how are you today", "en", "de", final=True)
        assert isinstance(await asyncio.wrap_future(future), str)
    finally:
        engine.close()


async def test_each_viewer_servers_entry_on_the_captioner_counts_until_it_expires(engine):
    """Viewer servers tell the captioner what their readers read in entries of their own
    (``captions.reading.<relay>``, with an expiry): all of them count, an expired one does not, and
    one that expires while the room runs stops its languages (a viewer server that died)."""
    from captions.protocol import ATTR_READING_FROM, reading_value

    room = FakeRoom()
    lane = Lane(room, engine)
    now = time.time()
    entries = {f"{ATTR_READING_FROM}a": reading_value("de", int(now + 90)),
               f"{ATTR_READING_FROM}b": reading_value("es", int(now) - 1),
               f"{ATTR_READING_FROM}c": "junk@"}
    room.local_participant.attributes = dict(entries)
    room.emit("participant_attributes_changed", entries, room.local_participant)
    assert lane.translator.wanted == {"de"}, "the expired and the malformed entries asked for more"
    soon = {f"{ATTR_READING_FROM}b": reading_value("es", int(time.time()) + 1)}
    room.local_participant.attributes.update(soon)
    room.emit("participant_attributes_changed", soon, room.local_participant)
    assert lane.translator.wanted == {"de", "es"}
    deadline = time.monotonic() + 5
    while lane.translator.wanted != {"de"}:
        assert time.monotonic() < deadline, "an entry that expired still costs translations"
        await asyncio.sleep(0.1)
    lane.close()


async def test_a_participant_flipping_its_languages_cannot_flood_the_log(engine, caplog):
    """A reader's own attribute, flipped 1000 times: each change is followed, the first ones logged
    (tests and the latency benchmark wait for those lines), the rest at most once per 10 s."""
    room = FakeRoom()
    lane = Lane(room, engine)
    with caplog.at_level("INFO"):
        for i in range(1000):
            room.set_reading("mallory", "de" if i % 2 == 0 else "es")
    assert lane.translator.wanted == {"es"}
    assert 20 <= caplog.text.count("translating captions into") <= 21
    lane.close()
