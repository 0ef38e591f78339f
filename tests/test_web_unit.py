"""The viewer's JavaScript without a room: the transcript export (web/export.js) and the caption
protocol (web/protocol.js) against the Python one, run by node; the transcript (web/transcript.js) on
an empty page in headless Chromium. The viewer server: test_viewer_server.py."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from captions.protocol import CaptionSigner, caption_message
from captions.viewer.server import WEB_DIR

API_SECRET = "api-secret-that-never-leaves-the-server"


# ---------------------------------------------------------------- export (web/export.js under node)


def run_export(segments: list[dict]) -> dict[str, str]:
    node = shutil.which("node")
    assert node, "node is needed for the viewer (npm ci) and for this test"
    script = (
        "import { toText, toSrt, toVtt } from './export.js';"
        "const segments = JSON.parse(process.argv[1]);"
        "console.log(JSON.stringify({txt: toText(segments), srt: toSrt(segments), vtt: toVtt(segments)}));"
    )
    result = subprocess.run([node, "--input-type=module", "-e", script, json.dumps(segments)],
                            cwd=WEB_DIR, capture_output=True, text=True, timeout=30, check=True)
    return json.loads(result.stdout)


T0 = 1_700_000_000.0


def test_long_segments_split_into_readable_cues_along_word_times():
    words = [[f"w{i}", T0 + i * 0.5, T0 + i * 0.5 + 0.4] for i in range(30)]
    out = run_export([{"name": "Ana", "text": " ".join(w[0] for w in words), "start": T0, "end": T0 + 15,
                       "words": words}])
    blocks = out["srt"].strip().split("\n\n")
    assert len(blocks) == 3  # 30 words at 2 per second: cues of at most 14 words / 7 s
    assert blocks[0].splitlines()[1] == "00:00:00,000 --> 00:00:06,900"
    assert blocks[1].splitlines()[1].startswith("00:00:07,000 --> ")
    assert blocks[0].splitlines()[2].startswith("Ana: w0 w1")


def test_export_escapes_vtt_markup_and_keeps_each_cue_on_one_line():
    out = run_export([
        {"name": "<b>Eve</b>", "text": "a --> b\n\nc & d", "start": T0, "end": T0 + 2, "words": []},
        {"name": "Zed", "text": "later", "start": T0 + 65.25, "end": T0 + 66, "words": []},
    ])
    assert "<v &lt;b&gt;Eve&lt;/b&gt;>a --&gt; b c &amp; d" in out["vtt"]
    assert "\n\n\n" not in out["srt"] and "a --> b c & d" in out["srt"]
    assert out["txt"].splitlines() == ["[00:00:00] <b>Eve</b>: a --> b c & d", "[00:01:05] Zed: later"]
    assert "00:01:05.250 --> 00:01:06.000" in out["vtt"]


def test_export_orders_cues_by_time_and_gives_every_cue_a_duration():
    out = run_export([
        {"name": "B", "text": "second", "start": T0 + 4, "end": T0 + 4, "words": [["second", T0 + 4, T0 + 4]]},
        {"name": "A", "text": "first", "start": T0, "end": T0 + 1, "words": [["first", T0, T0 + 1]]},
        {"name": "C", "text": "", "start": T0 + 9, "end": T0 + 9, "words": []},
    ])
    blocks = out["srt"].strip().split("\n\n")
    assert [b.splitlines()[2] for b in blocks] == ["A: first", "B: second"]
    assert blocks[1].splitlines()[1] == "00:00:04,000 --> 00:00:04,500"
    assert run_export([]) == {"txt": "", "srt": "", "vtt": "WEBVTT\n\n"}


def test_web_dir_is_where_the_server_looks():
    assert (WEB_DIR / "index.html").is_file() and Path(WEB_DIR / "package-lock.json").is_file()


# ---------------------------------------------------------------- caption signatures (web/protocol.js under node)


def run_protocol_js(body: str, *args) -> object:
    """`body` (JavaScript that ends by printing JSON) under node with web/protocol.js imported as P;
    `args` arrive as JSON in ARGS."""
    script = ("import * as P from './protocol.js';"
              "const ARGS = process.argv.slice(1).map((a) => JSON.parse(a));"
              "const verify = async (key, signature, message) => crypto.subtle.verify({name: 'Ed25519'},"
              " await crypto.subtle.importKey('raw', P.fromBase64(key), {name: 'Ed25519'}, false, ['verify']),"
              " P.fromBase64(signature), message);" + body)
    result = subprocess.run([shutil.which("node"), "--input-type=module", "-e", script, *map(json.dumps, args)],
                            cwd=WEB_DIR, capture_output=True, text=True, timeout=30, check=True)
    return json.loads(result.stdout)


def verify_in_node(public_key: str, caption: dict) -> bool:
    """What the viewer does with a caption (protocol.js's message, WebCrypto's Ed25519), under node."""
    return run_protocol_js("const [key, c] = ARGS;"
                           "console.log(JSON.stringify(await verify(key, c.signature, P.captionMessage(c))));",
                           public_key, caption)


def test_a_caption_signed_by_the_agent_verifies_in_the_viewer_and_any_change_breaks_it():
    signer = CaptionSigner.for_deployment(API_SECRET, "")
    fields = {"room": "réunion: 1", "agent": "agent-AJ_1", "speaker": "alice", "trackSid": "TR_1",
              "segmentId": "SG_1", "seq": 3, "final": True, "sentMs": 1_780_000_000_123,
              "words": '[["h\\u00e9llo", 1.0, 1.5]]', "text": "héllo 5:world 🎉"}
    message = caption_message(room=fields["room"], agent=fields["agent"], speaker=fields["speaker"],
                              track_sid=fields["trackSid"], segment_id=fields["segmentId"], seq=fields["seq"],
                              final=fields["final"], sent_ms=fields["sentMs"], words=fields["words"],
                              text=fields["text"])
    caption = {**fields, "signature": signer.sign(message)}
    assert verify_in_node(signer.public_key, caption) is True
    for field, other in [("text", "héllo 5:world 🎉!"), ("speaker", "bob"), ("segmentId", "SG_2"), ("seq", 4),
                         ("final", False), ("room", "réunion: 2"), ("agent", "agent-AJ_2"), ("words", "[]"),
                         ("trackSid", "TR_2"), ("sentMs", fields["sentMs"] + 1)]:
        assert verify_in_node(signer.public_key, {**caption, field: other}) is False, field
    assert verify_in_node(CaptionSigner().public_key, caption) is False, "a key of its own"
    assert verify_in_node(CaptionSigner.for_deployment(API_SECRET, "other-pool").public_key, caption) is False, \
        "another pool's key"
    assert verify_in_node(CaptionSigner.for_deployment("another-secret", "").public_key, caption) is False, \
        "another deployment's key"


def test_a_captioners_claim_verifies_in_the_viewer_for_its_own_identity_and_room_only():
    from captions.protocol import claim_message

    signer = CaptionSigner.for_deployment(API_SECRET, "")
    room, identity = "réunion: 1", "agent-AJ_1"
    claim = signer.claim(room, identity)
    assert claim == signer.sign(claim_message(room=room, identity=identity))
    cases = [(signer.public_key, room, identity), (signer.public_key, room, "agent-AJ_2"),
             (signer.public_key, "réunion: 2", identity), (CaptionSigner().public_key, room, identity)]
    checked = run_protocol_js("const [claim, cases] = ARGS; const out = [];"
                              "for (const [key, room, identity] of cases)"
                              " out.push(await verify(key, claim, P.claimMessage({room, identity})));"
                              "console.log(JSON.stringify(out));", claim, cases)
    assert checked == [True, False, False, False]


def test_the_viewers_protocol_constants_mirror_the_python_ones():
    from captions import protocol

    constants = run_protocol_js("console.log(JSON.stringify(Object.fromEntries(Object.entries(P)"
                                ".filter(([name]) => /^[A-Z_]+$/.test(name)))));")
    assert constants["REPLAY_WINDOW_MS"] == protocol.REPLAY_WINDOW_S * 1000
    for name in ("TOPIC_TRANSCRIPTION", "ATTR_SEGMENT_ID", "ATTR_TRANSCRIPTION_FINAL", "ATTR_TRANSCRIBED_TRACK_ID",
                 "ATTR_WORDS", "ATTR_AGENT", "ATTR_SPEAKER", "ATTR_SEQ", "ATTR_SENT", "ATTR_SIGNATURE", "ATTR_AGENT_STATUS",
                 "ATTR_AGENT_QUEUED", "ATTR_AGENT_CLAIM"):
        assert constants[name] == getattr(protocol, name), name
    assert "ATTR_AGENT_KEY" not in constants and "ATTR_AGENT_SINCE" not in constants


def test_the_viewer_takes_the_speaker_as_the_python_subscriber_does():
    from captions.dev.bots import speaker_of

    cases = [("alice", {"captions.agent": "agent-1", "captions.speaker": "bob"}),
             ("agent-1", {"captions.agent": "agent-1", "captions.speaker": "bob"}),
             ("agent-1", {"captions.agent": "agent-1"}),
             ("mallory", {"captions.agent": "mallory", "captions.speaker": "bob"}),
             ("", {"captions.agent": "", "captions.speaker": "bob"})]
    in_node = run_protocol_js("console.log(JSON.stringify(ARGS[0].map(([s, a]) => P.speakerOf(s, a))));", cases)
    assert in_node == [speaker_of(sender, attributes) for sender, attributes in cases] == \
        ["alice", "bob", "agent-1", "bob", ""]


def test_the_viewer_elects_the_captioner_the_workers_elect():
    """From livekit-client's joinedAt (a Date made from the server's whole seconds), as
    `elected_captioner` does from the same facts; identities compare by code point as in Python."""
    from captions.protocol import CaptionerInfo, elected_captioner

    cases = [
        [("agent-b", 1000), ("agent-a", 2000)],
        [("agent-b", 1000), ("agent-a", 1000)],
        [("agent-z", 5), ("agent-y", None), ("agent-x", 7)],
        [("agent-\uffff", 9), ("agent-\U0001f600", 9)],  # UTF-16 order would pick the emoji
        [("only", 3)],
    ]
    elected = run_protocol_js(
        "console.log(JSON.stringify(ARGS[0].map((captioners) => P.electedCaptioner(captioners.map(([identity, s]) =>"
        " ({identity, joinedAt: s === null ? undefined : new Date(s * 1000)}))).identity)));", cases)
    in_python = [elected_captioner([CaptionerInfo(i, s if s is not None else 2**62) for i, s in case]).identity
                 for case in cases]
    assert elected == in_python
    assert run_protocol_js("console.log(JSON.stringify(P.electedCaptioner([])));") is None


# ---------------------------------------------------------------- translations (issue 26)


def translation_fields(**overrides) -> dict:
    fields = {"room": "réunion: 1", "agent": "agent-AJ_1", "speaker": "alice", "trackSid": "TR_1",
              "segmentId": "SG_1~ar", "seq": 3, "final": True, "sentMs": 1_780_000_000_123,
              "sourceSegment": "SG_1", "sourceLanguage": "fr", "language": "ar", "untranslated": "",
              "text": "صباح الخير 5:world 🎉", "translated": True}
    return {**fields, **overrides}


def python_translation_message(f: dict) -> bytes:
    from captions.protocol import translation_message

    return translation_message(room=f["room"], agent=f["agent"], speaker=f["speaker"], track_sid=f["trackSid"],
                               segment_id=f["segmentId"], seq=f["seq"], final=f["final"], sent_ms=f["sentMs"],
                               source_segment=f["sourceSegment"], source_language=f["sourceLanguage"],
                               language=f["language"], untranslated=f["untranslated"], text=f["text"])


def test_a_translation_signed_by_the_agent_verifies_in_the_viewer_and_any_change_breaks_it():
    """The same bytes in Python and JavaScript, and the page's check (signedMessage: a translation's
    message for a stream that says it is one) passes for the agent's signature only."""
    from captions.protocol import translation_segment_id

    signer = CaptionSigner.for_deployment(API_SECRET, "")
    fields = translation_fields()
    assert fields["segmentId"] == translation_segment_id("SG_1", "ar")
    caption = {**fields, "signature": signer.sign(python_translation_message(fields))}
    same_bytes = run_protocol_js("console.log(JSON.stringify([...P.translationMessage(ARGS[0])]));", fields)
    assert bytes(same_bytes) == python_translation_message(fields)
    assert run_protocol_js("console.log(JSON.stringify(P.translationSegmentId('SG_1', 'ar')));") == "SG_1~ar"
    cases = [caption] + [{**caption, field: other} for field, other in [
        ("text", "صباح الخير"), ("language", "he"), ("sourceSegment", "SG_2"), ("sourceLanguage", "en"),
        ("untranslated", "too slow"), ("seq", 4), ("final", False), ("speaker", "bob"), ("segmentId", "SG_1~he"),
        ("sentMs", fields["sentMs"] + 1)]]
    checked = run_protocol_js("const [key, cases] = ARGS; const out = [];"
                              "for (const c of cases) out.push(await verify(key, c.signature, P.signedMessage(c)));"
                              "console.log(JSON.stringify(out));", signer.public_key, cases)
    assert checked == [True] + [False] * 10


