"""The viewer server's window on a room: captions and who captions, nothing else.

Viewers never join LiveKit. A LiveKit token in a viewer's hands, whatever its grants, lets its holder
see every participant's identity, name, metadata and attributes and every data message of the room
(chat included), and livekit-server hands a connected participant refreshed tokens, so a removed
viewer can come back with one. So the viewer server joins each room that has viewers once, as one
hidden participant that subscribes to nothing and publishes nothing (`RoomRelay`), and forwards to
the viewers' WebSockets (server.py) only:

* the caption streams (`lk.transcription`), read whole (bounded) and passed on as they are, so that
  the page verifies every signature itself (captions/protocol.py);
* the agents (identity, kind, server join time, their ``captions.*`` attributes), which the page needs
  to elect the room's captioner and show its state;
* the other participants' identity and display name (captions name their speaker), never their
  metadata or attributes.

A viewer's WebSocket is closed when its link expires or is revoked: its access ends then, whatever
client it uses. A relay leaves its room `IDLE_S` after its last viewer.

Threads: everything here runs on the viewer server's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import Callable

from captions.log import logger
from captions.protocol import TOPIC_TRANSCRIPTION

MAX_CAPTION_CHARS = 2000
"""A caption is a line of text (web/protocol.js `MAX_CAPTION_CHARS`): a longer stream is dropped."""
STREAM_TIMEOUT_S = 30.0
IDLE_S = 30.0
RECONNECT_DELAYS_S = (1, 2, 4, 8, 15)
RELAY_NAME = "Caption viewers"
AGENT_KIND = 4  # ParticipantKind AGENT, in LiveKit's protocol (and livekit-client's enum)
VIEWER_QUEUE = 256
"""Messages waiting for one slow viewer; past that the viewer is disconnected (it reconnects)."""


class RoomRelay:
    """One room's captions for every viewer of it on this server (see the module notes)."""

    def __init__(self, url: str, token: Callable[[], str], room_name: str, on_idle: Callable[[RoomRelay], None]):
        self.url, self._token, self.room_name, self._on_idle = url, token, room_name, on_idle
        self.viewers: set[asyncio.Queue] = set()
        self.connected = asyncio.Event()
        self._room = None
        self._task: asyncio.Task | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._readers: set[asyncio.Task] = set()

    # Viewers ----------------------------------------------------------------------------------

    def add_viewer(self) -> asyncio.Queue:
        """A queue of JSON messages for one viewer, starting with the room as it is now."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=VIEWER_QUEUE)
        self.viewers.add(queue)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"relay-{self.room_name[:40]}")
        # The room as it is now; or, while the relay is (re)joining it, that it is not there yet.
        queue.put_nowait(self._snapshot() if self.connected.is_set() else {"type": "reconnecting"})
        return queue

    def remove_viewer(self, queue: asyncio.Queue) -> None:
        self.viewers.discard(queue)
        if not self.viewers and self._idle_timer is None:
            self._idle_timer = asyncio.get_running_loop().call_later(IDLE_S, self._idle)

    def _idle(self) -> None:
        self._idle_timer = None
        if not self.viewers:
            self._on_idle(self)

    def _send(self, message: dict) -> None:
        for queue in list(self.viewers):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:  # a viewer that does not read: it is closed, and reconnects
                self.viewers.discard(queue)
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait({"type": "overflow"})

    # The room ---------------------------------------------------------------------------------

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._readers):
            task.cancel()

    async def _run(self) -> None:
        """Joins the room, and joins again (with backoff) whenever the connection is lost for good."""
        attempt = 0
        while True:
            closed = asyncio.Event()
            try:
                await self._join(closed)
                attempt = 0
                await closed.wait()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to join: say so, try again
                logger.warning("relay of room %r could not join (%s: %s)", self.room_name, type(e).__name__, e)
            finally:
                self.connected.clear()
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
        for event in ("participant_connected", "participant_name_changed"):
            room.on(event, lambda participant, *_: self._send({"type": "participant", **_describe(participant)}))
        room.on("participant_attributes_changed",
                lambda changed, participant: self._send({"type": "participant", **_describe(participant)}))
        room.on("participant_disconnected", lambda p: self._send({"type": "left", "identity": p.identity}))
        room.on("reconnecting", lambda: self._send({"type": "reconnecting"}))
        room.on("reconnected", lambda: self._send(self._snapshot()))
        room.on("disconnected", lambda *_: closed.set())
        await room.connect(self.url, self._token(), options=rtc.RoomOptions(auto_subscribe=False))
        self.connected.set()
        self._send(self._snapshot())

    def _snapshot(self) -> dict:
        room = self._room
        participants = [_describe(p) for p in room.remote_participants.values()] if room is not None else []
        return {"type": "room", "room": self.room_name, "participants": participants}

    def _on_caption_stream(self, reader, sender: str) -> None:
        task = asyncio.create_task(self._forward(reader, sender))
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    async def _forward(self, reader, sender: str) -> None:
        try:
            text = await asyncio.wait_for(_read_bounded(reader), STREAM_TIMEOUT_S)
        except (ValueError, asyncio.TimeoutError) as e:
            logger.info("relay of room %r: a caption stream from %r dropped (%s)", self.room_name, sender, e)
            return
        except Exception as e:  # noqa: BLE001 - the sender left mid-stream, say
            logger.info("relay of room %r: a caption stream from %r failed (%s)", self.room_name, sender, e)
            return
        self._send({"type": "caption", "id": reader.info.stream_id, "sender": sender,
                    "attributes": dict(reader.info.attributes or {}), "text": text})


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
    joined = participant.joined_at
    described = {"identity": participant.identity, "name": participant.name, "kind": int(participant.kind),
                 "joined_at_ms": int(joined.timestamp() * 1000) if joined is not None else None}
    if int(participant.kind) == AGENT_KIND:
        described["attributes"] = {k: v for k, v in participant.attributes.items() if k.startswith("captions.")}
    return described


class Relays:
    """The relays of this viewer server, one per room with viewers."""

    def __init__(self, url: str, token_for: Callable[[str], str]):
        self.url, self._token_for = url, token_for
        self._relays: dict[str, RoomRelay] = {}

    def relay(self, room: str) -> RoomRelay:
        relay = self._relays.get(room)
        if relay is None:
            relay = RoomRelay(self.url, lambda: self._token_for(room), room, self._drop)
            self._relays[room] = relay
        return relay

    def _drop(self, relay: RoomRelay) -> None:
        if self._relays.get(relay.room_name) is relay:
            del self._relays[relay.room_name]
        asyncio.get_running_loop().create_task(relay.aclose())

    async def aclose(self) -> None:
        relays, self._relays = list(self._relays.values()), {}
        await asyncio.gather(*(r.aclose() for r in relays), return_exceptions=True)


def relay_identity() -> str:
    return f"captions-relay-{secrets.token_hex(6)}"


def encode(message: dict) -> str:
    return json.dumps(message, ensure_ascii=False)
