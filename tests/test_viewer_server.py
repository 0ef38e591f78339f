"""The viewer server without a browser: signed links, revocation, viewer tokens, rate limits, the
backlog, and what is served and what is not (issue 22: a captions link shows captions and nothing
else). The same links against a real livekit-server: test_viewer_access.py."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import jwt
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from captions.cli import main as cli_main
from captions.live.transcripts import TranscriptStore, recent_segments, transcript_path
from captions.protocol import CaptionSigner, FinalSegment
from captions.viewer.backlog import BacklogCache
from captions.viewer.links import AccessDenied, Link, check_link, make_link, viewer_link
from captions.viewer.ratelimit import RateLimiter
from captions.viewer.relay import encode
from captions.viewer.revocations import Revocations, append
from captions.viewer.server import WebSettings, check_web_dir, create_app, relay_token

API_SECRET = "api-secret-that-never-leaves-the-server"
VIEWER_SECRET = "viewer-link-secret"


def settings(**overrides) -> WebSettings:
    values = {"livekit_url": "ws://127.0.0.1:7880", "api_key": "key", "api_secret": API_SECRET,
              "viewer_secret": VIEWER_SECRET}
    values.update(overrides)
    return WebSettings(**values)


def link_params(link: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(link).query).items()}


def a_link(room: str = "standup", ttl_s: int = 600, **kwargs) -> dict[str, str]:
    return {"link": make_link(VIEWER_SECRET, room, ttl_s, **kwargs)}


def decode(token: str) -> dict:
    return jwt.decode(token, API_SECRET, algorithms=["HS256"], options={"verify_aud": False})


# ---------------------------------------------------------------- signed links


def test_a_link_opens_exactly_its_room_until_it_expires():
    token = link_params(viewer_link("http://host:8080", VIEWER_SECRET, "standup", ttl_s=600))["link"]
    link = check_link(VIEWER_SECRET, token)
    assert link.room == "standup" and link.link_id
    with pytest.raises(AccessDenied) as expired:
        check_link(VIEWER_SECRET, token, now=link.expires_at)
    assert expired.value.reason == "expired"


def forged(claims: dict, secret: str = VIEWER_SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


@pytest.mark.parametrize("case", ["other secret", "alg none", "no jti", "no room", "wrong audience", "room as list",
                                  "exp as string", "tampered payload", "control characters", "huge"])
def test_a_forged_tampered_or_incomplete_link_is_refused(case):
    now = int(time.time())
    good = {"aud": "captions-viewer", "room": "standup", "iat": now, "exp": now + 600, "jti": "abc"}
    token = {
        "other secret": lambda: forged(good, secret="other-secret"),
        "alg none": lambda: forged(good, secret="", algorithm="none"),
        "no jti": lambda: forged({k: v for k, v in good.items() if k != "jti"}),
        "no room": lambda: forged({k: v for k, v in good.items() if k != "room"}),
        "wrong audience": lambda: forged({**good, "aud": "someone-else"}),
        "room as list": lambda: forged({**good, "room": ["standup"]}),
        "exp as string": lambda: forged({**good, "exp": str(now + 600)}),
        "tampered payload": lambda: ".".join([(p := forged(good).split("."))[0],
                                              forged({**good, "room": "board"}).split(".")[1], p[2]]),
        "control characters": lambda: forged({**good, "room": "stand\nup"}),
        "huge": lambda: forged({**good, "pad": "x" * 4000}),
    }[case]()
    with pytest.raises(AccessDenied) as refused:
        check_link(VIEWER_SECRET, token)
    assert refused.value.reason == "invalid"


def test_a_link_made_on_a_machine_whose_clock_is_a_little_ahead_works_at_once():
    link = check_link(VIEWER_SECRET, make_link(VIEWER_SECRET, "standup", 600, now=time.time() + 30))
    assert link.room == "standup"


def test_captions_token_prints_a_link_the_server_accepts(capsys, monkeypatch):
    monkeypatch.setenv("CAPTIONS_VIEWER_SECRET", VIEWER_SECRET)
    assert cli_main(["token", "--room", "town hall", "--base-url", "https://captions.example.test",
                     "--link-ttl", "120", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["url"].startswith("https://captions.example.test/?link=")
    link = check_link(VIEWER_SECRET, link_params(printed["url"])["link"])
    assert link.room == "town hall" and link.link_id == printed["link_id"]
    assert 100 <= link.expires_at - time.time() <= 120


# ---------------------------------------------------------------- revocation


def test_revoking_a_link_ends_that_link_only_and_revoking_a_room_ends_its_links_so_far(tmp_path, capsys,
                                                                                       monkeypatch):
    monkeypatch.setenv("CAPTIONS_VIEWER_SECRET", VIEWER_SECRET)
    path = tmp_path / "revoked.ndjson"
    revocations = Revocations(path, recheck_s=0)
    leaked, kept = (check_link(VIEWER_SECRET, make_link(VIEWER_SECRET, "standup", 600)) for _ in range(2))
    other_room = check_link(VIEWER_SECRET, make_link(VIEWER_SECRET, "board", 600))
    url = f"http://viewer.example.test/?link={quote(make_link(VIEWER_SECRET, 'standup', 600, link_id=leaked.link_id))}"
    assert cli_main(["revoke", "--link", url, "--revocations", str(path)]) == 0
    assert revocations.is_revoked(leaked) and not revocations.is_revoked(kept)
    assert cli_main(["revoke", "--room", "standup", "--revocations", str(path)]) == 0
    assert revocations.is_revoked(kept) and not revocations.is_revoked(other_room)
    later = Link("standup", "made-later", int(time.time()) + 1, int(time.time()) + 600)
    assert not revocations.is_revoked(later), "a link made after the room's revocation works"
    assert cli_main(["revoke", "--link", make_link("other-secret", "standup", 600), "--revocations",
                     str(path)]) == 2, "only links of this deployment can be named"
    assert "not a link of this deployment" in capsys.readouterr().err


def test_a_damaged_revocation_list_keeps_its_good_lines(tmp_path):
    path = tmp_path / "revoked.ndjson"
    link = check_link(VIEWER_SECRET, make_link(VIEWER_SECRET, "standup", 600))
    path.write_text('{"link_id": 5\nnot json\n[1, 2]\n{"link_id": "x", "until": 1e999}\n{"room": "r", "before": NaN}\n')
    append(path, {"link_id": link.link_id, "until": link.expires_at})
    assert Revocations(path, recheck_s=0).is_revoked(link)


# ---------------------------------------------------------------- live captions (the relay faked)


class FakeRelay:
    """What the server asks of a room's relay (relay.py): a queue of messages per viewer."""

    def __init__(self, messages: list[dict]) -> None:
        self.messages = messages
        self.viewers: dict = {}

    def add_viewer(self, language: str = ""):
        queue = asyncio.Queue()
        for message in self.messages:
            queue.put_nowait(encode(message))
        self.viewers[queue] = language
        return queue

    def remove_viewer(self, queue) -> None:
        self.viewers.pop(queue, None)