def test_an_originals_signature_never_passes_for_a_translations_nor_the_reverse():
    """Same fields, same text: a caption's signature over a translation's message (and the reverse)
    does not verify, in the page (signedMessage) or in the relay (protocol.verify_caption)."""
    from captions.protocol import (
        ATTR_AGENT,
        ATTR_LANGUAGE,
        ATTR_SEGMENT_ID,
        ATTR_SENT,
        ATTR_SEQ,
        ATTR_SIGNATURE,
        ATTR_SOURCE_LANGUAGE,
        ATTR_SOURCE_SEGMENT,
        ATTR_SPEAKER,
        ATTR_TRANSCRIBED_TRACK_ID,
        ATTR_TRANSCRIPTION_FINAL,
        ATTR_TRANSLATED,
        ATTR_WORDS,
        verify_caption,
    )

    signer = CaptionSigner.for_deployment(API_SECRET, "")
    fields = translation_fields(untranslated="", words="")
    as_caption = caption_message(room=fields["room"], agent=fields["agent"], speaker=fields["speaker"],
                                 track_sid=fields["trackSid"], segment_id=fields["segmentId"], seq=fields["seq"],
                                 final=True, sent_ms=fields["sentMs"], words="", text=fields["text"])
    caption_signature, translation_signature = signer.sign(as_caption), signer.sign(python_translation_message(fields))
    cases = [  # (fields as the page reads them, signature): which verify
        ({**fields, "translated": False}, caption_signature),
        ({**fields, "translated": True}, translation_signature),
        ({**fields, "translated": True}, caption_signature),
        ({**fields, "translated": False}, translation_signature),
    ]
    in_node = run_protocol_js("const [key, cases] = ARGS; const out = [];"
                              "for (const [c, s] of cases) out.push(await verify(key, s, P.signedMessage(c)));"
                              "console.log(JSON.stringify(out));", signer.public_key, cases)
    assert in_node == [True, True, False, False]
    base = {ATTR_SEGMENT_ID: fields["segmentId"], ATTR_TRANSCRIPTION_FINAL: "true", ATTR_AGENT: fields["agent"],
            ATTR_SPEAKER: fields["speaker"], ATTR_TRANSCRIBED_TRACK_ID: fields["trackSid"], ATTR_SEQ: "3",
            ATTR_SENT: str(fields["sentMs"]), ATTR_WORDS: ""}
    translated = {**base, ATTR_TRANSLATED: "true", ATTR_LANGUAGE: "ar", ATTR_SOURCE_SEGMENT: "SG_1",
                  ATTR_SOURCE_LANGUAGE: "fr"}
    in_python = [verify_caption(signer.public_key, fields["room"], "alice", {**attributes, ATTR_SIGNATURE: signature},
                                fields["text"])
                 for attributes, signature in [(base, caption_signature), (translated, translation_signature),
                                               (translated, caption_signature), (base, translation_signature)]]
    assert in_python == [True, True, False, False]


