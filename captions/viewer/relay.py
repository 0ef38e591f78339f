"""The viewer server's window on a room: captions and who captions, nothing else.

Viewers never join LiveKit. A LiveKit token in a viewer's hands, whatever its grants, lets its holder
see every participant's identity, name, metadata and attributes and every data message of the room
(chat included), and livekit-server hands a connected participant refreshed tokens, so a removed
viewer can come back with one. So the viewer server joins each room that has viewers once, as one
hidden participant that subscribes to nothing and publishes nothing (`RoomRelay`), and forwards to
the viewers' WebSockets (server.py) only:

* the caption streams (`lk.transcription`) signed with the caption key, read whole (bounded: at most
  `MAX_STREAMS_PER_SENDER` at once per sender and speaker, `MAX_CAPTION_CHARS` each; anything else is
  closed unread or dropped), with only the attributes a caption is made of; the page verifies every
  signature again;
* the agents (identity, kind, server join time, their ``captions.*`` attributes), which the page needs
  to elect the room's captioner and show its state;
* the other participants' identity and display name (captions name their speaker), never their
  metadata, attributes or join times.

Translations (issue 26) are captions too, verified the same way; each viewer reads one language
(or only the originals), and its socket carries the originals and that language's translations,
never every language. The relay sets its own participant attribute ``captions.reading`` to the
languages its viewers read (only configured ones, so at most ``--translate-to``'s few; "" removes
it), updated as viewers come and go, coalesced to one update per `READING_UPDATE_S`: the room's
captioner translates only into those. livekit-server shows a hidden participant to nobody, the
captioner included, so a hidden relay also has the server API set ``captions.reading.<relay>`` on
each captioner of the room (an agent whose claim verifies: `tell_captioner`), which a participant
cannot do: a key of its own, so that several viewer servers in front of one room do not overwrite
each other, holding an expiry (captions/protocol.py `reading_value`) that the relay renews every
`READING_RENEW_S`, so that a viewer server that died stops costing translations. A captioner that
joins later is told too; a failed call is tried again after `READING_RETRY_S`; a relay that leaves
removes its entry. Viewers are never shown ``captions.reading``.

A room that does not exist (a meeting not started, or over) is not created by a viewer: the relay
checks through the server API first, tells its viewers the room is empty, and checks again every
`ABSENT_RECHECK_S`.

A viewer's WebSocket is closed when its link expires or is revoked: its access ends then, whatever
client it uses. A relay leaves its room `IDLE_S` after its last viewer.

Threads: everything here runs on the viewer server's event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import secrets
import time
from collections.abc import Awaitable, Callable

from captions.log import logger
from captions.protocol import (
    ATTR_AGENT_CLAIM,
    ATTR_LANGUAGE,
    ATTR_READING,
    ATTR_READING_FROM,
    ATTR_SPEAKER,
    ATTR_TRANSLATED,
    CAPTION_ATTRIBUTES,
    READING_TTL_S,
    TOPIC_TRANSCRIPTION,
    claim_message,
    parse_reading_value,
    reading_value,
    verify,
    verify_caption,
)

MAX_CAPTION_CHARS = 2000
"""A caption is a line of text (web/protocol.js `MAX_CAPTION_CHARS`): a longer stream is dropped."""
STREAM_TIMEOUT_S = 30.0
IDLE_S = 30.0
RECONNECT_DELAYS_S = (1, 2, 4, 8, 15)
ABSENT_RECHECK_S = 2.0
MAX_STREAMS_PER_SENDER = 16
"""Caption streams read at once per sender, speaker and language (the agent sends one at a time per
speaker and language; a burst can overlap a few)."""
RELAY_NAME = "Caption viewers"
AGENT_KIND = 4  # ParticipantKind AGENT, in LiveKit's protocol (and livekit-client's enum)
READING_UPDATE_S = 0.5
"""At most one ``captions.reading`` update this often (a viewer switching languages reconnects)."""
READING_RENEW_S = READING_TTL_S / 3
"""A captioner's ``captions.reading.<relay>`` entry is renewed this often (it expires after the TTL)."""
READING_RETRY_S = 2.0
"""After a failed server API call, the captioners are told again this much later."""
VIEWER_QUEUE = 256
"""Messages waiting for one slow viewer; past that the viewer is disconnected (it reconnects)."""


