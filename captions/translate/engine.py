"""The translation engine: one background thread per worker that batches every pending translation
into one model call (dynamic batching: what piles up while a batch runs goes into the next one).

Threads: `submit` and `close` are called from any thread (each room's event loop) and never block
on the model: `submit` takes a lock for O(1) work and returns a `concurrent.futures.Future`. The
engine's own thread ("translation") is the only caller of the model. A future's done-callbacks run
on the engine thread (or on the submitting thread, for a future that fails or is dropped at once):
a caller on an event loop hands results over with `loop.call_soon_threadsafe` (or wraps the future
with `asyncio.wrap_future`).

What a caller can rely on:

* finals are served before interims, in the order submitted; each batch holds at most `max_batch`;
  a final starts a batch at once, interims alone wait up to `interim_linger_s` for others;
* a queued interim is dropped (its future cancelled), never silently, when the queue of interims is
  full (the oldest goes first), when a newer interim or the final of the same `key` (a caption
  segment) arrives, or when the caller cancels it;
* a model exception fails that batch's futures with the exception; the engine goes on with the next;
* past `max_finals` waiting finals (a model far too slow for its load), the oldest fails with
  `TranslationBacklogFull`: memory stays bounded;
* `close()` stops the thread and fails what is still queued with `TranslationEngineClosed`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from captions.log import logger
from captions.translate.model import TranslationRequest, UnsupportedPair, language_code

MAX_QUEUED_INTERIMS = 64
"""Interims waiting at once (all rooms together), beyond which the oldest is dropped: a bound on
memory and on the work a burst of interims can queue in front of the next final."""
MAX_QUEUED_FINALS = 1024
"""Finals waiting at once, beyond which the oldest fails with TranslationBacklogFull: only a model
far too slow for its load gets there, and memory stays bounded even then."""


INTERIM_LINGER_S = 0.3
"""How long interims wait for others before a batch of interims alone starts (finals never wait).
Interims come often and each call has a large fixed cost: batched together they keep the engine free
more of the time, so that a final less often waits behind a batch of interims (`captions bench
translate --interim-linger`)."""


class Translator(Protocol):
    """What the engine needs from a model (TranslationModel, or a fake in tests)."""

    def translate_batch(self, requests: Sequence[TranslationRequest]) -> list[str]: ...


class TranslationEngineClosed(RuntimeError):
    """The engine was closed before this translation ran."""


class TranslationBacklogFull(RuntimeError):
    """Too many finals were waiting: the oldest gave way (the model cannot keep up with its load)."""


@dataclass
class _Job:
    request: TranslationRequest
    final: bool
    key: Hashable | None
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.monotonic)


@dataclass
class EngineCounters:
    """Plain counters, for metrics and tests; read them from any thread (each is one int or float)."""

    submitted: int = 0
    translated: int = 0
    """Futures resolved with a translation."""
    dropped: int = 0
    """Translations cancelled before they ran: interims (queue full, superseded), and any its caller
    cancelled (a final too, once evicted, closed or reached: counted once either way)."""
    failed: int = 0
    """Futures failed by a model exception, an unsupported pair or close()."""
    batches: int = 0
    busy_s: float = 0.0
    """Time spent in the model."""
    largest_batch: int = 0


class TranslationEngine:
    """Batched translation on one thread; see the module docstring for the contract."""

    def __init__(self, model: Translator, max_batch: int = 32, max_interims: int = MAX_QUEUED_INTERIMS,
                 on_batch: Callable[[int, float], None] | None = None,
                 interim_linger_s: float = INTERIM_LINGER_S, max_finals: int = MAX_QUEUED_FINALS):
        """`on_batch(size, seconds)` is called on the engine thread after each model call (metrics);
        `interim_linger_s`: see INTERIM_LINGER_S (0: interims start at once, as finals do)."""
        if min(max_batch, max_interims, max_finals) < 1:
            raise ValueError("max_batch, max_interims and max_finals must be at least 1")
        self.max_finals = max_finals
        self.model = model
        self.max_batch = max_batch
        self.max_interims = max_interims
        self.counters = EngineCounters()
        self._on_batch = on_batch
        self.interim_linger_s = interim_linger_s
        self._counters_lock = threading.Lock()
        self._cond = threading.Condition()
        self._finals: deque[_Job] = deque()
        self._interims: deque[_Job] = deque()
        self._interim_by_key: dict[Hashable, _Job] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="translation", daemon=True)
        self._thread.start()

    # ---- any thread ---------------------------------------------------------------------------

    def submit(self, text: str, source: str, target: str, *, final: bool,
               key: Hashable | None = None) -> Future[str]:
        """Queues a translation and returns its future at once. `key` (for example the caption's
        segment id and the target language) lets a newer interim or the final of the same key
        replace a queued interim, whose future is then cancelled."""
        job = _Job(TranslationRequest(text, source, target), final, key)
        supports = getattr(self.model, "supports", None)
        if supports is not None and not supports(source, target):
            self._fail([job], UnsupportedPair(f"no translation model for "
                                              f"{language_code(source)}->{language_code(target)}"))
            return job.future
        dropped: list[_Job] = []
        overflow: list[_Job] = []
        with self._cond:
            if self._closed:
                closed = True
            else:
                closed = False
                self._count("submitted")
                if key is not None and (old := self._interim_by_key.pop(key, None)) is not None:
                    self._interims.remove(old)  # O(queued interims), bounded by max_interims
                    dropped.append(old)
                if final:
                    if len(self._finals) >= self.max_finals:
                        overflow.append(self._finals.popleft())
                    self._finals.append(job)
                else:
                    if len(self._interims) >= self.max_interims:
                        dropped.append(self._pop_interim())
                    self._interims.append(job)
                    if key is not None:
                        self._interim_by_key[key] = job
                self._cond.notify()
        if closed:
            self._fail([job], TranslationEngineClosed("the translation engine is closed"))
        self._drop(dropped)  # outside the lock: cancel() runs the callers' callbacks
        if overflow:
            logger.warning("translation backlog full (%d finals waiting): the oldest final fails", self.max_finals)
            self._fail(overflow, TranslationBacklogFull(f"more than {self.max_finals} finals were waiting"))
        return job.future

    def discard(self, futures: Iterable[Future]) -> int:
        """Removes the queued translations of `futures` from the queue, cancelled (whoever asked is
        gone: a receiving process that died, captions/host/); one already in the model's batch runs.
        The number removed."""
        gone_futures = set(futures)
        with self._cond:
            gone = [job for job in (*self._finals, *self._interims) if job.future in gone_futures]
            if gone:
                self._finals = deque(job for job in self._finals if job.future not in gone_futures)
                self._interims = deque(job for job in self._interims if job.future not in gone_futures)
                for job in gone:
                    if job.key is not None and self._interim_by_key.get(job.key) is job:
                        del self._interim_by_key[job.key]
        self._drop(gone)
        return len(gone)

    @property
    def running(self) -> bool:
        """False once closed, or once its thread failed (every translation then fails at once)."""
        return not self._closed and self._thread.is_alive()

    @property
    def queued(self) -> int:
        """Translations waiting (finals and interims)."""
        with self._cond:
            return len(self._finals) + len(self._interims)

    def close(self, timeout: float | None = 10.0) -> None:
        """Stops the thread after the batch in progress (waiting up to `timeout` for it) and fails
        every queued future with TranslationEngineClosed. Idempotent."""
        with self._cond:
            self._closed = True
            pending = list(self._finals) + list(self._interims)
            self._finals.clear()
            self._interims.clear()
            self._interim_by_key.clear()
            self._cond.notify_all()
        self._fail(pending, TranslationEngineClosed("the translation engine closed before this ran"))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ---- the engine thread ------------------------------------------------------------------------

    def _pop_interim(self) -> _Job:
        job = self._interims.popleft()
        if job.key is not None and self._interim_by_key.get(job.key) is job:
            del self._interim_by_key[job.key]
        return job

    def _next_batch(self) -> list[_Job] | None:
        """Waits for work; the next batch (finals first), or None once closed."""
        with self._cond:
            while not self._closed and not self._finals:
                if not self._interims:
                    self._cond.wait()
                    continue
                # Interims alone wait until the oldest has waited `interim_linger_s`, so that
                # they go in fewer, larger batches (a batch costs far less than one call per text)
                # and the engine is more often free when a final comes.
                wait = self._interims[0].submitted + self.interim_linger_s - time.monotonic()
                if wait <= 0 or len(self._interims) >= self.max_batch:
                    break
                self._cond.wait(wait)
            if self._closed:
                return None
            batch = []
            while self._finals and len(batch) < self.max_batch:
                batch.append(self._finals.popleft())
            while self._interims and len(batch) < self.max_batch:
                batch.append(self._pop_interim())
            return batch

    def _run(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                jobs = [job for job in batch if job.future.set_running_or_notify_cancel()]
                self._count("dropped", len(batch) - len(jobs))  # cancelled by their caller meanwhile
                if jobs:
                    self._translate(jobs)
        except BaseException:  # noqa: BLE001 - logged; the thread ends either way
            # A bug here must not leave callers waiting on a thread that is gone: closed, every queued
            # and later translation fails at once (the rooms publish the originals, marked).
            logger.exception("the translation engine's thread failed: translation is off until the worker restarts")
            self.close()

    def _translate(self, jobs: list[_Job]) -> None:
        start = time.perf_counter()
        try:
            texts = self.model.translate_batch([job.request for job in jobs])
            if len(texts) != len(jobs):
                raise RuntimeError(f"the model returned {len(texts)} translations for {len(jobs)} texts")
        except Exception as e:  # noqa: BLE001 - the model's failure is this batch's, not the engine's
            logger.warning("translation of a batch of %d failed: %s: %s", len(jobs), type(e).__name__, e)
            self._record(len(jobs), time.perf_counter() - start)
            if len(jobs) > 1:
                # One bad text must not fail every other room's captions of its batch: halve the
                # batch until the failure is narrowed down to the text(s) that cause it.
                half = len(jobs) // 2
                self._translate(jobs[:half])
                self._translate(jobs[half:])
                return
            jobs[0].future.set_exception(e)
            self._count("failed")
            return
        self._record(len(jobs), time.perf_counter() - start)
        for job, text in zip(jobs, texts):
            job.future.set_result(text)
        self._count("translated", len(jobs))

    def _count(self, name: str, n: int = 1) -> None:
        with self._counters_lock:
            setattr(self.counters, name, getattr(self.counters, name) + n)

    def _record(self, size: int, seconds: float) -> None:
        with self._counters_lock:
            self.counters.batches += 1
            self.counters.busy_s += seconds
            self.counters.largest_batch = max(self.counters.largest_batch, size)
        if self._on_batch is not None:
            try:
                self._on_batch(size, seconds)
            except Exception:  # noqa: BLE001 - a metrics hook must not stop translation
                logger.exception("translation on_batch callback failed")

    def _fail(self, jobs: list[_Job], error: BaseException) -> None:
        for job in jobs:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)
                self._count("failed")
            else:  # its caller gave up on it while it was queued: dropped, as in `_run`
                self._count("dropped")

    def _drop(self, jobs: list[_Job]) -> None:
        for job in jobs:
            job.future.cancel()
            self._count("dropped")
