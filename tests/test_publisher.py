"""The room's caption publisher with a fake LiveKit participant: one speaker's stuck or failing
stream never holds back another's captions, every SDK call has a timeout, a final is retried and an
interim superseded by a newer one is skipped (issue 23: nothing blocks the room)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from captions.live import publisher as publisher_module
from captions.live.publisher import CaptionPublisher, OutgoingCaption
from captions.live.segmenter import CaptionUpdate
from captions.protocol import ATTR_SEQ, CaptionSigner

pytestmark = pytest.mark.asyncio(loop_scope="function")


class FakeParticipant:
    """The room's local participant as the publisher sends through it (sdk_fixes.send_text_as)."""

    identity = "agent-1"

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, dict]] = []
        self.hang: set[str] = set()
        self.fail_next: dict[str, int] = {}

    async def send_text_as(self, text: str, *, topic: str, sender_identity: str, attributes: dict) -> None:
        if self.fail_next.get(sender_identity, 0) > 0:
            self.fail_next[sender_identity] -= 1
            raise ConnectionError("engine is not connected")
        if sender_identity in self.hang:
            await asyncio.Event().wait()  # a stream the server never takes
        self.sent.append((sender_identity, text, attributes))


def send_through_fake(participant: FakeParticipant, text: str, **options) -> object:
    """CaptionPublisher's `send` for a fake room."""
    return participant.send_text_as(text, **options)


def caption(identity: str, segment: str, text: str, final: bool = False) -> OutgoingCaption:
    return OutgoingCaption(identity, f"TR_{identity}", CaptionUpdate(segment, text, final, []))


@pytest.fixture
def room():
    return SimpleNamespace(name="r", local_participant=FakeParticipant(),
                           remote_participants={"alice": object(), "bob": object()})


async def running(room) -> tuple[CaptionPublisher, asyncio.Task]:
    publisher = CaptionPublisher(room, CaptionSigner(), send=send_through_fake)
    return publisher, asyncio.create_task(publisher.run())


async def test_a_stuck_speaker_holds_back_nobody_else_and_is_given_up_after_the_timeout(room, monkeypatch):
    monkeypatch.setattr(publisher_module, "SEND_TIMEOUT_S", 0.2)
    monkeypatch.setattr(publisher_module, "FINAL_PUBLISH_ATTEMPTS", 2)
    room.local_participant.hang.add("alice")
    publisher, task = await running(room)
    publisher.put(caption("alice", "SG_a", "stuck", final=True))
    for n in range(3):
        publisher.put(caption("bob", f"SG_b{n}", f"bob {n}", final=True))
    await asyncio.sleep(0.1)
    assert [text for who, text, _ in room.local_participant.sent] == ["bob 0", "bob 1", "bob 2"], \
        "bob waited for alice's stuck stream"
    assert await publisher.drain(5.0), "the stuck final was never given up"
    assert all(who == "bob" for who, _, _ in room.local_participant.sent)
    task.cancel()


async def test_a_final_that_fails_is_retried_and_arrives(room):
    room.local_participant.fail_next["alice"] = 2
    publisher, task = await running(room)
    publisher.put(caption("alice", "SG_a", "hello there", final=True))
    assert await publisher.drain(10.0)
    assert [(who, text) for who, text, _ in room.local_participant.sent] == [("alice", "hello there")]
    task.cancel()


async def test_an_interim_with_a_newer_one_waiting_is_skipped_and_numbers_stay_in_order(room):
    publisher = CaptionPublisher(room, CaptionSigner(), send=send_through_fake)
    for n in range(500):  # publishing far behind: only the newest text of the segment matters
        publisher.put(caption("alice", "SG_a", "word " * n))
    publisher.put(caption("alice", "SG_a", "the final text", final=True))
    publisher.put(caption("alice", "SG_b", "next"))
    task = asyncio.create_task(publisher.run())
    assert await publisher.drain(5.0)
    sent = room.local_participant.sent
    assert [text for _, text, _ in sent] == ["the final text", "next"]
    assert [int(attributes[ATTR_SEQ]) for _, _, attributes in sent] == [0, 0]
    task.cancel()


