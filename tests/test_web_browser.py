"""The captions viewer in a real browser (Debian's Chromium driven by Playwright) against a real
livekit-server and the real `captions web` server. The captions come from `CaptionAgentBot`
(tests/viewer_harness.py), which publishes exactly what the caption agent publishes; the last test
runs the real worker instead. Forgery attempts are in test_authenticity.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from pathlib import Path

import pytest

from captions.dev.processes import free_port
from captions.viewer.links import viewer_link
from tests.viewer_harness import (
    WAIT_MS,
    CaptionAgentBot,
    WebServer,
    join,
    screenshot_path,
    segment_texts,
    setup_room,
    start_web_server,
    stop,
    wait_state,
)

pytestmark = [pytest.mark.livekit, pytest.mark.browser, pytest.mark.asyncio(loop_scope="session")]

XSS_NAME = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def web_server(livekit_server, captions_worker, tmp_path_factory) -> WebServer:
    """`captions web` next to the session's real worker, serving its transcripts."""
    server = start_web_server(livekit_server, tmp_path_factory.mktemp("web") / "web.log", captions_worker.data_dir)
    yield server
    stop(server.process)


# ---------------------------------------------------------------- tests


async def test_two_speakers_interim_then_final_without_duplicates(agentless_livekit, agentless_web, rooms, open_viewer):
    speakers = {"alice": "Alice Martin", "bob": "Bob Okafor"}
    room_name, bot = await setup_room(agentless_livekit, rooms, speakers)
    viewer = await open_viewer(agentless_web.link(room_name))
    page = viewer.page
    await wait_state(page, "live")

    segment = f"SG_{uuid.uuid4().hex[:8]}"
    await bot.interim("alice", segment, "good morning")
    await page.wait_for_selector("#captions .seg.interim", timeout=WAIT_MS)
    assert await segment_texts(page) == [{"text": "good morning", "interim": True, "speaker": "Alice Martin"}]
    # Screen readers hear a segment once, when final, not each interim word.
    assert await page.get_attribute("#captions .seg.interim", "aria-hidden") == "true"
    await bot.interim("alice", segment, "good morning every")
    await bot.final("alice", segment, "good morning everyone", time.time())
    await page.wait_for_selector("#captions .seg:not(.interim)", timeout=WAIT_MS)
    assert await segment_texts(page) == [{"text": "good morning everyone", "interim": False, "speaker": "Alice Martin"}]
    assert await page.get_attribute("#captions .seg", "aria-hidden") is None

    await bot.say("bob", "thanks Alice let us start with the budget")
    await bot.say("alice", "sure the numbers are ready")
    await page.wait_for_function("() => document.querySelectorAll('#captions .seg').length === 3", timeout=WAIT_MS)
    await page.wait_for_function("() => !document.querySelector('#captions .seg.interim')", timeout=WAIT_MS)
    turns = await page.eval_on_selector_all(
        "#captions .turn", "ts => ts.map(t => [t.querySelector('.name').textContent, t.querySelector('.text').textContent])")
    assert turns == [
        ["Alice Martin", "good morning everyone"],
        ["Bob Okafor", "thanks Alice let us start with the budget"],
        ["Alice Martin", "sure the numbers are ready"],
    ]
    assert await page.get_attribute("#captions", "aria-live") == "polite"
    await page.screenshot(path=screenshot_path("viewer-normal.png"))
    for theme in ("dark", "contrast"):
        await page.select_option("#theme", theme)
        await page.screenshot(path=screenshot_path(f"viewer-{theme}.png"))
    assert viewer.errors == []


async def test_late_viewer_sees_backlog_once(agentless_livekit, agentless_web, rooms, open_viewer):
    """The viewer server serves the room's earlier captions; a segment the viewer already got live
    (the backlog request is held until then) is shown once."""
    speakers = {"carol": "Carol Diaz", "dan": "Dan Wu"}
    room_name, bot = await setup_room(agentless_livekit, rooms, speakers, web=agentless_web)
    earlier = time.time() - 60
    await bot.say("carol", "this was said before anyone watched", start=earlier)
    await bot.say("dan", "and so was this", start=earlier + 5)
    held: list = []

    async def hold_backlog(page) -> None:
        await page.route("**/api/backlog?*", lambda route: held.append(route))  # noqa: PLW0108 - playwright wraps the handler

    viewer = await open_viewer(agentless_web.link(room_name), before_load=hold_backlog)
    page = viewer.page
    await wait_state(page, "live")
    deadline = time.monotonic() + 10
    while not held and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert held, "the viewer never asked for the backlog"
    live_id = await bot.say("carol", "this one is live")
    await page.wait_for_selector("#captions .seg", timeout=WAIT_MS)
    await held[0].continue_()  # the backlog now holds the live segment too: it must not show twice
    await page.wait_for_selector("#captions .turn.backlog", timeout=WAIT_MS)
    texts = [s["text"] for s in await segment_texts(page)]
    assert texts == ["this was said before anyone watched", "and so was this", "this one is live"]
    assert live_id in {s.segment_id for s in bot.finals}
    names = await page.eval_on_selector_all("#captions .turn .name", "ns => ns.map(n => n.textContent)")
    assert names == ["Carol Diaz", "Dan Wu", "Carol Diaz"]
    assert viewer.errors == []


