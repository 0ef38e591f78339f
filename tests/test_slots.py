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


def test_waiters_are_served_in_the_order_they_started_talking(engine, queue):
    """A talker whose turn began earlier (it was judged speech late, or its room was slow to ask)
    goes before one who asked first but started talking later."""
    first = queue.request(Recorder("a").waiter)
    queue.request(Recorder("b").waiter)
    late, early = Recorder("late"), Recorder("early")
    late.waiter.since, early.waiter.since = 100.0, 99.0
    assert queue.request(late.waiter) is None
    assert queue.request(early.waiter) is None
    assert queue.waiting() == ["early", "late"]
    first.close()
    assert early.granted.wait(2) and not late.granted.is_set()


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


class GrantLog:
    """The order in which the dispatcher granted slots, and each granted stream, across threads."""

    def __init__(self):
        self.labels: list[str] = []
        self.streams: dict[str, object] = {}
        self._changed = threading.Condition()

    def waiter(self, label: str) -> Waiter:
        return Waiter(label, on_event=lambda e: None, on_granted=lambda stream: self._granted(label, stream))

    def _granted(self, label: str, stream) -> None:
        with self._changed:
            self.labels.append(label)
            self.streams[label] = stream
            self._changed.notify_all()

    def serve_one_at_a_time(self, first_to_free, count: int) -> list[str]:
        """Frees one slot, waits for the next grant, then frees that speaker's slot, `count` times:
        the grants then come one by one in the queue's order."""
        to_free = first_to_free
        for served in range(count):
            to_free.close()
            with self._changed:
                assert self._changed.wait_for(lambda n=served: len(self.labels) > n, 5), \
                    f"nobody was granted the freed slot after {self.labels}"
            to_free = self.streams[self.labels[-1]]
        return self.labels


def run_rooms(rooms: list[str], body) -> None:
    """`body(room)` in one thread per room, as livekit-agents' THREAD executor runs room jobs."""
    errors: list[BaseException] = []

    def run(room: str) -> None:
        try:
            body(room)
        except BaseException as e:  # noqa: BLE001 - reported by the test's thread below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(room,), name=room) for room in rooms]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), "a room thread hung"
    assert not errors, errors


def test_speakers_of_several_rooms_are_served_in_the_order_they_arrived(engine, queue):
    """Speakers of four rooms, each asking from its own room's thread, arrive one after another in
    a mixed order (a room's speakers sometimes back to back, sometimes between other rooms'): as
    slots free, they are served in exactly that order, whatever thread each came from."""
    first = queue.request(Recorder("busy-1").waiter)
    queue.request(Recorder("busy-2").waiter)  # holds the other slot throughout
    arrivals = ["r0", "r2", "r2", "r1", "r3", "r0", "r0", "r1", "r3", "r2", "r1", "r3"]
    expected = [f"{room}/speaker{i}" for i, room in enumerate(arrivals)]
    log, turn, next_arrival = GrantLog(), threading.Condition(), [0]

    def room(name: str) -> None:
        for i, label in enumerate(expected):
            if arrivals[i] != name:
                continue
            with turn:
                assert turn.wait_for(lambda i=i: next_arrival[0] == i, 5), f"{label} never got its turn"
                assert queue.request(log.waiter(label)) is None, "the engine is full: it must wait"
                next_arrival[0] += 1
                turn.notify_all()

    run_rooms(sorted(set(arrivals)), room)
    assert queue.waiting() == expected
    assert log.serve_one_at_a_time(first, len(expected)) == expected


def test_speakers_arriving_at_once_from_several_rooms_are_served_in_queue_order(engine, queue):
    """Four rooms' threads ask for slots at the same moment, three speakers each: the queue keeps
    each room's speakers in the order that room asked, loses none, and serves in its order."""
    first = queue.request(Recorder("busy-1").waiter)
    queue.request(Recorder("busy-2").waiter)
    rooms = [f"r{i}" for i in range(4)]
    log, start = GrantLog(), threading.Barrier(len(rooms))

    def room(name: str) -> None:
        start.wait(5)
        for j in range(3):
            assert queue.request(log.waiter(f"{name}/speaker{j}")) is None

    run_rooms(rooms, room)
    order = queue.waiting()
    assert sorted(order) == sorted(f"{r}/speaker{j}" for r in rooms for j in range(3))
    for r in rooms:
        assert [label for label in order if label.startswith(f"{r}/")] == [f"{r}/speaker{j}" for j in range(3)]
    assert log.serve_one_at_a_time(first, len(order)) == order


# ---- fair shares: rooms that wait get their part of the slots ----------------------------------------

def test_shares_are_max_min_fair_and_whole_slots_go_to_those_holding_them():
    from captions.live.slots import fair_shares, whole_shares

    assert fair_shares({"A": 3, "B": 1}, 2) == {"A": 1, "B": 1}
    assert fair_shares({"A": 5, "B": 1, "C": 1}, 4) == {"A": 2, "B": 1, "C": 1}, "a room needing less leaves the rest"
    assert fair_shares({"A": 1}, 4) == {"A": 1}
    thirds = fair_shares({"A": 2, "B": 2, "C": 2}, 4)
    assert thirds == pytest.approx({"A": 4 / 3, "B": 4 / 3, "C": 4 / 3})
    # 4 slots, 3 rooms: one whole slot each, the one left to the first in priority (holding more).
    assert whole_shares(thirds, ["B", "A", "C"]) == {"A": 1, "B": 2, "C": 1}
    assert sum(whole_shares(fair_shares({"A": 1, "B": 1, "C": 1}, 2), ["A", "B", "C"]).values()) == 2


