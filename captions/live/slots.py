"""A fair queue of speakers waiting for an engine slot, shared by every room of the worker.

Rooms run in different threads (livekit-agents' THREAD executor gives each job its own event loop),
and slots free up in the engine's thread, so everything here is thread-safe. Speakers are served in
the order they started talking, across all rooms: nobody who started later overtakes someone waiting.

Streams are opened by one dispatcher thread (or by the requesting thread when nobody waits), never
by the engine's slot-freed callback itself: that callback only sets an event, so the engine's
thread is never blocked and never re-enters the engine.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from captions.log import logger
from captions.stt.api import Engine, EngineFull, EngineStream, EventCallback


@dataclass(eq=False)
class Waiter:
    """One speaker's request for a slot.

    `on_event` is handed to the engine as the stream's event callback; `on_granted(stream)` is
    called (from the dispatcher thread) once the stream is open, and must be thread-safe.
    """

    label: str
    on_event: EventCallback
    on_granted: Callable[[EngineStream], None]
    since: float = field(default_factory=time.monotonic)
    """When the speaker started talking (time.monotonic()): the queue serves the earliest first."""
    live_chunk: int | None = None
    """Passed on to `engine.open_stream` (a live stream whose first push is kept audio)."""


class SlotQueue:
    """Waiters in front of `engine.open_stream`, served in the order they started talking, woken by
    `engine.add_slot_freed_listener`."""

    def __init__(self, engine: Engine, poll_s: float = 1.0):
        self._engine = engine
        self._lock = threading.Lock()
        self._waiters: list[Waiter] = []
        self._wake = threading.Event()
        self._closed = False
        self._poll_s = poll_s
        """A safety net: the dispatcher also retries this often even without a slot-freed signal."""
        engine.add_slot_freed_listener(self._wake.set)
        self._thread = threading.Thread(target=self._dispatch_forever, name="slot-queue", daemon=True)
        self._thread.start()

    def request(self, waiter: Waiter) -> EngineStream | None:
        """Opens a stream right away when a slot is free and nobody waits (returns it); otherwise
        queues the waiter (returns None) and `waiter.on_granted` will receive the stream later."""
        with self._lock:
            if not self._waiters:
                try:
                    return self._engine.open_stream(waiter.on_event, waiter.live_chunk)
                except EngineFull:
                    pass
            # In order of when they started talking; equal times keep their order of arrival.
            bisect.insort(self._waiters, waiter, key=lambda w: w.since)
        logger.info("engine full: %s waits for a slot (%d waiting)", waiter.label, len(self._waiters))
        self._wake.set()
        return None

    def cancel(self, waiter: Waiter) -> bool:
        """Removes a waiter that no longer needs a slot; False if it was not waiting (already
        granted, or never queued)."""
        with self._lock:
            try:
                self._waiters.remove(waiter)
            except ValueError:
                return False
        self._wake.set()
        return True

    def waiting(self) -> list[str]:
        """Labels of everyone waiting, first in line first."""
        with self._lock:
            return [w.label for w in self._waiters]

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiters)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=5)

    def _dispatch_forever(self) -> None:
        while not self._closed:
            self._wake.wait(timeout=self._poll_s)
            self._wake.clear()
            try:
                self._serve_waiters()
            except Exception:  # noqa: BLE001 - the dispatcher must outlive one bad open
                logger.exception("slot queue: failed to open a stream for a waiting speaker")

    def _serve_waiters(self) -> None:
        granted: list[tuple[Waiter, EngineStream]] = []
        with self._lock:
            while self._waiters and not self._closed:
                try:
                    stream = self._engine.open_stream(self._waiters[0].on_event, self._waiters[0].live_chunk)
                except EngineFull:
                    break
                granted.append((self._waiters.pop(0), stream))
        for waiter, stream in granted:
            logger.info("slot freed: %s is now captioned", waiter.label)
            try:
                waiter.on_granted(stream)
            except Exception:  # noqa: BLE001 - whatever went wrong, the slot must not leak
                logger.exception("slot queue: %s could not take its stream; freeing it", waiter.label)
                stream.abort()
