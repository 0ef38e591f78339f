"""`captions web` serves the captions viewer, its live captions and late viewers' backlog.

Who may do what (the security model in the docs names the test for each row):

* Only a valid, unexpired, unrevoked signed link (links.py, revocations.py) opens a room's live
  captions (`/api/live`, a WebSocket) or its backlog (`/api/backlog`), for exactly its room.
  ``--open`` (dev only) lets anyone view any room.
* Viewers never join LiveKit and never hold a LiveKit token: this server joins each room that has
  viewers once, as one participant that subscribes to nothing and publishes nothing, and forwards
  only the caption streams and who captions (relay.py). So a link's holder gets captions and nothing
  else: no audio or video, no chat or other data, no participant's metadata or attributes.
* A viewer's WebSocket is closed when its link expires or is revoked (checked every
  `REVOCATION_CHECK_S`): its access ends then, whatever client it uses.
* Viewers send nothing: a WebSocket message from a viewer closes its connection.
* The relay is hidden from the room's participant list by default (``--viewers-visible`` shows it
  as "Caption viewers"): participants see that captions are on (the captioner is in the room), not
  who reads them.
* With the room, a viewer gets the deployment's caption key (the public half: captions/protocol.py),
  the one key its page trusts, and this server's clock, against which the page refuses replays.
* Translations (issue 26): a viewer names the language it reads (``lang``, one of the operator's
  ``--translate-to`` languages, nothing else: an unknown one is refused with close code 4422); its
  socket carries the originals and that language's translations only, and its backlog the originals
  and that language's translated finals. The relay tells the room's captioner which languages its
  viewers read (relay.py), so the worker translates only into those.

Every request that costs something (a live connection, a transcript read) has a per-link (the
link's ``jti``, its one canonical name) and a per-address budget (ratelimit.py); past it the answer
is 429 with the seconds to wait (a WebSocket is closed with code 4429). A request with no valid link
spends only its address's budget. Transcript reads are bounded (the file's last `BACKLOG_MAX_BYTES`)
and cached while the file is unchanged.

The LiveKit API secret never leaves this process.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import re
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from captions import PROJECT_ROOT
from captions.config import (
    add_caption_secret_option,
    add_livekit_options,
    add_option,
    language_code,
    language_list,
    positive_int,
)
from captions.live.transcripts import BACKLOG_WINDOW_S, recent_segments, transcript_path
from captions.log import logger
from captions.protocol import CaptionSigner
from captions.viewer.backlog import BacklogCache
from captions.viewer.links import ROOM_NAME, AccessDenied, Link, add_viewer_secret_option, check_link
from captions.viewer.ratelimit import OpenConnections, RateLimiter
from captions.viewer.relay import OVERFLOW, RELAY_NAME, Relays, encode, relay_identity
from captions.viewer.revocations import Revocations, default_path
from captions.viewer.server_api import ServerApi

WEB_DIR = PROJECT_ROOT / "web"
LIVEKIT_CLIENT_PATH = Path("node_modules/livekit-client/dist/livekit-client.esm.mjs")
# Only top-level files of web/ with these names are served: never node_modules, never a path.
STATIC_NAME = re.compile(r"^[A-Za-z0-9_-]+\.(html|js|css|svg|ico|png)$")


@dataclass
class WebSettings:
    """What the viewer server needs; built from the command line or by `captions up`."""

    livekit_url: str
    """Where this server's relays reach LiveKit (browsers never do)."""
    api_key: str
    api_secret: str
    viewer_secret: str
    """Key of the HMAC in viewer links."""
    agent_name: str = ""
    """The caption worker pool whose caption key viewers trust (the workers' ``--agent-name``)."""
    caption_secret: str | None = None
    """What the caption key is derived from (the workers' ``--caption-secret``); None: the API secret."""
    viewers_visible: bool = False
    """The relay appears in the room's participant list (as "Caption viewers"); hidden by default."""
    revocations: Path | None = None
    """The revocation list (revocations.py); None: ``<data-dir>/revoked-links.ndjson``."""
    open_access: bool = False
    """Dev only: any room may be viewed without a signed link."""
    web_dir: Path = WEB_DIR
    data_dir: Path | None = None
    """The worker's transcripts, for late viewers' backlog; None: no backlog from this server."""
    behind_proxy: bool = False
    """Take the client's address from X-Forwarded-For (set by a reverse proxy in front of this one)."""
    tokens_per_minute_per_link: float = 30
    tokens_per_minute_per_address: float = 60
    backlogs_per_minute_per_link: float = 12
    backlogs_per_minute_per_address: float = 12
    translate_to: tuple[str, ...] = ()
    """The languages captions are translated into (the workers' ``--translate-to``): what a viewer may
    choose to read, besides the original."""

    @functools.cached_property
    def caption_key(self) -> str:
        """The public caption key of the pool `agent_name` (captions/protocol.py)."""
        return CaptionSigner.for_deployment(self.caption_secret or self.api_secret, self.agent_name).public_key


