"""A captions link against a real livekit-server, used with a plain WebSocket client rather than the
viewer page (issue 22): it gets captions and who captions, nothing else (no audio or video, no
chat, no participant's metadata or attributes), and it ends when it says, or when the operator
revokes it. The viewer server runs in this process (its real application and relay); the attacker
holds only the link."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import pytest
from aiohttp.test_utils import TestClient, TestServer
from livekit import rtc

from captions.protocol import CAPTION_ATTRIBUTES, TOPIC_TRANSCRIPTION
from captions.viewer.links import check_link, make_link
from captions.viewer.revocations import append
from captions.viewer.server import WebSettings, create_app
from tests.viewer_harness import CaptionAgentBot

pytestmark = [pytest.mark.livekit, pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="session")]

LINK_SECRET = "viewer-access-test-secret"
END_BOUND_S = 2.0
"""A viewer whose link ended is cut off within this (the issue asks for 30 s)."""
SECRETS = ("alice@example.test", "+33 6 12 34 56 78", "the password is swordfish")


def web_settings(livekit_server, data_dir) -> WebSettings:
    return WebSettings(livekit_url=livekit_server.url, api_key=livekit_server.api_key,
                       api_secret=livekit_server.api_secret, viewer_secret=LINK_SECRET, data_dir=data_dir)


async def speaker_with_everything(livekit_server, room_name: str) -> tuple[rtc.Room, list]:
    """Alice: a microphone, a camera, personal metadata and attributes."""
    from livekit import api

    token = (api.AccessToken(livekit_server.api_key, livekit_server.api_secret).with_identity("alice")
             .with_name("Alice").with_metadata(json.dumps({"email": SECRETS[0]}))
             .with_attributes({"phone": SECRETS[1]})
             .with_grants(api.VideoGrants(room_join=True, room=room_name)).to_jwt())
    room = rtc.Room()
    await room.connect(livekit_server.url, token)
    audio, video = rtc.AudioSource(48000, 1), rtc.VideoSource(64, 64)
    await room.local_participant.publish_track(rtc.LocalAudioTrack.create_audio_track("mic", audio),
                                               rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))
    await room.local_participant.publish_track(rtc.LocalVideoTrack.create_video_track("cam", video),
                                               rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA))
    return room, [audio, video]


async def live(client: TestClient, link: str):
    ws = await client.ws_connect("/api/live", params={"link": link})
    hello = await ws.receive_json(timeout=10)
    assert hello["type"] == "hello"
    return ws


async def read_all(ws, seconds: float) -> list[str]:
    """Every text message for `seconds` (or until the server closes the socket)."""
    messages: list[str] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            message = await ws.receive(timeout=left)
        except asyncio.TimeoutError:
            break
        if message.type.name != "TEXT":
            break
        messages.append(message.data)
    return messages


async def test_a_link_holder_gets_captions_and_who_captions_and_nothing_else(livekit_server, tmp_path):
    room_name = f"wiretap-{time.monotonic_ns()}"
    alice, _ = await speaker_with_everything(livekit_server, room_name)
    bot = await CaptionAgentBot.start(livekit_server, room_name, {"alice": "Alice"})
    agent = bot.room
    await agent.local_participant.set_attributes({"private.note": SECRETS[2]})
    async with TestClient(TestServer(create_app(web_settings(livekit_server, tmp_path)))) as client:
        assert (await client.get("/api/token", params={"link": make_link(LINK_SECRET, room_name, 600)})).status == 404
        ws = await live(client, make_link(LINK_SECRET, room_name, 600))
        try:
            await asyncio.sleep(1.0)  # the relay joins
            for n in range(3):
                await bot.interim("alice", f"SG_{n}", f"caption {n}")
                await alice.local_participant.send_text(f"chat {n} {SECRETS[2]}", topic="lk.chat")
                await alice.local_participant.publish_data(SECRETS[2].encode(), topic="app.private")
                # Alice's own text on the caption topic, unsigned, with attributes of her choosing:
                writer = await alice.local_participant.stream_text(
                    topic=TOPIC_TRANSCRIPTION, attributes={"lk.segment_id": f"SG_{n}", "note": SECRETS[2]})
                await writer.write(f"not a caption {n}")
                await writer.aclose()
            messages = await read_all(ws, 3.0)
        finally:
            await ws.close()
            await agent.disconnect()
            await alice.disconnect()
    received = [json.loads(m) for m in messages]
    captions = [m["text"] for m in received if m["type"] == "caption"]
    assert captions == ["caption 0", "caption 1", "caption 2"], received
    everything = "\n".join(messages)
    for secret in SECRETS:
        assert secret not in everything, f"a viewer link disclosed {secret!r}"
    forwarded_attributes = {k for m in received if m["type"] == "caption" for k in m["attributes"]}
    assert forwarded_attributes <= set(CAPTION_ATTRIBUTES), forwarded_attributes
    people = {}
    for m in received:  # the room as the relay last described it
        for p in m["participants"] if m["type"] == "room" else [m] if m["type"] == "participant" else []:
            people[p["identity"]] = p
    assert people["alice"].get("name") == "Alice" and "attributes" not in people["alice"]
    assert "joined_at_ms" not in people["alice"], "when people join is nobody's business here"
    agent_attributes = people[agent.local_participant.identity]["attributes"]
    assert agent_attributes.get("captions.status") == "live" and "private.note" not in agent_attributes
    assert {m["type"] for m in received} <= {"room", "participant", "left", "caption", "reconnecting"}


async def cut_off(ws) -> tuple[int, float]:
    """Reads until the server closes the socket: (close code, when)."""
    while (await ws.receive(timeout=30)).type.name == "TEXT":
        pass
    return ws.close_code, time.time()


async def test_a_viewer_is_cut_off_when_its_link_expires_and_cannot_come_back(livekit_server, tmp_path):
    room_name = f"expiring-{time.monotonic_ns()}"
    alice, _ = await speaker_with_everything(livekit_server, room_name)
    async with TestClient(TestServer(create_app(web_settings(livekit_server, tmp_path)))) as client:
        link = make_link(LINK_SECRET, room_name, 4)
        expires_at = check_link(LINK_SECRET, link).expires_at
        ws = await live(client, link)
        stayer = await live(client, make_link(LINK_SECRET, room_name, 600))
        try:
            code, at = await cut_off(ws)
            print(f"cut off {at - expires_at:.2f} s after its link expired")
            assert code == 4401 and at - expires_at <= END_BOUND_S
            bot = await CaptionAgentBot.start(livekit_server, room_name, {"alice": "Alice"})
            await asyncio.sleep(0.5)
            await bot.interim("alice", "SG_after", "after")
            assert any(json.loads(m).get("text") == "after" for m in await read_all(stayer, 2.0)), \
                "other links are untouched"
            await bot.room.disconnect()
            again = await client.ws_connect("/api/live", params={"link": link})
            assert (await again.receive(timeout=5)).type.name == "CLOSE" and again.close_code == 4401
        finally:
            await stayer.close()
            await alice.disconnect()


async def test_a_revoked_link_and_a_revoked_room_cut_their_viewers_off(livekit_server, tmp_path):
    room_name = f"revoked-{time.monotonic_ns()}"
    alice, _ = await speaker_with_everything(livekit_server, room_name)
    async with TestClient(TestServer(create_app(web_settings(livekit_server, tmp_path)))) as client:
        leaked = make_link(LINK_SECRET, room_name, 600)
        first = await live(client, leaked)
        second = await live(client, make_link(LINK_SECRET, room_name, 600))
        try:
            append(tmp_path / "revoked-links.ndjson", {"link_id": check_link(LINK_SECRET, leaked).link_id,
                                                       "until": int(time.time()) + 600})
            revoked_at = time.time()
            code, at = await cut_off(first)
            print(f"revoked link: cut off in {at - revoked_at:.2f} s")
            assert code == 4410 and at - revoked_at <= END_BOUND_S
            assert not second.closed, "only the revoked link's viewers go"
            append(tmp_path / "revoked-links.ndjson", {"room": room_name, "before": int(time.time())})
            revoked_at = time.time()
            code, at = await cut_off(second)
            print(f"revoked room: cut off in {at - revoked_at:.2f} s")
            assert code == 4410 and at - revoked_at <= END_BOUND_S
        finally:
            await alice.disconnect()


async def test_a_participant_flooding_the_caption_topic_leaves_nothing_behind_in_the_viewer_server(
        livekit_server, tmp_path, monkeypatch):
    """Oversized and never-ending streams on the caption topic, many at once, from an ordinary
    participant: the relay reads a few, drops them, and keeps no subscription or queue of theirs
    (an abandoned livekit stream reader keeps its subscription for the life of the process)."""
    from livekit.rtc._ffi_client import FfiClient

    from captions.viewer import relay as relay_module

    monkeypatch.setattr(relay_module, "STREAM_TIMEOUT_S", 2.0)
    room_name = f"flood-{time.monotonic_ns()}"
    mallory, _ = await speaker_with_everything(livekit_server, room_name)
    async with TestClient(TestServer(create_app(web_settings(livekit_server, tmp_path)))) as client:
        ws = await live(client, make_link(LINK_SECRET, room_name, 600))
        try:
            await asyncio.sleep(1.0)  # the relay joins
            before = len(FfiClient.instance.queue._subscribers)
            writers = []
            for n in range(24):  # more than the relay reads at once
                writer = await mallory.local_participant.stream_text(topic=TOPIC_TRANSCRIPTION)
                await writer.write("x" * 2100 if n % 2 else "still going")
                writers.append(writer)  # the never-ending ones stay open
            await asyncio.sleep(4.0)  # past the relay's (shortened) read timeout
            after = len(FfiClient.instance.queue._subscribers)
            assert after <= before, f"{after - before} stream subscriptions left behind"
            assert not [m for m in await read_all(ws, 1.0) if json.loads(m)["type"] == "caption"]
        finally:
            await ws.close()
            await mallory.disconnect()


async def relay_reading(livekit_server, room_name: str) -> str | None:
    """The relay's ``captions.reading``, as the server API lists it (the relay is hidden: the room's
    participants, the captioner included, do not see it; the server API does)."""
    from livekit import api

    async with api.LiveKitAPI(livekit_server.url, livekit_server.api_key, livekit_server.api_secret) as lk:
        listed = await lk.room.list_participants(api.ListParticipantsRequest(room=room_name))
    relays = [p for p in listed.participants if p.identity.startswith("captions-relay-")]
    assert len(relays) <= 1, [p.identity for p in listed.participants]
    return relays[0].attributes.get("captions.reading") if relays else "(not joined yet)"


def told_captioner(captioner: rtc.Room) -> str | None:
    """What the relays told the captioner: its ``captions.reading.<relay>`` entries' languages (one
    relay here), None without one."""
    from captions.protocol import ATTR_READING_FROM, parse_reading_value

    entries = {key: parse_reading_value(value) for key, value in captioner.local_participant.attributes.items()
               if key.startswith(ATTR_READING_FROM) and value}
    assert len(entries) <= 1, entries
    for languages, expires in entries.values():
        assert expires > time.time(), "an entry that expired"
        return languages
    return None


async def wait_reading(livekit_server, room_name: str, expected: str | None, captioner: rtc.Room) -> None:
    """Until the relay's captions.reading, and what it told the captioner, are `expected`."""
    deadline = time.monotonic() + 10
    while (reading := (await relay_reading(livekit_server, room_name), told_captioner(captioner))) != (expected,) * 2:
        assert time.monotonic() < deadline, f"captions.reading (relay's, captioner's) is {reading!r}, not {expected!r}"
        await asyncio.sleep(0.2)