async def test_the_last_words_of_a_speaker_who_left_go_out_in_the_agents_name_and_still_name_them(room):
    """Clients drop the streams of a sender who is gone (issue 23): once alice has left, her final is
    sent by the agent, and `captions.speaker` (covered by the signature) still says it is hers."""
    from captions.dev.bots import speaker_of
    from captions.protocol import ATTR_AGENT, ATTR_SPEAKER

    publisher, task = await running(room)
    publisher.put(caption("alice", "SG_a", "still here", final=True))
    assert await publisher.drain(5.0)
    del room.remote_participants["alice"]  # she left
    publisher.put(caption("alice", "SG_b", "goodbye everyone", final=True))
    assert await publisher.drain(5.0)
    (first_sender, _, first), (last_sender, text, last) = room.local_participant.sent
    assert first_sender == "alice" and first[ATTR_SPEAKER] == "alice"
    assert last_sender == "agent-1" and last[ATTR_AGENT] == "agent-1" and last[ATTR_SPEAKER] == "alice"
    assert speaker_of(last_sender, last) == "alice" and text == "goodbye everyone"
    assert speaker_of("mallory", {**last}) == "mallory", "only the agent's own streams name another speaker"
    task.cancel()


async def test_a_final_sent_as_its_speaker_leaves_goes_out_again_in_the_agents_name_with_its_number(room):
    """Clients abort the open streams of a sender who disconnects: a final that was going out under
    alice's identity as she left is lost to them. It is sent again in the agent's name, with the same
    update number (a viewer that has it drops the copy); an older final is not."""
    from captions.protocol import ATTR_SPEAKER

    publisher, task = await running(room)
    publisher.put(caption("alice", "SG_a", "see you", final=True))
    assert await publisher.drain(5.0)
    del room.remote_participants["alice"]  # she left
    publisher.speaker_left("alice")
    assert await publisher.drain(5.0)
    (first_sender, _, first), (again_sender, text, again) = room.local_participant.sent
    assert first_sender == "alice" and again_sender == "agent-1" and text == "see you"
    assert again[ATTR_SEQ] == first[ATTR_SEQ] and again[ATTR_SPEAKER] == "alice"
    publisher.speaker_left("bob")  # nothing of his was recent
    assert await publisher.drain(5.0)
    assert len(room.local_participant.sent) == 2
    task.cancel()


async def test_a_translation_goes_in_its_own_lane_signed_as_one_with_its_originals_number(room, monkeypatch):
    """Translations (issue 26) never hold back their speaker's originals: a stuck translation stream
    waits in the lane of its speaker and language, and a translation is signed with
    `translation_message` and the number of the update it translates."""
    from captions.live.publisher import Translation
    from captions.protocol import ATTR_LANGUAGE, ATTR_SOURCE_SEGMENT, ATTR_TRANSLATED, verify_caption

    monkeypatch.setattr(publisher_module, "SEND_TIMEOUT_S", 0.3)
    monkeypatch.setattr(publisher_module, "FINAL_PUBLISH_ATTEMPTS", 1)
    signer = CaptionSigner()
    publisher = CaptionPublisher(room, signer, send=send_through_fake)
    numbered = []
    publisher.on_numbered = lambda item, seq: numbered.append((item.update.text, seq))
    task = asyncio.create_task(publisher.run())
    translated = OutgoingCaption("alice", "TR_alice", CaptionUpdate("SG_a~de", "hallo", True, []),
                                 translation=Translation("SG_a", "en", "de", 3))
    publisher.put(translated)
    publisher.put(caption("alice", "SG_b", "hello", final=True))
    assert await publisher.drain(5.0)
    (_, text, _), (_, translated_text, translation) = sorted(room.local_participant.sent,
                                                           key=lambda sent: ATTR_TRANSLATED in sent[2])
    assert text == "hello" and translated_text == "hallo"
    assert numbered == [("hello", 0)], "only originals are numbered"
    assert translation[ATTR_SEQ] == "3" and translation[ATTR_TRANSLATED] == "true"
    assert translation[ATTR_LANGUAGE] == "de" and translation[ATTR_SOURCE_SEGMENT] == "SG_a"
    assert verify_caption(signer.public_key, "r", "alice", translation, "hallo")
    assert not verify_caption(signer.public_key, "r", "alice", {**translation, ATTR_LANGUAGE: "es"}, "hallo")
    assert not verify_caption(signer.public_key, "r", "alice", {**translation, ATTR_TRANSLATED: "false"}, "hallo"), \
        "a translation's signature passed for an original's"

    room.local_participant.hang.add("alice")  # now every alice stream hangs: the two lanes are apart
    publisher.put(translated)
    await asyncio.sleep(0.05)
    room.local_participant.hang.clear()
    publisher.put(caption("alice", "SG_c", "still going", final=True))
    await asyncio.sleep(0.1)
    assert room.local_participant.sent[-1][1] == "still going", "a stuck translation held back the original"
    task.cancel()