REVOCATION_CHECK_S = 1.0
"""How often a live viewer's link is checked against the revocation list."""
CLOSE_CODES = {"missing": 4400, "invalid": 4403, "expired": 4401, "revoked": 4410, "rate_limited": 4429,
               "language": 4422}
"""WebSocket close codes for a refused or ended link (the page's states: web/session.js)."""
CLOSE_TIMEOUT_S = 5.0
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
CLOSE_SLOW = 4408
"""A viewer that does not read its messages (its queue filled up): it reconnects."""


def relay_token(settings: WebSettings, room: str) -> str:
    """The LiveKit token of this server's relay in `room`: it subscribes to nothing and publishes
    nothing; LiveKit delivers it the room's data (the caption streams) all the same. With translation
    configured it may set its own attributes (``captions.reading``: the languages its viewers read)."""
    from livekit import api

    grants = api.VideoGrants(room_join=True, room=room, hidden=not settings.viewers_visible, can_subscribe=False,
                             can_publish=False, can_publish_data=False,
                             can_update_own_metadata=bool(settings.translate_to))
    return (api.AccessToken(settings.api_key, settings.api_secret).with_identity(relay_identity())
            .with_name(RELAY_NAME).with_ttl(timedelta(minutes=10)).with_grants(grants).to_jwt())


class _Refused(Exception):
    """A request answered with an error (`response`) before any work is done for it."""

    def __init__(self, response) -> None:
        super().__init__(response.status)
        self.response = response


def _json_error(status: int, message: str, reason: str, retry_after_s: float | None = None):
    from aiohttp import web

    headers = {"Cache-Control": "no-store"}
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(retry_after_s)))
    return web.json_response({"error": message, "reason": reason}, status=status, headers=headers)


CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; object-src 'none'")
"""Scripts only from this server; connections only to it (captions come over its WebSocket)."""


