"""`captions web` serves the captions viewer and mints viewer tokens.

Access control is the operator's: the server mints a LiveKit token only for a valid, unexpired
signed link of exactly that room (links.py). ``--open`` (dev only) lets anyone view any room. The
LiveKit API secret never leaves this process.

Viewer tokens are for one room, short lived, hidden from the participant list, subscribe-only for
media. They do allow data publishing: the viewer asks the agent for the backlog with the
``captions.backlog`` RPC, and livekit-server (measured with v1.13.5) drops every data packet, RPC
requests included, from a participant without ``canPublishData``.
"""

from __future__ import annotations

import argparse
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
from captions.log import logger
from captions.viewer.links import ROOM_NAME, AccessDenied, add_viewer_secret_option, check_access

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
        # Needed for the backlog RPC request (see the module docstring); no media publishing.
        can_publish_data=True,
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


def _json_error(status: int, message: str, reason: str):
    from aiohttp import web

    body = {"error": message, "reason": reason}
    return web.json_response(body, status=status, headers={"Cache-Control": "no-store"})


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
    """The aiohttp application: static viewer, ``/api/token``, ``/api/config``, ``/healthz``."""
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

    async def token(request: web.Request) -> web.Response:
        room = request.query.get("room", "")
        if not ROOM_NAME.match(room):
            return _json_error(400, "No room given. Open a viewer link that names a room (?room=...).", "missing")
        expiry = None
        if not settings.open_access:
            try:
                check_access(settings.viewer_secret, room, request.query.get("exp", ""),
                             request.query.get("access", ""))
            except AccessDenied as e:
                logger.info("viewer token refused for a room: %s", e)
                return _json_error(403, str(e), e.reason)
            expiry = int(request.query["exp"])
        body = mint_viewer_token(settings, room, expiry)
        return web.json_response(body, headers={"Cache-Control": "no-store"})

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


