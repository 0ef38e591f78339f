"""Real WebRTC clients for end-to-end tests and the benchmarks: a publisher that speaks a WAV file in
real time and a subscriber that collects caption streams. Only the tests, `captions speak` and the
benchmarks import this module."""

from __future__ import annotations

import asyncio
import bisect
import json
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from livekit import api, rtc

from captions.protocol import (
    ATTR_AGENT,
    ATTR_AGENT_STATUS,
    ATTR_SEGMENT_ID,
    ATTR_SEQ,
    ATTR_SPEAKER,
    ATTR_TRANSCRIBED_TRACK_ID,
    ATTR_TRANSCRIPTION_FINAL,
    ATTR_WORDS,
    TOPIC_TRANSCRIPTION,
)
from captions.stt.api import SAMPLE_RATE

FRAME_MS = 10


def make_token(server, room: str, identity: str, *, name: str = "", hidden: bool = False,
               can_publish: bool = True, can_publish_data: bool = True, agent: bool = False) -> str:
    grants = api.VideoGrants(room_join=True, room=room, can_publish=can_publish, can_subscribe=True,
                             can_publish_data=can_publish_data, hidden=hidden, agent=agent,
                             can_update_own_metadata=agent)
    return (api.AccessToken(server.api_key, server.api_secret).with_identity(identity)
            .with_name(name or identity).with_grants(grants).to_jwt())


def server_from_config(config: dict):
    """The server address a benchmark hands its bot processes in their JSON config (url, key, secret)."""
    from types import SimpleNamespace

    return SimpleNamespace(url=config["url"], api_key=config["api_key"], api_secret=config["api_secret"])


def read_wav(path: Path) -> tuple[np.ndarray, int, int]:
    """int16 samples (interleaved), sample rate, channels."""
    with wave.open(str(path), "rb") as w:
        assert w.getsampwidth() == 2, "16-bit WAV expected"
        data = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
        return data, w.getframerate(), w.getnchannels()


