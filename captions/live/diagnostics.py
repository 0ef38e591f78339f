"""`--diagnostics-file` (off by default): what a long-running worker holds, on request.

A worker serves thousands of rooms in one process, so whatever a room leaves behind adds up. With
the option set, SIGUSR1 makes the worker append one JSON line to the file: resident memory and the
allocator's own figures (to tell fragmentation from memory in use), threads, file descriptors, live
instances of the classes a room creates, the livekit FFI's live handles and event subscribers, the
Python types whose instance counts grew since the first report, and, when the worker runs under
`PYTHONTRACEMALLOC`, the Python heap and the source lines whose allocations grew since the first
report. SIGUSR2 does the same after `malloc_trim(0)` (free heap pages handed back to the system).
`captions bench soak` reads these lines; so can an operator chasing a leak (`kill -USR1 <pid>`).

`proc_figures(pid)` reads /proc alone and serves the benchmark for any process.

The report is built on its own thread, never on a room's loop or in a signal handler.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import functools
import gc
import json
import os
import signal
import threading
import time
from pathlib import Path

from captions.log import logger

WATCHED_TYPES = (
    # Ours: one of each per room, per speaker or per engine stream.
    "RoomCaptioner", "Speaker", "Turn", "TrackAudio", "SpeechGate", "_LiveFeed", "Segmenter",
    "TranscriptStore", "CaptionPublisher",
    "StreamRecorder", "StreamTiming", "Waiter",
    # livekit and livekit-agents, per room / participant / track / stream / job.
    "Room", "RemoteParticipant", "RemoteAudioTrack", "RemoteTrackPublication", "AudioStream",
    "JobContext", "_JobProc", "ThreadJobExecutor", "_ProcClient",
    # asyncio, per room thread.
    "_UnixSelectorEventLoop", "Task",
)
"""Instance counts reported by name (`objects`): a room's objects must go when the room ends."""
TOP_GROWTH = 15


def proc_figures(pid: int | str = "self", under: Path | None = None) -> dict:
    """RSS (MiB), threads and open file descriptors of a process, from /proc; with `under`, also
    how many of its descriptors are files below that directory (e.g. open transcripts)."""
    status = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.strip()
    fd_dir = Path(f"/proc/{pid}/fd")
    targets = []
    for fd in os.listdir(fd_dir):
        try:
            targets.append(os.readlink(fd_dir / fd))
        except OSError:  # closed since listdir
            continue
    figures = {"rss_mb": round(int(status["VmRSS"].split()[0]) / 1024, 2), "threads": int(status["Threads"]),
               "fds": len(targets)}
    if under is not None:
        prefix = str(Path(under).resolve()) + os.sep
        figures["open_files_under"] = sum(1 for target in targets if target.startswith(prefix))
    return figures


class _Malloc:
    """glibc's mallinfo2 and malloc_trim, where available (not on musl or macOS)."""

    class _Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
            "keepcost")]

    def __init__(self):
        name = ctypes.util.find_library("c")
        self._libc = ctypes.CDLL(name) if name else None
        self._mallinfo2 = getattr(self._libc, "mallinfo2", None)
        if self._mallinfo2 is not None:
            self._mallinfo2.restype = self._Info
        self._trim = getattr(self._libc, "malloc_trim", None)

    def figures(self) -> dict | None:
        """MiB: `heap` obtained from the system with brk/sbrk and arenas, `in_use` of it, `free` in it,
        `mmapped` (large blocks)."""
        if self._mallinfo2 is None:
            return None
        info = self._mallinfo2()
        mib = 1024 * 1024
        return {"heap_mb": round(info.arena / mib, 2), "in_use_mb": round(info.uordblks / mib, 2),
                "free_mb": round(info.fordblks / mib, 2), "mmapped_mb": round(info.hblkhd / mib, 2)}

    def trim(self) -> bool:
        if self._trim is None:
            return False
        self._trim(0)
        return True


@functools.cache
def _malloc() -> _Malloc:
    return _Malloc()


