"""Who captions a room: each captioner proves it is one, shows it is alive, and yields to another.

A captioner sets two participant attributes (captions/protocol.py): its claim (the pool's caption
key's signature of the room and its own identity) and a heartbeat counter (``captions.alive``) that
it advances every `HEARTBEAT_S`. Only participants whose claim verifies with this pool's key are
captioners: another agent (a voice assistant, a caption pool with another agent name) is none, and
is never elected nor removed. Two captioners in one room (a race between LiveKit's own dispatch and
a recovery) resolve by `elected_captioner` on what the server reports (who joined first): every
worker and viewer applies the same rule to the same facts. A new captioner claims the room before it
captions anything: it announces itself, waits `CLAIM_SETTLE_S` so that a captioner that joined at
the same moment is visible too, and asks the server (not its own, possibly late, view of the room)
who is there.

A captioner whose worker died (kill -9, a lost machine) stays in the room for about 20 s as far as
livekit-server is concerned; its heartbeat stops at once. `HeartbeatWatch` tells which stopped,
measuring time on the observer's own clock (never comparing clocks across machines).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import aiohttp
from livekit import api

from captions.log import logger
from captions.protocol import (
    ATTR_AGENT_ALIVE,
    ATTR_AGENT_CLAIM,
    ATTR_AGENT_SUPERSEDED,
    CaptionerInfo,
    claim_message,
    elected_captioner,
    verify,
)

HEARTBEAT_S = 1.0
STALE_S = 4.0
"""No heartbeat for this long (four beats missed): the captioner is superseded and replaced."""
GONE_S = 20.0
"""No heartbeat for this long: the captioner is removed. LiveKit itself keeps a participant whose
connection dropped about this long; a captioner whose loop was only blocked has seen that it was
superseded, flushed its open captions and left well before."""
CLAIM_SETTLE_S = 0.5
API_TIMEOUT_S = 5.0
API_ERRORS = (api.TwirpError, aiohttp.ClientError, OSError, asyncio.TimeoutError)
"""What LiveKit's server API client raises when the server is away, restarting or answers badly
(aiohttp's ServerDisconnectedError and ClientPayloadError are ClientErrors, not OSErrors)."""


@dataclass(frozen=True)
class LiveKitCredentials:
    """Where the server API answers (the worker's own LIVEKIT_URL and keys)."""

    url: str
    api_key: str
    api_secret: str

    def client(self) -> api.LiveKitAPI:
        """A server API client bound to the running event loop (close it with `aclose()`)."""
        import aiohttp

        return api.LiveKitAPI(self.url, self.api_key, self.api_secret,
                              timeout=aiohttp.ClientTimeout(total=API_TIMEOUT_S), failover=False)


@dataclass(frozen=True)
class Captioner:
    """A caption agent in a room, as the server lists it."""

    identity: str
    joined_s: int
    """When the server says it joined, Unix seconds."""
    alive: str
    superseded: bool = False
    """The recovery replaced it (its heartbeat stopped): no longer elected; it flushes and leaves."""

    @property
    def info(self) -> CaptionerInfo:
        return CaptionerInfo(self.identity, self.joined_s)


UNKNOWN_JOIN_S = 2**53
"""An unknown join time sorts last, in Python as in the page (web/protocol.js)."""


def joined_s(participant: api.ParticipantInfo) -> int:
    return participant.joined_at or participant.joined_at_ms // 1000 or UNKNOWN_JOIN_S


def is_captioner(participant: api.ParticipantInfo, room: str, caption_key: str) -> bool:
    """An agent whose claim, for this room and its own (server-set) identity, verifies with the key."""
    claim = participant.attributes.get(ATTR_AGENT_CLAIM, "")
    return (participant.kind == api.ParticipantInfo.Kind.AGENT and bool(claim)
            and verify(caption_key, claim_message(room=room, identity=participant.identity), claim))


def captioners_in(participants: Iterable[api.ParticipantInfo], room: str, caption_key: str) -> list[Captioner]:
    """This pool's captioners among a room's participants."""
    return [Captioner(p.identity, joined_s(p), p.attributes.get(ATTR_AGENT_ALIVE, ""),
                      bool(p.attributes.get(ATTR_AGENT_SUPERSEDED)))
            for p in participants if is_captioner(p, room, caption_key)]


def elected(captioners: list[Captioner]) -> Captioner | None:
    """The room's captioner among `captioners` (superseded ones are never elected)."""
    candidates = [c for c in captioners if not c.superseded]
    choice = elected_captioner([c.info for c in candidates])
    return next(c for c in captioners if c.identity == choice.identity) if choice else None


class HeartbeatWatch:
    """Per key (room and captioner), when its heartbeat last changed, on this observer's clock."""

    def __init__(self, stale_s: float = STALE_S, clock: Callable[[], float] = time.monotonic):
        self.stale_s = stale_s
        self._clock = clock
        self._seen: dict[str, tuple[str, float]] = {}

    def observe(self, key: str, alive: str) -> None:
        previous = self._seen.get(key)
        if previous is None or previous[0] != alive:
            self._seen[key] = (alive, self._clock())

    def stale(self, key: str, for_s: float | None = None) -> bool:
        """Unchanged for `for_s` (`stale_s` by default) since this observer first saw it (a newcomer
        is never stale)."""
        seen = self._seen.get(key)
        return seen is not None and self._clock() - seen[1] >= (self.stale_s if for_s is None else for_s)

    def keep_only(self, keys: set[str]) -> None:
        """Forgets what is no longer there (bounded memory over thousands of rooms)."""
        for key in self._seen.keys() - keys:
            del self._seen[key]


async def list_participants(client: api.LiveKitAPI, room: str) -> list[api.ParticipantInfo]:
    response = await client.room.list_participants(api.ListParticipantsRequest(room=room))
    return list(response.participants)


async def claim_room(room_name: str, identity: str, client: api.LiveKitAPI, caption_key: str) -> bool:
    """Asks the server, `CLAIM_SETTLE_S` after this captioner announced its claim, whether it is the
    room's captioner. An unreachable or failing API counts as yes: a room is better captioned twice
    for a moment than not at all (the recovery in every worker removes the extra one)."""
    try:
        await asyncio.sleep(CLAIM_SETTLE_S)
        winner = elected(captioners_in(await list_participants(client, room_name), room_name, caption_key))
    except API_ERRORS as e:
        logger.warning("room %s: could not ask LiveKit who captions the room (%s: %s); captioning", room_name,
                       type(e).__name__, e)
        return True
    if winner is not None and winner.identity != identity:
        logger.info("room %s: %s already captions it; %s leaves", room_name, winner.identity, identity)
        return False
    return True