class FakeRelays:
    def __init__(self, messages: list[dict] | None = None) -> None:
        self.rooms: dict[str, FakeRelay] = {}
        self.messages = messages or []

    def relay(self, room: str) -> FakeRelay:
        return self.rooms.setdefault(room, FakeRelay(self.messages))

    async def aclose(self) -> None:
        pass


CAPTION = {"type": "caption", "id": "S1", "sender": "alice", "attributes": {"lk.segment_id": "SG_1"}, "text": "hi"}


def live_app(tmp_path, relays: FakeRelays | None = None, **overrides):
    return create_app(settings(data_dir=tmp_path, **overrides), relays=relays or FakeRelays([CAPTION]))


async def test_live_captions_come_with_the_pools_key_and_the_servers_clock_and_nothing_else(tmp_path):
    relays = FakeRelays([{"type": "room", "room": "standup", "participants": []}, CAPTION])
    async with TestClient(TestServer(live_app(tmp_path, relays, agent_name="captions-eu"))) as client:
        ws = await client.ws_connect("/api/live", params=a_link())
        hello = await ws.receive_json(timeout=5)
        assert hello["type"] == "hello" and hello["room"] == "standup"
        assert hello["caption_key"] == CaptionSigner.for_deployment(API_SECRET, "captions-eu").public_key
        assert abs(hello["server_time_ms"] - time.time() * 1000) < 5000
        assert (await ws.receive_json(timeout=5))["type"] == "room"
        assert await ws.receive_json(timeout=5) == CAPTION
        assert set(relays.rooms) == {"standup"}, "the link's room, and no other"
        await ws.close()
        await asyncio.sleep(0.1)
        assert not relays.rooms["standup"].viewers, "a viewer that left is forgotten"


