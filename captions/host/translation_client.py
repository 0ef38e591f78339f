"""A receiving process's stand-in for the engine process's one translation engine (issue 26 with
`--receivers` P >= 2; the serving side and the messages: translation_server.py).

`RemoteTranslationEngine` has what a room's `RoomTranslator` (captions/live/translation.py) uses of
a `TranslationEngine`: `submit(text, source, target, *, final, key)` returns a
`concurrent.futures.Future[str]` at once, and a caller's `cancel()` of a future still pending makes
the engine skip it. The future ends as the engine's own would: with the translation; cancelled when
a newer interim or the final of its key replaced it (or the queue of interims was full); failed
with `TranslationEngineClosed`, `TranslationBacklogFull` or `UnsupportedPair` as the engine raised
them, `TranslationRejected` (the engine process refused the message: text over
`MAX_TEXT_CHARS`, say), or `TranslationFailed` (the model's exception, named in its message).

If the engine channel is lost (or closed), every pending future fails with
`TranslationEngineClosed`, and so does every later `submit`: the rooms publish the originals,
marked ``captions.untranslated``, as with a local engine that closed.

Deliberately no `queued` and no `counters`: the translation engine's metrics are the engine
process's own (captions/live/metrics.py reads them from the real engine there); a stand-in's
would be added into the host's sums (captions/host/metrics.py). `pending` counts this process's
translations not answered yet.

Threads: `submit` and a future's `cancel` come from any room's loop and never block (the
connection's writer sends); results resolve the futures on the engine client's reader thread, and
`RoomTranslator` hops to its room's loop as it does for a local engine.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future, InvalidStateError

from captions.host import wire
from captions.host.translation_server import ERRORS, MAX_TEXT_CHARS
from captions.translate.engine import TranslationEngineClosed


class TranslationRejected(ValueError):
    """The engine process refused the translation as sent (e.g. its text is too long)."""


class TranslationFailed(RuntimeError):
    """The engine process's model failed on it; the message names the model's exception."""


class RemoteTranslationEngine:
    """The engine process's translation engine, as this process's rooms use it (module notes).
    `send(frame)` queues a frame on the engine channel (False once it is closed); `available`: the
    languages the engine process's model translates into (its hello), None: any."""

    def __init__(self, send: Callable[[bytes], bool], available: tuple[str, ...] | None = None):
        self._send = send
        self.available = available
        self._lock = threading.Lock()
        self._futures: dict[int, Future[str]] = {}
        """By tid: the translations not answered yet."""
        self._tids = itertools.count(1)
        self._lost: str | None = None

    @property
    def pending(self) -> int:
        """This process's translations not answered yet."""
        with self._lock:
            return len(self._futures)

    def submit(self, text: str, source: str, target: str, *, final: bool,
               key: Hashable | None = None) -> Future[str]:
        """As `TranslationEngine.submit`. `key` must survive JSON (strings, numbers, tuples of them);
        raises TypeError if it cannot cross at all."""
        future: Future[str] = Future()
        if len(text) > MAX_TEXT_CHARS:
            future.set_exception(TranslationRejected(f"text of {len(text)} characters (at most {MAX_TEXT_CHARS})"))
            return future
        tid = next(self._tids)
        frame = wire.control({"op": "translate", "tid": tid, "text": text, "source": source, "target": target,
                              "final": bool(final), "key": key})
        with self._lock:
            lost = self._lost
            if lost is None:
                self._futures[tid] = future
        if lost is not None:
            future.set_exception(TranslationEngineClosed(f"the translation engine is gone: {lost}"))
            return future
        future.add_done_callback(functools.partial(self._caller_cancelled, tid))
        if not self._send(frame):
            self.lose("the engine channel is closed")
        return future

    def close(self) -> None:
        """Fails what is pending, and everything submitted later, with TranslationEngineClosed."""
        self.lose("closed")

    # ---- the engine client ----------------------------------------------------------------------

    def on_result(self, message: dict) -> None:
        """A "translated" message (the engine client's reader thread)."""
        with self._lock:
            future = self._futures.pop(message.get("tid"), None)
        if future is None:
            return  # cancelled here meanwhile, or the answer to an "untranslate"
        error = message.get("error")
        with_message = str(message.get("message", ""))
        with contextlib.suppress(InvalidStateError):  # the caller cancelled it just now
            if error is None:
                future.set_result(str(message["text"]))
            elif error == "cancelled":
                future.cancel()
            elif error == "rejected":
                future.set_exception(TranslationRejected(with_message))
            else:
                future.set_exception(ERRORS.get(error, TranslationFailed)(with_message))

    def lose(self, cause: str) -> None:
        """The channel ended (or this stand-in closed): every pending future fails (module notes)."""
        with self._lock:
            if self._lost is None:
                self._lost = cause
            futures, self._futures = list(self._futures.values()), {}
        for future in futures:
            with contextlib.suppress(InvalidStateError):
                future.set_exception(TranslationEngineClosed(f"the translation engine is gone: {cause}"))

    def _caller_cancelled(self, tid: int, future: Future[str]) -> None:
        """A done-callback: a future cancelled by its caller is cancelled in the engine process too."""
        if not future.cancelled():
            return
        with self._lock:
            mine = self._futures.get(tid) is future
            if mine:
                del self._futures[tid]
        if mine:
            self._send(wire.control({"op": "untranslate", "tid": tid}))
