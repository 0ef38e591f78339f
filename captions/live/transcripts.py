"""A room's transcript: the append-only JSON Lines file of its final captions.

Every final segment is written (and fsync'ed) to `transcript_path(data-dir, room)` (`<room>.jsonl`
for an ordinary name) so that nothing a viewer saw is lost if the worker dies; a worker that takes a
room over (after a crash or a restart) appends to the same file. The viewer server reads the recent
segments back for viewers who join late (`recent_segments`). `remove_expired` enforces the retention
period.

Storage never stops live captions (they are what deaf viewers rely on): the room hands each final to
its store's writer thread (`TranscriptStore.submit`), which writes and fsyncs it off the room's
event loop, and waits only a bounded time before publishing it (captions/live/room.py). A transcript
that cannot be opened or written (disk full, permissions, read-only volume) is reported once, with
its cause, counted (`captions_transcript_*` metrics), retried with backoff, and every final that could
not be saved is logged by segment id and counted: never lost silently.

File names: a room name that escapes to a short enough name keeps the name it always had
(`<percent-escaped room>.jsonl`), so a room's earlier transcript is continued after an upgrade;
a longer one (e.g. 42 CJK characters escape to 378 bytes, over the 255 bytes a file name may have)
gets a readable truncated prefix and a hash of the whole name (`<prefix>+<sha256>.jsonl`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import queue
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from captions.live.metrics import METRICS, TRANSCRIPT_METRICS
from captions.log import logger
from captions.protocol import FinalSegment

BACKLOG_WINDOW_S = 30 * 60
"""How far back a late viewer's backlog goes."""
BACKLOG_MAX_SEGMENTS = 2000
BACKLOG_MAX_BYTES = 4 * 2**20
"""Only the end of a long room's file is read for the backlog (bounded work per request)."""
SUFFIX = ".jsonl"
NAME_MAX = 255
"""Bytes in one file name on every file system the worker runs on (ext4, xfs, btrfs, overlayfs)."""
PREFIX_MAX = 96
"""Bytes of a long room name's escaped form kept readable in its file name."""
HASH_HEX = 32
"""Hex digits of SHA-256 in a long name's file name: 128 bits, no collision in practice."""
WRITE_QUEUE_MAX = 256
"""Finals waiting for the writer thread; past it (a disk stalled for minutes) a final is not saved
(logged and counted) rather than holding the room's memory without bound."""
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 60.0
"""Backoff between attempts to open (or reopen) a transcript that could not be written."""
PROBLEM_TRANSCRIPT_UNAVAILABLE = "transcript_unavailable"
"""The agent's ``captions.problem`` attribute while its room's transcript cannot be written."""


def transcript_path(data_dir: str | Path, room_name: str) -> Path:
    """The room's transcript file in `data_dir`: never outside it, never over NAME_MAX bytes, and
    distinct rooms never share one.

    Why this shape: percent-escaping alone (the original naming) keeps the name inside data-dir and
    distinct, but grows a UTF-8 character to 9 bytes, so a room name LiveKit accepts (up to 256
    characters) could make a name the file system refuses (ENAMETOOLONG: the room was never
    captioned). Names whose escaped form fits keep exactly the original file name, so existing
    transcripts are continued and the viewer finds them; only names that never could be stored get
    the new form `<escaped prefix>+<hash of the whole name>`. The two forms cannot collide: `+` is
    always escaped in the first, and the hash tells long names apart. (On a case-insensitive file
    system, names differing only by case share a file, as they always did.)"""
    safe = urllib.parse.quote(room_name, safe="-_.")
    if not safe or safe.startswith("."):
        safe = "%2E" + safe[1:] if safe else "%00"
    if len(safe) + len(SUFFIX) <= NAME_MAX:
        return Path(data_dir) / f"{safe}{SUFFIX}"
    prefix = safe[:PREFIX_MAX]
    cut = prefix.rfind("%", len(prefix) - 2)  # never end inside a %XX escape
    if cut != -1:
        prefix = prefix[:cut]
    digest = hashlib.sha256(room_name.encode("utf-8")).hexdigest()[:HASH_HEX]
    return Path(data_dir) / f"{prefix}+{digest}{SUFFIX}"


_CLOSE = object()


