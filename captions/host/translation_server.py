"""The engine process's one translation engine, served to its receiving processes (issue 26 with
`--receivers` P >= 2): one model and one batching thread for every room of the host, where each
receiving process would otherwise load its own copy and batch only its own rooms' captions.
translation_client.py is the receiving side.

Messages, on the engine channel (control frames, wire.py):

* receiver -> engine: ``{"op": "translate", "tid", "text", "source", "target", "final", "key"}``, a
  `TranslationEngine.submit`; ``{"op": "untranslate", "tid"}``: the room gave up on it (cancelled,
  as a local future's cancel: the engine skips it).
* engine -> receiver: ``{"op": "translated", "tid", "text"}``, or ``{"op": "translated", "tid",
  "error", "message"}``, `error` one of `ERRORS`' kinds, "failed" (the model's exception, named in
  the message) or "cancelled" (a newer interim or the final of its key replaced it, or the queue of
  interims was full: the receiving side cancels its future, as the local engine does).

Keys are namespaced by connection, ``(connection number, key)``: two receiving processes' keys
never meet in the engine's table of queued interims, even when equal. A key crosses as JSON (a
tuple becomes a list), and is made a tuple again here.

Every field of a "translate" is untrusted. A "tid" that is not a non-negative integer makes the
frame malformed (`wire.WireError`: the connection is dropped, there is no future to answer); any
other wrong field (a type, text over `MAX_TEXT_CHARS`, a key that is not a short list of scalars)
fails that translation alone with the kind "rejected" and the reason.

Threads: `handle` runs on the connection's reader thread; outcomes are sent from the translation
engine's thread (a future's done-callback) or from the reader's (a future failed at once), through
the connection's writer, which never blocks. `drop` (the connection went: its process died or
stopped) takes the connection's queued translations out of the engine: nothing is translated for a
process that is gone, and nothing it asked for stays queued.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future

from captions.host import wire
from captions.translate.engine import TranslationBacklogFull, TranslationEngine, TranslationEngineClosed
from captions.translate.model import UnsupportedPair

MAX_TEXT_CHARS = 16_384
"""The longest text taken: far beyond what the model reads (512 tokens, model.py's MAX_INPUT_TOKENS);
a longer one is a broken or hostile peer, and its translation fails ("rejected")."""
MAX_LANGUAGE_CHARS = 32
MAX_KEY_ITEMS = 8
MAX_KEY_DEPTH = 3
MAX_KEY_CHARS = 512
MAX_TID = 2**53
"""Ids are a receiving process's counter; JSON numbers beyond this are not exact integers."""
MAX_MESSAGE_CHARS = 500
"""An error's message is cut to this."""
ERRORS: dict[str, type[Exception]] = {"closed": TranslationEngineClosed, "backlog": TranslationBacklogFull,
                                      "unsupported": UnsupportedPair}
"""The engine's failures that cross by kind, raised as themselves on the receiving side."""


class TranslationService:
    """One connection's translations on the engine process's `engine` (None: it has none, and every
    translation fails "closed"); `send(message)` queues a control message to that connection."""

    def __init__(self, engine: TranslationEngine | None, number: int, send: Callable[[dict], object]):
        self._engine, self._number, self._send = engine, number, send
        self._lock = threading.Lock()
        self._futures: dict[int, Future[str]] = {}
        """By tid: the translations not done yet."""
        self._dropped = False

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._futures)

    def handle(self, message: dict) -> None:
        """A "translate" or "untranslate" message (reader thread); raises WireError if malformed."""
        tid = message.get("tid")
        if type(tid) is not int or not 0 <= tid <= MAX_TID:
            raise wire.WireError(f"a {message['op']} message without a valid tid: {tid!r:.40}")
        if message["op"] == "untranslate":
            with self._lock:
                future = self._futures.get(tid)
            if future is not None:
                future.cancel()  # queued: the engine skips it; already in a batch: it runs, unsent
            return
        try:
            text, source, target, final, key = _checked(message)
        except ValueError as e:
            self._send(_failure(tid, "rejected", str(e)))
            return
        if self._engine is None:
            self._send(_failure(tid, "closed", "the engine process has no translation engine"))
            return
        with self._lock:
            if self._dropped:
                return
            duplicate = tid in self._futures
        if duplicate:
            self._send(_failure(tid, "rejected", f"translation {tid} is already pending"))
            return
        future = self._engine.submit(text, source, target, final=final,
                                     key=None if key is None else (self._number, key))
        with self._lock:
            dropped = self._dropped
            if not dropped and not future.done():
                self._futures[tid] = future
        if dropped:  # the connection went meanwhile (dropped from another thread)
            self._engine.discard([future])
            future.cancel()
            return
        future.add_done_callback(functools.partial(self._done, tid))

    def drop(self) -> int:
        """The connection is gone: its translations leave the engine's queue (module notes); none is
        sent. The number taken out of the queue."""
        with self._lock:
            self._dropped = True
            futures, self._futures = list(self._futures.values()), {}
        removed = self._engine.discard(futures) if futures and self._engine is not None else 0
        for future in futures:
            future.cancel()  # one in the model's batch runs; its result is not sent
        return removed

    def _done(self, tid: int, future: Future[str]) -> None:
        """The engine's thread (or the reader's, for a future failed at once)."""
        with self._lock:
            if self._futures.get(tid) is future:
                del self._futures[tid]
            if self._dropped:
                return
        self._send(_outcome(tid, future))


def _outcome(tid: int, future: Future[str]) -> dict:
    if future.cancelled():
        return {"op": "translated", "tid": tid, "error": "cancelled"}
    error = future.exception()
    if error is None:
        return {"op": "translated", "tid": tid, "text": str(future.result())}
    kind = next((kind for kind, error_type in ERRORS.items() if isinstance(error, error_type)), None)
    return _failure(tid, kind, str(error)) if kind is not None else \
        _failure(tid, "failed", f"{type(error).__name__}: {error}")


def _failure(tid: int, kind: str, message: str) -> dict:
    return {"op": "translated", "tid": tid, "error": kind, "message": message[:MAX_MESSAGE_CHARS]}


def _checked(message: dict) -> tuple[str, str, str, bool, Hashable | None]:
    """A "translate" message's fields, checked; raises ValueError saying what is wrong."""
    text, source, target, final = (message.get(name) for name in ("text", "source", "target", "final"))
    if not isinstance(text, str):
        raise ValueError("text is not a string")
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"text of {len(text)} characters (at most {MAX_TEXT_CHARS})")
    for name, language in (("source", source), ("target", target)):
        if not isinstance(language, str) or not 0 < len(language) <= MAX_LANGUAGE_CHARS:
            raise ValueError(f"{name} is not a language code")
    if not isinstance(final, bool):
        raise ValueError("final is not true or false")
    return text, source, target, final, key_from_wire(message.get("key"))


def key_from_wire(value: object, depth: int = 0) -> Hashable | None:
    """A key as it crossed in JSON, hashable again (lists become tuples); raises ValueError for
    anything but a short list of strings, numbers, booleans and null (nested at most MAX_KEY_DEPTH)."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        if len(value) > MAX_KEY_CHARS:
            raise ValueError(f"a key's string of {len(value)} characters (at most {MAX_KEY_CHARS})")
        return value
    if isinstance(value, list) and len(value) <= MAX_KEY_ITEMS and depth < MAX_KEY_DEPTH:
        return tuple(key_from_wire(item, depth + 1) for item in value)
    raise ValueError("a key is a short list of strings, numbers, booleans and null")
