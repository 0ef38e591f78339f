"""Review attacks on the host's one translation engine (translation_server.py, translation_client.py)."""

from __future__ import annotations

import contextlib
import random
import threading
from concurrent.futures import CancelledError

import pytest

from captions.host import wire
from captions.translate import TranslationBacklogFull, TranslationEngine, TranslationEngineClosed
from tests import test_host_translation_wire
from tests.test_host_translation_wire import TIMEOUT, FakeTranslator, RawReceiver, busy, translate, until

host = test_host_translation_wire.host
"""The fixture: a real EngineServer serving a real TranslationEngine over a fake model."""


def test_a_raising_done_callback_does_not_end_the_channel(host):
    _, _, _, connect = host
    client = connect()
    remote = client.translation
    future = remote.submit("one", "en", "de", final=True)

    def bad(f):
        raise RuntimeError("callback bug")

    future.add_done_callback(bad)
    assert future.result(TIMEOUT) == "de:ONE"
    f2 = remote.submit("two", "en", "de", final=True)
    f2.add_done_callback(bad)
    assert f2.result(TIMEOUT) == "de:TWO"
    assert remote.submit("three", "en", "de", final=True).result(TIMEOUT) == "de:THREE"
    assert client.lost is None


def test_cancel_racing_results_resolves_each_future_once(host):
    _, _, server, connect = host
    remote = connect().translation
    calls: list[int] = []
    lock = threading.Lock()

    def seen(i, _f):
        with lock:
            calls.append(i)

    n = 0
    for _ in range(20):
        futures = [remote.submit(f"t{i}", "en", "de", final=i % 4 == 0, key=("s", i % 3)) for i in range(12)]
        for i, f in enumerate(futures):
            f.add_done_callback(lambda f, i=n + i: seen(i, f))
        for f in futures[::3]:
            f.cancel()
        for f in futures:
            with contextlib.suppress(CancelledError, TranslationBacklogFull):
                f.result(TIMEOUT)
        n += len(futures)
    assert sorted(calls) == list(range(n))
    until(lambda: remote.pending == 0, what="client map empty")
    (connection,) = server._connections
    until(lambda: connection.translations.pending == 0, what="server map empty")


def test_documented_a_flood_from_one_receiver_fails_anothers_final(host):
    """Not a regression test but the finding, pinned: `max_finals` (and `max_interims`) bound the
    host's one queue, so one receiving process's backlog evicts another's oldest final."""
    model, translation, _, connect = host
    a, b = connect().translation, connect().translation
    busy(model, a)
    victim = b.submit("deaf reader's final", "en", "de", final=True)
    until(lambda: translation.queued == 1, what="queued")
    flood = [a.submit(f"flood {i}", "en", "de", final=True) for i in range(4)]  # max_finals=4
    with pytest.raises(TranslationBacklogFull):
        victim.result(TIMEOUT)
    model.release()
    for f in flood:
        f.result(TIMEOUT)


def test_stress_cancels_from_other_threads_and_a_lost_channel_mid_flight(host):
    _, _, server, connect = host
    remote = connect().translation
    rng = random.Random(1)
    done_counts: dict[int, int] = {}
    lock = threading.Lock()
    futures = []

    def seen(i, _f):
        with lock:
            done_counts[i] = done_counts.get(i, 0) + 1

    stop = threading.Event()

    def canceller():
        while not stop.is_set():
            with lock:
                pick = list(futures)
            if pick:
                rng.choice(pick).cancel()

    t = threading.Thread(target=canceller)
    t.start()
    for i in range(400):
        f = remote.submit(f"t{i}", "en", "de", final=rng.random() < 0.3, key=("s", i % 5))
        f.add_done_callback(lambda f, i=i: seen(i, f))
        with lock:
            futures.append(f)
        if i == 300:
            server.close()
    stop.set()
    t.join()
    for f in futures:
        with contextlib.suppress(CancelledError, TranslationBacklogFull, TranslationEngineClosed):
            f.result(TIMEOUT)
    until(lambda: len(done_counts) == 400, what="all done")
    assert set(done_counts.values()) == {1}
    assert remote.pending == 0


def test_finals_a_caller_gave_up_on_are_counted_dropped_when_evicted_or_closed():
    """A room's final that timed out is cancelled (over the wire: "untranslate") but stays queued;
    evicted by the backlog bound or failed by close() it was counted nowhere, so that submitted
    never equalled translated + dropped + failed (an operator reads the difference as stuck)."""
    model = FakeTranslator()
    engine = TranslationEngine(model, interim_linger_s=0, max_finals=2)
    try:
        model.hold()
        first = engine.submit("a", "en", "de", final=True)
        assert model.entered.wait(TIMEOUT)
        gave_up = engine.submit("b", "en", "de", final=True)
        assert gave_up.cancel()
        engine.submit("c", "en", "de", final=True)
        engine.submit("d", "en", "de", final=True)  # evicts the cancelled "b"
        also_gave_up = engine.submit("e", "en", "de", final=True)  # evicts "c" (failed)
        assert also_gave_up.cancel()
        model.release()
        assert first.result(TIMEOUT) == "de:A"
        engine.close()
        c = engine.counters
        assert c.submitted == 5
        assert (c.translated, c.dropped, c.failed) == (c.translated, 2, c.submitted - c.translated - 2)
        assert c.submitted == c.translated + c.dropped + c.failed
    finally:
        model.release()
        engine.close()


def test_a_receiver_dying_while_its_translation_is_in_the_models_batch(host, caplog):
    model, translation, server, connect = host
    other = connect().translation
    dying = RawReceiver(server.path)
    model.hold()
    dying.send(translate(1, "in the batch"))
    assert model.entered.wait(TIMEOUT)
    dying.send(translate(2, "queued", final=False, key=["s", "de"]))
    until(lambda: translation.queued == 1, what="queued")
    dying.close()
    until(lambda: len(server.receivers()) == 0 or translation.queued == 0, what="dropped")
    until(lambda: translation.queued == 0, what="dropped")
    model.release()
    assert other.submit("alive", "en", "de", final=True).result(TIMEOUT) == "de:ALIVE"
    until(lambda: translation.counters.translated == 2, what="the batch ran")
    assert "queued" not in model.texts()
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_hostile_keys_and_values_are_answered_not_fatal(host):
    _, _, server, connect = host
    good = connect().translation
    peer = RawReceiver(server.path)
    try:
        peer.sock.sendall(wire.control({"op": "untranslate", "tid": 99}))  # unknown: ignored
        cases = [translate(1, key=float("nan")), translate(2, key=[True, 1, None, 1.5, [["x"]]]),
                 translate(3, final=1), translate(4, source="en" * 16 + "x"), translate(5, text="\ud800"),
                 translate(6, key=[2**80])]
        for case in cases:
            peer.sock.sendall(wire.control(case))
        answers = {}
        while len(answers) < len(cases):
            answer = peer.reply()
            answers[answer["tid"]] = answer
        assert answers[1]["text"] == "de:HELLO" and answers[2]["text"] == "de:HELLO"
        assert answers[3]["error"] == "rejected" and answers[4]["error"] == "rejected"
        assert answers[5]["text"] == "de:\ud800" and answers[6]["text"] == "de:HELLO"
        assert good.submit("fine", "en", "de", final=True).result(TIMEOUT) == "de:FINE"
    finally:
        peer.close()