class RoomRelay:
    """One room's captions for every viewer of it on this server (see the module notes)."""

    def __init__(self, url: str, token: Callable[[], str], room_name: str, on_idle: Callable[[RoomRelay], None],
                 caption_key: str, room_exists: Callable[[str], Awaitable[bool]], languages: tuple[str, ...] = (),
                 tell_captioner: Callable[[str, str, dict[str, str]], Awaitable[None]] | None = None):
        self.url, self._token, self.room_name, self._on_idle = url, token, room_name, on_idle
        self._caption_key, self._room_exists = caption_key, room_exists
        self._languages = languages
        self._tell_captioner = tell_captioner
        """(room, identity, attributes): sets a participant's attributes through the server API."""
        self._told: dict[str, tuple[str, float]] = {}
        """Per captioner, the languages it was told, and when (time.monotonic())."""
        self._reading_key = f"{ATTR_READING_FROM}{secrets.token_hex(6)}"
        """This relay's ``captions.reading.<relay>`` attribute on captioners (stable across rejoins)."""
        self._retry: asyncio.TimerHandle | None = None
        """The configured translation languages: the only ones a viewer can read, or the relay announce."""
        self._streams: collections.Counter[str] = collections.Counter()
        self._unverified = 0
        self.viewers: dict[asyncio.Queue, str] = {}
        """Each viewer's queue, and the language it reads ("": the originals only)."""
        self.reading = ""
        """The ``captions.reading`` attribute as last set in the room."""
        self._reading_task: asyncio.Task | None = None
        self.connected = asyncio.Event()
        self._room = None
        self._task: asyncio.Task | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._readers: set[asyncio.Task] = set()

    # Viewers ----------------------------------------------------------------------------------

    def add_viewer(self, language: str = "") -> asyncio.Queue:
        """A queue of JSON messages for one viewer that reads `language` (a configured one, or "" for
        the originals only), starting with the room as it is now."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=VIEWER_QUEUE)
        self.viewers[queue] = language if language in self._languages else ""
        self._reading_changed()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"relay-{self.room_name[:40]}")
        # The room as it is now; or, while the relay is (re)joining it, that it is not there yet.
        queue.put_nowait(encode(self._snapshot() if self.connected.is_set() else {"type": "reconnecting"}))
        return queue

    def remove_viewer(self, queue: asyncio.Queue) -> None:
        self.viewers.pop(queue, None)
        self._reading_changed()
        if not self.viewers and self._idle_timer is None:
            self._idle_timer = asyncio.get_running_loop().call_later(IDLE_S, self._idle)

    def _idle(self) -> None:
        self._idle_timer = None
        if not self.viewers:
            self._on_idle(self)

    def _send(self, message: dict, language: str | None = None) -> None:
        """Encoded once, queued for every viewer (only those reading `language`, when given)."""
        text = encode(message)
        for queue, reads in list(self.viewers.items()):
            if language is not None and reads != language:
                continue
            try:
                queue.put_nowait(text)
            except asyncio.QueueFull:  # a viewer that does not read: it is closed, and reconnects
                self.viewers.pop(queue, None)
                self._reading_changed()
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(OVERFLOW)

    # What its viewers read ----------------------------------------------------------------------

    def wanted_reading(self) -> str:
        """The ``captions.reading`` attribute its viewers call for: their languages, sorted."""
        return ",".join(sorted({language for language in self.viewers.values() if language}))

    def _captioners(self) -> list[str]:
        """The room's captioners (agents whose claim verifies), to be told what is read."""
        room = self._room
        if self._tell_captioner is None or room is None:
            return []
        return [p.identity for p in room.remote_participants.values()
                if int(p.kind) == AGENT_KIND and (claim := p.attributes.get(ATTR_AGENT_CLAIM))
                and verify(self._caption_key, claim_message(room=self.room_name, identity=p.identity), claim)]

    def _untold(self, wanted: str) -> list[str]:
        """The captioners not told `wanted` yet, or told long enough ago that their entry needs renewing."""
        now = time.monotonic()
        return [c for c in self._captioners()
                if (told := self._told.get(c)) is None or told[0] != wanted or now - told[1] >= READING_RENEW_S]

    def _reading_changed(self) -> None:
        """Sets ``captions.reading`` again (soon, once) if the viewers' languages changed, or a
        captioner has not been told them (or needs its entry renewed)."""
        if not self._languages or self._room is None or not self.connected.is_set() or self._reading_task:
            return
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        wanted = self.wanted_reading()
        if wanted != self.reading or self._untold(wanted):
            self._reading_task = asyncio.create_task(self._publish_reading(), name="relay-reading")

    async def _publish_reading(self) -> None:
        try:
            while (room := self._room) is not None:
                wanted = self.wanted_reading()
                untold = self._untold(wanted)
                if wanted == self.reading and not untold:
                    return
                try:
                    if wanted != self.reading:
                        await room.local_participant.set_attributes({ATTR_READING: wanted})
                        if room is self._room:  # not a room left meanwhile (the next join sets it again)
                            self.reading = wanted
                    for identity in untold:
                        value = reading_value(wanted, int(time.time() + READING_TTL_S)) if wanted else ""
                        await self._tell_captioner(self.room_name, identity, {self._reading_key: value})
                        self._told[identity] = (wanted, time.monotonic())
                except Exception as e:  # noqa: BLE001 - the room or the captioner went away, the API failed
                    logger.info("relay of room %r could not set %s (%s: %s); trying again in %.0f s",
                                self.room_name, ATTR_READING, type(e).__name__, e, READING_RETRY_S)
                    self._retry = asyncio.get_running_loop().call_later(READING_RETRY_S, self._retry_reading)
                    return
                await asyncio.sleep(READING_UPDATE_S)
        finally:
            self._reading_task = None
            if self._retry is None and self._room is not None and self._told and self.wanted_reading():
                # Renew the captioners' entries before they expire.
                self._retry = asyncio.get_running_loop().call_later(READING_RENEW_S, self._retry_reading)

    def _retry_reading(self) -> None:
        self._retry = None
        self._reading_changed()

    async def _forget_reading(self) -> None:
        """Removes this relay's entry from the captioners it told (it leaves the room)."""
        told, self._told = list(self._told), {}
        if self._tell_captioner is None:
            return
        for identity in told:
            with contextlib.suppress(Exception):  # best effort: the entry expires anyway
                await self._tell_captioner(self.room_name, identity, {self._reading_key: ""})

    # The room ---------------------------------------------------------------------------------

    async def aclose(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in [*self._readers, self._reading_task]:
            if task is not None:
                task.cancel()
        await self._forget_reading()

    async def _run(self) -> None:
        """Joins the room, and joins again (with backoff) whenever the connection is lost for good."""
        attempt = 0
        while True:
            closed = asyncio.Event()
            try:
                if not await self._room_exists(self.room_name):
                    self.connected.set()  # as an empty room: the page says nobody captions it
                    self._send(self._snapshot())
                    await asyncio.sleep(ABSENT_RECHECK_S)
                    continue
                await self._join(closed)
                attempt = 0
                await closed.wait()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to join: say so, try again
                logger.warning("relay of room %r could not join (%s: %s)", self.room_name, type(e).__name__, e)
            finally:
                self.connected.clear()
                self.reading = ""  # a new participant each join: it has no attributes yet
                room, self._room = self._room, None
                if room is not None:
                    with contextlib.suppress(Exception):
                        await room.disconnect()
            self._send({"type": "reconnecting"})
            await asyncio.sleep(RECONNECT_DELAYS_S[min(attempt, len(RECONNECT_DELAYS_S) - 1)])
            attempt += 1

    async def _join(self, closed: asyncio.Event) -> None:
        from livekit import rtc

        room = rtc.Room()
        self._room = room
        room.register_text_stream_handler(TOPIC_TRANSCRIPTION, self._on_caption_stream)
        room.on("participant_connected", self._on_participant_connected)
        room.on("participant_name_changed", lambda participant, *_: self._send({"type": "participant",
                                                                                **_describe(participant)}))
        room.on("participant_attributes_changed", self._on_attributes_changed)
        room.on("participant_disconnected", self._on_participant_disconnected)
        room.on("reconnecting", lambda: self._send({"type": "reconnecting"}))
        room.on("reconnected", lambda: self._send(self._snapshot()))
        room.on("disconnected", lambda *_: closed.set())
        await room.connect(self.url, self._token(), options=rtc.RoomOptions(auto_subscribe=False))
        self.connected.set()
        self._send(self._snapshot())
        self._reading_changed()

    def _on_participant_connected(self, participant) -> None:
        self._send({"type": "participant", **_describe(participant)})
        self._reading_changed()  # a captioner that joins is told what is read

    def _on_participant_disconnected(self, participant) -> None:
        self._told.pop(participant.identity, None)
        self._send({"type": "left", "identity": participant.identity})

    def _on_attributes_changed(self, changed: dict[str, str], participant) -> None:
        if int(participant.kind) == AGENT_KIND:  # others' attributes are nobody's business here
            if any(key != ATTR_READING and not key.startswith(ATTR_READING_FROM) for key in changed):
                # not what relays told it
                self._send({"type": "participant", **_describe(participant)})
            told = self._told.get(participant.identity)
            if ATTR_AGENT_CLAIM in changed or (self._reading_key in changed and told is not None
                                               and parse_reading_value(changed[self._reading_key])[0] != told[0]):
                self._told.pop(participant.identity, None)  # a new captioner, or one told otherwise since
                self._reading_changed()

    def _snapshot(self) -> dict:
        room = self._room
        participants = [_describe(p) for p in room.remote_participants.values()] if room is not None else []
        return {"type": "room", "room": self.room_name, "participants": participants}

    def _on_caption_stream(self, reader, sender: str) -> None:
        # Per sender, speaker and language: the agent sends in its own name for every speaker who
        # left, and a speaker's translations beside its originals (a configured language, or none:
        # the sender names it, so no sender gets more than the configured languages' budgets).
        attributes = reader.info.attributes or {}
        language = attributes.get(ATTR_LANGUAGE, "")
        sender = f"{sender}\n{attributes.get(ATTR_SPEAKER, '')}\n{language if language in self._languages else ''}"
        if self._streams[sender] >= MAX_STREAMS_PER_SENDER:
            reader.close()  # unread: its subscription goes at once
            logger.info("relay of room %r: more than %d caption streams at once from %r: one dropped",
                        self.room_name, MAX_STREAMS_PER_SENDER, sender)
            return
        self._streams[sender] += 1
        task = asyncio.create_task(self._forward(reader, sender))
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    async def _forward(self, reader, sending: str) -> None:
        sender = sending.split("\n", 1)[0]
        try:
            text = await asyncio.wait_for(_read_bounded(reader), STREAM_TIMEOUT_S)
        except (ValueError, asyncio.TimeoutError) as e:
            logger.info("relay of room %r: a caption stream from %r dropped (%s)", self.room_name, sender, e)
            return
        except Exception as e:  # noqa: BLE001 - the sender left mid-stream, say
            logger.info("relay of room %r: a caption stream from %r failed (%s)", self.room_name, sender, e)
            return
        finally:
            reader.close()  # a no-op once read to its end; otherwise its subscription would stay
            self._streams[sending] -= 1
            if not self._streams[sending]:
                del self._streams[sending]
        attributes = {k: v for k, v in (reader.info.attributes or {}).items() if k in CAPTION_ATTRIBUTES}
        if not verify_caption(self._caption_key, self.room_name, sender, attributes, text):
            # Not a caption of this deployment: nothing a viewer should see. Said, but not for each
            # one of a flood.
            self._unverified += 1
            if self._unverified <= 3 or self._unverified % 100 == 0:
                logger.info("relay of room %r: dropped a caption stream from %r that does not verify (%d so far)",
                            self.room_name, sender, self._unverified)
            return
        # A translation goes to the viewers of its language only (verified: its signature covers it).
        language = attributes.get(ATTR_LANGUAGE, "") if attributes.get(ATTR_TRANSLATED) == "true" else None
        self._send({"type": "caption", "id": reader.info.stream_id, "sender": sender, "attributes": attributes,
                    "text": text}, language)


async def _read_bounded(reader) -> str:
    text = ""
    async for chunk in reader:
        text += chunk
        if len(text) > MAX_CAPTION_CHARS:
            raise ValueError(f"longer than {MAX_CAPTION_CHARS} characters")
    return text


def _describe(participant) -> dict:
    """What viewers may know of a participant: an agent's identity, kind, join time and captions
    attributes; anyone else's identity and display name."""
    described = {"identity": participant.identity, "name": participant.name, "kind": int(participant.kind)}
    if int(participant.kind) == AGENT_KIND:
        joined = participant.joined_at
        described["joined_at_ms"] = int(joined.timestamp() * 1000) if joined is not None else None
        described["attributes"] = {k: v for k, v in participant.attributes.items()
                                   if k.startswith("captions.") and k != ATTR_READING
                                   and not k.startswith(ATTR_READING_FROM)}
    return described


class Relays:
    """The relays of this viewer server, one per room with viewers."""

    def __init__(self, url: str, token_for: Callable[[str], str], caption_key: str,
                 room_exists: Callable[[str], Awaitable[bool]], languages: tuple[str, ...] = (),
                 tell_captioner: Callable[[str, str, dict[str, str]], Awaitable[None]] | None = None):
        self.url, self._token_for = url, token_for
        self._caption_key, self._room_exists, self._languages = caption_key, room_exists, languages
        self._tell_captioner = tell_captioner
        self._relays: dict[str, RoomRelay] = {}
        self._closing: set[asyncio.Task] = set()
        """Relays of rooms gone idle, leaving (kept referenced until they have left)."""

    def relay(self, room: str) -> RoomRelay:
        relay = self._relays.get(room)
        if relay is None:
            relay = RoomRelay(self.url, lambda: self._token_for(room), room, self._drop, self._caption_key,
                              self._room_exists, self._languages, self._tell_captioner)
            self._relays[room] = relay
        return relay

    def _drop(self, relay: RoomRelay) -> None:
        if self._relays.get(relay.room_name) is relay:
            del self._relays[relay.room_name]
        task = asyncio.get_running_loop().create_task(relay.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        relays, self._relays = list(self._relays.values()), {}
        await asyncio.gather(*(r.aclose() for r in relays), return_exceptions=True)


def relay_identity() -> str:
    return f"captions-relay-{secrets.token_hex(6)}"


def encode(message: dict) -> str:
    return json.dumps(message, ensure_ascii=False)


OVERFLOW = encode({"type": "overflow"})
"""Queued instead of what a viewer that does not read would have missed: the server closes it."""