def labelled(label: str, since: float) -> Recorder:
    r = Recorder(label)
    r.waiter.since = since
    return r


def test_a_room_over_its_share_is_asked_to_yield_its_longest_held_slot_only_while_others_wait(engine, queue):
    a1, a2 = labelled("A/1", 1.0), labelled("A/2", 2.0)
    assert queue.request(a1.waiter) is not None and queue.request(a2.waiter) is not None
    assert not queue.should_yield(a1.waiter), "nobody waits: a room may hold every slot"
    b1 = labelled("B/1", 3.0)
    assert queue.request(b1.waiter) is None
    assert queue.holders() == {"A": 2}
    assert queue.should_yield(a1.waiter), "room A holds 2 slots, its share is 1: the longest held yields"
    assert not queue.should_yield(a2.waiter), "one slot back is enough"
    queue.cancel(b1.waiter)
    assert not queue.should_yield(a1.waiter), "nobody waits any more"


def test_a_lone_room_yields_only_a_long_held_slot_and_one_per_waiter(engine, queue):
    a1, a2, a3 = labelled("A/1", 1.0), labelled("A/2", 2.0), labelled("A/3", 3.0)
    queue.request(a1.waiter)
    queue.request(a2.waiter)
    assert queue.request(a3.waiter) is None
    assert not queue.should_yield(a1.waiter) and not queue.should_yield(a2.waiter), "the room keeps its share: B"
    assert queue.should_yield(a2.waiter, long_held=True), "the only long-held turn yields to the waiter"
    assert queue.should_yield(a1.waiter, long_held=True), "the longest held of the long-held turns yields"
    assert not queue.should_yield(a2.waiter, long_held=True), "one waiter: one yield"


def test_a_long_held_slot_is_not_asked_for_a_room_that_already_has_its_share(engine, queue):
    """B = 2, rooms A and B hold one slot each and A has a second talker waiting: B's long-held turn
    keeps its slot (A would then hold more than its share), A's own long-held turn yields."""
    a1, b1, a2 = labelled("A/1", 1.0), labelled("B/1", 0.5), labelled("A/2", 3.0)
    queue.request(b1.waiter)
    queue.request(a1.waiter)
    queue.request(a2.waiter)
    assert not queue.should_yield(b1.waiter, long_held=True)
    assert queue.should_yield(a1.waiter, long_held=True)


def test_more_rooms_than_slots_rotate_by_the_long_hold_rule(engine, queue):
    """B = 2, three rooms of one talker each: the room that waits is under its share (2/3 rounded
    up), so the longest long-held slot of another room yields to it."""
    a, b, c = labelled("A/1", 1.0), labelled("B/1", 2.0), labelled("C/1", 3.0)
    queue.request(a.waiter)
    queue.request(b.waiter)
    assert queue.request(c.waiter) is None
    assert not queue.should_yield(a.waiter) and not queue.should_yield(b.waiter), "within their shares"
    queue.should_yield(b.waiter, long_held=True)
    assert queue.should_yield(a.waiter, long_held=True) and not queue.should_yield(b.waiter, long_held=True)


def test_a_freed_slot_goes_to_the_room_under_its_share_before_an_earlier_waiter_of_a_room_at_it(engine, queue):
    a1, a2 = labelled("A/1", 1.0), labelled("A/2", 2.0)
    queue.request(a1.waiter)
    queue.request(a2.waiter)
    a3, b1 = labelled("A/3", 3.0), labelled("B/1", 4.0)
    assert queue.request(a3.waiter) is None and queue.request(b1.waiter) is None
    assert queue.waiting() == ["A/3", "B/1"], "in the order they started talking"
    engine.opened[0].close()
    assert b1.granted.wait(2), "room B holds nothing and its share is 1"
    assert not a3.granted.is_set() and queue.waiting() == ["A/3"]
    assert queue.holders() == {"A": 1, "B": 1}


def test_a_slot_being_given_back_counts_as_given_while_it_flushes(engine, queue):
    """B = 2, one room: a1's turn ended (a pause) and its stream is flushing, a2 has held long, a3
    waits. The slot a1 is giving back is a3's: a2 is not asked to yield as well."""
    a1, a2, a3 = labelled("A/1", 1.0), labelled("A/2", 2.0), labelled("A/3", 3.0)
    queue.request(a1.waiter)
    queue.request(a2.waiter)
    queue.request(a3.waiter)
    assert queue.should_yield(a2.waiter, long_held=True), "a2 is the only long-held turn"
    queue.closing(a1.waiter)
    assert not queue.should_yield(a2.waiter, long_held=True), "a1's slot, being flushed, goes to a3"
    assert not queue.should_yield(a1.waiter), "already giving it back"
    queue.request(labelled("A/4", 4.0).waiter)
    assert queue.should_yield(a2.waiter, long_held=True), "a second waiter: a2, held long, yields for it"