@pytest.mark.parametrize("query, code", [
    ({}, 4400),
    ({"link": forged({"room": "standup"}, "another-secret")}, 4403),
    ({"link": make_link(VIEWER_SECRET, "standup", 600, now=time.time() - 700)}, 4401),
])
async def test_a_refused_link_gets_a_closed_socket_that_says_why(tmp_path, query, code):
    relays = FakeRelays([CAPTION])
    async with TestClient(TestServer(live_app(tmp_path, relays))) as client:
        ws = await client.ws_connect("/api/live", params=query)
        message = await ws.receive(timeout=5)
        assert message.type.name == "CLOSE" and ws.close_code == code, (message, ws.close_code)
        assert not relays.rooms, "no room is opened for a refused link"


async def test_a_live_viewer_is_cut_off_when_its_link_expires(tmp_path):
    async with TestClient(TestServer(live_app(tmp_path))) as client:
        link = make_link(VIEWER_SECRET, "standup", 2)
        ws = await client.ws_connect("/api/live", params={"link": link})
        expires_at = check_link(VIEWER_SECRET, link).expires_at
        while (message := await ws.receive(timeout=5)).type.name == "TEXT":
            pass
        assert ws.close_code == 4401 and "expired" in message.extra
        assert time.time() - expires_at < 1.5, "cut off within a second of its expiry"


async def test_a_live_viewer_is_cut_off_when_its_link_is_revoked(tmp_path):
    async with TestClient(TestServer(live_app(tmp_path))) as client:
        params = a_link()
        ws = await client.ws_connect("/api/live", params=params)
        assert (await ws.receive_json(timeout=5))["type"] == "hello"
        append(tmp_path / "revoked-links.ndjson", {"link_id": check_link(VIEWER_SECRET, params["link"]).link_id,
                                                   "until": int(time.time()) + 600})
        revoked_at = time.monotonic()
        while (await ws.receive(timeout=5)).type.name == "TEXT":
            pass
        assert ws.close_code == 4410 and time.monotonic() - revoked_at < 3.0


async def test_a_viewer_that_sends_anything_is_disconnected(tmp_path):
    async with TestClient(TestServer(live_app(tmp_path))) as client:
        ws = await client.ws_connect("/api/live", params=a_link())
        await ws.send_str(json.dumps(CAPTION))
        while (await ws.receive(timeout=5)).type.name == "TEXT":
            pass
        assert ws.close_code == 1008


def test_the_relay_is_captions_only_and_hidden_unless_the_operator_shows_it():
    video = decode(relay_token(settings(), "standup"))["video"]
    assert video["room"] == "standup" and video["roomJoin"] is True
    assert video["canSubscribe"] is False, "the relay could listen to the meeting"
    assert video["canPublish"] is False and video["canPublishData"] is False
    assert video["hidden"] is True
    assert not video.get("roomAdmin") and not video.get("roomCreate") and not video.get("canUpdateOwnMetadata")
    assert decode(relay_token(settings(viewers_visible=True), "standup"))["video"].get("hidden") in (False, None)


# ---------------------------------------------------------------- the HTTP server


@pytest_asyncio.fixture(loop_scope="function")
async def client(request, tmp_path):
    app = create_app(settings(**{"data_dir": tmp_path, **getattr(request, "param", {})}), relays=FakeRelays())
    async with TestClient(TestServer(app)) as client:
        yield client


async def test_live_captions_are_opened_for_a_valid_link_only(client):
    response = await client.get("/api/live", params=a_link())
    assert response.status == 426, "a valid link: open it as a WebSocket"
    text = await response.text()
    assert API_SECRET not in text and VIEWER_SECRET not in text
    response = await client.get("/api/live", params={"link": forged({"room": "standup"}, "other")})
    assert response.status == 403 and (await response.json())["reason"] == "invalid"
    response = await client.get("/api/live", params={"room": "standup"})
    assert response.status == 400 and (await response.json())["reason"] == "missing"
    assert (await client.get("/api/token", params=a_link())).status == 404, "no LiveKit token for a link"


