"""The viewer server without a browser: signed links, viewer tokens, what is served and what is not,
and the transcript export (web/export.js run by node)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from captions.cli import main as cli_main
from captions.live.transcripts import TranscriptStore, transcript_path
from captions.protocol import CaptionSigner, FinalSegment, caption_message
from captions.viewer.links import AccessDenied, check_access, sign_access, viewer_link
from captions.viewer.ratelimit import RateLimiter
from captions.viewer.server import WEB_DIR, WebSettings, check_web_dir, create_app, mint_viewer_token

API_SECRET = "api-secret-that-never-leaves-the-server"
VIEWER_SECRET = "viewer-link-secret"


def settings(**overrides) -> WebSettings:
    values = {"livekit_url": "ws://127.0.0.1:7880", "public_livekit_url": "wss://live.example.test",
                  "api_key": "key", "api_secret": API_SECRET, "viewer_secret": VIEWER_SECRET, "token_ttl_s": 3600}
    values.update(overrides)
    return WebSettings(**values)


def link_params(link: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(link).query).items()}


def decode(token: str) -> dict:
    return jwt.decode(token, API_SECRET, algorithms=["HS256"], options={"verify_aud": False})


# ---------------------------------------------------------------- signed links


def test_a_link_opens_exactly_its_room_until_it_expires():
    params = link_params(viewer_link("http://host:8080", VIEWER_SECRET, "standup", ttl_s=600))
    assert params["room"] == "standup"
    check_access(VIEWER_SECRET, "standup", params["exp"], params["access"])
    with pytest.raises(AccessDenied, match="not valid for this room"):
        check_access(VIEWER_SECRET, "board-meeting", params["exp"], params["access"])
    with pytest.raises(AccessDenied) as expired:
        check_access(VIEWER_SECRET, "standup", params["exp"], params["access"], now=int(params["exp"]) + 1)
    assert expired.value.reason == "expired"


@pytest.mark.parametrize("field, value", [("exp", "9999999999"), ("access", "0" * 64), ("access", "")])
def test_a_tampered_or_incomplete_link_is_refused(field, value):
    params = link_params(viewer_link("http://host", VIEWER_SECRET, "standup", ttl_s=600))
    params[field] = value
    with pytest.raises(AccessDenied):
        check_access(VIEWER_SECRET, "standup", params["exp"], params["access"])


def test_a_link_signed_with_another_secret_is_refused():
    expiry = int(time.time()) + 600
    with pytest.raises(AccessDenied):
        check_access(VIEWER_SECRET, "standup", str(expiry), sign_access("other-secret", "standup", expiry))


def test_captions_token_prints_a_link_the_server_accepts(capsys, monkeypatch):
    monkeypatch.setenv("CAPTIONS_VIEWER_SECRET", VIEWER_SECRET)
    assert cli_main(["token", "--room", "town hall", "--base-url", "https://captions.example.test",
                     "--link-ttl", "120"]) == 0
    link = capsys.readouterr().out.strip()
    assert link.startswith("https://captions.example.test/?")
    params = link_params(link)
    assert params["room"] == "town hall"
    assert 100 <= int(params["exp"]) - time.time() <= 120
    check_access(VIEWER_SECRET, "town hall", params["exp"], params["access"])


# ---------------------------------------------------------------- viewer tokens


def test_viewer_token_is_hidden_subscribe_only_for_one_room_and_short_lived():
    body = mint_viewer_token(settings(token_ttl_s=900), "standup")
    claims = decode(body["token"])
    video = claims["video"]
    assert video["room"] == "standup" and video["roomJoin"] is True
    assert video["hidden"] is True and video["canSubscribe"] is True
    assert video["canPublish"] is False
    assert video["canPublishData"] is False, "a viewer link's holder could put data into the room"
    assert not video.get("roomAdmin") and not video.get("roomCreate") and not video.get("canUpdateOwnMetadata")
    assert claims["sub"].startswith("viewer-") and claims["sub"] == body["identity"]
    assert 890 <= claims["exp"] - time.time() <= 900
    assert body["url"] == "wss://live.example.test"


def test_viewer_token_never_outlives_the_link():
    body = mint_viewer_token(settings(token_ttl_s=3600), "standup", link_expiry=int(time.time()) + 60)
    assert decode(body["token"])["exp"] - time.time() <= 60


def test_each_viewer_gets_its_own_identity():
    identities = {mint_viewer_token(settings(), "standup")["identity"] for _ in range(5)}
    assert len(identities) == 5


# ---------------------------------------------------------------- the HTTP server


@pytest_asyncio.fixture(loop_scope="function")
async def client(request):
    app = create_app(settings(**getattr(request, "param", {})))
    async with TestClient(TestServer(app)) as client:
        yield client


async def test_server_mints_a_token_for_a_valid_link_only(client):
    params = link_params(viewer_link("http://x", VIEWER_SECRET, "standup", ttl_s=600))
    response = await client.get("/api/token", params=params)
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    text = await response.text()
    assert API_SECRET not in text and VIEWER_SECRET not in text
    body = json.loads(text)
    assert decode(body["token"])["video"]["room"] == "standup"

    other_room = dict(params, room="board-meeting")
    response = await client.get("/api/token", params=other_room)
    assert response.status == 403
    assert (await response.json())["reason"] == "invalid"

    response = await client.get("/api/token", params={"room": "standup"})
    assert response.status == 403
    assert "no access signature" in (await response.json())["error"]

    response = await client.get("/api/token")
    assert response.status == 400


async def test_server_says_when_a_link_has_expired(client):
    expiry = int(time.time()) - 1
    params = {"room": "standup", "exp": str(expiry), "access": sign_access(VIEWER_SECRET, "standup", expiry)}
    response = await client.get("/api/token", params=params)
    assert response.status == 403
    body = await response.json()
    assert body["reason"] == "expired" and "expired" in body["error"]


async def test_tokens_are_rate_limited_per_link_and_per_address_with_a_clear_answer(client):
    params = link_params(viewer_link("http://x", VIEWER_SECRET, "standup", ttl_s=600))
    statuses = [(await client.get("/api/token", params=params)).status for _ in range(12)]
    assert statuses[:10] == [200] * 10 and statuses[-1] == 429, statuses
    response = await client.get("/api/token", params=params)
    assert response.status == 429 and int(response.headers["Retry-After"]) >= 1
    body = await response.json()
    assert body["reason"] == "rate_limited" and "try again in" in body["error"]
    # Other links from the same address still work until the address's own budget runs out.
    other = link_params(viewer_link("http://x", VIEWER_SECRET, "board", ttl_s=600))
    statuses = [(await client.get("/api/token", params=other)).status for _ in range(10)]
    assert 200 in statuses and statuses[-1] == 429, statuses


@pytest.mark.parametrize("client", [{"behind_proxy": True}], indirect=True)
async def test_behind_a_proxy_each_client_address_has_its_own_budget(client):
    def link(room: str) -> dict:
        return link_params(viewer_link("http://x", VIEWER_SECRET, room, ttl_s=600))

    first = [(await client.get("/api/token", params=link(f"r{n}"), headers={"X-Forwarded-For": "203.0.113.7"})).status
             for n in range(22)]
    assert first[-1] == 429
    other = await client.get("/api/token", params=link("r-other"), headers={"X-Forwarded-For": "198.51.100.9"})
    assert other.status == 200


def test_rate_limiter_refills_over_time_and_forgets_idle_keys():
    now = [0.0]
    limiter = RateLimiter(per_minute=6, burst=2, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(2)] == [0.0, 0.0]
    assert limiter.take("a") == pytest.approx(10.0)  # 6 a minute: one every 10 s
    now[0] += 10.0
    assert limiter.take("a") == 0.0
    assert limiter.take("b") == 0.0, "keys do not share a budget"


@pytest.fixture
def transcripts(tmp_path) -> Path:
    store = TranscriptStore(transcript_path(tmp_path, "standup"))
    now = time.time()
    for n, text in enumerate(["<b>earlier</b>", "now"]):
        store.append(FinalSegment(f"SG_{n}", "alice", "Alice <i>", "TR_1", text, now - 10 + n, now - 9 + n, []))
    store.close()
    return tmp_path


async def test_backlog_is_served_for_a_valid_link_of_its_room_only(transcripts):
    async with TestClient(TestServer(create_app(settings(data_dir=transcripts)))) as client:
        params = link_params(viewer_link("http://x", VIEWER_SECRET, "standup", ttl_s=600))
        response = await client.get("/api/backlog", params=params)
        assert response.status == 200 and response.headers["Cache-Control"] == "no-store"
        body = await response.json()
        assert [(s["segment_id"], s["text"], s["participant_name"]) for s in body["segments"]] == [
            ("SG_0", "<b>earlier</b>", "Alice <i>"), ("SG_1", "now", "Alice <i>")]
        for bad in ({**params, "room": "board"}, {**params, "access": "0" * 64}, {**params, "exp": "9999999999"},
                    {"room": "standup"}):
            assert (await client.get("/api/backlog", params=bad)).status == 403, bad
        assert (await client.get("/api/backlog", params={**params, "room": "../standup"})).status == 403
        # Invalid requests spend the budget too (no guessing links at full speed): 6 at once.
        response = await client.get("/api/backlog", params=params)
        assert response.status == 429 and (await response.json())["reason"] == "rate_limited"


async def test_backlog_of_an_expired_link_says_so(transcripts):
    async with TestClient(TestServer(create_app(settings(data_dir=transcripts)))) as client:
        expiry = int(time.time()) - 1
        expired = {"room": "standup", "exp": str(expiry), "access": sign_access(VIEWER_SECRET, "standup", expiry)}
        response = await client.get("/api/backlog", params=expired)
        assert response.status == 403 and (await response.json())["reason"] == "expired"


async def test_backlog_without_access_to_the_transcripts_says_so(tmp_path):
    async with TestClient(TestServer(create_app(settings(data_dir=None)))) as client:
        params = link_params(viewer_link("http://x", VIEWER_SECRET, "standup", ttl_s=600))
        response = await client.get("/api/backlog", params=params)
        assert response.status == 404 and (await response.json())["reason"] == "no_backlog"


@pytest.mark.parametrize("client", [{"open_access": True}], indirect=True)
async def test_open_mode_lets_any_room_be_viewed(client):
    response = await client.get("/api/token", params={"room": "any-room"})
    assert response.status == 200
    assert decode((await response.json())["token"])["video"]["room"] == "any-room"
    assert (await (await client.get("/healthz")).json()) == {"status": "ok", "open_access": True}


async def test_page_and_scripts_are_served_locally_with_a_strict_policy(client):
    response = await client.get("/")
    assert response.status == 200
    html = await response.text()
    assert 'src="app.js"' in html and "aria-live" in html
    assert "http" not in html.replace('http-equiv', '')  # nothing from outside this server
    policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "wss://live.example.test" in policy
    assert response.headers["Referrer-Policy"] == "no-referrer"
    for path in ("/app.js", "/export.js", "/style.css", "/vendor/livekit-client.esm.mjs"):
        response = await client.get(path)
        assert response.status == 200, path
    vendor = await client.get("/vendor/livekit-client.esm.mjs")
    assert vendor.headers["Content-Type"].startswith("text/javascript")
    config = await (await client.get("/api/config")).json()
    assert config == {"livekit_url": "wss://live.example.test"}


@pytest.mark.parametrize("path", [
    "/package.json", "/package-lock.json", "/node_modules/livekit-client/package.json",
    "/..%2Fagent%2Fweb.py", "/%2e%2e/pyproject.toml", "/missing.js",
])
async def test_nothing_but_the_viewer_files_is_served(client, path):
    response = await client.get(path)
    assert response.status == 404


def test_missing_node_modules_is_a_clear_error(tmp_path, capsys, monkeypatch):
    with pytest.raises(RuntimeError, match=r"run `npm ci` in web/"):
        check_web_dir(tmp_path)
    monkeypatch.setattr("captions.viewer.server.WEB_DIR", tmp_path)
    assert cli_main(["web", "--port", "1"]) == 1
    assert "npm ci" in capsys.readouterr().err


def test_open_mode_comes_from_the_environment(monkeypatch):
    import argparse

    from captions.viewer.server import configure_web_parser

    monkeypatch.setenv("CAPTIONS_WEB_OPEN", "1")
    parser = argparse.ArgumentParser()
    configure_web_parser(parser)
    assert parser.parse_args([]).open is True
    monkeypatch.setenv("CAPTIONS_WEB_OPEN", "0")
    parser = argparse.ArgumentParser()
    configure_web_parser(parser)
    assert parser.parse_args([]).open is False
    assert parser.parse_args(["--open"]).open is True


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
