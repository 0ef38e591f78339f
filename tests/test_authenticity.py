"""Nobody can put words in someone else's captions (issue: caption authenticity).

Real livekit-server, the real `captions web`, the viewer in Chromium, the caption agent played by
`CaptionAgentBot` (it signs with the deployment's caption key, as the worker does), and attackers:
one holding a viewer link's token (as anyone in a public event's audience can fetch it), a room
participant with data rights, an agent with a key of its own, and a speaker replaying her own
captions. Every forgery is attempted while real captions flow; the page and its exports must show
the real captions and nothing forged, with a console warning for what it dropped.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from livekit import rtc

from captions.dev.bots import Subscriber
from captions.live.transcripts import TranscriptStore, transcript_path
from captions.protocol import (
    ATTR_AGENT,
    ATTR_SEGMENT_ID,
    ATTR_SENT,
    ATTR_SEQ,
    ATTR_SIGNATURE,
    ATTR_TRANSCRIBED_TRACK_ID,
    ATTR_TRANSCRIPTION_FINAL,
    REPLAY_WINDOW_S,
    TOPIC_TRANSCRIPTION,
    CaptionSigner,
    FinalSegment,
)
from tests.viewer_harness import (
    WAIT_MS,
    CaptionAgentBot,
    join,
    screenshot_path,
    segment_texts,
    setup_room,
    wait_state,
)

pytestmark = [pytest.mark.livekit, pytest.mark.browser, pytest.mark.timeout(240),
              pytest.mark.asyncio(loop_scope="session")]

FORGED = "I approve the merger and resign effective today"
BOGUS_SIGNATURE = "A" * 86 + "=="  # 64 bytes of base64, signed by nobody


async def send_caption(room: rtc.Room, text: str, **attributes: str) -> None:
    writer = await room.local_participant.stream_text(topic=TOPIC_TRANSCRIPTION, attributes=attributes)
    await writer.write(text)
    await writer.aclose()


def fetch_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


async def link_holders_socket(web, room: str):
    """What a viewer link gives anyone who holds it: the live captions WebSocket (no LiveKit token:
    the viewer server relays the room)."""
    import aiohttp

    session = aiohttp.ClientSession()
    url = web.link(room).replace("http://", "ws://").replace("/?", "/api/live?")
    return session, await session.ws_connect(url)


async def page_text(page) -> str:
    return await page.text_content("#captions")


async def wait_text(page, text: str) -> None:
    await page.wait_for_function(
        "(text) => document.querySelector('#captions').textContent.includes(text)", arg=text, timeout=WAIT_MS)


async def exports(page) -> str:
    texts = []
    for format_ in ("txt", "srt", "vtt"):
        async with page.expect_download() as download:
            await page.click(f'[data-export="{format_}"]')
        path = await (await download.value).path()
        texts.append(Path(path).read_text(encoding="utf-8"))
    return "\n".join(texts)


async def test_a_viewer_links_holder_can_send_nothing_into_the_room(agentless_livekit, agentless_web, rooms,
                                                                      open_viewer):
    room_name, bot = await setup_room(agentless_livekit, rooms, {"alice": "Alice (CEO)"}, web=agentless_web)
    viewer = await open_viewer(agentless_web.link(room_name))
    await wait_state(viewer.page, "live")
    listener = await Subscriber(agentless_livekit, room_name, identity="listener").connect()
    alice_segment = await bot.say("alice", "good morning everyone")

    token_url = agentless_web.link(room_name).replace("/?", "/api/token?")
    with pytest.raises(urllib.error.HTTPError) as no_token:
        await asyncio.to_thread(urllib.request.urlopen, token_url, timeout=5)
    assert no_token.value.code == 404, "a viewer link must not give a LiveKit token"
    session, attacker = await link_holders_socket(agentless_web, room_name)
    try:
        hello = await attacker.receive_json(timeout=10)
        assert hello["type"] == "hello" and hello["room"] == room_name
        line = FinalSegment("x", "alice", "Alice (CEO)", "TR_alice", FORGED, time.time() - 5, time.time(), [])
        await attacker.send_str(json.dumps({"type": "caption", "sender": "alice", "text": FORGED,
                                            "attributes": {ATTR_SEGMENT_ID: alice_segment, ATTR_SEQ: "99",
                                                           ATTR_TRANSCRIPTION_FINAL: "true",
                                                           ATTR_SIGNATURE: BOGUS_SIGNATURE}}))
        await attacker.send_str(line.to_json())
        while (await attacker.receive(timeout=10)).type.name == "TEXT":
            pass  # what the relay had queued for it
        assert attacker.close_code == 1008, "a viewer that sends anything is disconnected"
        await bot.say("alice", "the real words arrive")
        await viewer.page.wait_for_function(
            "() => document.querySelector('#captions').textContent.includes('the real words arrive')", timeout=WAIT_MS)
        await asyncio.sleep(1.0)  # anything the attacker's packets could still bring
    finally:
        await attacker.close()
        await session.close()
        await listener.disconnect()
    # Nothing the link holder sent reached the room: not even a raw LiveKit client received it.
    assert {c.sender for c in listener.captions} == {"alice"}
    assert FORGED not in await page_text(viewer.page)
    assert FORGED not in await exports(viewer.page)
    assert viewer.errors == []


async def test_a_participant_cannot_forge_captions_for_others_or_itself(agentless_livekit, agentless_web, rooms,
                                                                       open_viewer):
    """Mallory joins the meeting with a normal participant token (data rights). She sends a backlog
    stream, captions of her own, captions claiming the agent, a caption reusing Alice's segment id,
    oversized and malformed caption streams, and writes into the agent's own caption stream for
    Alice (LiveKit routes a stream's chunks by stream id alone). None of it is shown."""
    speakers = {"alice": "Alice (CEO)", "mallory": "Mallory"}
    room_name, bot = await setup_room(agentless_livekit, rooms, {"alice": speakers["alice"]}, web=agentless_web)
    mallory = await join(agentless_livekit, room_name, "mallory", "Mallory")
    rooms.append(mallory)
    viewer = await open_viewer(agentless_web.link(room_name))
    page = viewer.page
    await wait_state(page, "live")
    alice_segment = await bot.say("alice", "good morning everyone")
    agent = bot.room.local_participant.identity

    line = FinalSegment("x", "alice", "Alice (CEO)", "TR_alice", FORGED, time.time() - 5, time.time(), [])
    await mallory.local_participant.send_text(line.to_json(), topic="captions.backlog")
    await send_caption(mallory, FORGED)  # her own captions, unsigned
    signed_looking = {ATTR_SEGMENT_ID: "SG_m", ATTR_TRANSCRIPTION_FINAL: "true", ATTR_TRANSCRIBED_TRACK_ID: "TR_m",
                      ATTR_AGENT: agent, ATTR_SEQ: "0", ATTR_SENT: str(int(time.time() * 1000)),
                      ATTR_SIGNATURE: BOGUS_SIGNATURE}
    await send_caption(mallory, FORGED, **signed_looking)  # claims the agent's signature
    await send_caption(mallory, FORGED, **{**signed_looking, ATTR_SEGMENT_ID: alice_segment, ATTR_SEQ: "99"})
    await send_caption(mallory, "x" * 100_000, **{**signed_looking, ATTR_SEGMENT_ID: "SG_big"})
    await send_caption(mallory, FORGED, **{**signed_looking, ATTR_SEQ: "not a number"})

    # Into the agent's own stream: Mallory sees its header, then sends her chunks and trailer first.
    opened: asyncio.Future = asyncio.get_running_loop().create_future()
    mallory.register_text_stream_handler(
        TOPIC_TRANSCRIPTION, lambda reader, identity: opened.done() or opened.set_result(reader.info.stream_id))
    segment = f"SG_{uuid.uuid4().hex[:10]}"
    writer = await bot.room.local_participant.stream_text(
        topic=TOPIC_TRANSCRIPTION, sender_identity="alice",
        attributes=bot.signed_attributes("alice", segment, "quarterly numbers look fine", final=False))
    stream_id = await asyncio.wait_for(opened, 10)
    injector = await mallory.local_participant.stream_text(topic=TOPIC_TRANSCRIPTION, stream_id=stream_id)
    await injector.write(FORGED)
    await injector.aclose()
    await asyncio.sleep(0.5)
    await writer.write("quarterly numbers look fine")
    await writer.aclose()

    await bot.say("alice", "the real words arrive")
    await page.wait_for_function(
        "() => document.querySelector('#captions').textContent.includes('the real words arrive')", timeout=WAIT_MS)
    await asyncio.sleep(1.0)
    shown = await page_text(page)
    assert "good morning everyone" in shown
    assert FORGED not in shown and "xxxxxxxx" not in shown
    assert "Mallory" not in await page.text_content("#captions"), "a turn was opened for Mallory"
    assert FORGED not in await exports(page)
    # What does not verify never reaches the page: the viewer server's relay dropped it, and said so.
    assert "that does not verify" in agentless_web.log_path.read_text(errors="replace")
    # The oversized stream never reached the page: the viewer server's relay dropped it, and said so.
    assert "longer than 2000 characters" in agentless_web.log_path.read_text(errors="replace")
    await page.screenshot(path=screenshot_path("viewer-after-forgeries.png"))
    assert viewer.errors == []


async def test_html_in_backlog_fields_is_shown_as_text(agentless_livekit, agentless_web, rooms, open_viewer):
    room_name = f"room-{uuid.uuid4().hex[:8]}"
    store = TranscriptStore(transcript_path(agentless_web.data_dir, room_name))
    name, text = "<img src=x onerror=alert(1)>", "<script>alert(2)</script><b>bold?</b>"
    store.append(FinalSegment("SG_1", "eve", name, "TR_1", text, time.time() - 20, time.time() - 19,
                              [["<i>", time.time() - 20, time.time() - 19]]))
    store.close()
    bot = await CaptionAgentBot.start(agentless_livekit, room_name, {})
    rooms.append(bot.room)
    viewer = await open_viewer(agentless_web.link(room_name))
    page = viewer.page
    await page.wait_for_selector("#captions .turn.backlog", timeout=WAIT_MS)
    assert await page.text_content("#captions .turn .name") == name
    assert await page.text_content("#captions .seg") == text
    assert await page.locator("#captions img, #captions script, #captions b").count() == 0
    assert viewer.dialogs == [] and viewer.errors == []


async def test_an_agent_with_a_key_of_its_own_is_not_the_rooms_captioner(agentless_livekit, agentless_web, rooms,
                                                                          open_viewer):
    """Any agent of the deployment (a voice assistant; anyone holding an agent token) can speak for
    others and set its own attributes. This one joins before the real captioner, with an identity
    that sorts first, claims the room with a key of its own, says it has captioned since forever
    (captions.since=0, and captions.key: what earlier viewers trusted), says captions.status=waiting,
    and sends validly self-signed captions for Alice while the real captioner captions her. The page
    shows the real captioner's captions and status only, and "no captioner" once the real one leaves."""
    names = {"alice": "Alice (CEO)"}
    room_name = f"room-{uuid.uuid4().hex[:8]}"
    rooms.append(await join(agentless_livekit, room_name, "alice", names["alice"]))
    impostor = await CaptionAgentBot.start(agentless_livekit, room_name, names, identity="a-captions",
                                           signer=CaptionSigner())
    rooms.append(impostor.room)
    claims = {"captions.since": "0", "captions.key": impostor.signer.public_key}
    await impostor.set_status("waiting", queued=["alice"], **claims)
    await asyncio.sleep(1.2)  # the real captioner joins a second later: by join time the impostor would win
    bot = await CaptionAgentBot.start(agentless_livekit, room_name, names)
    rooms.append(bot.room)
    viewer = await open_viewer(agentless_web.link(room_name))
    page = viewer.page
    await wait_state(page, "live")

    forged_id = await impostor.say("alice", FORGED)
    real_id = await bot.say("alice", "good morning everyone")
    await impostor.final("alice", real_id, FORGED, time.time())  # over the real segment, a newer seq
    await impostor.interim("alice", f"SG_{uuid.uuid4().hex[:10]}", FORGED)
    await impostor.set_status("waiting", queued=["alice"], **claims)  # an attribute change: the page looks again
    await bot.say("alice", "the real words arrive")
    await wait_text(page, "the real words arrive")
    await asyncio.sleep(1.0)
    assert [s["text"] for s in await segment_texts(page)] == ["good morning everyone", "the real words arrive"]
    assert FORGED not in await page_text(page) and FORGED not in await exports(page)
    assert await page.get_attribute("#status", "data-state") == "live" and await page.is_hidden("#notice")
    assert "that does not verify" in agentless_web.log_path.read_text(errors="replace"), \
        "the impostor's captions were dropped by the relay"
    assert forged_id not in await page.inner_html("#captions")
    await page.screenshot(path=screenshot_path("viewer-impostor-agent.png"))

    await bot.room.disconnect()
    await wait_state(page, "no-agent")  # the impostor, still there and "waiting", is no captioner
    assert viewer.errors == []


async def test_a_replayed_caption_is_not_shown_again_or_as_new(agentless_livekit, agentless_web, rooms,
                                                                 open_viewer):
    """Alice receives the captions made of her words, signed, and can resend them with stream_text
    under her own identity. Replayed at once, a viewer that has them drops them (not newer, already
    final). Replayed 10 s later (past the time window): the viewer that was there does not show them
    twice, and a viewer that joined since (its backlog held back until after the replay, so only the
    time window stands in the way) shows neither the old final as a new live caption nor the old
    interim at all."""
    names = {"alice": "Alice (CEO)"}
    room_name = f"room-{uuid.uuid4().hex[:8]}"
    alice = await join(agentless_livekit, room_name, "alice", names["alice"])
    rooms.append(alice)
    received: list[tuple[dict, str]] = []

    async def keep(reader) -> None:
        text = await reader.read_all()
        received.append((dict(reader.info.attributes), text))

    tasks = set()

    def on_stream(reader, identity) -> None:
        task = asyncio.ensure_future(keep(reader))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    alice.register_text_stream_handler(TOPIC_TRANSCRIPTION, on_stream)
    bot = await CaptionAgentBot.start(agentless_livekit, room_name, names, data_dir=agentless_web.data_dir)
    rooms.append(bot.room)
    link = agentless_web.link(room_name)
    viewer = await open_viewer(link)
    await wait_state(viewer.page, "live")

    open_id = f"SG_{uuid.uuid4().hex[:10]}"
    await bot.interim("alice", open_id, "let me check the figures")  # this segment stays open
    final_id = await bot.say("alice", "we sign the contract today")

    def caught(segment_id: str, final: bool) -> tuple[dict, str] | None:
        return next(((a, t) for a, t in received if a[ATTR_SEGMENT_ID] == segment_id
                     and a[ATTR_TRANSCRIPTION_FINAL] == ("true" if final else "false")), None)

    deadline = time.monotonic() + 10
    while not (caught(open_id, False) and caught(final_id, True)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    # The open segment's interim, the final, and the final segment's first interim ("we").
    replays = [caught(open_id, False), caught(final_id, True), caught(final_id, False)]
    assert all(replays), "Alice did not receive her captions"

    async def replay() -> None:
        for attributes, text in replays:
            await send_caption(alice, text, **attributes)

    await wait_text(viewer.page, "we sign the contract today")
    await replay()  # at once: inside the time window
    signed_at = max(int(a[ATTR_SENT]) for a, _ in replays) / 1000
    await asyncio.sleep(max(0.0, signed_at + REPLAY_WINDOW_S + 4 - time.time()))

    held: list = []

    async def hold_backlog(page) -> None:
        await page.route("**/api/backlog?*", lambda route: held.append(route))  # noqa: PLW0108 - playwright wraps the handler

    late = await open_viewer(link, before_load=hold_backlog)
    await wait_state(late.page, "live")
    deadline = time.monotonic() + 10
    while not held and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert held, "the late viewer never asked for the backlog"
    await replay()  # 10 s later
    await bot.say("alice", "the real words arrive")
    for page in (viewer.page, late.page):
        await wait_text(page, "the real words arrive")
    await asyncio.sleep(1.0)
    async with late.page.expect_response("**/api/backlog?*"):
        await held[0].continue_()
    await asyncio.sleep(0.5)  # the page puts the backlog in

    assert await segment_texts(viewer.page) == [
        {"text": "let me check the figures", "interim": True, "speaker": "Alice (CEO)"},
        {"text": "we sign the contract today", "interim": False, "speaker": "Alice (CEO)"},
        {"text": "the real words arrive", "interim": False, "speaker": "Alice (CEO)"},
    ]
    turns = await late.page.eval_on_selector_all(
        "#captions .turn", "ts => ts.map(t => [t.classList.contains('backlog'), t.querySelector('.text').innerText])")
    assert turns == [[True, "we sign the contract today"], [False, "the real words arrive"]]
    there, joined = "\n".join(viewer.warnings), "\n".join(late.warnings)
    assert "already final" in there and "not newer" in there, viewer.warnings
    assert "a replay" in there and joined.count("a replay") == 3, (viewer.warnings, late.warnings)
    await late.page.screenshot(path=screenshot_path("viewer-after-replay-late.png"))
    assert viewer.errors == [] and late.errors == []


async def test_a_forged_or_replayed_translation_is_not_shown(agentless_livekit, translating_web, rooms,
                                                             open_viewer):
    """A reader of German. Mallory sends translations of Alice's segment: unsigned, with a bogus
    signature, and with the signature of a genuine original (a caption's signature never passes for
    a translation's); the relay drops them. Translations the agent did sign, replayed (signed long
    ago, or already final), reach the page, which drops them as it drops replayed originals."""
    room_name, bot = await setup_room(agentless_livekit, rooms, {"alice": "Alice (CEO)"}, web=translating_web)
    mallory = await join(agentless_livekit, room_name, "mallory", "Mallory")
    rooms.append(mallory)
    viewer = await open_viewer(translating_web.link(room_name, lang="de"))
    page = viewer.page
    await wait_state(page, "live")
    segment = await bot.say("alice", "good morning everyone")
    genuine = await bot.translate("alice", segment, "de", "guten Morgen allerseits")
    await wait_text(page, "guten Morgen allerseits")

    forged = {**genuine, ATTR_SEQ: "7", ATTR_SENT: str(int(time.time() * 1000))}
    await send_caption(mallory, FORGED, **{k: v for k, v in forged.items() if k != ATTR_SIGNATURE})
    await send_caption(mallory, FORGED, **{**forged, ATTR_SIGNATURE: BOGUS_SIGNATURE})
    original = bot.signed_attributes("alice", f"{segment}~de", FORGED, final=True)  # an original's signature
    await send_caption(mallory, FORGED, **{**genuine, **original})
    later = await bot.say("alice", "the numbers are final")
    await bot.translate("alice", later, "de", FORGED, sent_ms=int(time.time() * 1000) - 10_000)  # long ago
    await bot.send_stream("alice", "guten Morgen allerseits", genuine)  # once more: already final
    await bot.translate("alice", later, "de", "die Zahlen sind endgültig")
    await wait_text(page, "die Zahlen sind endgültig")
    await asyncio.sleep(1.0)
    assert FORGED not in await page_text(page) and FORGED not in await exports(page)
    shown = await page.eval_on_selector_all("#captions .seg .seg-text", "ts => ts.map(t => t.textContent)")
    assert shown == ["guten Morgen allerseits", "die Zahlen sind endgültig"]
    assert "that does not verify (3 so far)" in translating_web.log_path.read_text(errors="replace")
    warnings = "\n".join(viewer.warnings)
    assert "a replay" in warnings and "already final" in warnings, viewer.warnings
    assert viewer.errors == []


def verify_caption(caption, room: str, caption_key: str) -> bool:
    """The viewer's check, in Python: the caption's signature against the key the server vouches for
    (`caption.sender` is already the speaker: bots.speaker_of)."""
    from captions.protocol import verify_caption as verify

    return verify(caption_key, room, caption.sender, caption.attributes, caption.text)


@pytest.mark.timeout(300)
async def test_forgeries_fail_against_captions_up_and_the_real_workers_captions_verify(
        tiny_checkpoint, tmp_path, speech_dir):
    """`captions up` as a newcomer runs it: someone holding the printed viewer link fetches the
    page's token and tries the three forgeries; nobody receives them, and every caption the real
    worker publishes verifies against the key the viewer server vouches for, as does its claim."""
    from captions.dev.livekit_server import LiveKitServer
    from captions.protocol import ATTR_AGENT_CLAIM, claim_message, verify
    from tests.test_room_e2e import _start_captions_up, publisher, speech

    up, _, livekit_port, _, link = await _start_captions_up(tiny_checkpoint, tmp_path)
    try:
        server = LiveKitServer(f"ws://127.0.0.1:{livekit_port}", "", "devkey", "secret", up)
        listener = await Subscriber(server, "up-room", identity="listener").connect()
        alice = await publisher(server, "up-room", "alice")
        agent = await listener.wait_for_agent(timeout=120)
        await alice.wait_heard()  # the agent reads her microphone before she speaks
        grant = await asyncio.to_thread(fetch_json, link.split("/?")[0] + "/api/config")
        await alice.play(speech(speech_dir, "alice"), stop_after_s=2.0)
        await alice.silence(1.5)
        await listener.wait_until(lambda: listener.finals("alice"), 30, "alice's captions")
        await alice.disconnect()
        await asyncio.sleep(1.5)
        await listener.disconnect()
    finally:
        if up.poll() is None:
            up.send_signal(2)
        up.wait(timeout=90)
    assert all(c.sender == "alice" and FORGED not in c.text for c in listener.captions)
    key = grant["caption_key"]
    assert key == CaptionSigner.for_deployment("secret", "").public_key
    assert verify(key, claim_message(room="up-room", identity=agent.identity), agent.attributes[ATTR_AGENT_CLAIM])
    assert listener.captions and all(verify_caption(c, "up-room", key) for c in listener.captions)
    tampered = listener.captions[-1]
    tampered.text += " and more"
    assert not verify_caption(tampered, "up-room", key)
