"""The frame clock across receiving processes (captions/host/): each process gets WebRTC's 10 ms tick
at its own phase, so one process's speakers complete their frames up to a tick after another's. A
step waits for the later phase instead of stepping each phase on its own (captions/stt/engine.py,
`_gather`): with two groups half a tick apart, the steps that carried only one group (two steps per
80 ms, twice the GPU time) were the common case before."""

from __future__ import annotations

import time

import numpy as np
import pytest

from captions.stt.audio import read_audio_file
from captions.stt.engine import SttEngine
from captions.stt.frame_clock import HOLD_S, SEVERAL_PHASES_GATHER_WAIT_S
from tests.conftest import espeak_wav
from tests.engine_drive import FRAME, TICK_SAMPLES, Collector, run_solo, wait_settled

TICKS = 12 * 8
"""12 frames of 80 ms."""
PHASE_S = 0.005
"""The second process's tick, after the first's: where the old gather missed it most."""


def test_two_processes_half_a_tick_apart_share_each_step(tiny_checkpoint, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("captions.stt.engine._now", lambda: clock[0])
    engine = SttEngine.load(str(tiny_checkpoint), device="cpu", batch_size=4)
    engine.clock.gather_wait_s = SEVERAL_PHASES_GATHER_WAIT_S  # as the engine process sets it
    engine.start()
    active: list[int] = []
    counting = [False]
    try:
        noise = np.random.default_rng(3).normal(0, 0.05, TICKS * TICK_SAMPLES).astype(np.float32)
        streams = [engine.open_stream(Collector()) for _ in range(4)]
        wait_settled(engine)  # the prefix silence, out of the clock
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
            wait_settled(engine)
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
        wait_settled(engine)  # the prefix silence, out of the clock
        for tick in range(starts[-1] + FRAME * 16 // TICK_SAMPLES):
            clock[0] = 1000.0 + 0.01 * tick
            engine.push_many([(stream, clip[(tick - start) * TICK_SAMPLES:(tick - start + 1) * TICK_SAMPLES], clock[0])
                              for stream, clip, start in zip(streams, clips, starts) if start <= tick])
            wait_settled(engine)
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


@pytest.fixture(scope="module")
def clips(speech_dir) -> list[np.ndarray]:
    texts = ["a frame held for the others", "steps with its group", "words of its own audio"]
    return [read_audio_file(espeak_wav(text, speech_dir / f"held{i}.wav")) for i, text in enumerate(texts)]


@pytest.mark.parametrize("hold", [True, False], ids=["hold", "no-hold"])
def test_a_stream_whose_lead_came_out_ticks_off_waits_for_the_others_step(tiny_checkpoint, clips, monkeypatch, hold):
    """On a starved host a first push's production time can be estimated a few ticks off, and the
    stream's frames then complete ticks apart from everyone else's for its whole turn. Its ready
    frames wait (at most `HOLD_S`) for the others' step instead of costing a step of their own,
    and it still gets exactly the words of its own audio. Without the hold, the extra steps."""
    clock = [1000.0]
    monkeypatch.setattr("captions.stt.engine._now", lambda: clock[0])
    engine = SttEngine.load(str(tiny_checkpoint), device="cpu", batch_size=4)
    engine.clock.hold_s = HOLD_S if hold else 0.0
    engine.start()
    audios = [np.resize(clips[i % 3], FRAME * 16) for i in range(4)]
    collectors = [Collector() for _ in audios]
    offsets, completed, stepped = [0] * 4, [], {}
    actives: list[int] = []

    def on_off_event(event):
        collectors[3](event)
        stepped.setdefault(event.frames, clock[0])

    try:
        streams = [engine.open_stream(collector) for collector in collectors[:3]]
        streams.append(engine.open_stream(on_off_event))
        wait_settled(engine)  # the prefix silence, out of the clock
        engine.step_listeners.append(lambda timings: actives.append(timings.active))
        for tick in range(FRAME * 16 // TICK_SAMPLES):
            clock[0] = 1000.0 + 0.01 * tick
            for i, stream in enumerate(streams):
                # The off stream's first push: its audio said to be produced 3 ticks early.
                produced = clock[0] - (0.03 if i == 3 and tick == 0 else 0.0)
                stream.push(audios[i][offsets[i]:offsets[i] + TICK_SAMPLES], produced_at=produced)
                offsets[i] += TICK_SAMPLES
            if (streams[3].lead_samples + offsets[3]) % FRAME < TICK_SAMPLES:
                completed.append(clock[0])
            wait_settled(engine)
        counted = list(actives)
        for stream in streams:
            stream.close()
        for collector in collectors:
            assert collector.done.wait(30), "stream never ended"
        leads = [stream.lead_samples for stream in streams]
        solos = [run_solo(engine, np.concatenate([np.zeros(lead, np.float32), audio]))
                 for audio, lead in zip(audios, leads)]
    finally:
        engine.close()
    assert leads[3] != leads[0], "the off stream's frames complete on another tick"
    if not hold:
        assert sum(active < 4 for active in counted) > len(counted) / 2, counted
        return
    assert len(counted) == len(completed) and all(active == 4 for active in counted), f"steps carried {counted}"
    waits = [stepped[f + 1] - at for f, at in enumerate(completed) if f + 1 in stepped]
    assert waits and max(waits) <= HOLD_S + 1e-9 and max(waits) > 0, waits
    for collector, solo in zip(collectors, solos):
        assert collector.tokens == solo.tokens
    assert collectors[3].words, "the clip should give words"