async def test_html_in_names_and_captions_is_shown_as_text(agentless_livekit, agentless_web, rooms, open_viewer):
    speakers = {"mallory": XSS_NAME}
    room_name, bot = await setup_room(agentless_livekit, rooms, speakers)
    viewer = await open_viewer(agentless_web.link(room_name))
    page = viewer.page
    await wait_state(page, "live")
    caption = "<script>alert(2)</script><b onmouseover=alert(3)>hi</b>"
    await bot.say("mallory", caption)
    await page.wait_for_selector("#captions .seg:not(.interim)", timeout=WAIT_MS)
    assert await page.text_content("#captions .turn .name") == XSS_NAME
    assert await page.text_content("#captions .seg") == caption
    assert await page.locator("#captions img, #captions script, #captions b").count() == 0
    await page.hover("#captions .seg")
    await page.wait_for_timeout(500)  # give a would-be onerror/onmouseover handler time to fire
    assert viewer.dialogs == []
    assert viewer.errors == []


async def test_a_speaker_who_left_keeps_her_last_words(agentless_livekit, agentless_web, rooms, open_viewer):
    """Her last caption, final after she left, comes in the agent's own name with captions.speaker
    naming her (LiveKit clients drop the streams of a sender who is gone): it is shown as hers."""
    room_name, bot = await setup_room(agentless_livekit, rooms, {"pia": "Pia Novak", "quinn": "Quinn"})
    viewer = await open_viewer(agentless_web.link(room_name))
    page = viewer.page
    await wait_state(page, "live")
    segment = f"SG_{uuid.uuid4().hex[:8]}"
    await bot.interim("pia", segment, "I have to run")
    await page.wait_for_selector("#captions .seg.interim", timeout=WAIT_MS)
    await rooms[0].disconnect()
    deadline = time.monotonic() + 10
    while "pia" in bot.room.remote_participants and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert "pia" not in bot.room.remote_participants
    await bot.final("pia", segment, "I have to run see you all tomorrow", time.time())
    await bot.say("quinn", "bye Pia")
    await page.wait_for_function("() => document.querySelectorAll('#captions .seg:not(.interim)').length === 2",
                                 timeout=WAIT_MS)
    assert await segment_texts(page) == [
        {"text": "I have to run see you all tomorrow", "interim": False, "speaker": "Pia Novak"},
        {"text": "bye Pia", "interim": False, "speaker": "Quinn"},
    ]
    assert viewer.errors == []


def _parse_cues(text: str, separator: str) -> list[tuple[float, float, str]]:
    stamp = r"(\d\d):(\d\d):(\d\d)" + re.escape(separator) + r"(\d\d\d)"
    pattern = re.compile(rf"^{stamp} --> {stamp}\n(.+)$", re.MULTILINE)

    def seconds(h, m, s, ms):
        return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000

    return [(seconds(*m.groups()[:4]), seconds(*m.groups()[4:8]), m.group(9)) for m in pattern.finditer(text)]


async def _download(page, selector: str) -> str:
    async with page.expect_download(timeout=WAIT_MS) as info:
        await page.click(selector)
    download = await info.value
    return Path(await download.path()).read_text(encoding="utf-8")


async def test_srt_vtt_and_text_exports_use_word_times(agentless_livekit, agentless_web, rooms, open_viewer):
    speakers = {"erin": "Erin & <Co>", "frank": "Frank"}
    room_name, bot = await setup_room(agentless_livekit, rooms, speakers)
    viewer = await open_viewer(agentless_web.link(room_name))
    page = viewer.page
    await wait_state(page, "live")
    t0 = time.time()
    await bot.say("erin", "welcome to the weekly review", start=t0)
    await bot.say("frank", "first item is the release date", start=t0 + 3)
    await bot.say("erin", "it moves to friday", start=t0 + 7)
    await bot.interim("frank", "SG_open", "still talking")  # interim text is not exported
    await page.wait_for_function("() => document.querySelectorAll('#captions .seg:not(.interim)').length === 3",
                                 timeout=WAIT_MS)
    await page.wait_for_selector("#captions .seg.interim", timeout=WAIT_MS)

    srt = await _download(page, '[data-export="srt"]')
    cues = _parse_cues(srt, ",")
    assert len(cues) == 3 and srt.startswith("1\n")
    assert cues[0][0] == 0.0 and cues[1][0] == pytest.approx(3.0) and cues[2][0] == pytest.approx(7.0)
    assert all(end > start for start, end, _ in cues)
    assert [c[0] for c in cues] == sorted(c[0] for c in cues)
    assert cues[1][2] == "Frank: first item is the release date"
    assert "still talking" not in srt

    vtt = await _download(page, '[data-export="vtt"]')
    assert vtt.startswith("WEBVTT\n\n")
    vtt_cues = _parse_cues(vtt, ".")
    assert [(s, e) for s, e, _ in vtt_cues] == [(s, e) for s, e, _ in cues]
    # The last word ends 1.5 s after the first word of its segment: the word times are real.
    assert vtt_cues[0][1] == pytest.approx(4 * 0.4 + 0.3)
    assert vtt_cues[0][2] == "<v Erin &amp; &lt;Co&gt;>welcome to the weekly review"

    text = await _download(page, '[data-export="txt"]')
    assert text.splitlines() == [
        "[00:00:00] Erin & <Co>: welcome to the weekly review",
        "[00:00:03] Frank: first item is the release date",
        "[00:00:07] Erin & <Co>: it moves to friday",
    ]


