"""What the viewer tests share: `captions web` as a subprocess, Chromium pages, and `CaptionAgentBot`,
a LiveKit participant of kind AGENT that publishes exactly what the caption agent publishes
(captions/protocol.py): signed ``lk.transcription`` streams (interim updates carrying the full text so
far, then the final one with ``captions.words``) with ``sender_identity`` = the speaker, signed with
the deployment's caption key (derived from the LiveKit API secret, as the worker's), its
``captions.status``/``captions.queued``/``captions.claim`` attributes, and each final appended to the
room's transcript file, which the viewer server reads for late viewers. That keeps the viewer tests
independent of the model."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio

from captions.dev.livekit_server import start_dev_server
from captions.dev.processes import free_port
from captions.live.transcripts import TranscriptStore, transcript_path
from captions.protocol import (
    ATTR_AGENT,
    ATTR_AGENT_CLAIM,
    ATTR_AGENT_QUEUED,
    ATTR_AGENT_STATUS,
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
    ATTR_UNTRANSLATED,
    ATTR_WORDS,
    TOPIC_TRANSCRIPTION,
    CaptionSigner,
    FinalSegment,
    caption_message,
    translation_message,
    translation_segment_id,
)
from captions.viewer.links import viewer_link
from captions.viewer.server import WEB_DIR

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = PROJECT_ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-features=WebRtcHideLocalIpsWithMdns",
]
WAIT_MS = 15000
# The page runs under a strict Content-Security-Policy (no eval): predicates for wait_for_function
# are always written as functions ("() => ..."), which Playwright calls without eval.


# ---------------------------------------------------------------- servers and browser


@dataclass
class WebServer:
    base_url: str
    secret: str
    process: subprocess.Popen
    data_dir: Path
    """The transcripts it serves to late viewers."""
    log_path: Path | None = None

    def link(self, room: str, ttl_s: int = 600, **extra: str) -> str:
        url = viewer_link(self.base_url, self.secret, room, ttl_s)
        return url + "".join(f"&{k}={v}" for k, v in extra.items())


def start_web_server(livekit_server, log_path: Path, data_dir: Path, secret: str = "viewer-test-secret",
                     extra_args: tuple[str, ...] = (), agent_name: str = "") -> WebServer:
    """`captions web` as a subprocess, in signed-link mode (not --open), up when /healthz answers. It
    vouches for the caption key of pool `agent_name` under the LiveKit API secret (the bot's, and
    the worker's by default)."""
    assert (WEB_DIR / "node_modules").is_dir(), "run `npm ci` in web/ first"
    port = free_port()
    command = [sys.executable, "-m", "captions.cli", "web", "--port", str(port), "--url", livekit_server.url,
               "--api-key", livekit_server.api_key, "--api-secret", livekit_server.api_secret,
               "--viewer-secret", secret, "--data-dir", str(data_dir),
               "--agent-name", agent_name, *extra_args]
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"captions web exited early, see {log_path}"
        try:
            urllib.request.urlopen(f"{base}/healthz", timeout=1).read()
            return WebServer(base, secret, proc, data_dir, log_path)
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"captions web did not come up, see {log_path}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def agentless_livekit(tmp_path_factory):
    """A livekit-server of this module's own where no caption worker ever registers: the tests that
    play the agent with a bot must not meet the session's real worker, which automatic dispatch
    sends into every new room of the shared server."""
    server = start_dev_server(tmp_path_factory.mktemp("agentless") / "livekit-server.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def agentless_web(agentless_livekit, tmp_path_factory) -> WebServer:
    directory = tmp_path_factory.mktemp("agentless-web")
    server = start_web_server(agentless_livekit, directory / "web.log", directory / "data")
    yield server
    stop(server.process)


@pytest.fixture(scope="module")
def translating_web(agentless_livekit, tmp_path_factory) -> WebServer:
    """`captions web --translate-to de,ar` (a bot plays the translating worker)."""
    directory = tmp_path_factory.mktemp("translating-web")
    server = start_web_server(agentless_livekit, directory / "web.log", directory / "data",
                              extra_args=("--translate-to", "de,ar"))
    yield server
    stop(server.process)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def browser():
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


@dataclass
class Viewer:
    page: object
    dialogs: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    """The page's console warnings."""


@pytest_asyncio.fixture(loop_scope="session")
async def open_viewer(browser):
    """Opens viewer pages in fresh contexts; records every dialog (nothing may ever pop one)."""
    contexts = []

    async def opener(url: str, width: int = 1100, height: int = 760, before_load=None) -> Viewer:
        context = await browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
        contexts.append(context)
        page = await context.new_page()
        viewer = Viewer(page)

        async def on_dialog(dialog):
            viewer.dialogs.append(dialog.message)
            await dialog.dismiss()

        page.on("dialog", on_dialog)
        page.on("pageerror", lambda error: viewer.errors.append(str(error)))
        page.on("console", lambda message: viewer.warnings.append(message.text)
                if message.type == "warning" else None)
        if before_load is not None:
            await before_load(page)
        await page.goto(url)
        return viewer

    yield opener
    for context in contexts:
        await context.close()


# ---------------------------------------------------------------- LiveKit bots


def token(server, identity: str, name: str, room: str, agent: bool = False, hidden: bool = False,
          can_publish_data: bool = True) -> str:
    from livekit import api

    grant = api.AccessToken(server.api_key, server.api_secret).with_identity(identity).with_name(name)
    if agent:
        grant = grant.with_kind("agent")
    # The agent sets its own attributes (captions.status), which needs can_update_own_metadata.
    grants = api.VideoGrants(room_join=True, room=room, agent=agent, can_update_own_metadata=agent, hidden=hidden,
                             can_publish_data=can_publish_data)
    return grant.with_grants(grants).to_jwt()


async def join(server, room_name: str, identity: str, name: str, agent: bool = False, **grants):
    from livekit import rtc

    room = rtc.Room()
    await room.connect(server.url, token(server, identity, name, room_name, agent, **grants))
    return room


class CaptionAgentBot:
    """Publishes signed captions the way the caption agent does, and writes the transcript file.
    `signer`: the deployment's caption key (what the viewer server vouches for), unless a test plays
    an impostor with a key of its own."""

    def __init__(self, room, names: dict[str, str], data_dir: Path | None, signer: CaptionSigner):
        self.room = room
        self.names = names
        self.signer = signer
        self.finals: list[FinalSegment] = []
        self.transcript = TranscriptStore(transcript_path(data_dir, room.name)) if data_dir else None
        self._seq: dict[str, int] = {}

    @classmethod
    async def start(cls, server, room_name: str, names: dict[str, str], status: str = "live",
                    data_dir: Path | None = None, identity: str = "captions-agent",
                    signer: CaptionSigner | None = None):
        room = await join(server, room_name, identity, "Captions", agent=True)
        bot = cls(room, names, data_dir, signer or CaptionSigner.for_deployment(server.api_secret, ""))
        await bot.set_status(status)
        return bot

    async def set_status(self, status: str, queued: list[str] | None = None, **extra: str) -> None:
        """Its status, and its claim to caption the room (as the worker sets them)."""
        identity = self.room.local_participant.identity
        await self.room.local_participant.set_attributes(
            {ATTR_AGENT_STATUS: status, ATTR_AGENT_QUEUED: json.dumps(queued or []),
             ATTR_AGENT_CLAIM: self.signer.claim(self.room.name, identity), **extra})

    def signed_attributes(self, speaker: str, segment_id: str, text: str, final: bool, words: str = "",
                          seq: int | None = None, sent_ms: int | None = None) -> dict[str, str]:
        """The attributes the agent sends with a caption, signed now (or at `sent_ms`)."""
        if seq is None:
            seq = self._seq.get(segment_id, 0)
            self._seq[segment_id] = seq + 1
        sent_ms = int(time.time() * 1000) if sent_ms is None else sent_ms
        agent, track = self.room.local_participant.identity, f"TR_{speaker}"
        message = caption_message(room=self.room.name, agent=agent, speaker=speaker, track_sid=track,
                                  segment_id=segment_id, seq=seq, final=final, sent_ms=sent_ms, words=words,
                                  text=text)
        attributes = {ATTR_SEGMENT_ID: segment_id, ATTR_TRANSCRIPTION_FINAL: "true" if final else "false",
                      ATTR_TRANSCRIBED_TRACK_ID: track, ATTR_AGENT: agent, ATTR_SPEAKER: speaker, ATTR_SEQ: str(seq),
                      ATTR_SENT: str(sent_ms), ATTR_SIGNATURE: self.signer.sign(message)}
        if final:
            attributes[ATTR_WORDS] = words
        return attributes

    def translation_attributes(self, speaker: str, source_segment: str, language: str, text: str, final: bool,
                               untranslated: str = "", source_language: str = "en", seq: int | None = None,
                               sent_ms: int | None = None) -> dict[str, str]:
        """The attributes the worker sends with a translation of `source_segment`, signed now (or at
        `sent_ms`)."""
        segment_id = translation_segment_id(source_segment, language)
        if seq is None:
            seq = self._seq.get(segment_id, 0)
            self._seq[segment_id] = seq + 1
        sent_ms = int(time.time() * 1000) if sent_ms is None else sent_ms
        agent, track = self.room.local_participant.identity, f"TR_{speaker}"
        message = translation_message(room=self.room.name, agent=agent, speaker=speaker, track_sid=track,
                                      segment_id=segment_id, seq=seq, final=final, sent_ms=sent_ms,
                                      source_segment=source_segment, source_language=source_language,
                                      language=language, untranslated=untranslated, text=text)
        attributes = {ATTR_SEGMENT_ID: segment_id, ATTR_TRANSCRIPTION_FINAL: "true" if final else "false",
                      ATTR_TRANSCRIBED_TRACK_ID: track, ATTR_AGENT: agent, ATTR_SPEAKER: speaker, ATTR_SEQ: str(seq),
                      ATTR_SENT: str(sent_ms), ATTR_LANGUAGE: language, ATTR_TRANSLATED: "true",
                      ATTR_SOURCE_SEGMENT: source_segment, ATTR_SOURCE_LANGUAGE: source_language,
                      ATTR_SIGNATURE: self.signer.sign(message)}
        if untranslated:
            attributes[ATTR_UNTRANSLATED] = untranslated
        return attributes

    async def translate(self, speaker: str, source_segment: str, language: str, text: str, final: bool = True,
                        untranslated: str = "", **signed) -> dict[str, str]:
        """Publishes a translation of `source_segment` as the worker does (a final one goes to the
        transcript first, with its language); returns its attributes (a replay sends them again)."""
        attributes = self.translation_attributes(speaker, source_segment, language, text, final, untranslated,
                                                 **signed)
        original = next((s for s in self.finals if s.segment_id == source_segment), None)
        if final and self.transcript is not None and original is not None:
            self.transcript.append(FinalSegment(
                attributes[ATTR_SEGMENT_ID], speaker, original.participant_name, original.track_id, text,
                original.start, original.end, [], language=language, translation_of=source_segment))
        await self.send_stream(speaker, text, attributes)
        return attributes

    async def send_stream(self, speaker: str, text: str, attributes: dict[str, str]) -> None:
        # As the worker: a speaker who left gets their captions in the agent's own name.
        present = speaker in self.room.remote_participants
        writer = await self.room.local_participant.stream_text(
            topic=TOPIC_TRANSCRIPTION, sender_identity=speaker if present else self.room.local_participant.identity,
            attributes=attributes)
        await writer.write(text)
        await writer.aclose()

    async def _send(self, speaker: str, segment_id: str, text: str, final: bool, words=None) -> None:
        words_attr = json.dumps(words) if final else ""
        await self.send_stream(speaker, text, self.signed_attributes(speaker, segment_id, text, final, words_attr))

    async def interim(self, speaker: str, segment_id: str, text: str) -> None:
        await self._send(speaker, segment_id, text, final=False)

    async def final(self, speaker: str, segment_id: str, text: str, start: float) -> FinalSegment:
        words = [[w, round(start + 0.4 * i, 3), round(start + 0.4 * i + 0.3, 3)] for i, w in enumerate(text.split())]
        segment = FinalSegment(segment_id, speaker, self.names.get(speaker, speaker), f"TR_{speaker}", text,
                               words[0][1], words[-1][2], words)
        if self.transcript is not None:
            self.transcript.append(segment)  # before publishing, as the worker does
        await self._send(speaker, segment_id, text, final=True, words=words)
        self.finals.append(segment)
        return segment

    async def say(self, speaker: str, text: str, start: float | None = None) -> str:
        """Interim updates word by word, then the final: one segment."""
        segment_id = f"SG_{uuid.uuid4().hex[:10]}"
        words = text.split()
        for n in range(1, len(words)):
            await self.interim(speaker, segment_id, " ".join(words[:n]))
        await self.final(speaker, segment_id, text, time.time() if start is None else start)
        return segment_id

    def close(self) -> None:
        if self.transcript is not None:
            self.transcript.close()


@pytest_asyncio.fixture(loop_scope="session")
async def rooms():
    """Connected LiveKit rooms of a test, disconnected at its end."""
    joined = []
    yield joined
    for room in joined:
        await room.disconnect()


async def setup_room(livekit_server, rooms, speakers: dict[str, str], status: str = "live", web=None):
    """A fresh room with named speaker participants and a caption agent bot (which writes the
    transcript `web` serves, when given)."""
    room_name = f"room-{uuid.uuid4().hex[:8]}"
    for identity, name in speakers.items():
        rooms.append(await join(livekit_server, room_name, identity, name))
    bot = await CaptionAgentBot.start(livekit_server, room_name, speakers, status,
                                      data_dir=web.data_dir if web is not None else None)
    rooms.append(bot.room)
    return room_name, bot


async def wait_state(page, state: str) -> None:
    await page.wait_for_selector(f'#status[data-state="{state}"]', timeout=WAIT_MS)


async def segment_texts(page) -> list[dict]:
    return await page.eval_on_selector_all(
        "#captions .seg",
        "nodes => nodes.map(n => ({text: n.textContent, interim: n.classList.contains('interim'),"
        " speaker: n.closest('.turn').querySelector('.name').textContent}))",
    )


def screenshot_path(name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS / name
