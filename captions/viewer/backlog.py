"""Late viewers' backlog reads, bounded and shared.

A room's backlog is the end of its transcript file (at most BACKLOG_MAX_BYTES read: transcripts.py).
Many viewers of one room joining together (a webinar starting, a leaked link) would read the same
bytes again and again; the last read of each file is kept while the file's size and modification
time are unchanged, for at most `MAX_AGE_S` (the backlog is a time window), for `MAX_FILES` files.

A transcript holds every language (issue 26): a viewer's backlog is the originals and the translated
finals into the language it reads (`in_backlog`), chosen while reading, so that the file's translations
into other languages do not count against the backlog's segment limit; each (file, language) read is
cached on its own.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from captions.protocol import FinalSegment

MAX_AGE_S = 10.0
MAX_FILES = 256


def in_backlog(segment: FinalSegment, language: str = "") -> bool:
    """Whether a viewer reading `language` ("" for the originals) gets `segment`: the originals, and
    the translated finals into its language."""
    return not segment.translation_of or (bool(language) and segment.language == language)


class BacklogCache:
    """`read(path, language)`: `reader(path, keep=...)` run on a thread (`keep`: `in_backlog` for that
    language), or the cached answer for an unchanged file."""

    def __init__(self, reader: Callable[..., list[FinalSegment]], clock=time.monotonic):
        self._reader = reader
        self._clock = clock
        self._entries: OrderedDict[tuple[Path, str], tuple[tuple[int, int], float, list[FinalSegment]]] = \
            OrderedDict()
        self.reads = 0
        """Files actually read (a test counts them)."""

    async def read(self, path: Path, language: str = "") -> list[FinalSegment]:
        try:
            stat = path.stat()
        except FileNotFoundError:
            return []
        stamp = (stat.st_size, stat.st_mtime_ns)
        key = (path, language)
        cached = self._entries.get(key)
        if cached is not None and cached[0] == stamp and self._clock() - cached[1] < MAX_AGE_S:
            self._entries.move_to_end(key)
            return cached[2]
        self.reads += 1
        segments = await asyncio.to_thread(self._reader, path, keep=functools.partial(in_backlog, language=language))
        self._entries[key] = (stamp, self._clock(), segments)
        self._entries.move_to_end(key)
        while len(self._entries) > MAX_FILES:
            self._entries.popitem(last=False)
        return segments