async def test_overlay_shows_last_two_turns_on_transparent_background(agentless_livekit, agentless_web, rooms,
                                                                      open_viewer):
    speakers = {"gina": "Gina", "hugo": "Hugo"}
    room_name, bot = await setup_room(agentless_livekit, rooms, speakers)
    viewer = await open_viewer(agentless_web.link(room_name, overlay="1"), width=1280, height=720)
    page = viewer.page
    await page.wait_for_selector('body.overlay[data-state="live"]', timeout=WAIT_MS)
    await bot.say("gina", "first line should scroll away")
    await bot.say("hugo", "second line is still visible")
    await bot.say("gina", "third line is the newest one")
    await page.wait_for_function("() => document.querySelectorAll('#captions .seg:not(.interim)').length === 3",
                                 timeout=WAIT_MS)
    visible = await page.eval_on_selector_all(
        "#captions .turn", "ts => ts.filter(t => t.offsetParent !== null).map(t => t.innerText.replace(/\\s+/g, ' '))")
    assert visible == ["Hugo second line is still visible", "Gina third line is the newest one"]
    assert await page.is_hidden(".bar")
    background = await page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background in ("rgba(0, 0, 0, 0)", "transparent")
    size = await page.evaluate("parseFloat(getComputedStyle(document.querySelector('#captions')).fontSize)")
    assert size >= 36
    await page.screenshot(path=screenshot_path("viewer-overlay.png"), omit_background=True)


TURNS_JS = ("() => [...document.querySelectorAll('#captions .turn')].map(t => [t.querySelector('.name').textContent,"
            " [...t.querySelectorAll('.seg')].map(s => s.textContent + (s.classList.contains('interim') ? '…' : ''))])")


async def wait_turns(page, expected: list) -> None:
    """Waits until the page's turns ([name, [segment texts, interims ending in …]]) are `expected`."""
    try:
        await page.wait_for_function(f"expected => JSON.stringify(({TURNS_JS})()) === JSON.stringify(expected)",
                                     arg=expected, timeout=WAIT_MS)
    except Exception:
        assert await page.evaluate(TURNS_JS) == expected  # says what the page showed instead
        raise


async def open_caption_stream(bot: CaptionAgentBot, speaker: str, segment_id: str, text: str, seq: int,
                              final: bool = False):
    """A caption stream signed and opened now, its text written, left open: the viewer server relays
    a stream once it is complete, so it reaches the page when the returned writer is closed."""
    from captions.protocol import TOPIC_TRANSCRIPTION

    words = json.dumps([[w, round(time.time() + 0.4 * i, 3), round(time.time() + 0.4 * i + 0.3, 3)]
                        for i, w in enumerate(text.split())]) if final else ""
    attributes = bot.signed_attributes(speaker, segment_id, text, final, words, seq=seq)
    writer = await bot.room.local_participant.stream_text(topic=TOPIC_TRANSCRIPTION, sender_identity=speaker,
                                                          attributes=attributes)
    await writer.write(text)
    return writer


@pytest.mark.parametrize("first_in", ["interim", "final"])
async def test_a_caption_stream_that_completes_late_takes_its_place_in_the_overlay(
        agentless_livekit, agentless_web, rooms, open_viewer, first_in):
    """Hugo's line began between two lines of Gina's, but its streams reach the viewer after her
    second one (here: held open until then; in CI, a stream completed late under load). It ends up
    between them, in a turn of its own, whichever of its two streams comes first: its interim creates
    it there; its final shows it last until the interim, come after it, says when the line began."""
    room_name, bot = await setup_room(agentless_livekit, rooms, {"gina": "Gina", "hugo": "Hugo"})
    viewer = await open_viewer(agentless_web.link(room_name, overlay="1"), width=1280, height=720)
    page = viewer.page
    await page.wait_for_selector('body.overlay[data-state="live"]', timeout=WAIT_MS)
    await bot.say("gina", "first line should scroll away")
    hugo = f"SG_{uuid.uuid4().hex[:8]}"
    interim = await open_caption_stream(bot, "hugo", hugo, "second line", seq=0)
    await asyncio.sleep(0.01)  # Gina's next line is signed a few ms later, never in the same ms
    await bot.say("gina", "third line is the newest one")
    final = await open_caption_stream(bot, "hugo", hugo, "second line is still visible", seq=1, final=True)
    # Before Hugo's streams come, Gina's lines are one turn, as far as the page can tell.
    await wait_turns(page, [["Gina", ["first line should scroll away", "third line is the newest one"]]])
    late, later = (interim, final) if first_in == "interim" else (final, interim)
    await late.aclose()
    await page.wait_for_function("() => document.querySelectorAll('#captions .turn').length >= 2", timeout=WAIT_MS)
    await later.aclose()
    await wait_turns(page, [["Gina", ["first line should scroll away"]], ["Hugo", ["second line is still visible"]],
                            ["Gina", ["third line is the newest one"]]])
    visible = await page.eval_on_selector_all(
        "#captions .turn", "ts => ts.filter(t => t.offsetParent !== null).map(t => t.innerText.replace(/\\s+/g, ' '))")
    assert visible == ["Hugo second line is still visible", "Gina third line is the newest one"]
    assert viewer.errors == []


