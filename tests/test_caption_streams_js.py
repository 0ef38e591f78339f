"""The worker's caption streams as LiveKit's own JavaScript client reads them (livekit-client 2.23,
what LiveKit's front-end components run on): the publisher sends each caption as one `send_text`
request in the speaker's name (captions/live/sdk_fixes.py `send_text_as`), and a browser that joins
the room with a text stream handler on `lk.transcription` gets every caption whole, in the
speaker's name, with its attributes (segment, final flag, signature), long or empty."""

from __future__ import annotations

import asyncio
import functools
import http.server
import json
import secrets
import shutil
import threading
from pathlib import Path

import pytest
from livekit import rtc

from captions.dev.bots import make_token
from captions.live.publisher import CaptionPublisher, OutgoingCaption
from captions.live.segmenter import CaptionUpdate
from captions.protocol import ATTR_SEGMENT_ID, ATTR_SIGNATURE, ATTR_TRANSCRIPTION_FINAL, CaptionSigner
from tests.viewer_harness import CHROMIUM

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="function"), pytest.mark.timeout(120)]
ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "web/node_modules/livekit-client/dist/livekit-client.esm.mjs"
PAGE = """<!doctype html><script type="module">
import { Room } from './livekit-client.esm.mjs';
window.captions = [];
const room = new Room();
room.registerTextStreamHandler('lk.transcription', async (reader, participant) => {
  const text = await reader.readAll();
  window.captions.push({ text, sender: participant.identity, attributes: reader.info.attributes });
});
await room.connect(%s, %s);
window.joined = true;
</script>"""


@pytest.fixture
def page_dir(tmp_path: Path, livekit_server):
    shutil.copy(CLIENT, tmp_path / CLIENT.name)
    token = make_token(livekit_server, "js-client", "reader")
    (tmp_path / "index.html").write_text(PAGE % (json.dumps(livekit_server.url), json.dumps(token)))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/index.html"
    httpd.shutdown()


async def test_livekit_client_reads_every_caption_whole_in_the_speakers_name(livekit_server, page_dir):
    from playwright.async_api import async_playwright

    alice, agent = rtc.Room(), rtc.Room()
    await alice.connect(livekit_server.url, make_token(livekit_server, "js-client", "alice"))
    await agent.connect(livekit_server.url, make_token(livekit_server, "js-client", "agent-1", agent=True))
    publisher = CaptionPublisher(agent, CaptionSigner())
    publishing = asyncio.create_task(publisher.run())
    long_final = " ".join(secrets.token_hex(8) for _ in range(800))  # 13,599 characters that do not compress
    sent = [CaptionUpdate("seg-1", "hello thé", False, []), CaptionUpdate("seg-1", "hello thé world", True, []),
            CaptionUpdate("seg-2", long_final, True, []),
            CaptionUpdate("seg-3", "", True, [])]  # an empty final takes back an interim (segmenter.py)
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM)
            try:
                page = await browser.new_page()
                await page.goto(page_dir)
                await page.wait_for_function("window.joined === true", timeout=20_000)
                while "alice" not in agent.remote_participants or "reader" not in agent.remote_participants:
                    await asyncio.sleep(0.05)
                for count, update in enumerate(sent, 1):  # one at a time: a newer interim would skip an older one
                    publisher.put(OutgoingCaption("alice", "TR_alice", update))
                    await page.wait_for_function(f"window.captions.length >= {count}", timeout=20_000)
                await asyncio.sleep(0.5)  # nothing more arrives
                got = await page.evaluate("window.captions")
            finally:
                await browser.close()
    finally:
        publishing.cancel()
        await alice.disconnect()
        await agent.disconnect()
    assert [c["text"] for c in got] == [u.text for u in sent]
    assert {c["sender"] for c in got} == {"alice"}
    assert [(c["attributes"][ATTR_SEGMENT_ID], c["attributes"][ATTR_TRANSCRIPTION_FINAL]) for c in got] == \
        [("seg-1", "false"), ("seg-1", "true"), ("seg-2", "true"), ("seg-3", "true")]
    assert all(c["attributes"][ATTR_SIGNATURE] for c in got)
