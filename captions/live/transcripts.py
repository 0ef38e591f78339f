"""A room's transcript: the append-only JSON Lines file of its final captions.

Every final segment is written (and fsync'ed) to `<data-dir>/<room>.jsonl` before it is published,
so nothing a viewer saw is lost if the worker dies; a worker that takes a room over (after a crash or
a restart) appends to the same file. The viewer server reads the recent segments back for viewers
who join late (`recent_segments`). `remove_expired` enforces the retention period.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.parse
from pathlib import Path

from captions.log import logger
from captions.protocol import FinalSegment

BACKLOG_WINDOW_S = 30 * 60
"""How far back a late viewer's backlog goes."""
BACKLOG_MAX_SEGMENTS = 2000
BACKLOG_MAX_BYTES = 4 * 2**20
"""Only the end of a long room's file is read for the backlog (bounded work per request)."""
SUFFIX = ".jsonl"


def transcript_path(data_dir: str | Path, room_name: str) -> Path:
    """`<data-dir>/<room>.jsonl`, with the room name escaped so it can never leave data-dir."""
    safe = urllib.parse.quote(room_name, safe="-_.")
    if not safe or safe.startswith("."):
        safe = "%2E" + safe[1:] if safe else "%00"
    return Path(data_dir) / f"{safe}{SUFFIX}"


class TranscriptStore:
    """Appends final segments to one room's JSONL file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the room's lifetime
        if self._ends_mid_line():
            # A worker killed mid-write left half a line: start ours on a fresh one.
            self._file.write("\n")

    def append(self, segment: FinalSegment) -> None:
        """Durably appends `segment` (written and fsync'ed when this returns). One write per line: two
        workers appending to the same file (a takeover) never interleave inside a line."""
        self._file.write(segment.to_json() + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def _ends_mid_line(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"


def read_transcript(path: str | Path) -> list[FinalSegment]:
    """All segments of a transcript file, in order."""
    with open(path, encoding="utf-8") as f:
        return [FinalSegment.from_json(line) for line in f if line.strip()]


def recent_segments(path: str | Path, window_s: float = BACKLOG_WINDOW_S, limit: int = BACKLOG_MAX_SEGMENTS,
                    now: float | None = None) -> list[FinalSegment]:
    """The segments of the last `window_s` seconds (at most `limit`, the newest), oldest first; an
    unreadable line (a worker killed mid-write) is skipped and logged. No file: no segments."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - BACKLOG_MAX_BYTES))
            data = f.read()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    if size > BACKLOG_MAX_BYTES:
        lines = lines[1:]  # the first one is cut
    cutoff = (time.time() if now is None else now) - window_s
    segments = []
    for line in lines:
        if not line.strip():
            continue
        try:
            segment = FinalSegment.from_json(line.decode("utf-8"))
        except (ValueError, TypeError) as e:
            logger.warning("%s: skipping an unreadable transcript line (%s)", path, e)
            continue
        if segment.end >= cutoff:
            segments.append(segment)
    return segments[-limit:]


def remove_expired(directory: str | Path, max_age_s: float, now: float | None = None) -> list[Path]:
    """Deletes the transcripts (and recordings) in `directory` not written for `max_age_s` seconds;
    returns what it deleted."""
    cutoff = (time.time() if now is None else now) - max_age_s
    removed = []
    for path in Path(directory).glob("*"):
        if path.suffix not in (SUFFIX, ".wav") or not path.is_file():
            continue
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:
            continue  # another worker removed it first
    if removed:
        logger.info("retention: removed %d files older than %.0f days from %s", len(removed),
                    max_age_s / 86400, directory)
    return removed


RETENTION_SWEEP_S = 3600.0


def start_retention(directories: list[Path], max_age_s: float, period_s: float = RETENTION_SWEEP_S) -> None:
    """Runs `remove_expired` on `directories` now and every `period_s`, on a daemon thread."""

    def sweep_forever() -> None:
        while True:
            for directory in directories:
                try:
                    remove_expired(directory, max_age_s)
                except OSError:
                    logger.exception("retention: could not clean %s", directory)
            time.sleep(period_s)

    threading.Thread(target=sweep_forever, name="retention", daemon=True).start()