def test_the_viewer_writes_right_to_left_languages_right_to_left():
    codes = ["ar", "he", "fa", "ur", "yi", "ps", "ar-eg", "de", "fr", "ja", "pt-br", "", "EN"]
    directions = run_protocol_js("console.log(JSON.stringify(ARGS[0].map(P.directionOf)));", codes)
    assert directions == ["rtl"] * 7 + ["ltr"] * 4 + ["auto", "ltr"]


def test_the_viewers_translation_constants_mirror_the_python_ones():
    from captions import protocol

    constants = run_protocol_js("console.log(JSON.stringify(Object.fromEntries(Object.entries(P)"
                                ".filter(([name]) => /^[A-Z_]+$/.test(name)))));")
    for name in ("ATTR_LANGUAGE", "ATTR_TRANSLATED", "ATTR_SOURCE_SEGMENT", "ATTR_SOURCE_LANGUAGE",
                 "ATTR_UNTRANSLATED", "ATTR_READING"):
        assert constants[name] == getattr(protocol, name), name


# ---------------------------------------------------------------- the transcript (web/transcript.js in Chromium)

PAGE_ORIGIN = "http://viewer.test"


def run_in_page(body: str) -> object:
    """`body` (the inside of an async JavaScript function that returns JSON-able data) in headless
    Chromium, on an empty page served with web/ (no server: Playwright answers the requests) whose
    clock is Playwright's, run on by `await tick(ms)`; `T` is web/transcript.js."""
    from playwright.sync_api import sync_playwright

    from tests.viewer_harness import CHROMIUM, CHROMIUM_ARGS

    def serve(route):
        path = route.request.url.removeprefix(PAGE_ORIGIN).split("?")[0].lstrip("/")
        file = (WEB_DIR / path).resolve()
        if path == "unit.html":
            route.fulfill(body="<!doctype html><html><body><main id='captions'></main><p id='empty'></p></body></html>",
                          content_type="text/html")
        elif file.is_file() and file.is_relative_to(WEB_DIR.resolve()):
            route.fulfill(path=file, content_type="text/javascript" if file.suffix == ".js" else None)
        else:
            route.fulfill(status=404)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.clock.install()
            page.route(f"{PAGE_ORIGIN}/**", serve)
            page.goto(f"{PAGE_ORIGIN}/unit.html")
            page.expose_function("tickClock", page.clock.run_for)
            result = page.evaluate("async () => { const T = await import('/transcript.js');"
                                   " const tick = (ms) => window.tickClock(ms);" + body + "}")
            assert errors == []
            return result
        finally:
            browser.close()


