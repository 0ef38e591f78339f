"""`captions web` serves the captions viewer, mints viewer tokens and serves late viewers the backlog.

Access control is the operator's: the server mints a LiveKit token, or reads a room's transcript,
only for a valid, unexpired signed link of exactly that room (links.py). ``--open`` (dev only) lets
anyone view any room. The LiveKit API secret never leaves this process.

Viewer tokens are for one room, short lived, hidden from the participant list, and can publish
nothing, data included (livekit-server drops every data packet of a participant without
``canPublishData``): a viewer link's holder can read the room's captions and send nothing into it.
So a late viewer's backlog comes from here, over HTTP (``/api/backlog``), read from the transcript
files the worker writes (``--data-dir``, the worker's), not from the agent.

Every request that costs something (a token, a transcript read) has a per-link and per-address
budget (ratelimit.py); past it the answer is 429 with the seconds to wait.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import re
import secrets
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from captions import PROJECT_ROOT
from captions.config import add_livekit_options, add_option, positive_int
from captions.live.transcripts import BACKLOG_WINDOW_S, recent_segments, transcript_path
from captions.log import logger
from captions.viewer.links import ROOM_NAME, AccessDenied, add_viewer_secret_option, check_access
from captions.viewer.ratelimit import RateLimiter

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
    token_ttl_s: int = 3600
    open_access: bool = False
    """Dev only: any room may be viewed without a signed link."""
    web_dir: Path = WEB_DIR
    data_dir: Path | None = None
    """The worker's transcripts, for late viewers' backlog; None: no backlog from this server."""
    behind_proxy: bool = False
    """Take the client's address from X-Forwarded-For (set by a reverse proxy in front of this one)."""
    tokens_per_minute_per_link: float = 30
    tokens_per_minute_per_address: float = 60
    backlogs_per_minute_per_address: float = 12


def mint_viewer_token(settings: WebSettings, room: str, link_expiry: int | None = None) -> dict:
    """A LiveKit token for one hidden viewer of `room`; never lives past the link that asked for it."""
    from livekit import api

    ttl = settings.token_ttl_s
    if link_expiry is not None:
        ttl = max(1, min(ttl, int(link_expiry - time.time())))
    identity = f"viewer-{secrets.token_hex(6)}"
    grants = api.VideoGrants(
        room_join=True,
        room=room,
        hidden=True,
        can_subscribe=True,
        can_publish=False,
        # Nothing at all: a viewer link must never let its holder put data into the room.
        can_publish_data=False,
        can_update_own_metadata=False,
    )
    token = (
        api.AccessToken(settings.api_key, settings.api_secret)
        .with_identity(identity)
        .with_name(VIEWER_NAME)
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


def create_app(settings: WebSettings):
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
    backlog_addresses = RateLimiter(settings.backlogs_per_minute_per_address, burst=6)

    def client_address(request: web.Request) -> str:
        if settings.behind_proxy and (forwarded := request.headers.get("X-Forwarded-For", "")):
            return forwarded.split(",")[-1].strip()  # the address the proxy itself saw
        return request.remote or "unknown"

    def too_many(*waits: float) -> web.Response | None:
        wait = max(waits)
        if wait <= 0:
            return None
        return _json_error(429, f"Too many requests from this link or address; try again in {max(1, round(wait))} s.",
                           "rate_limited", wait)

    def checked_room(request: web.Request, what: str) -> tuple[str, int | None]:
        """The room of a valid link (and its expiry); raises _Refused otherwise."""
        room = request.query.get("room", "")
        if not ROOM_NAME.match(room):
            raise _Refused(_json_error(400, "No room given. Open a viewer link that names a room (?room=...).",
                                       "missing"))
        if settings.open_access:
            return room, None
        try:
            check_access(settings.viewer_secret, room, request.query.get("exp", ""), request.query.get("access", ""))
        except AccessDenied as e:
            logger.info("viewer %s refused for a room: %s", what, e)
            raise _Refused(_json_error(403, str(e), e.reason)) from None
        return room, int(request.query["exp"])

    async def token(request: web.Request) -> web.Response:
        link = f"{request.query.get('room', '')}\n{request.query.get('exp', '')}\n{request.query.get('access', '')}"
        if (refused := too_many(token_links.take(link), token_addresses.take(client_address(request)))) is not None:
            return refused
        try:
            room, expiry = checked_room(request, "token")
        except _Refused as e:
            return e.response
        body = mint_viewer_token(settings, room, expiry)
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    async def backlog(request: web.Request) -> web.Response:
        if (refused := too_many(backlog_addresses.take(client_address(request)))) is not None:
            return refused
        try:
            room, _ = checked_room(request, "backlog")
        except _Refused as e:
            return e.response
        if settings.data_dir is None:
            return _json_error(404, "This viewer server has no access to the transcripts: earlier captions "
                               "are not available.", "no_backlog")
        path = transcript_path(settings.data_dir, room)
        segments = await asyncio.to_thread(recent_segments, path)
        return web.json_response({"room": room, "window_s": BACKLOG_WINDOW_S,
                                  "segments": [dataclasses.asdict(seg) for seg in segments]},
                                 headers={"Cache-Control": "no-store"})

    async def config(request: web.Request) -> web.Response:
        return web.json_response({"livekit_url": settings.public_livekit_url})

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
    return app


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
    add_option(parser, "--token-ttl", env="CAPTIONS_TOKEN_TTL", default=3600, type=positive_int,
               help="lifetime in seconds of a viewer's LiveKit token")
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
        token_ttl_s=args.token_ttl,
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


