"""The fair queue in front of the engine's slots, shared by rooms on different threads."""

from __future__ import annotations

import threading
import time

import pytest

from captions.live.slots import SlotQueue, Waiter
from tests.fake_engine import FakeEngine


class Recorder:
    """A waiter's side: records the stream it was granted (from whichever thread)."""

    def __init__(self, label: str):
        self.granted = threading.Event()
        self.stream = None
        self.waiter = Waiter(label, on_event=lambda e: None, on_granted=self._on_granted)

    def _on_granted(self, stream) -> None:
        self.stream = stream
        self.granted.set()


@pytest.fixture
def engine():
    return FakeEngine(batch_size=2)


@pytest.fixture
def queue(engine):
    q = SlotQueue(engine, poll_s=5.0)
    yield q
    q.close()


def test_free_slots_are_given_immediately(engine, queue):
    a, b = Recorder("a"), Recorder("b")
    assert queue.request(a.waiter) is not None
    assert queue.request(b.waiter) is not None
    assert engine.slots_in_use == 2
    assert queue.waiting() == []


def test_speakers_beyond_capacity_wait_and_are_served_in_arrival_order(engine, queue):
    first = queue.request(Recorder("a").waiter)
    second = queue.request(Recorder("b").waiter)
    c, d = Recorder("c"), Recorder("d")
    assert queue.request(c.waiter) is None
    assert queue.request(d.waiter) is None
    assert queue.waiting() == ["c", "d"]

    second.close()
    assert c.granted.wait(2), "the first waiter gets the freed slot"
    assert not d.granted.is_set()
    assert queue.waiting() == ["d"]

    first.close()
    assert d.granted.wait(2)
    assert queue.waiting() == []
    assert engine.slots_in_use == 2


def test_a_newcomer_never_overtakes_someone_waiting(engine, queue):
    s1 = queue.request(Recorder("a").waiter)
    queue.request(Recorder("b").waiter)
    waiting = Recorder("waiting")
    assert queue.request(waiting.waiter) is None
    # Free a slot without telling the queue yet (as if the newcomer raced the slot-freed signal).
    engine._listeners.clear()
    s1.close()
    newcomer = Recorder("newcomer")
    assert queue.request(newcomer.waiter) is None, "the free slot belongs to the speaker who waited"
    assert queue.waiting() == ["waiting", "newcomer"]
    assert waiting.granted.wait(10), "served by the dispatcher's periodic retry"
    assert not newcomer.granted.is_set()


def test_a_cancelled_waiter_is_skipped(engine, queue):
    s1 = queue.request(Recorder("a").waiter)
    queue.request(Recorder("b").waiter)
    gone, next_in_line = Recorder("gone"), Recorder("next")
    queue.request(gone.waiter)
    queue.request(next_in_line.waiter)
    assert queue.cancel(gone.waiter)
    assert not queue.cancel(gone.waiter)
    s1.close()
    assert next_in_line.granted.wait(2)
    assert not gone.granted.is_set()


def test_waiters_from_many_threads_are_all_served_exactly_once(engine, queue):
    recorders = [Recorder(f"r{i}") for i in range(12)]
    immediate: dict[str, object] = {}

    def request(r: Recorder) -> None:
        stream = queue.request(r.waiter)
        if stream is not None:
            immediate[r.waiter.label] = stream

    threads = [threading.Thread(target=request, args=(r,)) for r in recorders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    served = dict(immediate)
    deadline = time.monotonic() + 20
    while len(served) < len(recorders) and time.monotonic() < deadline:
        for _label, stream in list(served.items()):
            if stream is not None and not stream.ended:
                stream.close()  # a speaker finishes, which frees a slot for the next one
        for r in recorders:
            if r.granted.is_set() and r.waiter.label not in served:
                served[r.waiter.label] = r.stream
        time.sleep(0.01)
    assert sorted(served) == sorted(r.waiter.label for r in recorders)
    assert len(engine.opened) == len(recorders), "no stream opened twice"


def test_a_waiter_that_cannot_take_its_stream_frees_it_for_the_next(engine, queue):
    s1 = queue.request(Recorder("a").waiter)
    queue.request(Recorder("b").waiter)

    def refuse(stream):
        raise RuntimeError("room already closed")

    broken = Waiter("broken", on_event=lambda e: None, on_granted=refuse)
    after = Recorder("after")
    queue.request(broken)
    queue.request(after.waiter)
    s1.close()
    assert after.granted.wait(5), "the refused stream was aborted, so its slot went to the next waiter"
