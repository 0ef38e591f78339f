"""The engine process's side of the engine channel: every receiving process's slot requests and
streams, turned into calls on the one real `SlotQueue` and its engine streams (captions/host/).

Threads: one accept thread; per connection one reader thread (it makes the calls, in the order the
receiver sent them) and one writer (`wire.FrameWriter`); one ticker thread that answers
`should_yield` ahead of time and sends the engine's status. The engine's thread only ever enqueues
an event on a writer (never blocks); the slot queue's dispatcher enqueues grants.

`should_yield` is asked every 80 ms by every live speaker, so it is not a round trip: a receiver
sends a turn's `long_held` when it changes, and the ticker evaluates the queue's answer for every
remote grant (every `yield_poll_s`, or sooner when the queue changes) and sends the changes.

A connection that drops (its receiving process died) frees everything it held at once: its streams
are aborted and its waiters leave the queue, and its queued translations leave the translation
engine's queue.

The engine process's one translation engine, if any, is served on the same connections
(translation_server.py): "translate" messages are handled on the reader thread, results sent by
the writer.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from captions.host import wire
from captions.host.translation_server import TranslationService
from captions.live.slots import SlotQueue, Waiter
from captions.log import logger
from captions.stt.api import Engine, EngineStream, StreamEvent
from captions.translate.engine import TranslationEngine

YIELD_POLL_S = 0.09
"""How often the ticker re-evaluates `should_yield` for every remote grant (a speaker asks every 80 ms)."""
STATUS_EVERY_S = 0.5
"""How often each receiver is told the engine's slots in use and the queue's length (its LiveKit load)."""


@dataclass(eq=False)
class _Remote:
    """One waiter of a receiver, by its id on that connection, and what it was granted."""

    wid: int
    waiter: Waiter | None = None
    stream: EngineStream | None = None
    long_held: bool = False
    long_held_changed: bool = False
    """A new `long_held` that the queue has not been told yet."""
    yielding: bool = False
    """The queue's answer last sent to the receiver."""


@dataclass(eq=False)
class Receiver:
    """What the engine process knows of one connected receiving process."""

    number: int
    """This connection's number (in the order they connected)."""
    index: int | None = None
    """The receiving process's index in the pool (its hello)."""
    pid: int | None = None
    missing: list[str] = field(default_factory=lambda: ["has not reported yet"])
    """What the receiver says keeps it from being ready (its /readyz); empty: ready."""
    connected_at: float = field(default_factory=time.monotonic)