async def test_server_says_when_a_link_has_expired_or_was_revoked(client, tmp_path):
    response = await client.get("/api/live", params=a_link(now=time.time() - 700))
    body = await response.json()
    assert response.status == 403 and body["reason"] == "expired" and "expired" in body["error"]
    params = a_link()
    append(tmp_path / "revoked-links.ndjson", {"link_id": check_link(VIEWER_SECRET, params["link"]).link_id,
                                               "until": int(time.time()) + 600})
    await asyncio.sleep(1.05)  # the list is re-read at most once a second
    for path in ("/api/live", "/api/backlog"):
        response = await client.get(path, params=params)
        body = await response.json()
        assert response.status == 403 and body["reason"] == "revoked", path


async def test_tokens_are_rate_limited_per_link_and_per_address_with_a_clear_answer(client):
    params = a_link()
    statuses = [(await client.get("/api/live", params=params)).status for _ in range(12)]
    assert statuses[:10] == [426] * 10 and statuses[-1] == 429, statuses
    response = await client.get("/api/live", params=params)
    assert response.status == 429 and int(response.headers["Retry-After"]) >= 1
    body = await response.json()
    assert body["reason"] == "rate_limited" and "try again in" in body["error"]
    # Other links from the same address still work until the address's own budget runs out.
    other = a_link("board")
    statuses = [(await client.get("/api/live", params=other)).status for _ in range(10)]
    assert 426 in statuses and statuses[-1] == 429, statuses


def respellings(token: str) -> list[str]:
    """Query strings that all carry the same link: percent-escapes, extra and repeated parameters (the
    old link format's fields, an `exp` with a sign and leading zeros), a whitespace-padded copy."""
    return [
        f"link={token}",
        f"link={quote(token, safe='')}".replace("%2E", "%2e"),
        f"link={token}&room=board&exp=+0099999999999&access=x",
        f"x=1&link={token}&link=other",
        f"link=%20{token}%0A",
        "link=" + "".join(f"%{ord(c):02X}" for c in token),
    ]


@pytest.mark.parametrize("client", [{"behind_proxy": True}], indirect=True)
async def test_every_spelling_of_one_link_shares_one_budget(client):
    token = make_link(VIEWER_SECRET, "standup", 600)
    statuses = []
    for n in range(12):
        query = respellings(token)[n % 6]
        # Each from its own address: only the per-link budget can refuse them.
        statuses.append((await client.get(f"/api/live?{query}", headers={"X-Forwarded-For": f"198.51.100.{n}"})).status)
    assert statuses[:10] == [426] * 10 and statuses[10:] == [429, 429], statuses


@pytest.mark.parametrize("client", [{"behind_proxy": True}], indirect=True)
async def test_behind_a_proxy_each_client_address_has_its_own_budget(client):
    first = [(await client.get("/api/live", params=a_link(f"r{n}"), headers={"X-Forwarded-For": "203.0.113.7"})).status
             for n in range(22)]
    assert first[-1] == 429
    other = await client.get("/api/live", params=a_link("r-other"), headers={"X-Forwarded-For": "198.51.100.9"})
    assert other.status == 426


async def test_a_flood_of_bad_links_spends_only_its_addresses_budget(client):
    statuses = [(await client.get("/api/live", params={"link": f"garbage-{n}"})).status for n in range(25)]
    assert statuses[:20] == [403] * 20 and statuses[-1] == 429, statuses


def test_rate_limiter_refills_over_time_and_forgets_idle_keys():
    now = [0.0]
    limiter = RateLimiter(per_minute=6, burst=2, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(2)] == [0.0, 0.0]
    assert limiter.take("a") == pytest.approx(10.0)  # 6 a minute: one every 10 s
    now[0] += 10.0
    assert limiter.take("a") == 0.0
    assert limiter.take("b") == 0.0, "keys do not share a budget"


# ---------------------------------------------------------------- backlog


ROOMS = ["standup", "会議室" * 42, "<b>town hall</b> & \"friends\"", ".hidden", "../../etc/passwd"]


@pytest.fixture
def transcripts(tmp_path) -> Path:
    now = time.time()
    for room in ROOMS:
        store = TranscriptStore(transcript_path(tmp_path, room))
        for n, text in enumerate(["<b>earlier</b>", "now"]):
            store.append(FinalSegment(f"SG_{n}", "alice", "Alice <i>", "TR_1", f"{text} {room[:8]}", now - 10 + n,
                                      now - 9 + n, []))
        store.close()
    return tmp_path