class Publisher:
    """A participant with one microphone track fed from WAV files at their native rate/channels."""

    def __init__(self, server, room: str, identity: str, sample_rate: int = SAMPLE_RATE, channels: int = 1,
                 auto_subscribe: bool = True, queue_size_ms: int = 1000, name: str = ""):
        self.server, self.room_name, self.identity, self.name = server, room, identity, name
        self.queue_size_ms = queue_size_ms
        """The AudioSource's buffer; 0 hands each frame straight to WebRTC, as a microphone does."""
        self.auto_subscribe = auto_subscribe
        """False: do not receive the other speakers (a benchmark's many bots would decode each other)."""
        self.sample_rate, self.channels = sample_rate, channels
        self.room = rtc.Room()
        self.source: rtc.AudioSource | None = None
        self.publication: rtc.LocalTrackPublication | None = None
        self.track: rtc.LocalAudioTrack | None = None
        self.subscribed = asyncio.Event()
        """Set when someone (the caption agent) subscribed to the current microphone track."""
        self.room.on("local_track_subscribed", lambda _track: self.subscribed.set())

    async def wait_subscribed(self, timeout: float = 30) -> None:
        """Until the current microphone has a subscriber: the agent, if the other participants
        do not subscribe to audio (`auto_subscribe=False` for publishers, as viewers do)."""
        await asyncio.wait_for(self.subscribed.wait(), timeout)

    async def wait_heard(self, settle_s: float = 1.0) -> None:
        """Until the agent receives this microphone steadily: subscribed, then `settle_s` of silence.
        The receiver's jitter buffer (WebRTC's NetEq) adapts in its first second and time-stretches
        speech there (in the worker, on main before the speech gate as well: up to 50 ms stretched,
        then squeezed back within 1.1 s; the words intact), so tests that compare the received audio
        with the clip sample by sample start speaking after it."""
        await self.wait_subscribed()
        await self.silence(settle_s)

    async def talk(self, path: Path, pause_s: float = 0.6) -> None:
        """Says the file again and again, with a short pause between (until cancelled)."""
        while True:
            await self.play(path)
            await self.silence(pause_s)

    async def connect(self) -> Publisher:
        token = make_token(self.server, self.room_name, self.identity, name=self.name)
        await self.room.connect(self.server.url, token,
                                options=rtc.RoomOptions(auto_subscribe=self.auto_subscribe))
        await self.publish()
        return self

    async def publish(self) -> str:
        """(Re)publishes a fresh microphone track; returns its sid."""
        self.subscribed.clear()
        self.source = rtc.AudioSource(self.sample_rate, self.channels, queue_size_ms=self.queue_size_ms)
        self.track = rtc.LocalAudioTrack.create_audio_track(f"{self.identity}-mic", self.source)
        options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        self.publication = await self.room.local_participant.publish_track(self.track, options)
        return self.publication.sid

    async def unpublish(self) -> None:
        assert self.publication is not None
        await self.room.local_participant.unpublish_track(self.publication.sid)
        self.publication = None

    @property
    def track_sid(self) -> str:
        assert self.publication is not None
        return self.publication.sid

    def mute(self) -> None:
        assert self.track is not None
        self.track.mute()

    def unmute(self) -> None:
        assert self.track is not None
        self.track.unmute()

    async def play(self, path: Path, *, stop_after_s: float | None = None) -> None:
        """Streams the file in real time (10 ms frames, paced by the clock); optionally stops early."""
        data, rate, channels = read_wav(path)
        assert (rate, channels) == (self.sample_rate, self.channels), "publish at the file's format"
        samples = rate * FRAME_MS // 1000
        frames = data.reshape(-1, channels)
        limit = len(frames) if stop_after_s is None else min(len(frames), int(stop_after_s * rate))
        start = time.monotonic()
        for i, offset in enumerate(range(0, limit, samples)):
            chunk = frames[offset:offset + samples]
            if len(chunk) < samples:
                chunk = np.concatenate([chunk, np.zeros((samples - len(chunk), channels), np.int16)])
            frame = rtc.AudioFrame(chunk.tobytes(), rate, channels, samples)
            assert self.source is not None
            await self.source.capture_frame(frame)
            delay = start + (i + 1) * FRAME_MS / 1000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    async def silence(self, seconds: float) -> None:
        """Real-time silence, as a microphone left open would send."""
        samples = self.sample_rate * FRAME_MS // 1000
        zero = rtc.AudioFrame(bytes(2 * samples * self.channels), self.sample_rate, self.channels, samples)
        start = time.monotonic()
        for i in range(int(seconds * 1000 / FRAME_MS)):
            assert self.source is not None
            await self.source.capture_frame(zero)
            delay = start + (i + 1) * FRAME_MS / 1000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    async def disconnect(self) -> None:
        await self.room.disconnect()


def speaker_of(sender: str, attributes: dict[str, str]) -> str:
    """Who a caption stream transcribes: its sender, or `captions.speaker` when the agent sent it in
    its own name (the speaker had left: captions/protocol.py)."""
    if sender and sender == attributes.get(ATTR_AGENT):
        return attributes.get(ATTR_SPEAKER, sender)
    return sender


@dataclass
class Caption:
    """One received `lk.transcription` stream."""

    text: str
    segment_id: str
    track_id: str
    final: bool
    sender: str
    """The identity the stream claims to be from (the transcribed speaker)."""
    attributes: dict[str, str]
    received_at: float
    order: int = 0
    """Position in which the stream was opened (= sent by the agent)."""

    @property
    def words(self) -> list[list]:
        return json.loads(self.attributes[ATTR_WORDS]) if ATTR_WORDS in self.attributes else []