def tampered(link: str, room: str) -> str:
    """`link` with its JWT's room changed, and its signature left as it was."""
    import base64

    prefix, token = link.split("?link=")
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged = base64.urlsafe_b64encode(json.dumps({**claims, "room": room}).encode()).decode().rstrip("=")
    return f"{prefix}?link={header}.{forged}.{signature}"


async def test_tampered_link_is_refused_with_a_message(agentless_web, open_viewer):
    link = tampered(agentless_web.link("some-room"), "another-room")
    viewer = await open_viewer(link)
    await wait_state(viewer.page, "refused")
    assert "not valid" in await viewer.page.text_content("#notice")
    assert await viewer.page.is_visible("#notice")
    await viewer.page.screenshot(path=screenshot_path("viewer-refused.png"))


async def test_expired_link_says_so(agentless_web, open_viewer):
    link = viewer_link(agentless_web.base_url, agentless_web.secret, "old-room", 60, now=time.time() - 65)
    viewer = await open_viewer(link)
    await wait_state(viewer.page, "expired")
    assert "expired" in await viewer.page.text_content("#notice")


def revoke_room(web: WebServer, room: str) -> None:
    """What `captions revoke --room` does: every link of `room` made so far ends."""
    from captions.viewer.revocations import append, default_path

    append(default_path(web.data_dir), {"room": room, "before": int(time.time())})


async def test_revoked_link_says_so(agentless_web, open_viewer):
    room = f"room-{uuid.uuid4().hex[:8]}"
    link = agentless_web.link(room)
    revoke_room(agentless_web, room)
    await asyncio.sleep(1.1)  # the server re-reads its revocation list at most every second
    viewer = await open_viewer(link)
    await wait_state(viewer.page, "revoked")
    assert "revoked" in (await viewer.page.text_content("#status")).lower()
    assert await viewer.page.is_visible("#notice")


async def test_a_viewer_whose_link_is_revoked_while_watching_is_told_and_does_not_retry(
        agentless_livekit, agentless_web, rooms, open_viewer):
    """The viewer server closes the live captions of a revoked link's viewers: the page says the link
    was revoked and what to do, instead of reconnecting in a loop."""
    room_name, _ = await setup_room(agentless_livekit, rooms, {"nia": "Nia"})
    viewer = await open_viewer(agentless_web.link(room_name))
    page = viewer.page
    await wait_state(page, "live")
    revoke_room(agentless_web, room_name)
    await page.wait_for_selector('#status[data-state="revoked"]', timeout=10000)
    notice = await page.text_content("#notice")
    assert "revoked" in notice and "Ask them for a new one" in notice
    await asyncio.sleep(3)
    assert await page.get_attribute("#status", "data-state") == "revoked"
    await page.screenshot(path=screenshot_path("viewer-link-revoked-while-watching.png"))
    assert viewer.errors == []


async def test_open_mode_shows_a_room_named_in_the_url_with_its_backlog(agentless_livekit, rooms, tmp_path,
                                                                        open_viewer):
    """Dev only (`captions web --open`): `?room=R` alone opens the room, its backlog included."""
    server = start_web_server(agentless_livekit, tmp_path / "web.log", tmp_path / "data", extra_args=("--open",))
    try:
        room_name, bot = await setup_room(agentless_livekit, rooms, {"olu": "Olu"}, web=server)
        await bot.say("olu", "said before the page opened", start=time.time() - 30)
        viewer = await open_viewer(f"{server.base_url}/?room={room_name}")
        page = viewer.page
        await wait_state(page, "live")
        await page.wait_for_selector("#captions .turn.backlog", timeout=WAIT_MS)
        await bot.say("olu", "and this is live")
        await page.wait_for_function("() => document.querySelectorAll('#captions .seg:not(.interim)').length === 2",
                                     timeout=WAIT_MS)
        assert [s["text"] for s in await segment_texts(page)] == ["said before the page opened", "and this is live"]
        assert await page.text_content("#room-name") == room_name
        assert viewer.errors == []
    finally:
        stop(server.process)


async def test_a_page_that_cannot_verify_says_so_and_shows_nothing(agentless_livekit, agentless_web, rooms,
                                                                    open_viewer):
    """Plain http from another machine: no WebCrypto (played here by hiding it before the page loads)."""
    room_name, bot = await setup_room(agentless_livekit, rooms, {"ria": "Ria"})

    async def insecure(page) -> None:
        await page.add_init_script("Object.defineProperty(window, 'isSecureContext', {value: false});"
                                   "Object.defineProperty(Crypto.prototype, 'subtle', {get: () => undefined});")

    viewer = await open_viewer(agentless_web.link(room_name), before_load=insecure)
    await wait_state(viewer.page, "insecure")
    await bot.say("ria", "nobody can check these words here")
    await asyncio.sleep(1.0)
    assert await viewer.page.locator("#captions .seg").count() == 0
    assert "not secure" in await viewer.page.text_content("#notice")
    assert viewer.errors == []


async def test_a_page_opened_without_a_link_or_with_a_livekit_token_is_refused_with_a_message(agentless_web,
                                                                                          open_viewer):
    """Viewers never join LiveKit: a LiveKit token in the URL opens nothing."""
    viewer = await open_viewer(f"{agentless_web.base_url}/?token=not.a.valid-token")
    await wait_state(viewer.page, "refused")
    assert "without a viewer link" in await viewer.page.text_content("#notice")