# A German reader's transcript; `say` and `translate` apply one update as session.js does.
TRANSCRIPT_JS = """
const transcript = new T.Transcript(document.getElementById('captions'), document.getElementById('empty'),
                                    new T.Speakers());
transcript.setLanguage('de');
const seqs = {};
const update = (id, text, final, translation) => {
  seqs[id] = (seqs[id] || 0) + 1;
  const words = final ? text.split(' ').map((w, i) => [w, 100 + i, 100.5 + i]) : [];
  const refused = transcript.update({id, identity: 'alice', text, final, words, start: 100, seq: seqs[id],
                                     agent: 'agent-1', translation});
  if (refused) throw new Error(refused);
};
const say = (id, text, final = true) => update(id, text, final, null);
const translate = (id, text, final = true, untranslated = '') => update(`${id}~de`, text, final,
  {of: id, language: 'de', sourceLanguage: 'en', untranslated});
const line = (id) => {
  const seg = [...document.querySelectorAll('#captions .seg')][id];
  const note = seg.querySelector('.untranslated-note');
  const reason = seg.querySelector('.untranslated-reason');
  return {text: seg.querySelector('.seg-text').textContent, interim: seg.classList.contains('interim'),
          ariaHidden: seg.getAttribute('aria-hidden'), note: Boolean(note && !note.hidden),
          noteText: note && !note.hidden ? note.textContent : '', noteAriaHidden: note?.getAttribute('aria-hidden'),
          reason: reason && !reason.hidden ? reason.textContent : '',
          reasonVisible: reason && !reason.hidden ? reason.lastChild.textContent : '',
          translated: seg.classList.contains('translated'), untranslated: seg.classList.contains('untranslated')};
};
const exported = () => transcript.finals().map((f) => f.text);
"""


