"""`captions web` serves the captions viewer, mints viewer tokens and serves late viewers the backlog.

Who may do what (the README's security table names the test for each row):

* Only a valid, unexpired, unrevoked signed link (links.py, revocations.py) gets a LiveKit token or a
  backlog, for exactly its room. ``--open`` (dev only) lets anyone view any room.
* A viewer token is **captions only**: it cannot subscribe to any track (``canSubscribe`` false:
  livekit-server still delivers the room's data, and so its caption text streams, to such a
  participant, checked against 1.13.5), cannot publish media or data, cannot change its metadata,
  and is short lived (``--token-ttl`` bounds joining; LiveKit refreshes it while connected).
* Viewers are hidden from the room's participant list by default (``--viewers-visible`` shows them as
  "Caption viewer"): participants see that captions are on (the captioner is in the room), not who
  reads them. A hidden viewer can receive nothing but the room's data messages.
* A viewer leaves when its link ends: the sweeper (sweeper.py) removes it from the room.
* With its token a viewer gets the deployment's caption key (the public half: captions/protocol.py),
  the one key its page trusts, and this server's clock, against which the page refuses replays.

Every request that costs something (a token, a transcript read) has a per-link (the link's ``jti``,
its one canonical name) and a per-address budget (ratelimit.py); past it the answer is 429 with the
seconds to wait. A request with no valid link spends only its address's budget. Transcript reads are
bounded (the file's last `BACKLOG_MAX_BYTES`) and cached while the file is unchanged.

The LiveKit API secret never leaves this process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import re
import secrets
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from captions import PROJECT_ROOT
from captions.config import add_livekit_options, add_option, non_negative_float, positive_int
from captions.live.transcripts import BACKLOG_WINDOW_S, recent_segments, transcript_path
from captions.log import logger
from captions.protocol import CaptionSigner
from captions.viewer.backlog import BacklogCache
from captions.viewer.links import ROOM_NAME, AccessDenied, Link, add_viewer_secret_option, check_link
from captions.viewer.ratelimit import RateLimiter
from captions.viewer.revocations import Revocations, default_path
from captions.viewer.sweeper import SWEEP_INTERVAL_S, Sweeper, viewer_metadata

WEB_DIR = PROJECT_ROOT / "web"
LIVEKIT_CLIENT_PATH = Path("node_modules/livekit-client/dist/livekit-client.esm.mjs")
# Only top-level files of web/ with these names are served: never node_modules, never a path.
STATIC_NAME = re.compile(r"^[A-Za-z0-9_-]+\.(html|js|css|svg|ico|png)$")
VIEWER_NAME = "Caption viewer"


@dataclass
class WebSettings:
    """What the viewer server needs; built from the command line or by `captions up`."""

    livekit_url: str
    """Where this server's process would reach LiveKit (not used by browsers)."""
    public_livekit_url: str
    """The LiveKit URL browsers connect to."""
    api_key: str
    api_secret: str
    viewer_secret: str
    """Key of the HMAC in viewer links."""
    agent_name: str = ""
    """The caption worker pool whose caption key viewers trust (the workers' ``--agent-name``)."""
    token_ttl_s: int = 300
    """How long a minted token may be used to join; connected viewers are refreshed by LiveKit."""
    viewers_visible: bool = False
    """Viewers appear in the room's participant list (as "Caption viewer"); hidden by default."""
    revocations: Path | None = None
    """The revocation list (revocations.py); None: ``<data-dir>/revoked-links.ndjson``."""
    sweep_interval_s: float = SWEEP_INTERVAL_S
    """How often viewers whose link ended are looked for and removed; 0: never (tests only)."""
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

    @functools.cached_property
    def caption_key(self) -> str:
        """The public caption key of the pool `agent_name` (captions/protocol.py)."""
        return CaptionSigner.for_deployment(self.api_secret, self.agent_name).public_key