async def test_unreachable_livekit_shows_reconnecting_and_an_unreachable_viewer_server_retries(
        agentless_livekit, tmp_path, open_viewer):
    from types import SimpleNamespace

    dead = SimpleNamespace(url=f"ws://127.0.0.1:{free_port()}", api_key=agentless_livekit.api_key,
                           api_secret=agentless_livekit.api_secret)
    server = start_web_server(dead, tmp_path / "web.log", tmp_path / "data")
    try:
        viewer = await open_viewer(server.link("any-room"))
        await wait_state(viewer.page, "reconnecting")  # the viewer server cannot reach LiveKit
        assert "keeps trying" in await viewer.page.text_content("#notice")
        stop(server.process)  # now the viewer server itself is gone
        await wait_state(viewer.page, "retrying")
        assert "Retrying in" in await viewer.page.text_content("#notice")
        # It keeps trying on its own, backing off: the second wait is 2 s.
        await viewer.page.wait_for_function(
            "() => document.querySelector('#notice').textContent.includes('Retrying in 2 s')", timeout=WAIT_MS)
    finally:
        stop(server.process)


async def test_agent_states_absent_loading_waiting_live(agentless_livekit, agentless_web, rooms, open_viewer):
    room_name = f"room-{uuid.uuid4().hex[:8]}"
    rooms.append(await join(agentless_livekit, room_name, "ivy", "Ivy Chen"))
    viewer = await open_viewer(agentless_web.link(room_name))
    page = viewer.page
    await wait_state(page, "no-agent")
    assert "not in this room" in await page.text_content("#notice")

    bot = await CaptionAgentBot.start(agentless_livekit, room_name, {"ivy": "Ivy Chen"}, status="loading")
    rooms.append(bot.room)
    await wait_state(page, "loading")
    await bot.set_status("waiting", queued=["ivy"])
    await wait_state(page, "waiting")
    assert "Ivy Chen" in await page.text_content("#notice")
    await bot.set_status("live")
    await wait_state(page, "live")
    assert await page.is_hidden("#notice")
    await bot.set_status("live", **{"captions.problem": "transcript_unavailable"})  # a full disk, say
    # Arrow functions: Playwright polls a bare expression with eval, which the page's CSP refuses
    # (the test failed so whenever the state was not there at the first look).
    await page.wait_for_function("() => document.querySelector('#notice').textContent.includes('cannot save')",
                                 timeout=WAIT_MS)
    await page.screenshot(path=screenshot_path("transcript-unavailable.png"))
    await bot.set_status("live", **{"captions.problem": ""})
    await page.wait_for_function("() => document.querySelector('#notice').hidden", timeout=WAIT_MS)
    await bot.room.disconnect()
    await wait_state(page, "no-agent")


async def test_reader_scrolling_back_stops_auto_scroll_until_jump_to_live(agentless_livekit, agentless_web, rooms,
                                                                          open_viewer):
    room_name, bot = await setup_room(agentless_livekit, rooms, {"jo": "Jo", "kim": "Kim"})
    viewer = await open_viewer(agentless_web.link(room_name), width=800, height=500)
    page = viewer.page
    await wait_state(page, "live")
    for i in range(12):
        await bot.final("jo" if i % 2 else "kim", f"SG_scroll_{i}", f"caption number {i} " + "words " * 12, time.time())
    await page.wait_for_function("() => document.querySelectorAll('#captions .seg').length === 12", timeout=WAIT_MS)
    at_bottom = "() => (c => c.scrollHeight - c.scrollTop - c.clientHeight < 48)(document.querySelector('#captions'))"
    await page.wait_for_function(at_bottom, timeout=WAIT_MS)
    assert await page.is_hidden("#jump-live")

    await page.hover("#captions")
    await page.mouse.wheel(0, -600)
    await page.wait_for_selector("#jump-live", state="visible", timeout=WAIT_MS)
    top_before = await page.evaluate("document.querySelector('#captions').scrollTop")
    await bot.final("jo", "SG_scroll_new", "a new caption while reading back", time.time())
    await page.wait_for_function("() => document.querySelectorAll('#captions .seg').length === 13", timeout=WAIT_MS)
    assert await page.evaluate("document.querySelector('#captions').scrollTop") == top_before
    await page.click("#jump-live")
    await page.wait_for_function(at_bottom, timeout=WAIT_MS)
    assert await page.is_hidden("#jump-live")


async def test_display_preferences_are_remembered(agentless_livekit, agentless_web, rooms, open_viewer):
    room_name, _ = await setup_room(agentless_livekit, rooms, {"lee": "Lee"})
    viewer = await open_viewer(agentless_web.link(room_name))
    page = viewer.page
    size = "getComputedStyle(document.querySelector('#captions')).fontSize"
    before = await page.evaluate(size)
    await page.click("#font-larger")
    await page.click("#font-larger")
    await page.select_option("#theme", "contrast")
    larger = await page.evaluate(size)
    assert float(larger.rstrip("px")) > float(before.rstrip("px"))
    await page.reload()
    await wait_state(page, "live")
    assert await page.evaluate(size) == larger
    assert await page.input_value("#theme") == "contrast"
    assert await page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(0, 0, 0)"


