"""One batched engine per process for every KyutaiSTT and stream, with the fair slot queue the captions
use (captions/live/slots.py); a stream asks it for a slot through captions/live/stream_client.py."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from captions.live.slots import SlotQueue
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