async def test_each_viewer_gets_its_own_language_and_the_relay_says_which_are_read(livekit_server, tmp_path):
    """Two viewers, one reading German, one the originals: the German reader's socket carries the
    originals and the German translations, the other's the originals only, neither the Arabic ones
    (nobody reads them). The relay's captions.reading says "de" while the German reader is there, and
    the captioner, which cannot see the hidden relay, is told the same through the server API."""
    room_name = f"languages-{time.monotonic_ns()}"
    alice, _ = await speaker_with_everything(livekit_server, room_name)
    bot = await CaptionAgentBot.start(livekit_server, room_name, {"alice": "Alice"})
    settings = dataclasses.replace(web_settings(livekit_server, tmp_path), translate_to=("de", "ar"))
    async with TestClient(TestServer(create_app(settings))) as client:
        original = await live(client, make_link(LINK_SECRET, room_name, 600))
        german = await client.ws_connect("/api/live", params={"link": make_link(LINK_SECRET, room_name, 600),
                                                              "lang": "de"})
        try:
            assert (await german.receive_json(timeout=10))["language"] == "de"
            await wait_reading(livekit_server, room_name, "de", bot.room)
            await bot.final("alice", "SG_1", "good morning", time.time())
            await bot.translate("alice", "SG_1", "de", "guten Morgen")
            await bot.translate("alice", "SG_1", "ar", "صباح الخير")
            texts, everything = {}, ""
            for name, ws in (("original", original), ("german", german)):
                messages = await read_all(ws, 2.0)
                everything += "".join(messages)
                texts[name] = [json.loads(m)["text"] for m in messages if json.loads(m)["type"] == "caption"]
            assert texts == {"original": ["good morning"], "german": ["good morning", "guten Morgen"]}
            assert "captions.reading" not in everything, "what others read is nobody's business"
            await german.close()
            await wait_reading(livekit_server, room_name, None, bot.room)  # the last German reader left
        finally:
            await original.close()
            await bot.room.disconnect()
            await alice.disconnect()
