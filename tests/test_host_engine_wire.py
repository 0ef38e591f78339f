"""The engine channel (captions/host/): a receiving process's RemoteSlotQueue and RemoteStreams
against the engine process's EngineServer, in one process over a real Unix socket, with the fake
engine behind the real SlotQueue."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from captions.host import wire
from captions.host.engine_client import ENGINE_GONE, EngineClient, RemoteStream
from captions.host.engine_server import EngineServer
from captions.live.slots import SlotQueue, Waiter
from captions.stt.api import StreamEvent, Word
from tests.fake_engine import FakeEngine, fake_words, silence, tone


class Speaker:
    """A Waiter's two callbacks, recorded (they run on the client's reader thread)."""

    def __init__(self, label: str, since: float | None = None):
        self.events: list[StreamEvent] = []
        self.granted: list[RemoteStream] = []
        self.ended = threading.Event()
        self.got_slot = threading.Event()
        self.waiter = Waiter(label, on_event=self._event, on_granted=self._granted,
                             since=time.monotonic() if since is None else since)

    def _event(self, event: StreamEvent) -> None:
        self.events.append(event)
        if event.ended:
            self.ended.set()

    def _granted(self, stream: RemoteStream) -> None:
        self.granted.append(stream)
        self.got_slot.set()

    def words(self) -> list[str]:
        return [w.text for e in self.events for w in e.words]


def until(check, timeout: float = 3.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.fixture
def host():
    """(fake engine, real slot queue, engine server, a connect() for clients); all closed after."""
    engine = FakeEngine(batch_size=1)
    slots = SlotQueue(engine, poll_s=0.05)
    server = EngineServer(engine, slots, yield_poll_s=0.02, status_every_s=0.05)
    clients: list[EngineClient] = []

    def connect(**kwargs) -> EngineClient:
        client = EngineClient(server.path, index=len(clients), **kwargs)
        clients.append(client)
        return client

    yield engine, slots, server, connect
    for client in clients:
        client.close()
    server.close()
    slots.close()


def test_audio_and_events_cross_the_wire_unchanged():
    pcm = np.linspace(-1, 1, 240, dtype=np.float32)
    pushes = [wire.AudioPush(7, pcm, 12.5, sync=True), wire.AudioPush(8, pcm[:0]), wire.AudioPush(9, pcm[::-1].copy())]
    frame = wire.audio(pushes)
    assert wire.LENGTH.unpack(frame[:4])[0] == len(frame) - 4 and frame[4] == wire.AUDIO
    back = wire.parse_audio(frame[5:])
    assert [(p.wid, p.produced_at, p.sync) for p in back] == [(7, 12.5, True), (8, None, False), (9, None, False)]
    assert all(np.array_equal(a.pcm, b.pcm) for a, b in zip(pushes, back, strict=True))
    event = StreamEvent(3, 12, [Word("w4", 0.08, 0.4)], "w2", 0.25, token=5, ended=True, error="boom",
                        step_started=1.5, step_ended=1.6, lead_samples=720)
    assert wire.event_from_wire(wire.parse_control(wire.control({"op": "e", "e": wire.event_to_wire(event)})[5:])["e"]) \
        == event
    with pytest.raises(wire.WireError):
        wire.parse_control(b"[1, 2]")


@pytest.mark.parametrize("payload", [
    b"\x00" * 3,  # no count
    wire.COUNT.pack(0),  # no pushes
    wire.COUNT.pack(2) + bytes(wire.AUDIO_ENTRY.itemsize),  # fewer entries than counted
    wire.audio([wire.AudioPush(1, np.ones(4, np.float32))])[5:-4],  # fewer samples than its entries say
    wire.audio([wire.AudioPush(1, np.ones(4, np.float32))])[5:] + b"\x00" * 4,  # more
    wire.COUNT.pack(0xFFFFFFFF) + b"\x00" * 64,  # a count far beyond the frame
], ids=["short", "empty", "entries", "fewer-samples", "more-samples", "huge-count"])
def test_a_malformed_audio_frame_is_refused(payload):
    with pytest.raises(wire.WireError):
        wire.parse_audio(payload)


def test_pushes_queued_together_cross_as_one_frame_in_order_with_the_frames_around_them():
    a, b = socket.socketpair()
    writer = wire.FrameWriter(a, "test-writer")
    with writer._cond:  # hold the writer so that everything below is queued at one wake-up
        writer._frames += [wire.AudioPush(1, np.ones(2, np.float32)), wire.AudioPush(2, np.zeros(3, np.float32)),
                           wire.control({"op": "close", "wid": 1}), wire.AudioPush(2, np.ones(1, np.float32))]
        writer._cond.notify()
    writer.close()
    a.close()
    frames = list(wire.read_frames(b))
    assert [kind for kind, _ in frames] == [wire.AUDIO, wire.CONTROL, wire.AUDIO]
    assert [(p.wid, p.pcm.tolist()) for p in wire.parse_audio(frames[0][1])] == [(1, [1.0, 1.0]), (2, [0.0] * 3)]
    assert frames[1][1]["op"] == "close" and wire.parse_audio(frames[2][1])[0].wid == 2
    assert writer.writes == 1


def test_request_grant_push_events_close(host):
    engine, _, _, connect = host
    client = connect()
    assert (client.engine.batch_size, client.engine.has_vad) == (1, False)
    alice = Speaker("room-a/alice")
    stream = client.slots.request(alice.waiter)
    assert isinstance(stream, RemoteStream) and stream.slot_index == 0
    audio = np.concatenate([silence(0.24), tone(0.4), silence(0.24), tone(0.16), silence(0.16)])
    for chunk in np.split(audio, len(audio) // 240):  # 10 ms live chunks
        stream.push(chunk, produced_at=time.monotonic())
    assert stream.lead_samples == 0
    stream.close()
    assert alice.ended.wait(3)
    frames = [e.frames for e in alice.events]
    assert frames == sorted(frames) and alice.events[-1].ended and alice.events[-1].error is None
    assert sum(e.ended for e in alice.events) == 1
    assert alice.words() == fake_words(audio)
    assert np.array_equal(np.concatenate(engine.opened[0].pushed), audio)  # every sample, in order
    until(lambda: engine.slots_in_use == 0 and client.engine.slots_in_use == 0, what="the slot back")
    assert client.writes < len(audio) // 240, "pushes were coalesced into fewer writes"
    with pytest.raises(RuntimeError):
        stream.push(tone(0.01))


def test_waiting_cancel_and_grant(host):
    engine, slots, _, connect = host
    client = connect()
    alice, bob, carol = Speaker("r/alice"), Speaker("r/bob"), Speaker("r/carol")
    stream = client.slots.request(alice.waiter)
    assert stream is not None
    assert client.slots.request(bob.waiter) is None
    assert client.slots.request(carol.waiter) is None
    until(lambda: len(slots) == 2 and len(client.slots) == 2, what="two waiting")
    assert client.slots.cancel(bob.waiter)
    until(lambda: slots.waiting() == ["r/carol"], what="bob out of the queue")
    stream.abort()
    assert alice.ended.wait(3) and alice.events[-1].words == []
    assert carol.got_slot.wait(3), "the freed slot went to the next waiter"
    assert not bob.got_slot.is_set()
    assert not client.slots.cancel(carol.waiter), "granted: nothing to cancel"
    carol.granted[0].push(tone(0.24))
    carol.granted[0].close()
    assert carol.ended.wait(3) and carol.words() == ["w3"]
    until(lambda: engine.slots_in_use == 0 and len(slots) == 0, what="everything freed")


def test_should_yield_is_pushed_and_cached(host):
    _, _, _, connect = host
    client = connect()
    alice, bob = Speaker("r/alice"), Speaker("r/bob")
    client.slots.request(alice.waiter)
    assert not client.slots.should_yield(alice.waiter, long_held=False)
    client.slots.request(bob.waiter)  # same room: a long-held turn yields to it
    time.sleep(0.1)
    assert not client.slots.should_yield(alice.waiter, long_held=False)
    until(lambda: client.slots.should_yield(alice.waiter, long_held=True), what="asked to yield")
    writes = client.writes
    for _ in range(200):  # a speaker asks every 80 ms: no message unless long_held changes
        assert client.slots.should_yield(alice.waiter, long_held=True)
    assert client.writes == writes
    client.slots.closing(alice.waiter)  # flushing: as good as given back
    until(lambda: not client.slots.should_yield(alice.waiter, long_held=True), what="closing: no longer asked")


def test_a_receiver_that_drops_frees_its_slots_and_waiters(host):
    engine, slots, server, connect = host
    gone, other = connect(), connect()
    alice, alice2, bob = Speaker("a/alice"), Speaker("a/alice2"), Speaker("b/bob")
    stream = gone.slots.request(alice.waiter)
    stream.push(tone(0.24))
    assert other.slots.request(bob.waiter) is None
    time.sleep(0.01)
    assert gone.slots.request(alice2.waiter) is None
    until(lambda: len(slots) == 2, what="two waiting")
    gone._sock.shutdown(socket.SHUT_RDWR)  # as a killed process's socket: no goodbye
    assert bob.got_slot.wait(3), "the dead receiver's slot went to the other receiver's waiter"
    assert engine.opened[0].ended
    until(lambda: len(slots) == 0 and len(server.receivers()) == 1, what="the dead receiver's waiter gone")
    assert not alice2.got_slot.is_set()


def test_the_engine_side_closing_fails_every_stream(host):
    _, _, server, connect = host
    lost: list[str] = []
    client = connect(on_lost=lost.append)
    alice = Speaker("r/alice")
    stream = client.slots.request(alice.waiter)
    stream.push(tone(0.24))
    server.close()
    assert alice.ended.wait(3)
    assert alice.events[-1].error is not None and ENGINE_GONE in alice.events[-1].error
    until(lambda: len(lost) == 1, what="on_lost")
    assert client.lost is not None
    assert client.slots.request(Speaker("r/bob").waiter) is None  # never granted: the receiver stops
    with pytest.raises(RuntimeError):
        stream.push(tone(0.01))
    stream.close()  # no-ops once gone
    stream.abort()
    time.sleep(0.05)
    assert len(lost) == 1


def test_an_engine_failure_reaches_every_receiver(host):
    _, _, server, connect = host
    lost: list[str] = []
    client = connect(on_lost=lost.append)
    alice = Speaker("r/alice")
    client.slots.request(alice.waiter)
    server.broadcast({"op": "engine_failed", "cause": "CUDA error: an illegal memory access"})
    until(lambda: len(lost) == 1, what="on_lost")
    assert "illegal memory access" in lost[0]
    assert alice.ended.wait(3) and alice.events[-1].error is not None


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff\xff\x01", b"\x00\x00\x00\x05\x63{not json", b"\x00\x00\x00\x02\x7f!"],
                         ids=["huge length", "bad json", "unknown kind"])
def test_a_connection_that_sends_garbage_is_dropped_and_its_slots_freed(host, garbage):
    """Anything on the engine's socket that is not a well-formed frame ends that connection (with its
    streams), never the engine process nor the other receivers."""
    _, _, server, connect = host
    bad, good = connect(), connect()
    alice, bob = Speaker("a/alice"), Speaker("b/bob")
    bad.slots.request(alice.waiter).push(tone(0.24))
    until(lambda: len(server.receivers()) == 2, what="both connected")
    bad._sock.sendall(garbage)
    until(lambda: len(server.receivers()) == 1, what="the garbage sender dropped")
    assert good.slots.request(bob.waiter) is not None, "its slot was not freed for the others"


def test_a_frame_that_cannot_be_made_fails_the_channel_visibly_instead_of_stopping_its_writer():
    """An event frame is made on the writer's thread: if making one fails, the writer must not die
    quietly with every later frame queued unsent (a receiving process's captions would just stop)."""
    a, b = socket.socketpair()
    errors: list[BaseException] = []
    writer = wire.FrameWriter(a, "test-writer", on_error=errors.append)
    try:
        writer.send(b"before")
        broken = StreamEvent(3, 1, [], "text", float("nan"), token=object())  # not JSON
        writer.send(wire.WireEvent(1, broken))
        deadline = time.monotonic() + 5
        while not errors and time.monotonic() < deadline:
            time.sleep(0.01)
        assert errors and isinstance(errors[0], TypeError), "the owner hears the channel failed"
        assert writer.send(b"after") is False, "the channel is closed, not silently stuck"
    finally:
        writer.close()
        a.close()
        b.close()


class TickingAtOnce(set):
    """The server's connections, as if the ticker wrote its status the instant one is added."""

    def add(self, connection) -> None:
        super().add(connection)
        connection.writer.send(wire.control({"op": "status", "slots_in_use": 0, "waiting": 0}))


def test_the_hello_comes_first_even_if_the_ticker_writes_at_once(host):
    """A receiving process reads the engine's hello before anything else (seen in CI: a status came
    first, and the receiving process would have stopped, its engine "unreachable")."""
    _, _, server, connect = host
    server._connections = TickingAtOnce()
    client = connect()
    assert client.engine.batch_size == 1