async def test_phone_sized_screen_keeps_controls_and_captions_usable(agentless_livekit, agentless_web, rooms,
                                                                     open_viewer):
    room_name, bot = await setup_room(agentless_livekit, rooms, {"max": "Maximilian Grünewald-Santos"})
    viewer = await open_viewer(agentless_web.link(room_name), width=390, height=844)
    page = viewer.page
    await wait_state(page, "live")
    await bot.say("max", "captions on a phone wrap to the screen width without scrolling sideways")
    await page.wait_for_selector("#captions .seg:not(.interim)", timeout=WAIT_MS)
    assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    for selector in ("#font-larger", "#theme", '[data-export="srt"]'):
        box = await page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390 and box["height"] >= 32
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.id") == "font-smaller"
    await page.screenshot(path=screenshot_path("viewer-phone.png"))


# ---------------------------------------------------------------- reading a translation (issue 26)


ROWS_JS = """() => [...document.querySelectorAll('#captions .seg')].map(s => ({
    text: (s.querySelector('.seg-text') || s).textContent, dir: s.getAttribute('dir'),
    interim: s.classList.contains('interim'), note: !!s.querySelector('.untranslated-note:not([hidden])'),
    toggle: !!s.querySelector('.show-original:not([hidden])')}))"""


async def rows(page) -> list[dict]:
    return await page.evaluate(ROWS_JS)


async def wait_rows(page, predicate: str) -> list[dict]:
    """Waits until `predicate` (JavaScript, of `rows`) holds; returns the rows."""
    await page.wait_for_function(f"() => (rows => {predicate})(({ROWS_JS})())", timeout=WAIT_MS)
    return await rows(page)


async def test_a_reader_of_arabic_reads_translations_in_place_right_to_left_with_the_original_on_demand(
        agentless_livekit, translating_web, rooms, open_viewer):
    room_name, bot = await setup_room(agentless_livekit, rooms, {"alice": "Alice Martin"}, web=translating_web)
    viewer = await open_viewer(translating_web.link(room_name, lang="ar"))
    page = viewer.page
    await wait_state(page, "live")
    assert await page.is_visible("#language")
    options = await page.eval_on_selector_all("#language option", "os => os.map(o => o.value)")
    assert options == ["", "de", "ar"] and await page.input_value("#language") == "ar"

    first = "SG_first"
    await bot.interim("alice", first, "good morning")
    await wait_rows(page, "rows.length === 1 && rows[0].text === 'good morning'")  # the original until then
    await bot.translate("alice", first, "ar", "صباح", final=False)
    await wait_rows(page, "rows[0].text === 'صباح' && rows[0].interim")
    await bot.translate("alice", first, "de", "Guten Morgen", final=True)  # nobody here reads German
    await bot.final("alice", first, "good morning everyone", time.time())
    await bot.translate("alice", first, "ar", "صباح الخير للجميع")
    shown = await wait_rows(page, "rows[0].text === 'صباح الخير للجميع' && !rows[0].interim")
    assert shown[0]["dir"] == "rtl" and shown[0]["toggle"] and not shown[0]["note"]
    assert await page.evaluate("getComputedStyle(document.querySelector('#captions .turn .text')).direction") == "rtl"
    assert await page.get_attribute("#captions .seg .seg-text", "lang") == "ar"
    assert await page.get_attribute("#captions .seg", "aria-hidden") is None

    failed = await bot.say("alice", "the budget is ready")
    await bot.translate("alice", failed, "ar", "the budget is ready", untranslated="translation failed")
    await bot.say("alice", "questions later please")  # its translation never comes
    shown = await wait_rows(page, "rows.length === 3 && rows[1].note && rows[2].note")  # the last after 5 s
    assert [r["text"] for r in shown] == ["صباح الخير للجميع", "the budget is ready", "questions later please"]
    assert [r["dir"] for r in shown] == ["rtl", "auto", "auto"] and not shown[1]["toggle"]
    assert await page.text_content("#captions .seg:nth-child(2) .untranslated-note") == "not translated"
    assert "Guten Morgen" not in await page.text_content("#captions"), "another language's translation"

    # The original on demand: a button, by mouse or keyboard.
    toggle = page.locator("#captions .seg").first.locator(".show-original")
    assert await toggle.get_attribute("aria-expanded") == "false"
    await toggle.click()
    original = page.locator("#captions .seg").first.locator(".seg-original")
    assert await original.is_visible() and await original.text_content() == "good morning everyone"
    assert await toggle.get_attribute("aria-expanded") == "true"
    assert await original.get_attribute("id") == await toggle.get_attribute("aria-controls")
    await page.screenshot(path=screenshot_path("translation.png"))
    await toggle.focus()
    await page.keyboard.press("Enter")
    assert await original.is_hidden() and await toggle.get_attribute("aria-expanded") == "false"

    text = await _download(page, '[data-export="txt"]')
    assert [line.split(": ", 1)[1] for line in text.splitlines()] == [
        "صباح الخير للجميع", "the budget is ready", "questions later please"]
    srt = await _download(page, '[data-export="srt"]')
    assert "Alice Martin: صباح الخير للجميع" in srt

    # Back to the originals: the page as it is without translation.
    await page.select_option("#language", "")
    await wait_rows(page, "rows[0].text === 'good morning everyone'")
    assert await segment_texts(page) == [
        {"text": t, "interim": False, "speaker": "Alice Martin"}
        for t in ("good morning everyone", "the budget is ready", "questions later please")]
    assert await page.locator("#captions .show-original, #captions .untranslated-note").count() == 0
    assert await page.evaluate("getComputedStyle(document.querySelector('#captions .turn .text')).direction") == "ltr"
    assert "lang=original" in page.url, "the address says what the page shows"
    assert viewer.errors == []


