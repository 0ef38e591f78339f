"""LiveKit's server API as the viewer server uses it (server.py, relay.py): whether a room exists,
and setting a captioner's attributes. The API secret stays in this process."""

from __future__ import annotations


class ServerApi:
    """LiveKit's server API, for the relays to ask whether a room exists (a viewer must not create
    one) and to tell a room's captioners what its viewers read; one client, made on first use on the
    server's loop."""

    def __init__(self, url: str, api_key: str, api_secret: str) -> None:
        self._url, self._api_key, self._api_secret = url, api_key, api_secret
        self._client = None

    def _api(self):
        from livekit import api

        if self._client is None:
            import aiohttp

            self._client = api.LiveKitAPI(self._url, self._api_key, self._api_secret,
                                          timeout=aiohttp.ClientTimeout(total=5))
        return self._client

    async def room_exists(self, room: str) -> bool:
        from livekit import api

        return bool((await self._api().room.list_rooms(api.ListRoomsRequest(names=[room]))).rooms)

    async def update_attributes(self, room: str, identity: str, attributes: dict[str, str]) -> None:
        """Sets (merges) `identity`'s attributes in `room`; "" removes one."""
        from livekit import api

        await self._api().room.update_participant(
            api.UpdateParticipantRequest(room=room, identity=identity, attributes=attributes))

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