@pytest.mark.parametrize("room", ROOMS)
async def test_backlog_is_served_for_a_valid_link_of_its_room_only(transcripts, room):
    async with TestClient(TestServer(create_app(settings(data_dir=transcripts)))) as client:
        response = await client.get("/api/backlog", params=a_link(room))
        assert response.status == 200 and response.headers["Cache-Control"] == "no-store"
        body = await response.json()
        assert [(s["segment_id"], s["text"], s["participant_name"]) for s in body["segments"]] == [
            ("SG_0", f"<b>earlier</b> {room[:8]}", "Alice <i>"), ("SG_1", f"now {room[:8]}", "Alice <i>")]


async def test_backlogs_are_limited_per_link_and_read_once_while_the_file_is_unchanged(tmp_path):
    backlogs = BacklogCache(recent_segments)
    async with TestClient(TestServer(create_app(settings(data_dir=tmp_path, behind_proxy=True), backlogs))) as client:
        await _backlogs_are_limited_and_cached(client, backlogs, tmp_path)


async def _backlogs_are_limited_and_cached(client, backlogs, tmp_path):
    store = TranscriptStore(transcript_path(tmp_path, "standup"))
    store.append(FinalSegment("SG_0", "alice", "Alice", "TR_1", "hello", time.time() - 5, time.time() - 4, []))
    params = a_link()
    statuses = [(await client.get("/api/backlog", params=params, headers={"X-Forwarded-For": f"192.0.2.{n}"})).status
                for n in range(8)]
    assert statuses[:6] == [200] * 6 and statuses[-1] == 429, statuses
    assert backlogs.reads == 1, "an unchanged transcript is read once"
    store.append(FinalSegment("SG_1", "alice", "Alice", "TR_1", "again", time.time() - 3, time.time() - 2, []))
    store.close()
    response = await client.get("/api/backlog", params=a_link(), headers={"X-Forwarded-For": "192.0.2.99"})
    assert [s["text"] for s in (await response.json())["segments"]] == ["hello", "again"], "a new final is seen"


async def test_backlog_without_access_to_the_transcripts_says_so():
    async with TestClient(TestServer(create_app(settings(data_dir=None)))) as client:
        response = await client.get("/api/backlog", params=a_link())
        assert response.status == 404 and (await response.json())["reason"] == "no_backlog"


# ---------------------------------------------------------------- what is served


@pytest.mark.parametrize("client", [{"open_access": True}], indirect=True)
async def test_open_mode_lets_any_room_be_viewed(client):
    ws = await client.ws_connect("/api/live", params={"room": "any-room"})
    assert (await ws.receive_json(timeout=5))["room"] == "any-room"
    await ws.close()
    assert (await (await client.get("/healthz")).json()) == {"status": "ok", "open_access": True}


async def test_page_and_scripts_are_served_locally_with_a_strict_policy(client):
    response = await client.get("/")
    assert response.status == 200
    html = await response.text()
    assert 'src="app.js"' in html and "aria-live" in html
    assert "http" not in html.replace('http-equiv', '')  # nothing from outside this server
    policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "connect-src 'self';" in policy, "the page connects only here"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    for path in ("/app.js", "/export.js", "/style.css", "/vendor/livekit-client.esm.mjs"):
        response = await client.get(path)
        assert response.status == 200, path
    vendor = await client.get("/vendor/livekit-client.esm.mjs")
    assert vendor.headers["Content-Type"].startswith("text/javascript")
    config = await (await client.get("/api/config")).json()
    assert config["caption_key"] == CaptionSigner.for_deployment(API_SECRET, "").public_key


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


async def test_open_live_connections_are_bounded_per_link(tmp_path, monkeypatch):
    """Opening is rate limited; keeping open is bounded too (a link, an address, the server)."""
    from captions.viewer import ratelimit

    monkeypatch.setattr(ratelimit, "MAX_LIVE_PER_LINK", 2)
    async with TestClient(TestServer(live_app(tmp_path))) as client:
        params = a_link()
        first, second = [await client.ws_connect("/api/live", params=params) for _ in range(2)]
        for ws in (first, second):
            assert (await ws.receive_json(timeout=5))["type"] == "hello"
        third = await client.ws_connect("/api/live", params=params)
        assert (await third.receive(timeout=5)).type.name == "CLOSE" and third.close_code == 4429
        await first.close()
        await asyncio.sleep(0.2)
        again = await client.ws_connect("/api/live", params=params)
        assert (await again.receive_json(timeout=5))["type"] == "hello", "a closed one frees its place"