def mint_viewer_token(settings: WebSettings, room: str, link: Link | None = None) -> dict:
    """A LiveKit token for one captions-only viewer of `room`; never lives past the link that asked
    for it, and carries that link for the sweeper."""
    from livekit import api

    ttl = settings.token_ttl_s
    if link is not None:
        ttl = max(1, min(ttl, int(link.expires_at - time.time())))
    identity = f"viewer-{secrets.token_hex(6)}"
    grants = api.VideoGrants(
        room_join=True,
        room=room,
        hidden=not settings.viewers_visible,
        # Captions only: no track at all, audio or video, whatever client holds the token.
        can_subscribe=False,
        can_publish=False,
        # Nothing at all: a viewer link must never let its holder put data into the room.
        can_publish_data=False,
        can_update_own_metadata=False,
    )
    token = (
        api.AccessToken(settings.api_key, settings.api_secret)
        .with_identity(identity)
        .with_name(VIEWER_NAME)
        .with_metadata(viewer_metadata(link) if link is not None else "")
        .with_ttl(timedelta(seconds=ttl))
        .with_grants(grants)
        .to_jwt()
    )
    return {
        "token": token,
        "url": settings.public_livekit_url,
        "room": room,
        "identity": identity,
        "expires_at": int(time.time()) + ttl,
        "link_expires_at": link.expires_at if link is not None else None,
        "caption_key": settings.caption_key,
        "server_time_ms": int(time.time() * 1000),
    }


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


def _content_security_policy(public_livekit_url: str) -> str:
    """Scripts only from this server; connections only here and to the LiveKit server."""
    parts = urlsplit(public_livekit_url)
    http_scheme = "https" if parts.scheme in ("wss", "https") else "http"
    ws_scheme = "wss" if http_scheme == "https" else "ws"
    livekit = f"{ws_scheme}://{parts.netloc} {http_scheme}://{parts.netloc}"
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src 'self' {livekit}; base-uri 'none'; form-action 'none'; object-src 'none'"
    )


def create_app(settings: WebSettings, backlogs: BacklogCache | None = None):
    """The aiohttp application: static viewer, ``/api/token``, ``/api/backlog``, ``/api/config``,
    ``/healthz``."""
    from aiohttp import web

    csp = _content_security_policy(settings.public_livekit_url)
    vendor = settings.web_dir / LIVEKIT_CLIENT_PATH

    @web.middleware
    async def security_headers(request, handler):
        response = await handler(request)
        response.headers.setdefault("Content-Security-Policy", csp)
        response.headers["X-Content-Type-Options"] = "nosniff"
        # Viewer links carry their access signature in the query: never leak it.
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

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

    async def token(request: web.Request) -> web.Response:
        try:
            room, link = checked_link(request, "token", token_addresses, token_links)
        except _Refused as e:
            return e.response
        return web.json_response(mint_viewer_token(settings, room, link), headers={"Cache-Control": "no-store"})

    async def backlog(request: web.Request) -> web.Response:
        try:
            room, _ = checked_link(request, "backlog", backlog_addresses, backlog_links)
        except _Refused as e:
            return e.response
        if settings.data_dir is None:
            return _json_error(404, "This viewer server has no access to the transcripts: earlier captions "
                               "are not available.", "no_backlog")
        try:
            segments = await backlogs.read(transcript_path(settings.data_dir, room))
        except OSError as e:
            logger.error("backlog of room %r unreadable: %s", room, e)
            return _json_error(503, "Earlier captions cannot be read right now; new captions appear below.",
                               "backlog_unavailable")
        return web.json_response({"room": room, "window_s": BACKLOG_WINDOW_S,
                                  "segments": [dataclasses.asdict(seg) for seg in segments]},
                                 headers={"Cache-Control": "no-store"})

    async def config(request: web.Request) -> web.Response:
        return web.json_response({"livekit_url": settings.public_livekit_url, "caption_key": settings.caption_key,
                                  "server_time_ms": int(time.time() * 1000)}, headers={"Cache-Control": "no-store"})

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
    app.router.add_get("/api/token", token)
    app.router.add_get("/api/backlog", backlog)
    app.router.add_get("/api/config", config)
    app.router.add_get("/vendor/livekit-client.esm.mjs", livekit_client)
    app.router.add_get("/{name}", static_file)
    if settings.sweep_interval_s > 0:
        app.cleanup_ctx.append(_sweeping(settings, revocations))
    return app