async def test_the_language_read_is_remembered_a_link_may_choose_it_and_a_late_reader_gets_translations(
        agentless_livekit, translating_web, rooms, open_viewer):
    """Chosen in the picker, it is remembered; a link's `lang` (an overlay's) wins; an unknown one is
    said and the originals shown. A late reader gets the backlog's translations into its language."""
    room_name, bot = await setup_room(agentless_livekit, rooms, {"bea": "Bea"}, web=translating_web)
    earlier = await bot.say("bea", "said before anyone watched", start=time.time() - 30)
    await bot.translate("bea", earlier, "de", "gesagt bevor jemand zusah")
    await bot.translate("bea", earlier, "ar", "قيل قبل أن يشاهد أحد")
    link = translating_web.link(room_name)
    viewer = await open_viewer(link)
    page = viewer.page
    await wait_state(page, "live")
    await page.wait_for_selector("#captions .turn.backlog", timeout=WAIT_MS)
    assert await page.input_value("#language") == "" and [r["text"] for r in await rows(page)] == [
        "said before anyone watched"]
    await page.select_option("#language", "de")
    await wait_rows(page, "rows[0].text === 'gesagt bevor jemand zusah'")  # the backlog, asked again
    live = await bot.say("bea", "and this is live")
    await bot.translate("bea", live, "de", "und das ist live")
    await wait_rows(page, "rows.length === 2 && rows[1].text === 'und das ist live'")

    await page.goto(link)  # remembered
    await wait_state(page, "live")
    assert await page.input_value("#language") == "de"
    await wait_rows(page, "rows.length === 2 && rows[1].text === 'und das ist live' && rows[1].dir === 'ltr'")
    await page.goto(translating_web.link(room_name, lang="ar", overlay="1"))  # the link's wins
    await page.wait_for_selector('body.overlay[data-state="live"]', timeout=WAIT_MS)
    shown = await wait_rows(page, "rows.length === 2 && rows[0].text === 'قيل قبل أن يشاهد أحد'")
    assert shown[0]["dir"] == "rtl" and not shown[0]["toggle"], "no buttons in an overlay"
    await page.screenshot(path=screenshot_path("translation-overlay.png"))
    await page.goto(translating_web.link(room_name, lang="xx"))
    await wait_state(page, "live")
    assert await page.input_value("#language") == ""
    assert "not translated into “xx”" in await page.text_content("#captions .system-note")
    await wait_rows(page, "rows.length === 2 && rows[1].text === 'and this is live'")
    await page.set_viewport_size({"width": 390, "height": 844})  # a phone: the picker fits too
    box = await page.locator("#language").bounding_box()
    assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390
    assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    await page.screenshot(path=screenshot_path("translation-phone.png"))
    assert viewer.errors == []


# ---------------------------------------------------------------- the real stack


async def _named_publisher(server, room: str, identity: str, name: str):
    from captions.dev.bots import Publisher, make_token

    publisher = Publisher(server, room, identity)
    await publisher.room.connect(server.url, make_token(server, room, identity, name=name))
    await publisher.publish()
    return publisher


