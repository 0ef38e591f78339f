"""A captions link against a real livekit-server, used with LiveKit's own Python client rather than
the viewer page (issue 22): it gets captions and nothing else, and it ends when it says, or when
the operator revokes it. The viewer server runs in this process (its real application, sweeper
included); the attacker holds only the link."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlencode

import pytest
from aiohttp.test_utils import TestClient, TestServer
from livekit import rtc

from captions.dev.bots import make_token
from captions.protocol import TOPIC_TRANSCRIPTION
from captions.viewer.links import check_link, make_link
from captions.viewer.revocations import append
from captions.viewer.server import WebSettings, create_app
from captions.viewer.sweeper import SWEEP_INTERVAL_S

pytestmark = [pytest.mark.livekit, pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="session")]

LINK_SECRET = "viewer-access-test-secret"
END_BOUND_S = 30.0
"""A viewer whose link ended is gone within this (issue 22)."""


def web_settings(livekit_server, data_dir) -> WebSettings:
    return WebSettings(livekit_url=livekit_server.url, public_livekit_url=livekit_server.url,
                       api_key=livekit_server.api_key, api_secret=livekit_server.api_secret,
                       viewer_secret=LINK_SECRET, data_dir=data_dir, sweep_interval_s=SWEEP_INTERVAL_S)


async def token_for(client: TestClient, link: str) -> dict:
    response = await client.get(f"/api/token?{urlencode({'link': link})}")
    assert response.status == 200, await response.text()
    return await response.json()


class Listener:
    """A link holder with LiveKit's Python client: auto-subscribes, and asks for every track too."""

    def __init__(self) -> None:
        self.room = rtc.Room()
        self.captions: list[str] = []
        self.frames = 0
        self.subscribed: list[str] = []
        self.disconnected_at: float | None = None
        self._tasks: set[asyncio.Task] = set()

    async def join(self, grant: dict) -> Listener:
        self.room.register_text_stream_handler(TOPIC_TRANSCRIPTION, self._on_caption)
        self.room.on("track_subscribed", self._on_track)
        self.room.on("disconnected", lambda *_: setattr(self, "disconnected_at", time.monotonic()))
        await self.room.connect(grant["url"], grant["token"], options=rtc.RoomOptions(auto_subscribe=True))
        return self

    def ask_for_every_track(self) -> int:
        asked = 0
        for participant in self.room.remote_participants.values():
            for publication in participant.track_publications.values():
                publication.set_subscribed(True)
                asked += 1
        return asked

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_caption(self, reader: rtc.TextStreamReader, identity: str) -> None:
        async def read() -> None:
            self.captions.append(await reader.read_all())
        self._spawn(read())

    def _on_track(self, track: rtc.Track, publication, participant) -> None:
        self.subscribed.append(track.kind)

        async def count(stream) -> None:
            async for _ in stream:
                self.frames += 1
        stream = rtc.AudioStream(track) if track.kind == rtc.TrackKind.KIND_AUDIO else rtc.VideoStream(track)
        self._spawn(count(stream))


async def speaker_with_microphone_and_camera(livekit_server, room_name: str) -> tuple[rtc.Room, list]:
    room = rtc.Room()
    await room.connect(livekit_server.url, make_token(livekit_server, room_name, "alice", name="Alice"))
    audio = rtc.AudioSource(48000, 1)
    video = rtc.VideoSource(64, 64)
    await room.local_participant.publish_track(rtc.LocalAudioTrack.create_audio_track("mic", audio),
                                               rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))
    await room.local_participant.publish_track(rtc.LocalVideoTrack.create_video_track("cam", video),
                                               rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA))
    return room, [audio, video]


async def feed(sources: list, seconds: float) -> None:
    """Speech-loud audio and a changing picture, in real time."""
    import numpy as np

    audio, video = sources
    tone = (np.sin(np.arange(480) * 2 * np.pi * 220 / 48000) * 8000).astype(np.int16)
    for n in range(int(seconds * 100)):
        await audio.capture_frame(rtc.AudioFrame(tone.tobytes(), 48000, 1, 480))
        if n % 4 == 0:
            video.capture_frame(rtc.VideoFrame(64, 64, rtc.VideoBufferType.RGBA, bytes([n % 256]) * (64 * 64 * 4)))
        await asyncio.sleep(0.01)