def _sweeping(settings: WebSettings, revocations: Revocations):
    """Runs the sweeper (sweeper.py) for the application's lifetime."""

    async def context(app):
        sweeper = Sweeper(settings.livekit_url, settings.api_key, settings.api_secret, revocations.is_revoked,
                          settings.sweep_interval_s)
        task = asyncio.create_task(sweeper.run(), name="viewer-sweeper")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return context


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
    add_option(parser, "--public-livekit-url", env="CAPTIONS_PUBLIC_LIVEKIT_URL", default=None,
               help="LiveKit URL as browsers reach it (defaults to --url)")
    add_viewer_secret_option(parser)
    add_option(parser, "--token-ttl", env="CAPTIONS_TOKEN_TTL", default=300, type=positive_int,
               help="seconds a viewer's LiveKit token may be used to join (LiveKit refreshes it while connected)")
    add_option(parser, "--agent-name", env="CAPTIONS_AGENT_NAME", default="",
               help="the caption workers' agent name: viewers trust only that pool's caption key")
    add_option(parser, "--viewers-visible", env="CAPTIONS_VIEWERS_VISIBLE", default=False, type=_truthy,
               nargs="?", const=True, help="show viewers in the room's participant list (hidden by default)")
    add_option(parser, "--revocations", env="CAPTIONS_REVOCATIONS", default=None, type=Path,
               help="the revocation list `captions revoke` writes (default <data-dir>/revoked-links.ndjson)")
    add_option(parser, "--sweep-interval", env="CAPTIONS_SWEEP_INTERVAL", default=SWEEP_INTERVAL_S,
               type=non_negative_float, help="seconds between removals of viewers whose link ended (0: never)")
    add_option(parser, "--open", env="CAPTIONS_WEB_OPEN", default=False, type=_truthy, nargs="?", const=True,
               help="DEV ONLY: let anyone view any room without a signed link")
    add_option(parser, "--data-dir", env="CAPTIONS_DATA_DIR", default="data", type=Path,
               help="the worker's transcript directory, read for late viewers' backlog")
    add_option(parser, "--behind-proxy", env="CAPTIONS_WEB_BEHIND_PROXY", default=False, type=_truthy, nargs="?",
               const=True, help="a reverse proxy is in front: per-address limits use X-Forwarded-For")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


def settings_from_args(args: argparse.Namespace) -> WebSettings:
    return WebSettings(
        livekit_url=args.url,
        public_livekit_url=args.public_livekit_url or args.url,
        api_key=args.api_key,
        api_secret=args.api_secret,
        viewer_secret=args.viewer_secret or args.api_secret,
        agent_name=args.agent_name,
        token_ttl_s=args.token_ttl,
        viewers_visible=bool(args.viewers_visible),
        revocations=args.revocations,
        sweep_interval_s=args.sweep_interval,
        open_access=bool(args.open),
        data_dir=args.data_dir,
        behind_proxy=bool(args.behind_proxy),
    )


def run_web(args: argparse.Namespace) -> int:
    from aiohttp import web

    try:
        check_web_dir()
    except RuntimeError as e:
        print(f"captions web: {e}", file=sys.stderr)
        return 1
    settings = settings_from_args(args)
    if settings.open_access:
        logger.warning("--open: ANY visitor may view ANY room; use signed links (captions token) otherwise")
    logger.info("viewer at http://%s:%d/ (LiveKit for browsers: %s)", args.host, args.port,
                settings.public_livekit_url)
    web.run_app(create_app(settings), host=args.host, port=args.port, print=None)
    return 0


