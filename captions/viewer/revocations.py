"""Ending viewer links before they expire: `captions revoke`, and the list the viewer server reads.

An operator revokes one link (by the link itself or its id) or every link of a room made so far,
without rotating the secret that signs every room's links. The list is a JSON Lines file
(``--revocations``, by default ``<data-dir>/revoked-links.ndjson``) that `captions revoke` appends
to and the viewer server re-reads when it changes: the server refuses live captions and backlogs
for a revoked link at once, and closes the live connections of the link's viewers (server.py).

Lines: ``{"link_id": ID, "until": EXP}`` (one link; forgotten once it would have expired anyway) or
``{"room": R, "before": T}`` (every link of room R made at or before Unix second T).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from captions.config import add_livekit_options, add_option
from captions.log import logger
from captions.viewer.links import ROOM_NAME, AccessDenied, Link, add_viewer_secret_option, check_link

FILE_NAME = "revoked-links.ndjson"
MAX_FILE_BYTES = 16 * 2**20
"""A list this large is a mistake (one line per revoked link): refuse to read more, loudly."""


def default_path(data_dir: Path | None) -> Path:
    return Path(data_dir or "data") / FILE_NAME


class Revocations:
    """The revocation list as last read from `path`; re-read (at most every `recheck_s`) when the
    file's size or modification time changed."""

    def __init__(self, path: Path, recheck_s: float = 1.0, clock=time.monotonic):
        self.path = path
        self.recheck_s = recheck_s
        self._clock = clock
        self._lock = threading.Lock()
        self._checked_at = -float("inf")
        self._stamp: tuple[int, int] | None = None
        self._links: dict[str, int] = {}
        self._rooms: dict[str, int] = {}

    def is_revoked(self, link: Link) -> bool:
        self._refresh()
        return link.link_id in self._links or link.issued_at <= self._rooms.get(link.room, -1)

    def _refresh(self) -> None:
        with self._lock:
            if self._clock() - self._checked_at < self.recheck_s:
                return
            self._checked_at = self._clock()
            try:
                stat = self.path.stat()
            except FileNotFoundError:
                self._stamp, self._links, self._rooms = None, {}, {}
                return
            except OSError as e:
                # Fail closed would refuse every viewer; keep the last list read, and say so.
                logger.error("cannot read the revocation list %s (%s); using the last one read", self.path, e)
                return
            stamp = (stat.st_size, stat.st_mtime_ns)
            if stamp != self._stamp:
                try:
                    self._links, self._rooms = _read(self.path)
                except OSError as e:
                    logger.error("cannot read the revocation list %s (%s); using the last one read", self.path, e)
                    return
                self._stamp = stamp


def _read(path: Path) -> tuple[dict[str, int], dict[str, int]]:
    links: dict[str, int] = {}
    rooms: dict[str, int] = {}
    now = time.time()
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        logger.error("revocation list %s is over %d bytes: only its start is read", path, MAX_FILE_BYTES)
    for number, line in enumerate(data[:MAX_FILE_BYTES].decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if "link_id" in entry:
                if int(entry["until"]) > now:
                    links[str(entry["link_id"])] = int(entry["until"])
            else:
                rooms[str(entry["room"])] = max(int(entry["before"]), rooms.get(str(entry["room"]), -1))
        except (ValueError, TypeError, KeyError, AttributeError, ArithmeticError):  # 1e999: int(inf)
            logger.error("revocation list %s line %d is not a revocation; ignored: %.80r", path, number, line)
    return links, rooms


def append(path: Path, entry: dict) -> None:
    """Adds one revocation durably (one write per line: concurrent writers never interleave)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def configure_revoke_parser(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--link", help="the viewer link (URL) or its token to revoke")
    which.add_argument("--room", help="revoke every link of this room made until now")
    add_option(parser, "--revocations", env="CAPTIONS_REVOCATIONS", default=None, type=Path,
               help=f"the revocation list the viewer server reads (default <data-dir>/{FILE_NAME})")
    add_option(parser, "--data-dir", env="CAPTIONS_DATA_DIR", default="data", type=Path,
               help="the data directory (where the default revocation list lives)")
    add_livekit_options(parser)
    add_viewer_secret_option(parser)


def _link_token(text: str) -> str:
    """The JWT of a link given as a URL (``...?link=...``) or as the token itself."""
    if "://" in text or text.startswith(("/", "?")):
        return parse_qs(urlsplit(text).query).get("link", [""])[0]
    return text.strip()


def run_revoke(args: argparse.Namespace) -> int:
    path = args.revocations or default_path(args.data_dir)
    if args.room is not None:
        if not ROOM_NAME.match(args.room):
            print("captions revoke: --room must be 1 to 256 printable characters", file=sys.stderr)
            return 2
        before = int(time.time())
        append(path, {"room": args.room, "before": before})
        print(f"revoked every link of room {args.room!r} made until {before} (Unix s) in {path}")
        return 0
    try:
        link = check_link(args.viewer_secret or args.api_secret, _link_token(args.link))
    except AccessDenied as e:
        if e.reason == "expired":
            print("captions revoke: that link has expired already: nothing to do")
            return 0
        print(f"captions revoke: not a link of this deployment: {e}", file=sys.stderr)
        return 2
    append(path, {"link_id": link.link_id, "until": link.expires_at})
    print(f"revoked link {link.link_id} of room {link.room!r} in {path}")
    return 0