async def test_a_link_holder_with_any_client_gets_captions_and_no_audio_or_video(livekit_server, tmp_path):
    room_name = f"wiretap-{time.monotonic_ns()}"
    speaker, sources = await speaker_with_microphone_and_camera(livekit_server, room_name)
    async with TestClient(TestServer(create_app(web_settings(livekit_server, tmp_path)))) as client:
        grant = await token_for(client, make_link(LINK_SECRET, room_name, 600))
        listener = await Listener().join(grant)
        try:
            feeding = asyncio.ensure_future(feed(sources, 6.0))
            await asyncio.sleep(1.0)
            assert listener.ask_for_every_track() == 2, "the listener sees the microphone and the camera"
            for n in range(3):  # captions flow meanwhile (any participant's text stream stands for them)
                await speaker.local_participant.send_text(f"caption {n}", topic=TOPIC_TRANSCRIPTION)
                await asyncio.sleep(1.0)
            await feeding
            assert sorted(listener.captions) == ["caption 0", "caption 1", "caption 2"]
            assert listener.subscribed == [] and listener.frames == 0, (
                f"a captions link received {listener.frames} frames of {listener.subscribed}")
        finally:
            await listener.room.disconnect()
            await speaker.disconnect()


async def wait_removed(listener: Listener, since: float) -> float:
    deadline = since + END_BOUND_S
    while listener.disconnected_at is None and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert listener.disconnected_at is not None, f"still connected {END_BOUND_S:.0f} s after its link ended"
    return listener.disconnected_at - since


async def test_a_viewer_is_removed_when_its_link_expires_and_cannot_come_back(livekit_server, tmp_path):
    room_name = f"expiring-{time.monotonic_ns()}"
    speaker, _ = await speaker_with_microphone_and_camera(livekit_server, room_name)
    async with TestClient(TestServer(create_app(web_settings(livekit_server, tmp_path)))) as client:
        link = make_link(LINK_SECRET, room_name, 4)
        expires_at = check_link(LINK_SECRET, link).expires_at
        listener = await Listener().join(await token_for(client, link))
        stayer = await Listener().join(await token_for(client, make_link(LINK_SECRET, room_name, 600)))
        try:
            await speaker.local_participant.send_text("before", topic=TOPIC_TRANSCRIPTION)
            await asyncio.sleep(max(0.0, expires_at - time.time()))
            took = await wait_removed(listener, time.monotonic())
            print(f"removed {took:.1f} s after its link expired (sweep every {SWEEP_INTERVAL_S:g} s)")
            await speaker.local_participant.send_text("after", topic=TOPIC_TRANSCRIPTION)
            await asyncio.sleep(1.0)
            assert "after" not in listener.captions
            assert stayer.disconnected_at is None and "after" in stayer.captions, "other links are untouched"
            response = await client.get(f"/api/token?{urlencode({'link': link})}")
            assert response.status == 403 and (await response.json())["reason"] == "expired"
        finally:
            await listener.room.disconnect()
            await stayer.room.disconnect()
            await speaker.disconnect()


async def test_a_revoked_link_and_a_revoked_room_end_their_viewers(livekit_server, tmp_path):
    room_name = f"revoked-{time.monotonic_ns()}"
    speaker, _ = await speaker_with_microphone_and_camera(livekit_server, room_name)
    async with TestClient(TestServer(create_app(web_settings(livekit_server, tmp_path)))) as client:
        leaked = make_link(LINK_SECRET, room_name, 600)
        first = await Listener().join(await token_for(client, leaked))
        second = await Listener().join(await token_for(client, make_link(LINK_SECRET, room_name, 600)))
        try:
            append(tmp_path / "revoked-links.ndjson", {"link_id": check_link(LINK_SECRET, leaked).link_id,
                                                       "until": int(time.time()) + 600})
            print(f"revoked link: viewer removed in {await wait_removed(first, time.monotonic()):.1f} s")
            assert second.disconnected_at is None, "only the revoked link's viewers go"
            append(tmp_path / "revoked-links.ndjson", {"room": room_name, "before": int(time.time())})
            print(f"revoked room: viewer removed in {await wait_removed(second, time.monotonic()):.1f} s")
            response = await client.get(f"/api/token?{urlencode({'link': leaked})}")
            assert response.status == 403 and (await response.json())["reason"] == "revoked"
        finally:
            await first.room.disconnect()
            await second.room.disconnect()
            await speaker.disconnect()