@pytest.mark.browser
def test_a_translation_cut_off_by_its_captioner_leaving_is_neither_shown_nor_exported_as_final():
    """The original's final came, its translated final did not: the interim translation ("das Budget
    ist") may say the opposite of the final ("not approved"). The original serves, marked as not
    translated because the translation was cut off, at once and still 5 s later."""
    out = run_in_page(TRANSCRIPT_JS + """
        say('SG_1', 'good morning');
        translate('SG_1', 'guten Morgen');
        say('SG_2', 'the budget is', false);
        translate('SG_2', 'das Budget ist', false);
        say('SG_2', 'the budget is not approved');
        const before = line(1);
        transcript.interrupt('agent-1');
        const cut = line(1);
        await tick(T.TRANSLATION_WAIT_MS + 1000);
        return {before, cut, later: line(1), first: line(0), exported: exported()};
    """)
    assert out["before"]["text"] == "das Budget ist" and out["before"]["interim"]  # an interim translation
    for state in (out["cut"], out["later"]):
        assert state["text"] == "the budget is not approved"
        assert not state["interim"] and state["ariaHidden"] is None, "settled: read out once"
        assert state["note"] and state["untranslated"] and not state["translated"]
        assert state["reason"] == "not translated: the translation was cut off"
    assert out["first"]["text"] == "guten Morgen" and not out["first"]["note"]
    assert out["exported"] == ["guten Morgen", "the budget is not approved"]


