"""Late viewers' backlog reads, bounded and shared.

A room's backlog is the end of its transcript file (at most BACKLOG_MAX_BYTES read: transcripts.py).
Many viewers of one room joining together (a webinar starting, a leaked link) would read the same
bytes again and again; the last read of each file is kept while the file's size and modification
time are unchanged, for at most `MAX_AGE_S` (the backlog is a time window), for `MAX_FILES` files.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from captions.protocol import FinalSegment

MAX_AGE_S = 10.0
MAX_FILES = 256


class BacklogCache:
    """`read(path)`: `reader(path)` run on a thread, or the cached answer for an unchanged file."""

    def __init__(self, reader: Callable[[Path], list[FinalSegment]], clock=time.monotonic):
        self._reader = reader
        self._clock = clock
        self._entries: OrderedDict[Path, tuple[tuple[int, int], float, list[FinalSegment]]] = OrderedDict()
        self.reads = 0
        """Files actually read (a test counts them)."""

    async def read(self, path: Path) -> list[FinalSegment]:
        try:
            stat = path.stat()
        except FileNotFoundError:
            return []
        stamp = (stat.st_size, stat.st_mtime_ns)
        cached = self._entries.get(path)
        if cached is not None and cached[0] == stamp and self._clock() - cached[1] < MAX_AGE_S:
            self._entries.move_to_end(path)
            return cached[2]
        self.reads += 1
        segments = await asyncio.to_thread(self._reader, path)
        self._entries[path] = (stamp, self._clock(), segments)
        self._entries.move_to_end(path)
        while len(self._entries) > MAX_FILES:
            self._entries.popitem(last=False)
        return segments
