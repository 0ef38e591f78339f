"""Viewers leave when their link ends: the viewer server's sweeper.

livekit-server refreshes the token of a connected participant, so a token's expiry only bounds
joining: a viewer who joined on a link keeps receiving captions after the link expired, until a
server call removes it. Every viewer token this server mints carries its link in the participant's
metadata (`viewer_metadata`; a viewer cannot change its own metadata). Every `interval_s` the sweeper
lists the rooms and their participants through LiveKit's server API and removes each viewer whose
link has expired or was revoked (revocations.py). A viewer is therefore gone within about
`interval_s` plus a few API calls of its link ending, whatever client it uses; the page then asks
for a new token, and is told the link has ended.

Cost per sweep: one ListRooms, one ListParticipants per room (hidden viewers may not be counted in
a room's participant count, so every room is listed), one
RemoveParticipant per viewer removed.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from captions.log import logger
from captions.viewer.links import Link

if TYPE_CHECKING:
    from livekit import api

SWEEP_INTERVAL_S = 5.0
API_TIMEOUT_S = 5.0
METADATA_KEY = "captions_link"


def viewer_metadata(link: Link) -> str:
    """The metadata of a viewer's participant: the link it joined on."""
    return json.dumps({METADATA_KEY: {"id": link.link_id, "iat": link.issued_at, "exp": link.expires_at}})


def link_of(participant: api.ParticipantInfo, room: str) -> Link | None:
    """The link a viewer joined on, from metadata only this server's tokens set; None for anyone else."""
    try:
        claims = json.loads(participant.metadata or "{}").get(METADATA_KEY)
        return Link(room, str(claims["id"]), int(claims["iat"]), int(claims["exp"]))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


class Sweeper:
    """Removes viewers whose link ended (`ended(link)`: expired or revoked), every `interval_s`."""

    def __init__(self, url: str, api_key: str, api_secret: str, ended: Callable[[Link], bool],
                 interval_s: float = SWEEP_INTERVAL_S):
        self.url, self.api_key, self.api_secret = url, api_key, api_secret
        self.ended = ended
        self.interval_s = interval_s
        self.removed = 0

    async def run(self) -> None:
        """Sweeps until cancelled; a failed sweep (any error: the server restarting, a bad answer) is
        logged and the next one tried, so the sweeper never stops silently."""
        import aiohttp
        from livekit import api

        client = api.LiveKitAPI(self.url, self.api_key, self.api_secret,
                                timeout=aiohttp.ClientTimeout(total=API_TIMEOUT_S))
        try:
            while True:
                try:
                    await self.sweep(client)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - any failure: log it, sweep again next time
                    logger.warning("viewer sweep failed (%s: %s); trying again in %.0f s", type(e).__name__, e,
                                   self.interval_s)
                await asyncio.sleep(self.interval_s * random.uniform(0.8, 1.0))
        finally:
            await client.aclose()

    async def sweep(self, client: api.LiveKitAPI) -> None:
        from livekit import api

        now = time.time()
        for room in (await client.room.list_rooms(api.ListRoomsRequest())).rooms:
            listing = await client.room.list_participants(api.ListParticipantsRequest(room=room.name))
            for participant in listing.participants:
                link = link_of(participant, room.name)
                if link is None or not (link.expires_at <= now or self.ended(link)):
                    continue
                try:
                    await client.room.remove_participant(
                        api.RoomParticipantIdentity(room=room.name, identity=participant.identity))
                except api.TwirpError as e:  # it left meanwhile
                    logger.info("viewer %s already gone from %s (%s)", participant.identity, room.name, e.message)
                    continue
                self.removed += 1
                logger.info("removed viewer %s from room %s: its link %s %s", participant.identity, room.name,
                            link.link_id, "expired" if link.expires_at <= now else "was revoked")