def create_app(settings: WebSettings, backlogs: BacklogCache | None = None, relays=None):
    """`relays`: where live captions come from (relay.Relays by default; tests pass a fake)."""
    """The aiohttp application: static viewer, ``/api/live``, ``/api/backlog``, ``/api/config``,
    ``/healthz``."""
    from aiohttp import web

    csp = CONTENT_SECURITY_POLICY
    vendor = settings.web_dir / LIVEKIT_CLIENT_PATH

    @web.middleware
    async def security_headers(request, handler):
        response = await handler(request)
        response.headers.setdefault("Content-Security-Policy", csp)
        response.headers["X-Content-Type-Options"] = "nosniff"
        # Viewer links carry their access signature in the query: never leak it.
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    server_api = ServerApi(settings.livekit_url, settings.api_key, settings.api_secret)
    # A hidden relay is shown to nobody: the server API tells the captioners what its viewers read.
    tell = server_api.update_attributes if settings.translate_to and not settings.viewers_visible else None
    relays = relays or Relays(settings.livekit_url, lambda room: relay_token(settings, room), settings.caption_key,
                              server_api.room_exists, settings.translate_to, tell)
    live_viewers = OpenConnections()
    token_links = RateLimiter(settings.tokens_per_minute_per_link, burst=10)
    token_addresses = RateLimiter(settings.tokens_per_minute_per_address, burst=20)
    backlog_links = RateLimiter(settings.backlogs_per_minute_per_link, burst=6)
    backlog_addresses = RateLimiter(settings.backlogs_per_minute_per_address, burst=6)
    revocations = Revocations(settings.revocations or default_path(settings.data_dir))
    backlogs = backlogs or BacklogCache(recent_segments)

    def client_address(request: web.Request) -> str:
        if settings.behind_proxy and (forwarded := request.headers.get("X-Forwarded-For", "")):
            return forwarded.split(",")[-1].strip()  # the address the proxy itself saw
        return request.remote or "unknown"

    def too_many(*waits: float) -> None:
        wait = max(waits)
        if wait > 0:
            raise _Refused(_json_error(429, "Too many requests from this link or address; try again in "
                                       f"{max(1, round(wait))} s.", "rate_limited", wait))

    def checked_link(request: web.Request, what: str, addresses: RateLimiter, links: RateLimiter) -> tuple[str, Link | None]:
        """The room (and the link) of a request; raises _Refused for a bad link or a spent budget.
        The address pays first, so that a flood of bad links costs nothing but its own budget; the
        link pays by its id, whatever spelling of it the request used."""
        too_many(addresses.take(client_address(request)))
        if settings.open_access and "link" not in request.query:
            room = request.query.get("room", "")
            if not ROOM_NAME.match(room):
                raise _Refused(_json_error(400, "No room given. Open a viewer link that names a room (?room=...).",
                                           "missing"))
            return room, None
        try:
            link = check_link(settings.viewer_secret, request.query.get("link", ""))
            if revocations.is_revoked(link):
                raise AccessDenied("This viewer link was revoked by the operator. Ask them for a new one.",
                                   "revoked")
        except AccessDenied as e:
            logger.info("viewer %s refused: %s", what, e)
            raise _Refused(_json_error(400 if e.reason == "missing" else 403, str(e), e.reason)) from None
        too_many(links.take(link.link_id))
        return link.room, link

    def reading_language(request: web.Request) -> str:
        """The language a viewer reads (``lang``): "" for the originals, else one of the configured
        ones; raises _Refused for anything else."""
        asked = request.query.get("lang", "")
        language = language_code(asked) if asked else ""  # the workers' spelling: lower case
        if language is None or (language and language not in settings.translate_to):
            offered = ", ".join(settings.translate_to) or "none"
            raise _Refused(_json_error(400, f"Captions are not translated into {asked[:16]!r} here "
                                       f"(languages offered: {offered}).", "language"))
        return language

    async def live(request: web.Request) -> web.StreamResponse:
        """A room's live captions over a WebSocket, until the link ends (see the module notes)."""
        refused = None
        try:
            room, link = checked_link(request, "live", token_addresses, token_links)
            language = reading_language(request)
        except _Refused as e:
            refused = e.response
        ws = web.WebSocketResponse(heartbeat=20, max_msg_size=4096)
        if not ws.can_prepare(request).ok:
            return refused or _json_error(426, "Open this with a WebSocket (the viewer page does).", "websocket")
        await ws.prepare(request)
        if refused is not None:
            body = json.loads(refused.body)
            await ws.close(code=CLOSE_CODES.get(body["reason"], 4403), message=body["error"].encode()[:120])
            return ws
        over = live_viewers.over_limit(client_address(request), link.link_id if link else room)
        if over:
            await _close(ws, request, 4429, over)
            return ws
        with live_viewers.counted(client_address(request), link.link_id if link else room):
            await _serve_viewer(ws, request, room, link, language)
        return ws

    async def _close(ws: web.WebSocketResponse, request: web.Request, code: int, message: str) -> None:
        """Closes, and drops the connection if the viewer does not take the close (it stopped reading)."""
        try:
            await asyncio.wait_for(ws.close(code=code, message=message.encode()[:120]), CLOSE_TIMEOUT_S)
        except (asyncio.TimeoutError, ConnectionError):
            if request.transport is not None:
                request.transport.abort()

    async def _serve_viewer(ws: web.WebSocketResponse, request: web.Request, room: str, link: Link | None,
                            language: str) -> None:
        # The hello first: the page reads every other message as part of the room it opened.
        await ws.send_str(encode({"type": "hello", "room": room, "caption_key": settings.caption_key,
                                  "server_time_ms": int(time.time() * 1000),
                                  "link_expires_at": link.expires_at if link else None, "language": language}))
        relay = relays.relay(room)  # after the await: a relay that went idle meanwhile is not reused
        queue = relay.add_viewer(language)
        sender = asyncio.create_task(_forward(ws, queue))
        reader = asyncio.create_task(_read_nothing(ws))
        ending = asyncio.create_task(_link_end(link))
        try:
            done, _ = await asyncio.wait({sender, reader, ending}, return_when=asyncio.FIRST_COMPLETED)
        except ConnectionError:
            done = set()
        finally:
            # Nothing more for this viewer, whatever happens to the close.
            relay.remove_viewer(queue)
            for task in (sender, reader, ending):
                task.cancel()
            await asyncio.gather(sender, reader, ending, return_exceptions=True)
        if ws.closed:
            return
        if ending in done and ending.exception() is None:
            reason = ending.result()
            await _close(ws, request, CLOSE_CODES[reason], _ENDED[reason])
        elif sender in done:
            await _close(ws, request, CLOSE_SLOW, "too slow: reconnect")
        elif reader in done:
            await _close(ws, request, 1008, "viewers send nothing")

    async def _forward(ws: web.WebSocketResponse, queue: asyncio.Queue) -> None:
        while True:
            message = await queue.get()
            if message == OVERFLOW:
                return
            await ws.send_str(message)

    async def _read_nothing(ws: web.WebSocketResponse) -> None:
        """Returns when the viewer sends anything (or goes away)."""
        async for _ in ws:
            return

    async def _link_end(link: Link | None) -> str:
        """"expired" or "revoked", when the link ends (never for --open's link-less viewers)."""
        while True:
            if link is not None and link.expires_at <= time.time():
                return "expired"
            if link is not None and revocations.is_revoked(link):
                return "revoked"
            await asyncio.sleep(REVOCATION_CHECK_S if link is None else
                                max(0.05, min(REVOCATION_CHECK_S, link.expires_at - time.time())))

    async def backlog(request: web.Request) -> web.Response:
        try:
            room, _ = checked_link(request, "backlog", backlog_addresses, backlog_links)
            language = reading_language(request)
        except _Refused as e:
            return e.response
        if settings.data_dir is None:
            return _json_error(404, "This viewer server has no access to the transcripts: earlier captions "
                               "are not available.", "no_backlog")
        try:
            segments = await backlogs.read(transcript_path(settings.data_dir, room), language)
        except OSError as e:
            logger.error("backlog of room %r unreadable: %s", room, e)
            return _json_error(503, "Earlier captions cannot be read right now; new captions appear below.",
                               "backlog_unavailable")
        return web.json_response({"room": room, "window_s": BACKLOG_WINDOW_S, "language": language,
                                  "segments": [dataclasses.asdict(seg) for seg in segments]},
                                 headers={"Cache-Control": "no-store"})

    async def config(request: web.Request) -> web.Response:
        return web.json_response({"caption_key": settings.caption_key, "server_time_ms": int(time.time() * 1000),
                                  "languages": list(settings.translate_to)}, headers={"Cache-Control": "no-store"})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "open_access": settings.open_access})

    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(settings.web_dir / "index.html", headers={"Cache-Control": "no-cache"})

    async def livekit_client(request: web.Request) -> web.FileResponse:
        return web.FileResponse(vendor, headers={"Content-Type": "text/javascript"})

    async def static_file(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = settings.web_dir / name
        if not STATIC_NAME.match(name) or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    app = web.Application(middlewares=[security_headers])
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/live", live)
    app.router.add_get("/api/backlog", backlog)
    app.router.add_get("/api/config", config)
    app.router.add_get("/vendor/livekit-client.esm.mjs", livekit_client)
    app.router.add_get("/{name}", static_file)
    app.on_shutdown.append(lambda app: relays.aclose())
    app.on_cleanup.append(lambda app: server_api.aclose())
    return app


_ENDED = {"expired": "This viewer link has expired. Ask the operator for a new one.",
          "revoked": "This viewer link was revoked by the operator. Ask them for a new one."}


def check_web_dir(web_dir: Path | None = None) -> None:
    """Raises RuntimeError with the fix when the viewer's JavaScript dependencies are not installed."""
    web_dir = web_dir or WEB_DIR
    if not (web_dir / LIVEKIT_CLIENT_PATH).is_file():
        raise RuntimeError(
            f"{web_dir / 'node_modules'} is missing (the viewer's livekit-client): "
            f"run `npm ci` in web/ (cd {web_dir} && npm ci)"
        )


def _truthy(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected 1/0, true/false, yes/no, got {text!r}")


def configure_web_parser(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--host", env="CAPTIONS_WEB_HOST", default="127.0.0.1", help="address to bind")
    add_option(parser, "--port", env="CAPTIONS_WEB_PORT", default=8080, type=positive_int, help="port")
    add_livekit_options(parser)
    add_viewer_secret_option(parser)
    add_option(parser, "--agent-name", env="CAPTIONS_AGENT_NAME", default="",
               help="the caption workers' agent name: viewers trust only that pool's caption key")
    add_caption_secret_option(parser)
    add_option(parser, "--viewers-visible", env="CAPTIONS_VIEWERS_VISIBLE", default=False, type=_truthy,
               nargs="?", const=True, help="show the viewers' relay in the room's participant list (hidden by default)")
    add_option(parser, "--revocations", env="CAPTIONS_REVOCATIONS", default=None, type=Path,
               help="the revocation list `captions revoke` writes (default <data-dir>/revoked-links.ndjson)")
    add_option(parser, "--open", env="CAPTIONS_WEB_OPEN", default=False, type=_truthy, nargs="?", const=True,
               help="DEV ONLY: let anyone view any room without a signed link")
    add_option(parser, "--data-dir", env="CAPTIONS_DATA_DIR", default="data", type=Path,
               help="the worker's transcript directory, read for late viewers' backlog")
    add_option(parser, "--translate-to", env="CAPTIONS_TRANSLATE_TO", default=(), type=language_list,
               help="languages viewers may read captions in, besides the original (comma-separated codes, "
                    "the workers' setting: one .env configures both)")
    add_option(parser, "--behind-proxy", env="CAPTIONS_WEB_BEHIND_PROXY", default=False, type=_truthy, nargs="?",
               const=True, help="a reverse proxy is in front: per-address limits use X-Forwarded-For")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


def settings_from_args(args: argparse.Namespace) -> WebSettings:
    return WebSettings(
        livekit_url=args.url,
        api_key=args.api_key,
        api_secret=args.api_secret,
        viewer_secret=args.viewer_secret or args.api_secret,
        agent_name=args.agent_name,
        caption_secret=args.caption_secret,
        viewers_visible=bool(args.viewers_visible),
        revocations=args.revocations,
        open_access=bool(args.open),
        data_dir=args.data_dir,
        behind_proxy=bool(args.behind_proxy),
        translate_to=tuple(args.translate_to),
    )


def run_web(args: argparse.Namespace) -> int:
    from aiohttp import web

    try:
        check_web_dir()
    except RuntimeError as e:
        print(f"captions web: {e}", file=sys.stderr)
        return 1
    settings = settings_from_args(args)
    if settings.open_access and args.host not in LOOPBACK_HOSTS:
        print(f"captions web: --open lets anyone view any room: it serves only on this machine "
              f"(--host 127.0.0.1), not on {args.host}", file=sys.stderr)
        return 2
    if settings.open_access:
        logger.warning("--open: ANY visitor may view ANY room; use signed links (captions token) otherwise")
    logger.info("viewer at http://%s:%d/ (its relays reach LiveKit at %s)", args.host, args.port, settings.livekit_url)
    web.run_app(create_app(settings), host=args.host, port=args.port, print=None)
    return 0