class EngineServer:
    """Serves `slots` (and the streams it opens on `engine`) to receiving processes over a Unix
    socket at `path`, in a private temporary directory (module notes)."""

    def __init__(self, engine: Engine, slots: SlotQueue, yield_poll_s: float = YIELD_POLL_S,
                 status_every_s: float = STATUS_EVERY_S,
                 on_disconnect: Callable[[Receiver], None] | None = None,
                 on_metrics: Callable[[Receiver, object], None] | None = None,
                 translation: TranslationEngine | None = None, translation_available: Sequence[str] | None = None):
        """`translation`: the translation engine to serve (its model translating into
        `translation_available`, None: any); None: receivers translate nothing."""
        self._engine, self._slots = engine, slots
        self.translation = translation
        self._translation_hello = None if translation is None else {
            "available": None if translation_available is None else list(translation_available)}
        self._yield_poll_s, self._status_every_s = yield_poll_s, status_every_s
        self._on_disconnect = on_disconnect
        self._on_metrics = on_metrics
        """A receiver's metrics report (captions/host/metrics.py), on its connection's reader thread."""
        self._dir = tempfile.mkdtemp(prefix="captions-engine-")  # 0700: only this user connects
        self.path = os.path.join(self._dir, "engine.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(64)
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._numbers = itertools.count(1)
        self._wake = threading.Event()
        self._closed = False
        self._threads = [threading.Thread(target=self._accept_forever, name="engine-server-accept", daemon=True),
                         threading.Thread(target=self._tick_forever, name="engine-server-ticker", daemon=True)]
        for thread in self._threads:
            thread.start()

    def receivers(self) -> list[Receiver]:
        """The receiving processes connected now."""
        with self._lock:
            return [c.receiver for c in self._connections]

    def broadcast(self, message: dict) -> None:
        """Sends a control message to every connected receiver (e.g. the engine failed)."""
        frame = wire.control(message)
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.writer.send(frame)

    def queue_changed(self) -> None:
        """Wakes the ticker: the queue's answers may have changed."""
        self._wake.set()

    def close(self) -> None:
        """Stops accepting, drops every connection (freeing what they held), removes the socket."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._wake.set()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.drop("the engine process stops")
        for thread in self._threads:
            thread.join(timeout=2)
        shutil.rmtree(self._dir, ignore_errors=True)

    # ---- threads --------------------------------------------------------------------------------

    def _accept_forever(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            connection = _Connection(self, sock, Receiver(next(self._numbers)))
            connection.greet()  # first: once in `_connections`, the ticker and broadcasts write to it too
            with self._lock:
                self._connections.add(connection)
            connection.start()

    def _tick_forever(self) -> None:
        next_status = 0.0
        while not self._closed:
            self._wake.wait(self._yield_poll_s)
            self._wake.clear()
            with self._lock:
                connections = list(self._connections)
            try:
                waiting = len(self._slots)
                for connection in connections:
                    connection.send_yields(waiting > 0)
                if time.monotonic() >= next_status:
                    next_status = time.monotonic() + self._status_every_s
                    status = wire.control({"op": "status", "slots_in_use": self._engine.slots_in_use,
                                           "waiting": waiting})
                    for connection in connections:
                        connection.writer.send(status)
            except Exception:  # noqa: BLE001 - the ticker must outlive one bad answer
                logger.exception("engine server: the ticker failed")

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)
        self._wake.set()
        if self._on_disconnect is not None and not self._closed:
            self._on_disconnect(connection.receiver)


class _Connection:
    """One receiving process: its reader thread makes its calls; `writer` sends everything back."""

    def __init__(self, server: EngineServer, sock: socket.socket, receiver: Receiver):
        self._server, self._slots, self._sock = server, server._slots, sock
        self.receiver = receiver
        self.writer = wire.FrameWriter(sock, f"engine-server-writer-{receiver.number}",
                                       on_error=lambda e: self.drop(f"write failed: {e}"))
        self._order = threading.Lock()
        """Held across a request and its reply, and by a grant: a grant never overtakes its "requested"."""
        self._remotes: dict[int, _Remote] = {}
        self._remotes_lock = threading.Lock()
        """Guards `_remotes` only; never held while calling the queue or the engine."""
        self._dropped = False
        self.translations = TranslationService(server.translation, receiver.number,
                                               lambda message: self.writer.send(wire.control(message)))
        self._reader = threading.Thread(target=self._read_forever, name=f"engine-server-reader-{receiver.number}",
                                        daemon=True)

    def greet(self) -> None:
        """The hello, which the receiving process reads before anything else (engine_client.py)."""
        self.writer.send(wire.control({"op": "hello", "batch_size": self._server._engine.batch_size,
                                       "has_vad": self._server._engine.has_vad,
                                       "translation": self._server._translation_hello}))

    def start(self) -> None:
        self._reader.start()

    def _read_forever(self) -> None:
        why = "the receiving process closed its connection"
        try:
            for kind, payload in wire.read_frames(self._sock):
                if kind == wire.AUDIO:
                    self._push(payload)
                else:
                    self._handle(payload)
        except (OSError, wire.WireError) as e:
            why = f"connection failed: {e}"
        except Exception as e:  # noqa: BLE001 - a bug here must free the receiver's slots, not leak them
            logger.exception("engine server: receiver %s's message failed", self._name())
            why = f"{type(e).__name__}: {e}"
        self.drop(why)

    def _name(self) -> str:
        r = self.receiver
        return f"{r.index} (pid {r.pid})" if r.index is not None else f"#{r.number}"

    # ---- messages -------------------------------------------------------------------------------

    def _handle(self, message: dict) -> None:
        op = message["op"]
        if op == "request":
            self._request(message)
            return
        if op in ("translate", "untranslate"):
            self.translations.handle(message)
            return
        if op == "hello":
            self.receiver.index, self.receiver.pid = message.get("index"), message.get("pid")
            logger.info("engine server: receiving process %s connected", self._name())
            return
        if op == "ready":
            self.receiver.missing = [str(m) for m in message.get("missing", [])]
            return
        if op == "metrics":
            if self._server._on_metrics is not None:
                self._server._on_metrics(self.receiver, message.get("families"))
            return
        remote = self._remotes.get(message.get("wid"))
        if remote is None or remote.waiter is None:
            return  # it ended meanwhile
        if op == "cancel":
            if remote.stream is None and self._slots.cancel(remote.waiter):
                self._forget_remote(remote)
                self._server.queue_changed()
        elif op == "long_held":
            remote.long_held, remote.long_held_changed = bool(message["v"]), True
            self._server.queue_changed()
        elif op == "closing":
            self._slots.closing(remote.waiter)
            self._server.queue_changed()
        elif op in ("close", "abort") and remote.stream is not None:
            remote.stream.close() if op == "close" else remote.stream.abort()
        elif op not in ("close", "abort"):
            logger.warning("engine server: unknown message %r from receiver %s", op, self._name())

    def _request(self, message: dict) -> None:
        wid = int(message["wid"])
        remote = _Remote(wid)
        remote.waiter = Waiter(str(message["label"]), on_event=functools.partial(self._on_event, remote),
                               on_granted=functools.partial(self._on_granted, remote),
                               since=float(message["since"]), live_chunk=message.get("live_chunk"),
                               room=str(message.get("room", "")))
        with self._order:
            if self._dropped:
                return
            with self._remotes_lock:
                self._remotes[wid] = remote
            stream = self._slots.request(remote.waiter)
            if stream is not None:
                remote.stream = stream
            self.writer.send(wire.control({"op": "requested", "wid": wid, "stream": _describe(stream)}))
        self._server.queue_changed()

    def _push(self, payload: bytes) -> None:
        taken, answers = [], []
        for push in wire.parse_audio(payload):
            remote = self._remotes.get(push.wid)
            stream = remote.stream if remote is not None else None
            if stream is not None:
                taken.append((stream, push.pcm, push.produced_at))
            if push.sync:
                answers.append((push.wid, stream))
        # One call for the batch (the engine takes its lock once); a stream that ended meanwhile (the
        # engine ended it, or it was aborted) drops its push, as a local push would.
        self._server._engine.push_many(taken)
        for wid, stream in answers:
            lead = stream.lead_samples if stream is not None else 0
            self.writer.send(wire.control({"op": "pushed", "wid": wid, "lead": lead}))

    # ---- from the queue's dispatcher and the engine's thread ------------------------------------

    def _on_granted(self, remote: _Remote, stream: EngineStream) -> None:
        with self._order:
            if self._dropped:
                raise RuntimeError(f"receiving process {self._name()} is gone")  # the queue frees the slot
            remote.stream = stream
            self.writer.send(wire.control({"op": "granted", "wid": remote.wid, "stream": _describe(stream)}))

    def _on_event(self, remote: _Remote, event: StreamEvent) -> None:
        # The engine's thread: enqueue and return (the writer makes one frame of a step's events).
        self.writer.send(wire.WireEvent(remote.wid, event))
        if event.ended:
            self._forget_remote(remote)
            self._server.queue_changed()

    def _forget_remote(self, remote: _Remote) -> None:
        with self._remotes_lock:
            if self._remotes.get(remote.wid) is remote:
                del self._remotes[remote.wid]

    # ---- the ticker -----------------------------------------------------------------------------

    def send_yields(self, anyone_waits: bool) -> None:
        """Evaluates `should_yield` for this receiver's grants and sends what changed (module notes).
        Nobody waiting: the answer is no, and only a changed `long_held` is passed on."""
        with self._remotes_lock:
            remotes = [r for r in self._remotes.values() if r.stream is not None]
        for remote in remotes:
            if anyone_waits or remote.long_held_changed:
                remote.long_held_changed = False
                answer = self._slots.should_yield(remote.waiter, remote.long_held)
            else:
                answer = False
            if answer != remote.yielding:
                remote.yielding = answer
                self.writer.send(wire.control({"op": "yield", "wid": remote.wid, "v": answer}))

    # ---- the end --------------------------------------------------------------------------------

    def drop(self, why: str) -> None:
        """Frees everything this receiver held: streams aborted, waiters out of the queue."""
        with self._order:
            if self._dropped:
                return
            self._dropped = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with self._remotes_lock:
            remotes, self._remotes = list(self._remotes.values()), {}
        aborted = cancelled = 0
        for remote in remotes:
            if remote.stream is not None:
                remote.stream.abort()
                aborted += 1
            elif remote.waiter is not None and self._slots.cancel(remote.waiter):
                cancelled += 1
            # else: its grant is on its way; `_on_granted` refuses it and the queue frees the slot
        untranslated = self.translations.drop()
        self.writer.close(timeout=0.5)
        self._sock.close()
        # Expected when it stops with nothing held; worth a warning when it held slots (it died).
        logger.log(logging.WARNING if aborted or cancelled or untranslated else logging.INFO,
                   "engine server: receiving process %s disconnected (%s): %d streams aborted, %d waiters left "
                   "the queue, %d translations left the translation queue", self._name(), why, aborted, cancelled,
                   untranslated)
        self._server._forget(self)


def _describe(stream: EngineStream | None) -> list[int] | None:
    return None if stream is None else [stream.id, stream.slot_index]