@pytest.mark.timeout(300)
async def test_real_worker_captions_two_named_speakers_and_a_late_viewer_gets_the_backlog(
        livekit_server, captions_worker, web_server, speech_dir, open_viewer):
    """livekit-server + `captions worker` (tiny checkpoint) + two bots speaking espeak-ng audio."""
    from tests.conftest import espeak_wav

    room = f"web-e2e-{uuid.uuid4().hex[:6]}"
    speech = {
        "spk-ann": ("Ann Lee", "The quick brown fox jumps over the lazy dog near the river bank."),
        "spk-ben": ("Ben <b>Ray</b>", "Streaming speech recognition turns every word into text as it is spoken."),
    }
    viewer = await open_viewer(web_server.link(room))
    page = viewer.page
    # Before anyone joins, the room does not exist, and a viewer does not create it.
    await wait_state(page, "no-agent")
    publishers = {identity: await _named_publisher(livekit_server, room, identity, name)
                  for identity, (name, _) in speech.items()}
    await page.wait_for_selector('#status[data-state="live"], #status[data-state="loading"]', timeout=60000)
    await asyncio.sleep(0.5)  # let the agent subscribe to both microphones
    wavs = {identity: espeak_wav(text, speech_dir / f"web-{identity}.wav") for identity, (_, text) in speech.items()}
    await asyncio.gather(*(publishers[i].play(wavs[i]) for i in speech))
    await asyncio.gather(*(p.silence(1.0) for p in publishers.values()))
    for publisher in publishers.values():
        await publisher.disconnect()  # the worker flushes: every segment ends final

    names = [name for name, _ in speech.values()]
    turns_js = ("() => [...document.querySelectorAll('#captions .turn')].map(t => ["
                "t.querySelector('.name').textContent, t.querySelector('.text').textContent,"
                "t.querySelectorAll('.seg.interim').length])")
    await page.wait_for_function(
        f"() => {{ const turns = ({turns_js})(); const names = {json.dumps(names)};"
        " return names.every(n => turns.some(t => t[0] === n && t[1].trim()))"
        " && turns.every(t => t[2] === 0); }", timeout=60000)
    turns = await page.evaluate(turns_js)
    assert {t[0] for t in turns} == set(names)
    segment_ids = await page.evaluate("() => document.querySelectorAll('#captions .seg').length")
    shown = await page.evaluate(
        "() => [...document.querySelectorAll('#captions .seg')].map(s => s.textContent).join(' | ')")

    late = await open_viewer(web_server.link(room))
    await late.page.wait_for_selector("#captions .turn.backlog", timeout=30000)
    await late.page.wait_for_function(
        f"() => document.querySelectorAll('#captions .seg').length === {segment_ids}", timeout=30000)
    late_shown = await late.page.evaluate(
        "() => [...document.querySelectorAll('#captions .seg')].map(s => s.textContent).join(' | ')")
    assert sorted(late_shown.split(" | ")) == sorted(shown.split(" | "))
    late_names = await late.page.eval_on_selector_all("#captions .name", "ns => ns.map(n => n.textContent)")
    assert set(late_names) == set(names)
    await page.screenshot(path=screenshot_path("viewer-real-worker.png"))
    assert viewer.dialogs == [] and viewer.errors == [] and late.errors == []


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_real_worker_a_viewer_reads_two_speakers_in_german_and_the_originals_are_unchanged(
        tiny_checkpoint, tiny_translation_model, speech_dir, tmp_path, open_viewer):
    """Issue 26 end to end: livekit-server + `captions worker --translate-to de` (tiny STT and
    translation models: meaningless words, real formats) + `captions web --translate-to de` + the page
    reading German. Nobody reads German until the page does (the relay tells the hidden captioner);
    then every final of both speakers settles in German (or says it is not translated), each with its
    original on demand, and the Original view shows exactly the originals."""
    from tests.conftest import espeak_wav, start_captions_worker, start_livekit_server

    server = await asyncio.to_thread(start_livekit_server, tmp_path / "livekit-server.log")
    worker = web = None
    publishers = []
    try:
        worker = await asyncio.to_thread(start_captions_worker, server, tiny_checkpoint, tmp_path / "worker", 3,
                                         translate_to="de", translation_model=tiny_translation_model)
        web = start_web_server(server, tmp_path / "web.log", worker.data_dir, extra_args=("--translate-to", "de"))
        room = f"web-translate-{uuid.uuid4().hex[:6]}"
        speech = {"spk-ann": ("Ann Lee", "The quick brown fox jumps over the lazy dog near the river bank."),
                  "spk-ben": ("Ben Ray", "Streaming speech recognition turns every word into text as it is spoken.")}
        publishers = [await _named_publisher(server, room, identity, name) for identity, (name, _) in speech.items()]
        viewer = await open_viewer(web.link(room, lang="de"))
        page = viewer.page
        await page.wait_for_selector('#status[data-state="live"]', timeout=60000)
        deadline = time.monotonic() + 30
        while b"translating captions into de" not in worker.log_path.read_bytes():
            assert time.monotonic() < deadline, "the worker never heard that someone reads German"
            await asyncio.sleep(0.2)
        await asyncio.gather(*(p.wait_heard() for p in publishers))
        wavs = [espeak_wav(text, speech_dir / f"web-translate-{identity}.wav") for identity, (_, text) in speech.items()]
        await asyncio.gather(*(p.play(wav) for p, wav in zip(publishers, wavs, strict=True)))
        await asyncio.gather(*(p.silence(1.0) for p in publishers))
        for publisher in publishers:
            await publisher.disconnect()  # the worker flushes: every segment ends final

        # Settled: no interim left, and every segment in German or saying it is not translated.
        await page.wait_for_function(
            "() => { const segs = [...document.querySelectorAll('#captions .seg')];"
            " const names = new Set([...document.querySelectorAll('#captions .turn .name')].map(n => n.textContent));"
            " return names.size === 2 && segs.length && segs.every(s => !s.classList.contains('interim')"
            " && (s.classList.contains('translated') || s.classList.contains('untranslated'))); }", timeout=90000)
        rows_now = await page.eval_on_selector_all("#captions .seg", """segs => segs.map(s => ({
            translated: s.classList.contains('translated'), lang: s.querySelector('.seg-text').lang,
            text: s.querySelector('.seg-text').textContent, original: s.querySelector('.seg-original').textContent,
            speaker: s.closest('.turn').querySelector('.name').textContent}))""")
        assert {r["speaker"] for r in rows_now if r["translated"]} == {"Ann Lee", "Ben Ray"}, rows_now
        assert all(r["lang"] == "de" for r in rows_now if r["translated"])
        await page.screenshot(path=screenshot_path("translation-real-worker.png"))
        await page.select_option("#language", "")
        await wait_state(page, "live")
        await page.wait_for_function("() => !document.querySelector('#captions .seg-text')", timeout=WAIT_MS)
        originals = await segment_texts(page)
        assert [o["text"] for o in originals] == [r["original"] for r in rows_now], "the Original view is unchanged"
        assert viewer.errors == []
    finally:
        for publisher in publishers:
            with contextlib.suppress(Exception):
                await publisher.disconnect()
        if web is not None:
            stop(web.process)
        if worker is not None:
            worker.stop()
        server.stop()