class TranscriptStore:
    """Appends final segments to one room's JSONL file, on a writer thread of its own.

    Opening never raises: a transcript that cannot be opened or written makes `problem` say why (and
    `on_problem` is called, from any thread, when it changes), and opening is retried with backoff
    (RETRY_FIRST_S doubling to RETRY_MAX_S) while finals keep coming; the finals that could not be
    written are logged and counted. `clock`: monotonic seconds (tests pass a fake)."""

    def __init__(self, path: str | Path, on_problem: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.path = Path(path)
        self.problem: str | None = None
        """Why the transcript cannot be written now; None while it can."""
        self.on_problem = on_problem
        self.unsaved = 0
        """Finals this store could not save."""
        self._clock = clock
        self._fd: int | None = None
        self._retry_s = RETRY_FIRST_S
        self._retry_at = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE_MAX)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._open()

    def submit(self, segment: FinalSegment) -> concurrent.futures.Future[bool]:
        """Queues `segment` for the writer thread (in order); the future says True once it is written
        and fsync'ed, False if it could not be (already logged and counted). Never blocks."""
        future: concurrent.futures.Future[bool] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                self._not_saved(segment, "the room's transcript is closed")
                future.set_result(False)
                return future
            if self._thread is None:
                self._thread = threading.Thread(target=self._write_forever, name=f"transcript-{self.path.name[:40]}",
                                                daemon=True)
                self._thread.start()
            try:
                self._queue.put_nowait((segment, future))
            except queue.Full:
                TRANSCRIPT_METRICS.errors.labels("backlog").inc()
                self._not_saved(segment, f"{WRITE_QUEUE_MAX} finals already wait for a stalled disk")
                future.set_result(False)
        return future

    def append(self, segment: FinalSegment) -> bool:
        """Durably appends `segment`: written and fsync'ed when this returns True; False when it
        could not be (logged and counted). One write per line: two workers appending to the same file
        (a takeover) never interleave inside a line."""
        return self.submit(segment).result()

    def close(self, timeout: float = 10.0) -> None:
        """Writes what is queued (waiting at most `timeout` s), then closes the file."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is not None:
            try:
                self._queue.put(_CLOSE, timeout=timeout)
            except queue.Full:  # the disk took nothing for that long
                logger.error("transcript %s: the disk did not take the last finals within %.0f s; they are "
                             "written if it recovers before the worker exits", self.path, timeout)
                return
            thread.join(timeout)
            if thread.is_alive():
                logger.error("transcript %s: the disk did not take the last finals within %.0f s; they are "
                             "written if it recovers before the worker exits", self.path, timeout)
                return
        self._close_file()
        if self.problem is not None:
            TRANSCRIPT_METRICS.unavailable.dec()

    # On the writer thread ------------------------------------------------------------------------

    def _write_forever(self) -> None:
        while True:
            wait = None if self.problem is None else max(0.0, self._retry_at - self._clock())
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                self._open()  # retried without a final waiting, so that the room's problem clears
                continue
            if item is _CLOSE:
                return
            segment, future = item
            try:
                saved = self._write(segment)
            except Exception:  # noqa: BLE001 - a bug here must not end the writer: every later final would wait forever
                logger.exception("transcript %s: writing final segment %s failed", self.path, segment.segment_id)
                TRANSCRIPT_METRICS.errors.labels("other").inc()
                saved = False
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # its waiter gave up
                future.set_result(saved)

    def _write(self, segment: FinalSegment) -> bool:
        if self._fd is None and (self.problem is None or self._clock() >= self._retry_at):
            self._open()
        if self._fd is None:
            self._not_saved(segment, self.problem or "not open")
            return False
        data = (segment.to_json() + "\n").encode("utf-8")
        try:
            written = os.write(self._fd, data)  # O_APPEND: one write per line
            while written < len(data):
                written += os.write(self._fd, data[written:])
            os.fsync(self._fd)
        except OSError as e:
            self._failed(e, "write")
            self._close_file()  # reopened (on a fresh line) once the disk can take it again
            self._not_saved(segment, self.problem or str(e))
            return False
        return True

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            self._failed(e, "open")
            return
        try:
            if _ends_mid_line(fd):
                # A worker killed mid-write left half a line: start ours on a fresh one.
                os.write(fd, b"\n")
        except OSError as e:
            os.close(fd)
            self._failed(e, "open")
            return
        self._fd = fd
        if self.problem is not None:
            logger.warning("transcript %s can be written again (%d finals were not saved)", self.path, self.unsaved)
            self.problem, self._retry_s = None, RETRY_FIRST_S
            TRANSCRIPT_METRICS.unavailable.dec()
            self._changed()

    def _failed(self, error: OSError, action: str) -> None:
        TRANSCRIPT_METRICS.errors.labels(TRANSCRIPT_METRICS.reason(error)).inc()
        cause = f"{action} failed: {error.strerror or error}"
        if self.problem is not None:
            self._retry_s = min(RETRY_MAX_S, self._retry_s * 2)
        self._retry_at = self._clock() + self._retry_s
        if self.problem is None:
            # Once per outage, with its cause; the retries that fail the same way stay quiet.
            logger.error("transcript %s cannot be written (%s); live captions go on, finals are not saved until it can be "
                         "written (retrying every %.0f-%.0f s)", self.path, cause, RETRY_FIRST_S, RETRY_MAX_S)
            self.problem = cause
            TRANSCRIPT_METRICS.unavailable.inc()
            self._changed()

    def _not_saved(self, segment: FinalSegment, why: str) -> None:
        self.unsaved += 1
        TRANSCRIPT_METRICS.unsaved.inc()
        METRICS.error("transcript")  # captions_errors{kind="transcript"}, as before: existing alerts still fire
        logger.warning("transcript %s: final segment %s of %s (%.3f-%.3f) not saved: %s", self.path,
                       segment.segment_id, segment.participant_identity, segment.start, segment.end, why)

    def _changed(self) -> None:
        if self.on_problem is not None:
            self.on_problem()

    def _close_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _ends_mid_line(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def read_transcript(path: str | Path) -> list[FinalSegment]:
    """All segments of a transcript file, in order."""
    with open(path, encoding="utf-8") as f:
        return [FinalSegment.from_json(line) for line in f if line.strip()]


def recent_segments(path: str | Path, window_s: float = BACKLOG_WINDOW_S, limit: int = BACKLOG_MAX_SEGMENTS,
                    now: float | None = None, keep: Callable[[FinalSegment], bool] | None = None) -> list[FinalSegment]:
    """The segments of the last `window_s` seconds (at most `limit`, the newest), oldest first; an
    unreadable line (a worker killed mid-write) is skipped and logged. No file: no segments.
    `keep`: only the segments it accepts, before `limit` is applied (e.g. the originals and one
    language's translations: a room's file holds every language)."""
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
        if segment.end >= cutoff and (keep is None or keep(segment)):
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