class Diagnostics:
    """Writes one report per request to `path` (JSON Lines), from its own thread."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._requests: collections.deque[bool] = collections.deque()
        """Pending requests: True to trim the allocator first."""
        self._wake = threading.Event()
        self._malloc = _malloc()
        self._baseline_types: collections.Counter[str] | None = None
        self._baseline_trace = None
        self._sequence = 0
        self._thread = threading.Thread(target=self._serve, name="diagnostics", daemon=True)

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        signal.signal(signal.SIGUSR1, lambda *_: self.request(trim=False))
        signal.signal(signal.SIGUSR2, lambda *_: self.request(trim=True))
        logger.info("diagnostics: kill -USR1 %d appends a memory report to %s", os.getpid(), self.path)

    def request(self, trim: bool = False) -> None:
        self._requests.append(trim)
        self._wake.set()

    def _serve(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while self._requests:
                trim = self._requests.popleft()
                try:
                    report = self.report(trim)
                except Exception:  # noqa: BLE001 - diagnostics must never take the worker down
                    logger.exception("diagnostics: could not build the report")
                    continue
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(report) + "\n")

    def report(self, trim: bool = False) -> dict:
        started = time.monotonic()
        gc.collect()  # what is still reachable, not what waits for the cycle collector
        trimmed = self._malloc.trim() if trim else False
        self._sequence += 1
        report = {"sequence": self._sequence, "time": time.time(), "trimmed": trimmed,
                  **proc_figures(), "malloc": self._malloc.figures(), "thread_names": _thread_names(),
                  "native_thread_names": _native_thread_names(),
                  "ffi": ffi_figures()}
        counts = _type_counts()
        report["objects"] = {name: counts.get(name, 0) for name in WATCHED_TYPES}
        report["gc_objects"] = sum(counts.values())
        if self._baseline_types is None:
            self._baseline_types = counts
        growth = counts.copy()
        growth.subtract(self._baseline_types)
        report["type_growth"] = [[name, n] for name, n in growth.most_common(TOP_GROWTH) if n > 0]
        report["tracemalloc"] = self._tracemalloc()
        report["seconds"] = round(time.monotonic() - started, 3)
        return report

    def _tracemalloc(self) -> dict | None:
        import tracemalloc

        if not tracemalloc.is_tracing():
            return None
        current, peak = tracemalloc.get_traced_memory()
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)])
        figures = {"current_mb": round(current / 2**20, 2), "peak_mb": round(peak / 2**20, 2)}
        if self._baseline_trace is None:
            self._baseline_trace = snapshot
            figures["growth"] = []
        else:
            figures["growth"] = [
                [str(stat.traceback[0]), round(stat.size_diff / 1024, 1), stat.count_diff]
                for stat in snapshot.compare_to(self._baseline_trace, "lineno")[:TOP_GROWTH]
                if stat.size_diff > 0]
        return figures


def native_heap_in_use_mb() -> float | None:
    """MiB of the C heap in use (glibc's mallinfo2: Python's objects and native libraries alike);
    None where the C library does not tell."""
    figures = _malloc().figures()
    return figures["in_use_mb"] if figures is not None else None


def ffi_figures() -> dict | None:
    """The livekit FFI's live handles (Python objects holding a native handle not yet dropped) and
    the subscribers of its event queue (each room and audio stream subscribes while it lives)."""
    try:
        from livekit.rtc import _ffi_client
    except ImportError:
        return None
    client = _ffi_client.FfiClient._instance
    handles = list(getattr(_ffi_client, "_live_handles", ()))
    return {"handles": sum(1 for h in handles if not h.disposed),
            "subscribers": len(client.queue._subscribers) if client is not None else 0}


def _type_counts() -> collections.Counter[str]:
    return collections.Counter(type(o).__name__ for o in gc.get_objects())


def _thread_names() -> dict[str, int]:
    """Python's threads by name (numbers dropped)."""
    return dict(collections.Counter(_stem(t.name) for t in threading.enumerate()))


def _native_thread_names() -> dict[str, int]:
    """Every thread of the process by its kernel name (native libraries' threads included)."""
    names = collections.Counter()
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            names[_stem((task / "comm").read_text().strip())] += 1
    return dict(names)


def _stem(name: str) -> str:
    return name.rstrip("0123456789_-() ") or name


def start_diagnostics(path: Path | None) -> Diagnostics | None:
    """Starts the reports when the option is set (the worker calls this once, on the main thread)."""
    if path is None:
        return None
    diagnostics = Diagnostics(path)
    diagnostics.start()
    return diagnostics
