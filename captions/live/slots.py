"""A fair queue of speakers waiting for an engine slot, shared by every room of the worker.

Rooms run in different threads (livekit-agents' THREAD executor gives each job its own event loop),
and slots free up in the engine's thread, so everything here is thread-safe.

Who gets a slot, when some wait:

* **Shares.** The B slots are divided among the rooms that have demand (a speaker holding a slot or
  waiting for one), max-min fair: a room that needs fewer than an even part keeps what it needs and
  the rest is divided among the others (`fair_shares`). Whole slots: each room gets the whole part
  of its share, and the slots left over go to the rooms with a fraction, those holding more first
  (so that nobody yields for a rounding), then the room whose speaker has waited longest.
* **Grants.** A freed slot goes to the first waiter, in the order they started talking, whose room
  holds fewer than its share; with a free slot there always is one (the shares add up to B, or to
  the demand when that is less).
* **Yields.** A room holding more than its share while others wait is asked to give back its
  excess, its longest-held turns first (`should_yield`): a room with a never-ending talker (a TV, an
  hour-long monologue) cannot keep every slot. A turn that has held its slot for a long time
  (`long_held`, judged by the speaker: speaker.py's `max_turn_hold_s`) is asked to yield to a waiter
  of its own room, or of a room holding less than its share rounded up (more rooms than slots: the
  slots rotate), one such turn per waiter, the longest held first. Nothing is asked while nobody
  waits. The speaker yields at a sentence end (or after a bound): its stream is flushed, and its
  speaker asks again, behind those who waited (speaker.py).

A grant lasts until its stream's last event (`ended`), which the queue sees by wrapping the
stream's event callback.

Streams are opened by one dispatcher thread (or by the requesting thread when nobody waits), never
by the engine's slot-freed callback itself: that callback only sets an event, so the engine's
thread is never blocked and never re-enters the engine.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from captions.log import logger
from captions.stt.api import Engine, EngineFull, EngineStream, EventCallback, StreamEvent


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
    room: str = ""
    """The room whose share this counts against (default: the label up to its last '/')."""

    def __post_init__(self) -> None:
        if not self.room:
            self.room = self.label.rsplit("/", 1)[0]


def loop_waiter(label: str, on_granted: Callable[[EngineStream], None], on_event: EventCallback, *,
                since: float | None = None, live_chunk: int | None = None, room: str = "") -> Waiter:
    """The Waiter of a requester that lives on an asyncio event loop (a room's speaker, an Agents STT
    stream): the grant (this queue's dispatcher thread) and the stream's events (the engine's thread)
    hop onto the calling loop, where `on_granted(stream)` and `on_event(event)` run. Once that loop
    is gone, a grant raises into the queue, which frees the slot, and events are dropped (nobody
    listens any more). Call it on the requester's loop."""
    loop = asyncio.get_running_loop()

    def granted(stream: EngineStream) -> None:
        loop.call_soon_threadsafe(on_granted, stream)

    def event(stream_event) -> None:
        # From the engine's thread: never block it, never raise into it.
        with contextlib.suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(on_event, stream_event)

    return Waiter(label, on_event=event, on_granted=granted, since=time.monotonic() if since is None else since,
                  live_chunk=live_chunk, room=room)


@dataclass(eq=False)
class _Grant:
    waiter: Waiter
    order: int
    """Grants in the order they were made: the lowest has held its slot longest."""
    long_held: bool = False
    closing: bool = False
    """Its stream is being flushed: the slot is as good as given back."""


def fair_shares(demand: dict[str, float], capacity: int) -> dict[str, float]:
    """Max-min fair split of `capacity` among rooms by demand: a room gets its demand or the even
    part of what the rooms needing less left, whichever is less (fractions)."""
    shares: dict[str, float] = {}
    left, rooms = float(capacity), sorted(demand, key=lambda r: demand[r])
    for i, room in enumerate(rooms):
        shares[room] = min(float(demand[room]), left / (len(rooms) - i))
        left -= shares[room]
    return shares


def whole_shares(shares: dict[str, float], priority: Iterable[str]) -> dict[str, int]:
    """Whole slots: each room's share rounded down, then the slots that leaves over one each to the
    rooms with a fraction, in `priority` order (the first rooms first)."""
    whole = {room: math.floor(share + 1e-9) for room, share in shares.items()}
    left = round(sum(shares.values())) - sum(whole.values())
    for room in priority:
        if left <= 0:
            break
        if shares[room] - whole[room] > 1e-9:
            whole[room] += 1
            left -= 1
    return whole


class SlotQueue:
    """Waiters in front of `engine.open_stream`, served by room shares and then in the order they
    started talking, woken by `engine.add_slot_freed_listener` (module notes)."""

    def __init__(self, engine: Engine, poll_s: float = 1.0):
        self._engine = engine
        self._lock = threading.Lock()
        self._waiters: list[Waiter] = []
        self._grants: dict[Waiter, _Grant] = {}
        """Every stream this queue opened and that has not ended yet, by its waiter."""
        self._order = itertools.count()
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
                    return self._open(waiter)
                except EngineFull:
                    pass
            # In order of when they started talking; equal times keep their order of arrival.
            bisect.insort(self._waiters, waiter, key=lambda w: w.since)
            waiting = len(self._waiters)
        logger.info("engine full: %s waits for a slot (%d waiting)", waiter.label, waiting)
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

    def should_yield(self, waiter: Waiter, long_held: bool = False) -> bool:
        """Whether the turn holding the slot granted to `waiter` should give it back (module
        notes); `long_held`: it has held the slot long (the speaker's judgement, kept until the
        next call). False when nobody waits, or the slot is no longer held."""
        with self._lock:
            grant = self._grants.get(waiter)
            if grant is None:
                return False
            grant.long_held = long_held
            if not self._waiters or grant.closing:
                return False
            return grant in self._yields()

    def closing(self, waiter: Waiter) -> None:
        """The stream granted to `waiter` is closing (flushed, then ended): it still holds its slot
        until it ends, but counts as given back when the queue decides who else should yield."""
        with self._lock:
            grant = self._grants.get(waiter)
            if grant is not None:
                grant.closing = True

    def holders(self) -> dict[str, int]:
        """Slots held per room (rooms holding none left out)."""
        with self._lock:
            return self._holders()

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

    # ---- under the lock ---------------------------------------------------------------------------

    def _open(self, waiter: Waiter) -> EngineStream:
        """Opens the waiter's stream (raises EngineFull) and counts it against its room until it ends."""
        grant = _Grant(waiter, next(self._order))

        def on_event(event: StreamEvent) -> None:
            if event.ended:
                with self._lock:
                    if self._grants.get(waiter) is grant:
                        del self._grants[waiter]
                self._wake.set()
            waiter.on_event(event)

        stream = self._engine.open_stream(on_event, waiter.live_chunk)
        self._grants[waiter] = grant
        return stream

    def _holders(self) -> dict[str, int]:
        held: dict[str, int] = {}
        for grant in self._grants.values():
            held[grant.waiter.room] = held.get(grant.waiter.room, 0) + 1
        return held

    def _shares(self, held: dict[str, int]) -> tuple[dict[str, float], dict[str, int]]:
        """Each room's fair share (fraction) and whole slots (module notes)."""
        demand: dict[str, float] = dict(held)
        first_waiting: dict[str, int] = {}
        for i, w in enumerate(self._waiters):
            demand[w.room] = demand.get(w.room, 0) + 1
            first_waiting.setdefault(w.room, i)
        shares = fair_shares(demand, self._engine.batch_size)
        priority = sorted(demand, key=lambda r: (-held.get(r, 0), first_waiting.get(r, len(self._waiters))))
        return shares, whole_shares(shares, priority)

    def _yields(self) -> set[_Grant]:
        """The grants that should give their slot back now (module notes); only while someone waits."""
        held = self._holders()
        shares, whole = self._shares(held)
        by_age = sorted(self._grants.values(), key=lambda g: g.order)
        yields: set[_Grant] = set()
        for room, count in held.items():
            excess = count - whole.get(room, 0)
            if excess > 0:  # those closing already give theirs back; then the longest held
                yields.update(sorted((g for g in by_age if g.waiter.room == room), key=lambda g: not g.closing)[:excess])
        yields.update(g for g in by_age if g.closing)  # each frees a slot for a waiter
        for w in self._waiters[len(yields):]:
            under = held.get(w.room, 0) < math.ceil(shares.get(w.room, 0) - 1e-9)
            grant = next((g for g in by_age if g.long_held and g not in yields
                          and (g.waiter.room == w.room or under)), None)
            if grant is not None:
                yields.add(grant)
        return yields

    def _next_waiter(self) -> Waiter | None:
        """The first waiter whose room holds fewer slots than its share."""
        held = self._holders()
        _, whole = self._shares(held)
        return next((w for w in self._waiters if held.get(w.room, 0) < whole.get(w.room, 0)), None)

    # ---- the dispatcher ---------------------------------------------------------------------------

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
                waiter = self._next_waiter()
                if waiter is None:
                    break
                try:
                    stream = self._open(waiter)
                except EngineFull:
                    break
                self._waiters.remove(waiter)
                granted.append((waiter, stream))
        for waiter, stream in granted:
            logger.info("slot freed: %s is now captioned", waiter.label)
            try:
                waiter.on_granted(stream)
            except Exception:  # noqa: BLE001 - whatever went wrong, the slot must not leak
                logger.exception("slot queue: %s could not take its stream; freeing it", waiter.label)
                stream.abort()
