"""One batched engine per process for every KyutaiSTT and stream, and a stream's request for a slot
in it (the fair queue the captions use: captions/live/slots.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass

from livekit.agents import (
    APIConnectionError,
)

from captions.live.slots import SlotQueue, loop_waiter
from captions.stt.api import EngineStream, StreamEvent
from captions.stt.engine import SttEngine
from captions.stt.model import DEFAULT_MODEL

DEFAULT_BATCH_SIZE = 8


@dataclass(eq=False)
class SharedEngine:
    """One loaded engine and its fair slot queue, shared by every KyutaiSTT of the process."""

    engine: SttEngine
    slots: SlotQueue

    @property
    def slot_load(self) -> float:
        """Streams served or waiting over the slots, at most 1: a worker's `load_fnc`, so that
        LiveKit dispatches new sessions to the workers with free slots."""
        return min(1.0, (self.engine.slots_in_use + len(self.slots)) / self.engine.batch_size)

    def close(self) -> None:
        self.slots.close()
        self.engine.close()


_registry_lock = threading.Lock()
_engines: dict[tuple[str, str, int], SharedEngine] = {}
_load_locks: dict[tuple[str, str, int], threading.Lock] = {}


def shared_engine(model: str = DEFAULT_MODEL, device: str = "auto",
                  batch_size: int = DEFAULT_BATCH_SIZE) -> SharedEngine:
    """The process's engine for this checkpoint, device and batch size, loaded and started on first
    use. Blocking (seconds; minutes for a first download): call it off the event loop."""
    key = (model, device, batch_size)
    with _registry_lock:
        load_lock = _load_locks.setdefault(key, threading.Lock())
    with load_lock:  # one load per key; other callers wait for it instead of loading twice
        with _registry_lock:
            if key in _engines:
                return _engines[key]
        engine = SttEngine.load(model, device=device, batch_size=batch_size)
        engine.start()
        shared = SharedEngine(engine, SlotQueue(engine))
        with _registry_lock:
            _engines[key] = shared
        return shared


def is_loaded(model: str, device: str, batch_size: int) -> bool:
    with _registry_lock:
        return (model, device, batch_size) in _engines


def close_shared_engines() -> None:
    """Stops and forgets every shared engine (for tests: a worker keeps its engine for life)."""
    with _registry_lock:
        engines = list(_engines.values())
        _engines.clear()
    for shared in engines:
        shared.close()


class SlotRequest:
    """One request for an engine slot. The grant (slot queue thread) and the stream's events
    (engine thread) hop to the requesting loop, where `on_event` runs."""

    def __init__(self, shared: SharedEngine, label: str, on_event: Callable[[StreamEvent], None]):
        self._shared = shared
        self._loop = asyncio.get_running_loop()
        self._on_event = on_event
        self._granted: asyncio.Future[EngineStream] = self._loop.create_future()
        self._released = False
        self._waiter = loop_waiter(label, on_granted=self._on_granted, on_event=self._deliver)
        stream = shared.slots.request(self._waiter)
        if stream is not None:
            self._granted.set_result(stream)

    async def wait(self, timeout: float) -> EngineStream:
        """The stream once granted; after `timeout` seconds a retryable APIConnectionError, the
        request staying in line (call `wait` again to keep waiting)."""
        try:
            return await asyncio.wait_for(asyncio.shield(self._granted), timeout)
        except asyncio.TimeoutError:
            slots = self._shared.slots
            raise APIConnectionError(
                f"Kyutai STT: no free engine slot for {timeout:g} s ({self._shared.engine.batch_size} slots, "
                f"{len(slots)} waiting); still in line") from None

    def release(self) -> None:
        """Leaves the line, or frees the slot (without flushing) if the stream is still running."""
        if self._released:
            return
        self._released = True
        if not self._granted.done():
            # If the queue granted it meanwhile, `_on_granted` (still to run) aborts the stream.
            self._shared.slots.cancel(self._waiter)
            self._granted.cancel()
        elif not self._granted.cancelled():
            self._granted.result().abort()  # a no-op once the stream has ended

    def _on_granted(self, stream: EngineStream) -> None:
        if self._released or self._granted.done():
            stream.abort()
            return
        self._granted.set_result(stream)

    def _deliver(self, event: StreamEvent) -> None:
        if not self._released:
            self._on_event(event)


# ---- the recognize stream ----------------------------------------------------------------------
