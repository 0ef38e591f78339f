"""Who captions a room: each captioner announces itself, proves it is alive, and yields to another.

A captioner sets three participant attributes (captions/protocol.py): its key, when it joined
(``captions.since``, the server's clock) and a heartbeat counter (``captions.alive``) that it advances
every `HEARTBEAT_S`. Two captioners in one room (a race between LiveKit's own dispatch and a
recovery) resolve by `elected_captioner`: the one that joined first stays. A new captioner claims the
room before it captions anything: it announces itself, waits `CLAIM_SETTLE_S` so that a captioner
that joined at the same moment is visible too, and asks the server (not its own, possibly late, view
of the room) who is there.

A captioner whose worker died (kill -9, a lost machine) stays in the room for about 20 s as far as
livekit-server is concerned; its heartbeat stops at once. `HeartbeatWatch` tells which stopped,
measuring time on the observer's own clock (never comparing clocks across machines).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from livekit import api

from captions.log import logger
from captions.protocol import (
    ATTR_AGENT_ALIVE,
    ATTR_AGENT_KEY,
    ATTR_AGENT_SINCE,
    CaptionerInfo,
    elected_captioner,
)

HEARTBEAT_S = 1.0
STALE_S = 4.0
"""No heartbeat for this long (four beats missed): the captioner is gone."""
CLAIM_SETTLE_S = 0.5
API_TIMEOUT_S = 5.0


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
    since_ms: int
    alive: str

    @property
    def info(self) -> CaptionerInfo:
        return CaptionerInfo(self.identity, self.since_ms)


def captioners_in(participants: Iterable[api.ParticipantInfo]) -> list[Captioner]:
    """The caption agents among a room's participants: agents that announced a caption key (other
    agents, a voice assistant say, are not captioners)."""
    return [Captioner(p.identity, p.joined_at_ms or p.joined_at * 1000, p.attributes.get(ATTR_AGENT_ALIVE, ""))
            for p in participants
            if p.kind == api.ParticipantInfo.Kind.AGENT and p.attributes.get(ATTR_AGENT_KEY)]


def elected(captioners: list[Captioner]) -> Captioner | None:
    choice = elected_captioner([c.info for c in captioners])
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

    def stale(self, key: str) -> bool:
        """Unchanged for `stale_s` since this observer first saw it (a newcomer is never stale)."""
        seen = self._seen.get(key)
        return seen is not None and self._clock() - seen[1] >= self.stale_s

    def keep_only(self, keys: set[str]) -> None:
        """Forgets what is no longer there (bounded memory over thousands of rooms)."""
        for key in self._seen.keys() - keys:
            del self._seen[key]


async def list_participants(client: api.LiveKitAPI, room: str) -> list[api.ParticipantInfo]:
    response = await client.room.list_participants(api.ListParticipantsRequest(room=room))
    return list(response.participants)


async def claim_room(room_name: str, identity: str, client: api.LiveKitAPI,
                     announce: Callable[[dict[str, str]], object]) -> bool:
    """Announces this captioner (key, since, heartbeat through `announce`, which must already carry
    the key), waits `CLAIM_SETTLE_S`, then asks the server whether it is the room's captioner. An
    unreachable API counts as yes: a room is better captioned twice for a moment than not at all
    (the recovery in every worker removes the extra one)."""
    try:
        me = next((p for p in await list_participants(client, room_name) if p.identity == identity), None)
        if me is not None:
            await announce({ATTR_AGENT_SINCE: str(me.joined_at_ms or me.joined_at * 1000)})
        await asyncio.sleep(CLAIM_SETTLE_S)
        winner = elected(captioners_in(await list_participants(client, room_name)))
    except (api.TwirpError, OSError, asyncio.TimeoutError) as e:
        logger.warning("room %s: could not ask LiveKit who captions the room (%s); captioning", room_name, e)
        return True
    if winner is not None and winner.identity != identity:
        logger.info("room %s: %s already captions it; %s leaves", room_name, winner.identity, identity)
        return False
    return True
