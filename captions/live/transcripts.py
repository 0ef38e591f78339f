"""A room's final captions: the append-only transcript file and the in-memory backlog.

Every final segment is written (and fsync'ed) to `<data-dir>/<room>.jsonl` before it is published,
so nothing a viewer saw is lost if the worker dies. The backlog keeps the last `retention_s`
seconds in memory for viewers who join late; a restarted worker reloads it from the file.
"""

from __future__ import annotations

import collections
import os
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from captions.log import logger
from captions.protocol import FinalSegment

BACKLOG_RETENTION_S = 30 * 60


def transcript_path(data_dir: str | Path, room_name: str) -> Path:
    """`<data-dir>/<room>.jsonl`, with the room name escaped so it can never leave data-dir."""
    safe = urllib.parse.quote(room_name, safe="-_.")
    if not safe or safe.startswith("."):
        safe = "%2E" + safe[1:] if safe else "%00"
    return Path(data_dir) / f"{safe}.jsonl"


class TranscriptStore:
    """Appends final segments to one room's JSONL file and keeps the recent ones in memory."""

    def __init__(self, path: str | Path, retention_s: float = BACKLOG_RETENTION_S,
                 clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.retention_s = retention_s
        self._clock = clock
        """Unix time now; `captions bench soak` runs an hour of a room faster than real time."""
        self._recent: collections.deque[FinalSegment] = collections.deque()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._load_recent()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the room's lifetime
        if self._ends_mid_line():
            # A worker killed mid-write left half a line: start ours on a fresh one.
            self._file.write("\n")

    def append(self, segment: FinalSegment) -> None:
        """Durably appends `segment` (written and fsync'ed when this returns)."""
        self._file.write(segment.to_json() + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._recent.append(segment)
        self._prune()

    def backlog(self) -> list[FinalSegment]:
        """The room's final segments of the last `retention_s` seconds, oldest first."""
        self._prune()
        return list(self._recent)

    def close(self) -> None:
        self._file.close()

    def _prune(self, now: float | None = None) -> None:
        cutoff = (self._clock() if now is None else now) - self.retention_s
        while self._recent and self._recent[0].end < cutoff:
            self._recent.popleft()

    def _ends_mid_line(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"

    def _load_recent(self) -> None:
        """After a restart, the backlog continues from the file; unreadable lines are reported."""
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    self._recent.append(FinalSegment.from_json(line))
                except (ValueError, TypeError) as e:
                    logger.warning("%s:%d: skipping an unreadable transcript line (%s)", self.path, number, e)
        self._prune()


def read_transcript(path: str | Path) -> list[FinalSegment]:
    """All segments of a transcript file, in order."""
    with open(path, encoding="utf-8") as f:
        return [FinalSegment.from_json(line) for line in f if line.strip()]


def backlog_payload(segments: list[FinalSegment]) -> str:
    """The backlog text stream's content: JSON Lines of FinalSegment, oldest first."""
    return "".join(s.to_json() + "\n" for s in segments)