# ---------------------------------------------------------------- translations (issue 26)


def test_the_languages_come_from_the_workers_setting_and_only_language_codes_pass(monkeypatch):
    import argparse

    from captions.viewer.server import configure_web_parser, settings_from_args

    def parsed(*argv: str):
        parser = argparse.ArgumentParser()
        configure_web_parser(parser)
        return settings_from_args(parser.parse_args(list(argv))).translate_to

    assert parsed() == ()
    monkeypatch.setenv("CAPTIONS_TRANSLATE_TO", "de, AR,pt_BR,de")
    assert parsed() == ("de", "ar", "pt-br")
    assert parsed("--translate-to", "fr") == ("fr",)
    monkeypatch.setenv("CAPTIONS_TRANSLATE_TO", "de,<script>")
    with pytest.raises(SystemExit, match="CAPTIONS_TRANSLATE_TO"):
        parsed()


@pytest.mark.parametrize("client", [{"translate_to": ("de", "ar")}], indirect=True)
async def test_a_viewer_reads_a_configured_language_or_nothing(client):
    """`lang` must be one of --translate-to's: anything else is refused with a reason (HTTP 400, or
    WebSocket close 4422), before any relay is opened."""
    assert (await (await client.get("/api/config")).json())["languages"] == ["de", "ar"]
    ws = await client.ws_connect("/api/live", params={**a_link(), "lang": "ar"})
    hello = await ws.receive_json(timeout=5)
    assert hello["type"] == "hello" and hello["language"] == "ar"
    await ws.close()
    for lang in ("xx", "../de", "de,ar", "d" * 5000, "de\x00"):
        ws = await client.ws_connect("/api/live", params={**a_link(), "lang": lang})
        message = await ws.receive(timeout=5)
        assert message.type.name == "CLOSE" and ws.close_code == 4422, lang
        assert "not translated into" in message.extra and len(message.extra) < 120
        response = await client.get("/api/backlog", params={**a_link(), "lang": lang})
        body = await response.json()
        assert response.status == 400 and body["reason"] == "language" and "de, ar" in body["error"], lang
    response = await client.get("/api/backlog", params={**a_link(), "lang": "DE"})
    assert response.status == 200, "the workers' spelling: lower case"


async def test_without_translation_no_language_is_offered_and_the_relay_sets_no_attributes(client):
    assert (await (await client.get("/api/config")).json())["languages"] == []
    ws = await client.ws_connect("/api/live", params={**a_link(), "lang": "de"})
    await ws.receive(timeout=5)
    assert ws.close_code == 4422
    assert not decode(relay_token(settings(), "standup"))["video"].get("canUpdateOwnMetadata")
    video = decode(relay_token(settings(translate_to=("de",)), "standup"))["video"]
    assert video["canUpdateOwnMetadata"] is True, "it says which languages its viewers read"
    assert video["canSubscribe"] is False and video["canPublish"] is False and video["canPublishData"] is False


async def test_the_backlog_holds_the_originals_and_the_readers_language_only(tmp_path):
    store = TranscriptStore(transcript_path(tmp_path, "standup"))
    now = time.time()
    store.append(FinalSegment("SG_0", "alice", "Alice", "TR_1", "hello", now - 5, now - 4, []))
    for language, text in (("de", "hallo"), ("ar", "مرحبا"), ("ar", "مرحبا 1"), ("ar", "مرحبا 2")):
        store.append(FinalSegment(f"SG_0~{language}", "alice", "Alice", "TR_1", text, now - 5, now - 4, [],
                                  language=language, translation_of="SG_0"))
    store.close()
    # At most 2 segments a backlog: other languages' translations must not take the German reader's places.
    backlogs = BacklogCache(functools.partial(recent_segments, limit=2))
    app = create_app(settings(data_dir=tmp_path, translate_to=("de", "ar")), backlogs, relays=FakeRelays())
    async with TestClient(TestServer(app)) as client:
        texts = {}
        for lang in ("", "de", "ar"):
            response = await client.get("/api/backlog", params={**a_link(), "lang": lang})
            texts[lang] = [s["text"] for s in (await response.json())["segments"]]
    assert texts == {"": ["hello"], "de": ["hello", "hallo"], "ar": ["مرحبا 1", "مرحبا 2"]}