@dataclass
class Subscriber:
    """A (by default hidden) viewer that records every caption stream and the agent's attributes."""

    server: object
    room_name: str
    identity: str = "viewer"
    hidden: bool = True
    can_publish_data: bool = False
    """Viewers publish nothing; a test may make one that can (an attacker)."""
    room: rtc.Room = field(default_factory=rtc.Room)
    captions: list[Caption] = field(default_factory=list)
    statuses: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    """(participant identity, attributes) each time an agent's attributes changed."""
    on_caption_opened: Callable[[dict[str, str]], None] | None = None
    """Called with a caption stream's attributes the moment it opens, before its text is read (a
    test can check what was true when a caption reached a viewer)."""
    _tasks: set = field(default_factory=set)
    _opened: int = 0
    _leaving: bool = False

    async def connect(self) -> Subscriber:
        self.room.register_text_stream_handler(TOPIC_TRANSCRIPTION, self._on_caption_stream)
        self.room.on("participant_attributes_changed", self._on_attributes)
        token = make_token(self.server, self.room_name, self.identity, hidden=self.hidden,
                           can_publish=False, can_publish_data=self.can_publish_data)
        await self.room.connect(self.server.url, token, options=rtc.RoomOptions(auto_subscribe=False))
        return self

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_caption_stream(self, reader: rtc.TextStreamReader, participant_identity: str) -> None:
        # Streams are opened in the order the agent sent them, but their reads may finish in any
        # order: keep `captions` in opening order.
        if self._leaving:
            return  # opened while this viewer leaves: it would end "disconnected while receiving"
        self._opened += 1
        if self.on_caption_opened is not None:
            self.on_caption_opened(dict(reader.info.attributes or {}))
        self._spawn(self._read_caption(reader, participant_identity, self._opened))

    async def _read_caption(self, reader: rtc.TextStreamReader, participant_identity: str, order: int) -> None:
        text = await reader.read_all()
        attrs = dict(reader.info.attributes or {})
        caption = Caption(
            text=text, segment_id=attrs.get(ATTR_SEGMENT_ID, ""), track_id=attrs.get(ATTR_TRANSCRIBED_TRACK_ID, ""),
            final=attrs.get(ATTR_TRANSCRIPTION_FINAL) == "true", sender=speaker_of(participant_identity, attrs),
            attributes=attrs, received_at=time.time(), order=order)
        if any(c.segment_id == caption.segment_id and c.attributes.get(ATTR_SEQ) == attrs.get(ATTR_SEQ)
               for c in self.captions):
            return  # the same update sent again (its speaker left as it went out): a viewer shows it once
        bisect.insort(self.captions, caption, key=lambda c: c.order)

    def _on_attributes(self, changed: dict[str, str], participant: rtc.Participant) -> None:
        if ATTR_AGENT_STATUS in participant.attributes:
            self.statuses.append((participant.identity, dict(participant.attributes)))

    def agent(self) -> rtc.RemoteParticipant | None:
        for p in self.room.remote_participants.values():
            if p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT or ATTR_AGENT_STATUS in p.attributes:
                return p
        return None

    async def wait_for_agent(self, timeout: float = 30) -> rtc.RemoteParticipant:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (agent := self.agent()) is not None and ATTR_AGENT_STATUS in agent.attributes:
                return agent
            await asyncio.sleep(0.1)
        raise TimeoutError(f"no captions agent in {self.room_name} after {timeout} s")

    def finals(self, sender: str | None = None) -> list[Caption]:
        return [c for c in self.captions if c.final and (sender is None or c.sender == sender)]

    def by_segment(self) -> dict[str, list[Caption]]:
        segments: dict[str, list[Caption]] = {}
        for c in self.captions:
            segments.setdefault(c.segment_id, []).append(c)
        return segments

    async def wait_until(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"timed out after {timeout} s waiting for {what}")

    async def disconnect(self) -> None:
        """Leaves; captions still being read are dropped (a stream cut by leaving is no error)."""
        self._leaving = True
        for task in list(self._tasks):
            task.cancel()
        await self.room.disconnect()
        await asyncio.gather(*self._tasks, return_exceptions=True)
