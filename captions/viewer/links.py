"""Signed viewer links, and `captions token`, which prints one.

A viewer link is ``<viewer>/?link=<JWT>``: a standard JSON Web Token (HS256, PyJWT) signed with
``CAPTIONS_VIEWER_SECRET`` (or the LiveKit API secret when that is unset), with the claims
``room``, ``exp`` (when it ends, Unix seconds), ``iat`` (when it was made) and ``jti`` (its id).
One canonical form: whatever else a request adds or re-spells, the link is its ``jti`` once the
signature verifies, so per-link budgets and revocations key on it (server.py, revocations.py).

The viewer server (server.py) serves captions only for a valid, unexpired, unrevoked link, for
exactly its room, and closes the viewer's live captions when the link ends (server.py).
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import sys
import time
from dataclasses import dataclass
from urllib.parse import urlencode

import jwt

from captions.config import add_livekit_options, add_option, positive_int

ROOM_NAME = re.compile(r"^[^\x00-\x1f]{1,256}$")
LINK_AUDIENCE = "captions-viewer"
LINK_ALGORITHM = "HS256"
CLOCK_SKEW_S = 60
"""A link made on a machine whose clock is ahead of this one's by up to this is still valid now."""
MAX_LINK_CHARS = 2048
"""A link token is a few hundred characters: anything far longer is not one, and is not parsed."""


class AccessDenied(Exception):
    """A viewer request that must not get a token; the message is shown to the viewer."""

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason
        """"missing", "invalid", "expired" or "revoked": lets the page say which."""


@dataclass(frozen=True)
class Link:
    """A verified viewer link."""

    room: str
    link_id: str
    """The ``jti``: the link's one canonical name."""
    issued_at: int
    expires_at: int


def make_link(secret: str, room: str, ttl_s: int, now: float | None = None, link_id: str | None = None) -> str:
    """The JWT of a viewer link for `room`, valid for `ttl_s` seconds."""
    issued = int(time.time() if now is None else now)
    claims = {"aud": LINK_AUDIENCE, "room": room, "iat": issued, "exp": issued + ttl_s,
              "jti": link_id or secrets.token_urlsafe(12)}
    return jwt.encode(claims, secret, algorithm=LINK_ALGORITHM)


def check_link(secret: str, token: str, now: float | None = None) -> Link:
    """The link `token` names; raises AccessDenied unless it is signed with `secret`, complete and
    unexpired (revocation is the server's: revocations.py)."""
    token = token.strip()  # a link pasted with a trailing newline is the same link
    if not token:
        raise AccessDenied("This page was opened without a viewer link. Ask the operator for one.", "missing")
    if len(token) > MAX_LINK_CHARS:
        raise AccessDenied("This link is malformed. Ask the operator for a new link.")
    try:
        claims = jwt.decode(token, secret, algorithms=[LINK_ALGORITHM], audience=LINK_AUDIENCE, leeway=CLOCK_SKEW_S,
                            options={"require": ["exp", "iat", "jti", "room", "aud"], "verify_exp": False})
    except jwt.PyJWTError:
        raise AccessDenied("This link's signature is not valid. Ask the operator for a new link.") from None
    room, link_id, issued, expires = claims["room"], claims["jti"], claims["iat"], claims["exp"]
    if (not isinstance(room, str) or not ROOM_NAME.match(room) or not isinstance(link_id, str)
            or not 0 < len(link_id) <= 64 or not all(type(v) is int for v in (issued, expires))):
        raise AccessDenied("This link is malformed. Ask the operator for a new link.")
    if expires <= (time.time() if now is None else now):
        raise AccessDenied("This viewer link has expired. Ask the operator for a new one.", "expired")
    return Link(room, link_id, issued, expires)


def viewer_link(base_url: str, secret: str, room: str, ttl_s: int, now: float | None = None) -> str:
    """A signed viewer link for `room`, valid for `ttl_s` seconds."""
    return f"{base_url.rstrip('/')}/?{urlencode({'link': make_link(secret, room, ttl_s, now)})}"


def add_viewer_secret_option(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--viewer-secret", env="CAPTIONS_VIEWER_SECRET", default=None,
               help="key that signs viewer links (falls back to the LiveKit API secret)")


def configure_token_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--room", required=True, help="the room this link lets its holder view")
    add_option(parser, "--base-url", env="CAPTIONS_WEB_BASE_URL", default="http://127.0.0.1:8080",
               help="the viewer server's URL as viewers reach it")
    add_option(parser, "--link-ttl", env="CAPTIONS_LINK_TTL", default=86400, type=positive_int,
               help="seconds the link gives access; its viewers are removed from the room when it ends")
    add_livekit_options(parser)
    add_viewer_secret_option(parser)
    parser.add_argument("--json", action="store_true", help="print the link, its id and its expiry as JSON")


def run_token(args: argparse.Namespace) -> int:
    if not ROOM_NAME.match(args.room):
        print("captions token: --room must be 1 to 256 printable characters", file=sys.stderr)
        return 2
    secret = args.viewer_secret or args.api_secret
    now = time.time()
    token = make_link(secret, args.room, args.link_ttl, now=now)
    link = f"{args.base_url.rstrip('/')}/?{urlencode({'link': token})}"
    if args.json:
        checked = check_link(secret, token, now=now)
        print(json.dumps({"url": link, "room": args.room, "link_id": checked.link_id,
                          "expires_at": checked.expires_at}))
    else:
        print(link)
    return 0