@pytest.mark.browser
def test_a_line_cut_off_with_its_translation_stays_as_it_was_and_is_not_exported():
    out = run_in_page(TRANSCRIPT_JS + """
        say('SG_1', 'the budget is', false);
        translate('SG_1', 'das Budget ist', false);
        transcript.interrupt('agent-1');
        await tick(T.TRANSLATION_WAIT_MS + 1000);
        return {line: line(0), interrupted: document.querySelector('.seg').classList.contains('interrupted'),
                exported: exported()};
    """)
    assert out["line"]["text"] == "das Budget ist" and out["line"]["interim"] and not out["line"]["note"]
    assert out["interrupted"] and out["exported"] == []


@pytest.mark.browser
def test_the_not_translated_note_says_why_in_plain_words_to_everyone():
    """Visible next to the badge and read out with it (the badge itself is aria-hidden, so that it
    is not read twice), not only in a hover title; the captioner's reasons are not shown as sent."""
    out = run_in_page(TRANSCRIPT_JS + """
        say('SG_1', 'one');
        translate('SG_1', 'one', true, 'timeout');
        say('SG_2', 'two');
        translate('SG_2', 'two', true, 'error: TranslationBacklogFull');
        say('SG_3', 'three');  // no translation comes
        const early = line(2);
        await tick(T.TRANSLATION_WAIT_MS + 100);
        const notes = [0, 1, 2].map(line);
        const title = document.querySelector('.untranslated-note').title;
        transcript.setLanguage('');
        return {early, notes, title, html: document.getElementById('captions').innerHTML};
    """)
    assert not out["early"]["note"]
    assert [n["reason"] for n in out["notes"]] == ["not translated: the translation came too late",
                                                 "not translated: the translation failed",
                                                 "not translated: the translation came too late"]
    assert [n["reasonVisible"] for n in out["notes"]] == ["the translation came too late", "the translation failed",
                                                        "the translation came too late"]
    assert all(n["noteText"] == "not translated" and n["noteAriaHidden"] == "true" for n in out["notes"])
    assert out["title"] == "Shown in the original language: the translation came too late."
    assert "Backlog" not in out["html"] and "not translated" not in out["html"], "originals: no notes"
