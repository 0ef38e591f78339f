"""The host's one translation engine (captions/host/translation_server.py, translation_client.py):
receiving processes' `RemoteTranslationEngine`s against a real `EngineServer` serving a real
`TranslationEngine` over a fake model, in one process over a real Unix socket.

Results, a replaced interim cancelled across the wire, keys kept apart per connection, the engine's
failures raised as themselves, a lost channel failing everything pending, a dead receiving process's
translations taken out of the queue, and hostile messages refused one by one (or the connection
dropped when there is no translation to answer)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from concurrent.futures import CancelledError

import pytest

from captions.host import wire
from captions.host.engine_client import EngineClient
from captions.host.engine_server import EngineServer
from captions.host.metrics import ReceiverMetrics, snapshot
from captions.host.translation_client import RemoteTranslationEngine, TranslationRejected
from captions.host.translation_server import MAX_TEXT_CHARS
from captions.live.metrics import CaptionMetrics
from captions.live.slots import SlotQueue
from captions.translate import (
    TranslationBacklogFull,
    TranslationEngine,
    TranslationEngineClosed,
    UnsupportedPair,
)
from tests.fake_engine import FakeEngine

TIMEOUT = 5


class FakeTranslator:
    """Upper-cases each text into "<target>:<TEXT>"; records every batch; translates en/fr into de/fr/en
    only; `hold()` makes the next call wait until `release()`."""

    def __init__(self):
        self.batches: list[list[str]] = []
        self._gate = threading.Event()
        self._gate.set()
        self.entered = threading.Event()

    def supports(self, source: str, target: str) -> bool:
        return source in ("en", "fr") and target in ("de", "fr", "en")

    def hold(self) -> None:
        self._gate.clear()
        self.entered.clear()

    def release(self) -> None:
        self._gate.set()

    def translate_batch(self, requests):
        self.batches.append([r.text for r in requests])
        self.entered.set()
        assert self._gate.wait(TIMEOUT)
        if any("boom" in r.text for r in requests):
            raise KeyError("model exploded")
        return [f"{r.target}:{r.text.upper()}" for r in requests]

    def texts(self) -> list[str]:
        return [text for batch in self.batches for text in batch]


def until(check, timeout: float = TIMEOUT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.fixture
def host():
    """(fake model, translation engine, engine server, connect()); all closed after."""
    model = FakeTranslator()
    translation = TranslationEngine(model, interim_linger_s=0, max_finals=4)
    engine = FakeEngine(batch_size=1)
    slots = SlotQueue(engine, poll_s=0.05)
    server = EngineServer(engine, slots, yield_poll_s=0.02, status_every_s=0.05, translation=translation,
                          translation_available=("de", "en", "fr"))
    clients: list[EngineClient] = []

    def connect() -> EngineClient:
        client = EngineClient(server.path, index=len(clients))
        clients.append(client)
        return client

    yield model, translation, server, connect
    model.release()
    for client in clients:
        client.close()
    server.close()
    translation.close()
    slots.close()


def busy(model: FakeTranslator, remote: RemoteTranslationEngine):
    """Holds the model inside a first batch, so that what is submitted next stays queued."""
    model.hold()
    first = remote.submit("first", "en", "de", final=True)
    assert model.entered.wait(TIMEOUT)
    return first


class RawReceiver:
    """A peer that speaks the wire directly (a broken or hostile receiving process)."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.frames = wire.read_frames(self.sock)
        kind, self.hello = next(self.frames)
        assert kind == wire.CONTROL and self.hello["op"] == "hello"

    def send(self, message: dict) -> None:
        self.sock.sendall(wire.control(message))

    def reply(self, op: str = "translated") -> dict:
        self.sock.settimeout(TIMEOUT)
        for kind, message in self.frames:
            if kind == wire.CONTROL and message["op"] == op:
                return message
        raise AssertionError("the engine process closed the connection")

    def close(self) -> None:
        """As the process dying: its end of the socket closes (the reader's file would keep it open)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def translate(tid, text="hello", source="en", target="de", final=True, key=None, **extra) -> dict:
    return {"op": "translate", "tid": tid, "text": text, "source": source, "target": target, "final": final,
            "key": key, **extra}


def test_translations_come_back_and_the_receiver_learns_the_languages(host):
    _, translation, _, connect = host
    remote = connect().translation
    assert isinstance(remote, RemoteTranslationEngine) and remote.available == ("de", "en", "fr")
    futures = [remote.submit(f"caption {i}", "en", "de", final=True, key=("seg", i)) for i in range(3)]
    interim = remote.submit("bonjour", "fr", "en", final=False, key=("seg-9", "en"))
    assert [f.result(TIMEOUT) for f in futures] == [f"de:CAPTION {i}" for i in range(3)]
    assert interim.result(TIMEOUT) == "en:BONJOUR"
    assert remote.pending == 0
    assert translation.counters.translated == 4


def test_a_replaced_interim_is_cancelled_across_the_wire(host):
    model, translation, _, connect = host
    remote = connect().translation
    first = busy(model, remote)
    old = remote.submit("hel", "en", "de", final=False, key=("seg-1", "de"))
    until(lambda: translation.queued == 1, what="the interim queued")
    new = remote.submit("hello", "en", "de", final=False, key=("seg-1", "de"))
    final = remote.submit("hello world", "en", "de", final=True, key=("seg-1", "de"))
    with pytest.raises(CancelledError):
        old.result(TIMEOUT)
    with pytest.raises(CancelledError):
        new.result(TIMEOUT)  # the segment's final replaced it too
    model.release()
    assert first.result(TIMEOUT) == "de:FIRST" and final.result(TIMEOUT) == "de:HELLO WORLD"
    assert "hel" not in model.texts() and "hello" not in model.texts()
    assert translation.counters.dropped == 2


def test_equal_keys_of_two_receiving_processes_do_not_replace_each_other(host):
    model, translation, _, connect = host
    a, b = connect().translation, connect().translation
    busy(model, a)
    from_a = a.submit("from a", "en", "de", final=False, key=("seg-1", "de"))
    until(lambda: translation.queued == 1, what="a's interim queued")
    from_b = b.submit("from b", "en", "de", final=False, key=("seg-1", "de"))
    until(lambda: translation.queued == 2, what="b's interim queued")
    model.release()
    assert (from_a.result(TIMEOUT), from_b.result(TIMEOUT)) == ("de:FROM A", "de:FROM B")


def test_the_callers_cancel_makes_the_engine_skip_it(host):
    model, translation, server, connect = host
    remote = connect().translation
    first = busy(model, remote)
    given_up = remote.submit("too late", "en", "de", final=True, key=("seg-2", "de"))
    until(lambda: translation.queued == 1, what="queued")
    (connection,) = server._connections
    assert connection.translations.pending == 2
    assert given_up.cancel()
    until(lambda: connection.translations.pending == 1, what="the engine process told")
    model.release()
    assert first.result(TIMEOUT) == "de:FIRST"
    assert remote.submit("kept", "en", "de", final=True).result(TIMEOUT) == "de:KEPT"
    assert "too late" not in model.texts() and remote.pending == 0
    assert translation.counters.dropped == 1


def test_the_engines_failures_are_raised_as_themselves(host):
    model, _, _, connect = host
    remote = connect().translation
    with pytest.raises(UnsupportedPair):
        remote.submit("hola", "es", "de", final=True).result(TIMEOUT)
    busy(model, remote)
    backlog = [remote.submit(f"final {i}", "en", "de", final=True) for i in range(5)]  # max_finals=4
    with pytest.raises(TranslationBacklogFull):
        backlog[0].result(TIMEOUT)
    model.release()
    assert [f.result(TIMEOUT) for f in backlog[1:]] == [f"de:FINAL {i}" for i in range(1, 5)]
    with pytest.raises(RuntimeError, match="KeyError"):  # the model's own failure, named
        remote.submit("boom", "en", "de", final=True).result(TIMEOUT)


def test_a_lost_channel_fails_every_pending_translation_and_every_later_one(host):
    model, translation, server, connect = host
    remote = connect().translation
    first = busy(model, remote)
    queued = remote.submit("queued", "en", "de", final=True)
    server.close()
    for future in (first, queued):
        with pytest.raises(TranslationEngineClosed):
            future.result(TIMEOUT)
    with pytest.raises(TranslationEngineClosed):
        remote.submit("after", "en", "de", final=True).result(TIMEOUT)
    until(lambda: translation.queued == 0, what="the dropped connection's translations left the queue")


def test_a_dead_receiving_process_translations_leave_the_queue(host):
    model, translation, server, connect = host
    other = connect().translation
    first = busy(model, other)
    dying = RawReceiver(server.path)
    for tid in range(1, 4):
        dying.send(translate(tid, f"for the dead {tid}", final=tid != 2, key=["seg", tid]))
    until(lambda: translation.queued == 3, what="the dying process's translations queued")
    dying.close()
    until(lambda: translation.queued == 0, what="them removed")
    model.release()
    assert first.result(TIMEOUT) == "de:FIRST"
    assert other.submit("alive", "en", "de", final=True).result(TIMEOUT) == "de:ALIVE"
    assert not any(text.startswith("for the dead") for text in model.texts())
    assert translation.counters.dropped == 3


@pytest.mark.parametrize(("fields", "why"), [
    ({"text": 42}, "text is not a string"),
    ({"text": "x" * (MAX_TEXT_CHARS + 1)}, "characters"),
    ({"source": ""}, "source is not a language code"),
    ({"target": "d" * 33}, "target is not a language code"),
    ({"target": ["de"]}, "target is not a language code"),
    ({"final": "yes"}, "final is not true or false"),
    ({"key": {"a": 1}}, "a key is"),
    ({"key": [[[["deep"]]]]}, "a key is"),
    ({"key": list(range(9))}, "a key is"),
    ({"key": ["s" * 600]}, "a key's string"),
], ids=["text-type", "text-long", "source-empty", "target-long", "target-list", "final-type", "key-dict",
        "key-deep", "key-long", "key-string-long"])
def test_a_bad_field_fails_that_translation_only(host, fields, why):
    _, _, server, _ = host
    peer = RawReceiver(server.path)
    try:
        peer.send(translate(1, **fields))
        answer = peer.reply()
        assert answer["tid"] == 1 and answer["error"] == "rejected" and why in answer["message"]
        peer.send(translate(2, "still served"))
        assert peer.reply() == {"op": "translated", "tid": 2, "text": "de:STILL SERVED"}
    finally:
        peer.close()


def test_a_duplicate_pending_id_is_refused(host):
    model, _, server, connect = host
    busy(model, connect().translation)
    peer = RawReceiver(server.path)
    try:
        peer.send(translate(7, "one"))
        peer.send(translate(7, "two"))
        answer = peer.reply()
        assert answer["tid"] == 7 and answer["error"] == "rejected" and "already pending" in answer["message"]
        model.release()
        assert peer.reply() == {"op": "translated", "tid": 7, "text": "de:ONE"}
    finally:
        peer.close()


@pytest.mark.parametrize("tid", [None, "1", -1, 1.5, True, 2**60], ids=["none", "str", "negative", "float", "bool",
                                                                        "huge"])
def test_a_translation_without_a_valid_id_drops_the_connection(host, tid):
    _, _, server, connect = host
    good = connect().translation
    peer = RawReceiver(server.path)
    try:
        until(lambda: len(server.receivers()) == 2, what="both connected")
        peer.send(translate(tid))
        until(lambda: len(server.receivers()) == 1, what="the peer dropped")
        assert good.submit("fine", "en", "de", final=True).result(TIMEOUT) == "de:FINE"
    finally:
        peer.close()


def test_overlong_text_and_a_key_that_cannot_cross_fail_on_the_receiving_side(host):
    _, translation, _, connect = host
    remote = connect().translation
    with pytest.raises(TranslationRejected):
        remote.submit("x" * (MAX_TEXT_CHARS + 1), "en", "de", final=True).result(TIMEOUT)
    with pytest.raises(TypeError):
        remote.submit("text", "en", "de", final=True, key=object())
    assert translation.counters.submitted == 0 and remote.pending == 0


def test_without_a_translation_engine_receivers_get_none():
    engine = FakeEngine(batch_size=1)
    slots = SlotQueue(engine, poll_s=0.05)
    server = EngineServer(engine, slots)
    client = EngineClient(server.path)
    peer = RawReceiver(server.path)
    try:
        assert client.translation is None
        peer.send(translate(1))
        assert peer.reply()["error"] == "closed"
    finally:
        peer.close()
        client.close()
        server.close()
        slots.close()


def test_translation_engine_metrics_are_the_engine_process_own_once():
    """A receiving process's stand-in has no engine metrics; and if a report carried some anyway, the
    engine process's own values are served, not a sum."""
    model = FakeTranslator()
    engine = TranslationEngine(model)
    try:
        engine.submit("one", "en", "de", final=True).result(TIMEOUT)
        own = CaptionMetrics()
        own.attach_translation(engine, ("de",))
        receiving = CaptionMetrics()
        receiving.attach_translation(RemoteTranslationEngine(lambda frame: True), ("de",))
        report = snapshot(receiving.registry)
        assert not [f for f in report if f[0].startswith(("captions_translation_engine", "captions_translation_queued"))]
        twice = CaptionMetrics()
        twice.attach_translation(engine, ("de",))
        merged = ReceiverMetrics()
        merged.update(1, snapshot(twice.registry))
        merged.update(2, report)
        served = {s.name: s.value for family in merged.merge(own.registry.collect()) for s in family.samples}
        assert served["captions_translation_engine_submitted_total"] == 1
        assert served["captions_translation_engine_translated_total"] == 1
        assert served["captions_translation_queued"] == 0
    finally:
        engine.close()


def test_a_stopped_translation_engine_makes_the_engine_process_unready():
    from captions.host.engine_process import _EngineProcess

    class NoReceivers:
        def receivers(self):
            return []

    process = _EngineProcess(0)
    process.model_loaded, process.server = True, NoReceivers()
    process.translation = TranslationEngine(FakeTranslator())
    assert process.not_ready() == []
    process.translation.close()
    assert process.not_ready() == ["the translation engine stopped"]
