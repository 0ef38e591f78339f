"""Review of the batched engine channel (45192ca): limits a legitimate batch must stay within."""

from __future__ import annotations

import socket

import numpy as np

from captions.host import wire
from captions.stt.api import StreamEvent, Word


def _sent_at_one_wake_up(frames: list, monkeypatch, max_frame: int) -> list:
    """What the peer reads when `frames` were queued on a FrameWriter at one wake-up (as while its
    previous write was blocked), with MAX_FRAME made small so that the test stays small."""
    monkeypatch.setattr(wire, "MAX_FRAME", max_frame)
    a, b = socket.socketpair()
    errors: list[BaseException] = []
    writer = wire.FrameWriter(a, "test-writer", on_error=errors.append)
    with writer._cond:  # everything queued before the writer wakes
        writer._frames += frames
        writer._cond.notify()
    writer.close()
    a.close()
    try:
        return list(wire.read_frames(b))  # raises WireError("bad frame length") on a frame over MAX_FRAME
    finally:
        b.close()
        assert not errors


def test_pushes_queued_while_the_writer_is_blocked_never_make_a_frame_over_max_frame(monkeypatch):
    """Each push fits in a frame, but many queued together (every room's 10 ms pushes while the engine
    process is slow to read, or several rooms' kept audio granted at once) must not be coalesced into
    one AUDIO frame longer than MAX_FRAME: the engine process would drop the whole connection."""
    pushes = [wire.AudioPush(wid, np.full(240, wid, np.float32), float(wid)) for wid in range(1, 41)]
    one = 1 + wire.COUNT.size + wire.AUDIO_ENTRY.itemsize + 4 * 240
    frames = _sent_at_one_wake_up(pushes, monkeypatch, max_frame=5 * one)
    got = [p for kind, payload in frames if kind == wire.AUDIO for p in wire.parse_audio(payload)]
    assert [(p.wid, p.produced_at) for p in got] == [(p.wid, p.produced_at) for p in pushes]
    assert all(np.array_equal(a.pcm, b.pcm) for a, b in zip(got, pushes, strict=True))
    assert len(frames) < len(pushes), "still batched"


def test_events_queued_while_the_writer_is_blocked_never_make_a_frame_over_max_frame(monkeypatch):
    events = [wire.WireEvent(wid, StreamEvent(wid, 3, [Word("word" * 20, 0.1, 0.2)], "partial" * 10, 0.5))
              for wid in range(1, 101)]
    frames = _sent_at_one_wake_up(events, monkeypatch, max_frame=4096)
    got = [wid for kind, message in frames if kind == wire.CONTROL for wid, _ in message["e"]]
    assert got == list(range(1, 101))
    assert len(frames) < len(events), "still batched"


def test_an_infinite_produced_at_is_refused_as_a_malformed_frame():
    """NaN stands for "not given"; an infinite time is malformed. Taken, it became the engine's frame
    clock (`FrameClock.latest`), and the next first push of ANY receiving process raised OverflowError
    in `_lead_for` on that process's connection: the healthy receiver was dropped, not the broken one."""
    for bad in (float("inf"), float("-inf")):
        payload = wire.audio([wire.AudioPush(1, np.ones(4, np.float32), 1.0),
                              wire.AudioPush(2, np.ones(4, np.float32), bad)])[5:]
        try:
            wire.parse_audio(payload)
        except wire.WireError:
            continue
        raise AssertionError(f"produced_at={bad} was taken")
    assert wire.parse_audio(wire.audio([wire.AudioPush(1, np.ones(4, np.float32), None)])[5:])[0].produced_at is None
