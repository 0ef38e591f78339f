"""End to end (issue 26): the real `captions worker` translating into German for a participant who
reads it, with the tiny STT checkpoint and the tiny random translation models (meaningless words, in
the real formats), a real livekit-server of its own, two WebRTC speaker bots and a bot viewer.

Every final of each speaker gets exactly one translated final in German, attributed to that speaker,
naming its original and carrying its number, in the order of the originals and signed with the
pool's caption key; nobody reads Spanish, so nothing is translated into it; the originals are what
they are without translation (each segment final once, in the transcript, signed as originals); and a
participant's forged or replayed translation does not verify. Readers the server API names on the
captioner itself (the viewer server's relay is hidden, and livekit-server shows a hidden participant
to nobody) count too.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time

import pytest
from livekit import api, rtc

from captions.dev.bots import Caption, Publisher, Subscriber
from captions.live.transcripts import read_transcript, transcript_path
from captions.protocol import (
    ATTR_LANGUAGE,
    ATTR_READING,
    ATTR_SEQ,
    ATTR_SOURCE_SEGMENT,
    ATTR_TRANSLATED,
    ATTR_UNTRANSLATED,
    TOPIC_TRANSCRIPTION,
    CaptionSigner,
    translation_segment_id,
    verify_caption,
)
from tests.conftest import espeak_wav, start_captions_worker, start_livekit_server

pytestmark = [pytest.mark.livekit, pytest.mark.slow, pytest.mark.timeout(180),
              pytest.mark.asyncio(loop_scope="session")]

ROOM = "e2e-translation"
SENTENCES = {
    "alice": "The quick brown fox jumps over the lazy dog near the river bank.",
    "bob": "Streaming speech recognition turns every word into text as it is spoken.",
}
WAIT_S = 40


def token(server, identity: str, attributes: dict[str, str], can_publish_data: bool = False) -> str:
    grants = api.VideoGrants(room_join=True, room=ROOM, can_publish=False, can_subscribe=False,
                             can_publish_data=can_publish_data)
    return (api.AccessToken(server.api_key, server.api_secret).with_identity(identity).with_grants(grants)
            .with_attributes(attributes).to_jwt())


async def wait_for_log(worker, text: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while text.encode() not in worker.log_path.read_bytes():
        assert time.monotonic() < deadline, f"the worker never logged {text!r}:\n{worker.log_tail()}"
        await asyncio.sleep(0.1)


def originals(captions: list[Caption]) -> list[Caption]:
    return [c for c in captions if c.attributes.get(ATTR_TRANSLATED) != "true"]


def translations(captions: list[Caption], language: str) -> list[Caption]:
    return [c for c in captions if c.attributes.get(ATTR_TRANSLATED) == "true"
            and c.attributes.get(ATTR_LANGUAGE) == language]


@pytest.mark.parametrize("receivers", [1, 2], ids=["one-process", "engine-and-2-receivers"])
async def test_a_reader_of_german_gets_every_final_of_each_speaker_in_german_in_order(
        tiny_checkpoint, tiny_translation_model, speech_dir, tmp_path, receivers):
    server = await asyncio.to_thread(start_livekit_server, tmp_path / "livekit-server.log")
    worker = None
    rooms: list[rtc.Room] = []
    reads: list[asyncio.Future] = []
    try:
        worker = await asyncio.to_thread(start_captions_worker, server, tiny_checkpoint, tmp_path / "worker", 3,
                                         translate_to="de,es", translation_model=tiny_translation_model,
                                         receivers=receivers)
        key = CaptionSigner.for_deployment(server.api_secret).public_key
        viewer = await Subscriber(server, ROOM).connect()
        rooms.append(viewer.room)
        reader = rtc.Room()  # a participant whose viewers read German (what the viewer server's relay is)
        received: list[tuple[str, dict[str, str], str]] = []  # what reaches the reader, as sent (no dedup)

        async def read(stream: rtc.TextStreamReader, sender: str) -> None:
            received.append((sender, dict(stream.info.attributes or {}), await stream.read_all()))

        reader.register_text_stream_handler(TOPIC_TRANSCRIPTION,
                                            lambda stream, sender: reads.append(asyncio.ensure_future(
                                                read(stream, sender))))
        await reader.connect(server.url, token(server, "reader", {ATTR_READING: "de"}))
        rooms.append(reader)
        speakers = {name: await Publisher(server, ROOM, name, auto_subscribe=False).connect() for name in SENTENCES}
        rooms += [p.room for p in speakers.values()]
        await viewer.wait_for_agent()
        await wait_for_log(worker, f"room {ROOM}: translating captions into de\n")
        # One translation model per host: with receiving processes, the engine process's only.
        loads = re.findall(rb"(\[receiver \d+\])?: translation: \S+ into de, es on ", worker.log_path.read_bytes())
        assert loads == [b""], loads
        await asyncio.gather(*(p.wait_heard() for p in speakers.values()))
        wavs = {name: espeak_wav(text, speech_dir / f"translation-{name}.wav", 24000, 1)
                for name, text in SENTENCES.items()}
        await asyncio.gather(*(p.play(wavs[name]) for name, p in speakers.items()))
        await asyncio.gather(*(p.silence(1.0) for p in speakers.values()))
        for p in speakers.values():
            await p.disconnect()

        def settled() -> bool:
            finals = [c for c in originals(viewer.captions) if c.final]
            translated = {c.attributes[ATTR_SOURCE_SEGMENT] for c in translations(viewer.captions, "de") if c.final}
            open_segments = {c.segment_id for c in originals(viewer.captions)} - {c.segment_id for c in finals}
            return (bool(finals) and not open_segments and {c.segment_id for c in finals if c.text} <= translated
                    and time.time() - max(c.received_at for c in viewer.captions) > 2.0)

        await viewer.wait_until(settled, WAIT_S, "every final and its German translation")

        # The originals: each segment final once, signed as an original, in the transcript.
        finals = [c for c in originals(viewer.captions) if c.final and c.text]
        assert {c.sender for c in finals} == set(SENTENCES)
        assert len({c.segment_id for c in finals}) == len(finals), "a segment was final twice"
        assert all(verify_caption(key, ROOM, c.sender, c.attributes, c.text) for c in originals(viewer.captions))
        on_disk = read_transcript(transcript_path(worker.data_dir, ROOM))
        assert sorted((s.segment_id, s.text) for s in on_disk if not s.translation_of) == \
            sorted((c.segment_id, c.text) for c in finals)

        # Their German translations: one final each, the speaker's, naming and numbered as its original.
        german = [c for c in translations(viewer.captions, "de") if c.final]
        by_source = {c.attributes[ATTR_SOURCE_SEGMENT]: c for c in german}
        assert len(by_source) == len(german), "a segment's translation was final twice"
        for original in finals:
            translated = by_source[original.segment_id]
            assert translated.sender == original.sender
            assert translated.segment_id == translation_segment_id(original.segment_id, "de")
            assert translated.attributes[ATTR_SEQ] == original.attributes[ATTR_SEQ]
            assert translated.attributes[ATTR_UNTRANSLATED] == "", translated.attributes[ATTR_UNTRANSLATED]
            assert translated.text
            assert verify_caption(key, ROOM, translated.sender, translated.attributes, translated.text)
        for name in SENTENCES:
            spoken = [c.segment_id for c in sorted(finals, key=lambda c: c.order) if c.sender == name]
            shown = [c.attributes[ATTR_SOURCE_SEGMENT] for c in sorted(german, key=lambda c: c.order)
                     if c.sender == name]
            assert shown == spoken, f"{name}'s translations are out of order"
        # A segment's translated updates in seq order, its final last; each after the original it translates.
        for segment, updates in viewer.by_segment().items():
            if updates[0].attributes.get(ATTR_TRANSLATED) == "true":
                seqs = [int(c.attributes[ATTR_SEQ]) for c in updates]
                assert seqs == sorted(seqs) and [c.final for c in updates].index(True) == len(updates) - 1, segment
        for c in translations(viewer.captions, "de"):
            source = [o for o in originals(viewer.captions) if o.segment_id == c.attributes[ATTR_SOURCE_SEGMENT]
                      and o.attributes[ATTR_SEQ] == c.attributes[ATTR_SEQ]]
            assert source and source[0].order < c.order
        assert not translations(viewer.captions, "es"), "translated into a language nobody reads"
        assert sorted((s.translation_of, s.text) for s in on_disk if s.language == "de") == \
            sorted((c.attributes[ATTR_SOURCE_SEGMENT], c.text) for c in german), "the transcript lacks translations"

        # A participant forges a translation and replays a genuine one: neither verifies.
        mallory = rtc.Room()
        await mallory.connect(server.url, token(server, "mallory", {}, can_publish_data=True))
        rooms.append(mallory)
        genuine = german[0]
        for text in (genuine.text + " (forged)", genuine.text):
            writer = await mallory.local_participant.stream_text(topic=TOPIC_TRANSCRIPTION,
                                                                 attributes=genuine.attributes)
            await writer.write(text)
            await writer.aclose()
        await viewer.wait_until(lambda: sum(sender == "mallory" for sender, _, _ in received) == 2, WAIT_S,
                                "mallory's two streams")
        assert any(sender == genuine.attributes["captions.agent"] or sender == genuine.sender
                   for sender, _, _ in received), "the reader received no genuine caption to compare with"
        for sender, attributes, text in received:
            assert verify_caption(key, ROOM, sender, attributes, text) == (sender != "mallory"), (sender, text)

        # Readers behind a hidden participant (whom livekit-server shows to nobody): the server API
        # sets captions.reading on the captioner itself (as the viewer server's relay does).
        lkapi = api.LiveKitAPI(server.url, server.api_key, server.api_secret)
        try:
            await lkapi.room.update_participant(api.UpdateParticipantRequest(
                room=ROOM, identity=viewer.agent().identity, attributes={ATTR_READING: "es,ja"}))
        finally:
            await lkapi.aclose()
        await wait_for_log(worker, f"room {ROOM}: translating captions into de, es\n")
    finally:
        for read_task in reads:
            read_task.cancel()
        for room in rooms:
            with contextlib.suppress(Exception):
                await room.disconnect()
        if worker is not None:
            await asyncio.to_thread(worker.stop)
        await asyncio.to_thread(server.stop)