# The relay itself, without LiveKit: streams in, viewers' queues out.


class FakeStream:
    """A caption stream as livekit's TextStreamReader gives it to the relay."""

    def __init__(self, attributes: dict[str, str], text: str, stream_id: str = "S") -> None:
        from types import SimpleNamespace

        self.info = SimpleNamespace(attributes=attributes, stream_id=stream_id)
        self.text = text

    async def __aiter__(self):
        yield self.text

    def close(self) -> None:
        pass


class FakeParticipant:
    def __init__(self) -> None:
        self.attributes: dict[str, str] = {}
        self.updates: list[str] = []

    async def set_attributes(self, attributes: dict[str, str]) -> None:
        self.updates.append(attributes["captions.reading"])
        self.attributes.update(attributes)


def fake_relay(signer: CaptionSigner, languages=("de", "ar")):
    from types import SimpleNamespace

    from captions.viewer.relay import RoomRelay

    async def exists(room: str) -> bool:
        return True

    relay = RoomRelay("ws://unused", lambda: "", "standup", lambda relay: None, signer.public_key, exists, languages)
    relay._room = SimpleNamespace(local_participant=FakeParticipant(), remote_participants={})
    relay.connected.set()
    relay._task = asyncio.create_task(asyncio.sleep(3600))  # as if it had joined: add_viewer starts nothing
    return relay


def signed_stream(signer: CaptionSigner, segment: str, text: str, language: str = "", sign_as: str = "",
                  sent_ms: int | None = None) -> FakeStream:
    """An original (no `language`) or its translation, signed as what it is (or as `sign_as`)."""
    from captions.protocol import caption_message, translation_message, translation_segment_id

    sent_ms = int(time.time() * 1000) if sent_ms is None else sent_ms
    common = {"room": "standup", "agent": "agent-1", "speaker": "alice", "track_sid": "TR_1", "seq": 0,
              "final": True, "sent_ms": sent_ms, "text": text}
    attributes = {"lk.segment_id": segment, "lk.transcription_final": "true", "lk.transcribed_track_id": "TR_1",
                  "captions.agent": "agent-1", "captions.speaker": "alice", "captions.seq": "0",
                  "captions.sent": str(sent_ms), "captions.words": ""}
    if language:
        attributes.update({"lk.segment_id": translation_segment_id(segment, language), "language": language,
                           "translated": "true", "captions.source_segment": segment,
                           "captions.source_language": "en"})
    if (sign_as or ("translation" if language else "caption")) == "translation":
        message = translation_message(**common, segment_id=translation_segment_id(segment, language or "de"),
                                      source_segment=segment, source_language="en", language=language or "de",
                                      untranslated="")
    else:
        message = caption_message(**common, segment_id=attributes["lk.segment_id"], words="")
    return FakeStream({**attributes, "captions.sig": signer.sign(message), "note": "not forwarded"}, text)


def drained(queue: asyncio.Queue) -> list[str]:
    texts = []
    while not queue.empty():
        message = json.loads(queue.get_nowait())
        if message["type"] == "caption":
            texts.append(message["text"])
    return texts


async def test_the_relay_sends_each_viewer_the_originals_and_its_own_language_only():
    signer = CaptionSigner.for_deployment(API_SECRET, "")
    relay = fake_relay(signer)
    try:
        viewers = {lang: relay.add_viewer(lang) for lang in ("", "de", "ar")}
        unknown = relay.add_viewer("xx")  # the server refuses it; were it not, the originals only
        for stream in (signed_stream(signer, "SG_1", "hello"), signed_stream(signer, "SG_1", "hallo", "de"),
                       signed_stream(signer, "SG_1", "مرحبا", "ar"),
                       signed_stream(CaptionSigner(), "SG_2", "gefälscht", "de"),  # a key of its own
                       signed_stream(signer, "SG_3", "als Original signiert", "de", sign_as="caption"),
                       signed_stream(signer, "SG_4", "als Übersetzung signiert", "", sign_as="translation")):
            await relay._forward(stream, "alice\nalice")
        assert {lang: drained(queue) for lang, queue in viewers.items()} == {
            "": ["hello"], "de": ["hello", "hallo"], "ar": ["hello", "مرحبا"]}
        assert drained(unknown) == ["hello"]
        assert relay._unverified == 3, "a forged translation, and each signed as the other kind, dropped"
    finally:
        relay._task.cancel()


