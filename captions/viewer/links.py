"""Signed viewer links, and `captions token`, which prints one.

A viewer link carries ``room``, ``exp`` (Unix seconds) and ``access`` = HMAC-SHA256 over the room
and the expiry, keyed with ``CAPTIONS_VIEWER_SECRET`` (or the LiveKit API secret when that is
unset). The viewer server (server.py) mints a LiveKit token only for a valid, unexpired link of
exactly that room.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import re
import sys
import time
from urllib.parse import urlencode

from captions.config import add_livekit_options, add_option, positive_int

ROOM_NAME = re.compile(r"^[^\x00-\x1f]{1,256}$")


class AccessDenied(Exception):
    """A viewer request that must not get a token; the message is shown to the viewer."""

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason
        """"missing", "invalid" or "expired": lets the page say which."""


def sign_access(secret: str, room: str, expires_at: int) -> str:
    """The ``access`` parameter of a viewer link: hex HMAC-SHA256 of the room and the expiry."""
    message = f"captions-viewer\n{room}\n{expires_at}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def check_access(secret: str, room: str, expires_at: str, access: str, now: float | None = None) -> None:
    """Raises AccessDenied unless `access` signs exactly this room and expiry, and it has not passed."""
    if not access or not expires_at:
        raise AccessDenied("This link has no access signature. Ask the operator for a viewer link.", "missing")
    try:
        expiry = int(expires_at)
    except ValueError:
        raise AccessDenied("This link is malformed (bad exp). Ask the operator for a new link.") from None
    expected = sign_access(secret, room, expiry)
    # Constant-time compare so the signature cannot be guessed byte by byte.
    if not hmac.compare_digest(expected.encode(), access.encode()):
        raise AccessDenied("This link's access signature is not valid for this room.")
    if expiry <= (time.time() if now is None else now):
        raise AccessDenied("This viewer link has expired. Ask the operator for a new one.", "expired")


def viewer_link(base_url: str, secret: str, room: str, ttl_s: int, now: float | None = None) -> str:
    """A signed viewer link for `room`, valid for `ttl_s` seconds."""
    expires_at = int((time.time() if now is None else now) + ttl_s)
    query = urlencode({"room": room, "exp": expires_at, "access": sign_access(secret, room, expires_at)})
    return f"{base_url.rstrip('/')}/?{query}"


def add_viewer_secret_option(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--viewer-secret", env="CAPTIONS_VIEWER_SECRET", default=None,
               help="key that signs viewer links (falls back to the LiveKit API secret)")


def configure_token_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--room", required=True, help="the room this link lets its holder view")
    add_option(parser, "--base-url", env="CAPTIONS_WEB_BASE_URL", default="http://127.0.0.1:8080",
               help="the viewer server's URL as viewers reach it")
    add_option(parser, "--link-ttl", env="CAPTIONS_LINK_TTL", default=86400, type=positive_int,
               help="seconds the link stays valid for joining")
    add_livekit_options(parser)
    add_viewer_secret_option(parser)
    parser.add_argument("--json", action="store_true", help="print the link and its expiry as JSON")


def run_token(args: argparse.Namespace) -> int:
    if not ROOM_NAME.match(args.room):
        print("captions token: --room must be 1 to 256 printable characters", file=sys.stderr)
        return 2
    secret = args.viewer_secret or args.api_secret
    now = time.time()
    link = viewer_link(args.base_url, secret, args.room, args.link_ttl, now=now)
    if args.json:
        print(json.dumps({"url": link, "room": args.room, "expires_at": int(now + args.link_ttl)}))
    else:
        print(link)
    return 0
