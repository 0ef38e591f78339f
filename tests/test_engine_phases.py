"""The frame clock across receiving processes (captions/host/): each process gets WebRTC's 10 ms tick
at its own phase, so one process's speakers complete their frames up to a tick after another's. A
step waits for the later phase instead of stepping each phase on its own (captions/stt/engine.py,
`_gather`): with two groups half a tick apart, the steps that carried only one group (two steps per
80 ms, twice the GPU time) were the common case before."""

from __future__ import annotations

import time

import numpy as np

from captions.stt.audio import read_audio_file
from captions.stt.engine import SEVERAL_PHASES_GATHER_WAIT_S, SttEngine
from tests.conftest import espeak_wav
from tests.engine_drive import FRAME, TICK_SAMPLES, Collector, run_solo, wait_idle

TICKS = 12 * 8
"""12 frames of 80 ms."""
PHASE_S = 0.005
"""The second process's tick, after the first's: where the old gather missed it most."""


def test_two_processes_half_a_tick_apart_share_each_step(tiny_checkpoint, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("captions.stt.engine._now", lambda: clock[0])
    engine = SttEngine.load(str(tiny_checkpoint), device="cpu", batch_size=4)
    engine.gather_wait_s = SEVERAL_PHASES_GATHER_WAIT_S  # as the engine process sets it
    engine.start()
    active: list[int] = []
    counting = [False]
    try:
        noise = np.random.default_rng(3).normal(0, 0.05, TICKS * TICK_SAMPLES).astype(np.float32)
        streams = [engine.open_stream(Collector()) for _ in range(4)]
        wait_idle(engine)  # the prefix silence, out of the clock
        engine.step_listeners.append(lambda timings: counting[0] and active.append(timings.active))
        for tick in range(TICKS):
            counting[0] = tick >= 16  # every stream's lead settled
            tick_at = 1000.0 + 0.01 * tick
            for group, phase in ((0, 0.0), (1, PHASE_S)):
                if group:
                    time.sleep(0.001)  # the other process's pushes come a little later in real time too
                clock[0] = tick_at + phase
                for stream in streams[2 * group:2 * group + 2]:
                    stream.push(noise[tick * TICK_SAMPLES:(tick + 1) * TICK_SAMPLES], produced_at=tick_at + phase)
            wait_idle(engine)
        for stream in streams:
            stream.abort()
    finally:
        engine.close()
    assert len(active) >= 8
    assert sum(active) / len(active) >= 3.5, f"steps carried {active}: one group stepped without the other"


def test_pushes_taken_together_give_each_stream_the_words_of_its_own_audio(tiny_checkpoint, speech_dir, monkeypatch):
    """The engine channel's batches (`push_many`: a receiving process's pushes of a tick in one call):
    streams that joined at different ticks each hear exactly their own audio, after the lead the
    clock gave them; a push to a stream closed meanwhile is dropped, not raised into the batch."""
    clock = [1000.0]
    monkeypatch.setattr("captions.stt.engine._now", lambda: clock[0])
    texts = ["the channel carries every room", "one batch per tick", "words of its own audio"]
    clips = [read_audio_file(espeak_wav(text, speech_dir / f"phases{i}.wav"))[:FRAME * 16] for i, text in enumerate(texts)]
    starts = [0, 3, 13]
    engine = SttEngine.load(str(tiny_checkpoint), device="cpu", batch_size=3)
    engine.start()
    try:
        collectors = [Collector() for _ in clips]
        streams = [engine.open_stream(collector) for collector in collectors]
        wait_idle(engine)  # the prefix silence, out of the clock
        for tick in range(starts[-1] + FRAME * 16 // TICK_SAMPLES):
            clock[0] = 1000.0 + 0.01 * tick
            engine.push_many([(stream, clip[(tick - start) * TICK_SAMPLES:(tick - start + 1) * TICK_SAMPLES], clock[0])
                              for stream, clip, start in zip(streams, clips, starts) if start <= tick])
            wait_idle(engine)
        streams[0].close()
        engine.push_many([(streams[0], clips[0][:TICK_SAMPLES], None), (streams[1], np.zeros(0, np.float32), None)])
        for stream in streams[1:]:
            stream.close()
        for collector in collectors:
            assert collector.done.wait(30), "stream never ended"
        solos = [run_solo(engine, np.concatenate([np.zeros(stream.lead_samples, np.float32), clip]))
                 for stream, clip in zip(streams, clips)]
    finally:
        engine.close()
    assert len({stream.lead_samples for stream in streams}) == 3, "the clips joined the clock at different phases"
    for collector, solo in zip(collectors, solos):
        assert collector.tokens == solo.tokens
        assert collector.words, "each clip gave words"