async def test_the_relay_says_which_configured_languages_its_viewers_read(monkeypatch):
    from captions.viewer import relay as relay_module

    monkeypatch.setattr(relay_module, "READING_UPDATE_S", 0.01)
    relay = fake_relay(CaptionSigner())
    participant = relay._room.local_participant

    async def settled() -> str:
        for _ in range(100):
            await asyncio.sleep(0.01)
            if relay._reading_task is None:
                break
        return participant.attributes.get("captions.reading", "")

    try:
        original = relay.add_viewer("")
        assert await settled() == "" and participant.updates == [], "nobody reads a translation: nothing set"
        german, arabic, other = relay.add_viewer("de"), relay.add_viewer("ar"), relay.add_viewer("de")
        relay.add_viewer("xx")  # not configured: never announced
        assert await settled() == "ar,de"
        relay.remove_viewer(german)
        assert await settled() == "ar,de", "another viewer still reads German"
        relay.remove_viewer(other)
        relay.remove_viewer(arabic)
        assert await settled() == "", "the last reader left: the attribute goes"
        assert len(participant.updates) <= 4, participant.updates
        relay.remove_viewer(original)
    finally:
        relay._task.cancel()
        if relay._idle_timer is not None:
            relay._idle_timer.cancel()


async def test_two_viewer_servers_tell_one_captioner_their_own_languages_without_overwriting(monkeypatch):
    """Each relay has its own ``captions.reading.<relay>`` entry on the captioner: before, two viewer
    servers in front of one room overwrote one attribute about twice a second, forever, and a quarter
    to a third of either's lines went untranslated. A failed server API call is tried again; a relay
    that leaves removes its entry; every entry expires unless renewed."""
    from types import SimpleNamespace

    from captions.protocol import ATTR_AGENT_CLAIM, ATTR_READING_FROM, READING_TTL_S, parse_reading_value
    from captions.viewer import relay as relay_module

    monkeypatch.setattr(relay_module, "READING_UPDATE_S", 0.01)
    monkeypatch.setattr(relay_module, "READING_RETRY_S", 0.05)
    signer = CaptionSigner()
    captioner = SimpleNamespace(identity="agent-1", name="", kind=4, joined_at=None,
                                attributes={ATTR_AGENT_CLAIM: signer.claim("standup", "agent-1")})
    calls, failures = [], [1]
    relays = []

    async def tell(room: str, identity: str, attributes: dict[str, str]) -> None:
        if failures[0]:
            failures[0] -= 1
            raise RuntimeError("server API hiccup")
        calls.append(dict(attributes))
        for key, value in attributes.items():
            if value:
                captioner.attributes[key] = value
            else:
                captioner.attributes.pop(key, None)
        for relay in relays:  # every relay sees the captioner's attributes change
            relay._on_attributes_changed(dict(attributes), captioner)

    for _ in range(2):
        relay = fake_relay(signer)
        relay._tell_captioner = tell
        relay._room.remote_participants = {"agent-1": captioner}
        relays.append(relay)
    try:
        german, arabic = relays[0].add_viewer("de"), relays[1].add_viewer("ar")
        await asyncio.sleep(0.5)
        snapshot = json.loads(german.get_nowait())
        assert not [k for p in snapshot["participants"] for k in p.get("attributes", {}) if "reading" in k]
        entries = {k: parse_reading_value(v) for k, v in captioner.attributes.items() if k.startswith(ATTR_READING_FROM)}
        assert sorted(languages for languages, _ in entries.values()) == ["ar", "de"], entries
        assert all(0 < expires - time.time() <= READING_TTL_S for _, expires in entries.values())
        assert len(calls) == 2, f"the relays kept overwriting each other: {calls}"
        relays[0].remove_viewer(german)
        await relays[0].aclose()
        assert [parse_reading_value(v)[0] for k, v in captioner.attributes.items()
                if k.startswith(ATTR_READING_FROM)] == ["ar"], "the relay that left still asks for German"
        relays[1].remove_viewer(arabic)
        messages = []
        while not german.empty():
            messages.append(german.get_nowait())
        assert "captions.reading" not in "".join(messages), "what others read is nobody's business"
    finally:
        for relay in relays:
            relay._task.cancel()
            if relay._idle_timer is not None:
                relay._idle_timer.cancel()
            await relay.aclose()
