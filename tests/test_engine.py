"""The batched engine against Kyutai's reference loop and against itself run solo.

Runs the real model path (moshi loaders, Mimi, LMGen) on the project's tiny real-format checkpoint.

Two claims, kept apart. At batch size 1 the engine equals Kyutai's reference loop (batch size 1)
token for token. In a batch, a stream equals the same audio run alone on an engine of the same
batch size: other slots, their phases, resets and slot reuse change none of its tokens (its pause
probabilities agree within PAUSE_TOLERANCE: even a solo run is not bit for bit reproducible). Across
batch sizes the float rounding of the matrix products differs (about 1e-6 in the logits on CPU),
which flips a code or a greedy token at a near tie: rare, measured in the README (Known limitations).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from captions.dev.tiny_checkpoint import make_test_checkpoint
from captions.stt.audio import read_audio_file
from captions.stt.engine import EngineFull, SttEngine
from captions.stt.model import load_stt_model
from captions.stt.transcribe import transcribe_audio
from tests.conftest import espeak_wav
from tests.engine_drive import FRAME, TICK_SAMPLES, Collector, drive_spurts, run_solo, wait_settled

SENTENCES = [
    "Good morning everyone, let us start the meeting.",
    "The budget for next quarter looks fine to me.",
    "Bonjour, je voudrais poser une question sur le projet.",
]


@pytest.fixture(scope="module")
def clips(speech_dir) -> list[np.ndarray]:
    voices = ["en", "en-us", "fr"]
    return [read_audio_file(espeak_wav(text, speech_dir / f"engine{i}.wav", voice=voices[i]))
            for i, text in enumerate(SENTENCES)]


@pytest.fixture(scope="module")
def engine_b3(tiny_checkpoint):
    engine = SttEngine.load(str(tiny_checkpoint), device="cpu", batch_size=3)
    engine.start()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def engine_b1(tiny_checkpoint):
    engine = SttEngine.load(str(tiny_checkpoint), device="cpu", batch_size=1)
    engine.start()
    yield engine
    engine.close()


# ---- Kyutai's reference loop, written here from moshi's public API only ------------------------

def reference_tokens(checkpoint, audio: np.ndarray) -> list[int]:
    """delayed-streams-modeling's stt_from_file_pytorch.py loop: prefix silence, padded audio,
    delay silence, one greedy LMGen step per Mimi frame, batch size 1."""
    import json

    from moshi.models import LMGen, loaders
    from moshi.utils.compile import no_compile

    config = json.loads((checkpoint / "config.json").read_text())
    info = loaders.CheckpointInfo.from_hf_repo(
        str(checkpoint), moshi_weights=checkpoint / config["moshi_name"],
        mimi_weights=checkpoint / config["mimi_name"], tokenizer=checkpoint / config["tokenizer_name"],
        config_path=checkpoint / "config.json", mimi_config_path=checkpoint / config["mimi_config_name"])
    mimi = info.get_mimi(device="cpu")
    lm_gen = LMGen(info.get_moshi(device="cpu", dtype=torch.float32), temp=0, temp_text=0)
    n_prefix = math.ceil(info.stt_config["audio_silence_prefix_seconds"] * 12.5)
    n_suffix = math.ceil(info.stt_config["audio_delay_seconds"] * 12.5)
    padded = np.zeros(math.ceil(len(audio) / FRAME) * FRAME, dtype=np.float32)
    padded[: len(audio)] = audio
    chunks = [np.zeros(FRAME, np.float32)] * n_prefix + list(padded.reshape(-1, FRAME))
    chunks += [np.zeros(FRAME, np.float32)] * n_suffix
    tokens = []
    with no_compile(), torch.no_grad(), mimi.streaming(1), lm_gen.streaming(1):
        for chunk in chunks:
            out = lm_gen.step(mimi.encode(torch.from_numpy(chunk)[None, None]))
            if out is not None:
                tokens.append(int(out[0, 0, 0]))
    return tokens


def reference_offset_s(checkpoint) -> float:
    """What the reference subtracts from a token's time: the silence prefix in whole seconds
    (`int(n_prefix_chunks / frame_rate)`, as the script writes it) plus the text delay."""
    import json

    stt_config = json.loads((checkpoint / "config.json").read_text())["stt_config"]
    n_prefix = math.ceil(stt_config["audio_silence_prefix_seconds"] * 12.5)
    return int(n_prefix / 12.5) + stt_config["audio_delay_seconds"]


def reference_words(tokens: list[int], tokenizer, offset_s: float, *, live: bool = False,
                    padding_id: int = 3) -> list[tuple[str, float, float]]:
    """Words and times by the reference's rule (`tokens_to_timestamped_text`): a segment runs from
    the step after a boundary token (0) to the next boundary; its text is one word timed (start,
    end), or several words that take as many steps as they have tokens, the last one the rest. The
    last segment ends at the first end-of-sequence token, or one second (12.5 steps) after it
    started, or with the tokens. A time is max(0, step / 12.5 - offset_s).

    live=True adds our one rule for live captions (captions/stt/words.py): a segment is cut after
    the first padding step at least 12.5 steps into it with text pending since the last cut; that
    text becomes words ending at max(segment start + 12.5, that step), and the segment's next words
    start after the cut."""
    def at(step: float) -> float:
        return max(0.0, step / 12.5 - offset_s)

    def words(start: int, pieces_tokens: list[int], end: float) -> list[tuple[str, float, float]]:
        pieces = tokenizer.decode([t for t in pieces_tokens if t > padding_id]).split()
        timed = []
        for piece in pieces[:-1]:
            n_tokens = len(tokenizer.encode(piece))
            timed.append((piece, at(start), at(start + n_tokens)))
            start += n_tokens
        return timed + [(pieces[-1], at(start), at(end))] if pieces else timed

    def segment(start: int, stop: int, end: float, last: bool) -> list[tuple[str, float, float]]:
        timed, cut = [], start
        for step in range(start, len(tokens) if last else stop):
            if not live or step - start + 1 < 12.5 or tokens[step] > padding_id:
                continue
            if tokenizer.decode([t for t in tokens[cut:step + 1] if t > padding_id]).strip():
                timed += words(cut, tokens[cut:step + 1], max(start + 12.5, step))
                cut = step + 1
        return timed + (words(cut, tokens[cut:stop], end) if stop > cut else [])

    boundaries = [i for i, t in enumerate(tokens) if t == 0]
    timed = []
    for a, b in itertools.pairwise(boundaries):
        timed += segment(a + 1, b, b, last=False)
    if boundaries:
        start = boundaries[-1] + 1
        rest = tokens[start:]
        end = start + rest.index(tokenizer.eos_id()) if tokenizer.eos_id() in rest else min(len(tokens), start + 12.5)
        timed += segment(start, math.ceil(end), end, last=True)
    return timed


def as_tuples(words) -> list[tuple[str, float, float]]:
    return [(w.text, w.start, w.end) for w in words]


def test_transcribe_equals_kyutai_reference_loop(engine_b1, tiny_checkpoint, clips):
    """Tokens, words and word times exactly as Kyutai's reference gives them (these clips have no
    pause long enough for the live rule to cut a segment: checked, so the rule is the reference's)."""
    tokenizer = load_stt_model(str(tiny_checkpoint), "cpu").tokenizer
    offset_s = reference_offset_s(tiny_checkpoint)
    for audio in clips:
        expected_tokens = reference_tokens(tiny_checkpoint, audio)
        solo = run_solo(engine_b1, audio)
        assert solo.tokens == expected_tokens
        expected = reference_words(expected_tokens, tokenizer, offset_s)
        assert reference_words(expected_tokens, tokenizer, offset_s, live=True) == expected
        assert as_tuples(transcribe_audio(engine_b1, audio)) == expected
        assert len(expected) >= 3


def test_a_segment_cut_by_a_pause_keeps_the_reference_words_and_ends_its_word_a_second_in(
        engine_b1, tiny_checkpoint, clips):
    """Speech, two seconds of silence, speech: the model writes a word before the pause and its next
    boundary only after it. The live rule cuts that segment a second in, so the word is captioned
    during the pause; the words are the reference's, and only the times in the cut segment differ."""
    tokenizer = load_stt_model(str(tiny_checkpoint), "cpu").tokenizer
    offset_s = reference_offset_s(tiny_checkpoint)
    audio = np.concatenate([clips[0], np.zeros(2 * 24000, np.float32), clips[0]])
    tokens = reference_tokens(tiny_checkpoint, audio)
    kyutai = reference_words(tokens, tokenizer, offset_s)
    live = reference_words(tokens, tokenizer, offset_s, live=True)
    assert [w[0] for w in live] == [w[0] for w in kyutai]
    assert live != kyutai, "the pause should make the live rule cut a segment"
    assert as_tuples(transcribe_audio(engine_b1, audio)) == live
    (text, start, end), reference = next((mine, theirs) for mine, theirs in zip(live, kyutai) if mine != theirs)
    assert start == reference[1], "the cut segment's first word starts where the reference's does"
    assert end >= start + 1.0 - 1e-9, f"{text!r} is emitted a second after its segment began, not before"


def test_different_speech_gives_different_varied_transcripts(engine_b1, clips):
    transcripts = [" ".join(w.text for w in transcribe_audio(engine_b1, audio)) for audio in clips]
    assert len(set(transcripts)) == len(transcripts), transcripts
    for text in transcripts:
        assert len(set(text.split())) >= 3, f"too few distinct words: {text!r}"


def test_silence_gives_no_words(engine_b1):
    assert transcribe_audio(engine_b1, np.zeros(24000 * 3, dtype=np.float32)) == []


def test_word_times_follow_the_audio(engine_b1, clips):
    audio = clips[0]
    words = transcribe_audio(engine_b1, audio)
    duration = len(audio) / 24000
    starts = [w.start for w in words]
    assert starts == sorted(starts)
    assert all(0 <= w.start <= w.end <= duration + 1.0 for w in words)
    # The same speech after two seconds of silence: nothing during the silence, and the speech's
    # first word two seconds later (the model's context differs, so later words may too).
    shifted = transcribe_audio(engine_b1, np.concatenate([np.zeros(48000, np.float32), audio]))
    # (The tiny model answers at once, without the real model's learnt delay, yet its times still
    # subtract the configured delay: they come out early by that much.)
    assert min(w.start for w in shifted) >= 2.0 - engine_b1.text_delay_s - 0.08
    assert shifted[0].start - words[0].start == pytest.approx(2.0, abs=0.25)


def test_close_flushes_the_last_words(engine_b1, clips):
    audio = clips[1][: len(clips[1]) * 6 // 10]  # cut mid-sentence: the speaker stops talking at once
    flushed = run_solo(engine_b1, audio)
    aborted = Collector()
    stream = engine_b1.open_stream(aborted)
    stream.push(audio)
    wait_settled(engine_b1)
    stream.abort()
    assert aborted.done.wait(10)
    # Without the delay's worth of silence the model has not written its last words yet.
    assert len(aborted.words) < len(flushed.words)
    assert flushed.words[: len(aborted.words)] == aborted.words
    assert flushed.events[-1].ended and flushed.events[-1].error is None


def test_full_engine_says_so_and_frees_slots(engine_b3, clips):
    freed = []
    engine_b3.add_slot_freed_listener(lambda: freed.append(1))
    collectors = [Collector() for _ in range(3)]
    streams = [engine_b3.open_stream(c) for c in collectors]
    with pytest.raises(EngineFull, match="3 engine slots"):
        engine_b3.open_stream(Collector())
    assert engine_b3.slots_in_use == 3
    streams[1].push(clips[0][:FRAME * 5])
    streams[1].close()
    assert collectors[1].done.wait(10)
    assert freed and engine_b3.slots_in_use == 2
    replacement = engine_b3.open_stream(Collector())
    for stream in (streams[0], streams[2], replacement):
        stream.abort()
    wait_settled(engine_b3)
    assert engine_b3.slots_in_use == 0


def test_failed_step_is_reported_and_engine_keeps_serving(engine_b3, clips, monkeypatch):
    mimi = engine_b3.model.mimi
    real_encode = mimi.encode
    calls = {"n": 0}

    def flaky_encode(x):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_encode(x)

    monkeypatch.setattr(mimi, "encode", flaky_encode)
    collector = Collector()
    stream = engine_b3.open_stream(collector)
    stream.push(clips[0][: FRAME * 10])
    assert collector.done.wait(10), "a failed step must end the stream, not hang it"
    assert "out of memory" in collector.events[-1].error
    monkeypatch.setattr(mimi, "encode", real_encode)
    assert run_solo(engine_b3, clips[0]).events[-1].error is None
    assert engine_b3.slots_in_use == 0
    assert engine_b3.broken is None, "one out-of-memory step does not break the engine (the worker stays)"


PROPERTY_FRAMES = 24  # ~2 s of each clip keeps the property test quick
REMEMBERING_ATTENTION = 1.0
"""The property test's checkpoint keeps the LM's attention at full strength (make_test_checkpoint):
the default tiny model is nearly memoryless, so state leaking between slots, or a slot not reset
when a new stream takes it, would hardly change its tokens."""


PAUSE_TOLERANCE = 0.05
"""How far a stream's pause probabilities may be from its solo run's. Not bit for bit: the same
audio run solo in slot 0 of a fresh engine does not give the same pause probabilities from one
process to the next (measured here, 1 thread, MKL_CBWR=COMPATIBLE, fixed PYTHONHASHSEED: clip 2's
probability at frame 25 is 0.3087 in some processes and 0.2896 in others, tokens unchanged), nor
always within one process (a CI run: its solo fixture and a batched run 0.0191 apart at that frame,
the same two values). Somewhere in the CPU kernels a difference of about 1e-7 (the size of the
spread between slots of one batch, measured at under 5e-7) meets a near tie in the tiny model, and
that frame's probability jumps by up to 0.02 while the frames after it move by under 4e-4. A leak
between slots or a missed reset changes them by more than 0.05, which
test_the_property_checkpoint_remembers checks on this checkpoint, and by up to 0.9. The tokens,
what a user reads, must still be equal exactly."""


@pytest.fixture(scope="module")
def remembering_engine_b3(tmp_path_factory):
    checkpoint = make_test_checkpoint(tmp_path_factory.mktemp("ckpt") / "remembering", seed=0,
                                      attention=REMEMBERING_ATTENTION)
    engine = SttEngine.load(str(checkpoint), device="cpu", batch_size=3)
    engine.start()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def short_clips(clips) -> list[np.ndarray]:
    return [clip[FRAME * 3: FRAME * (3 + PROPERTY_FRAMES)] for clip in clips]


@pytest.fixture(scope="module")
def solo_runs(remembering_engine_b3, short_clips) -> list[tuple[list[int], list[float]]]:
    """Each clip alone on the engine: its tokens and pause probabilities."""
    runs = [run_solo(remembering_engine_b3, audio) for audio in short_clips]
    return [(run.tokens, run.pauses) for run in runs]


def test_the_property_checkpoint_remembers(remembering_engine_b3, short_clips, solo_runs):
    """What the batched == solo property test relies on: on its checkpoint, what a stream heard
    before changes what it writes now. One clip after another in the same stream (what a slot would
    hear if it were not reset, or if another slot's state leaked into it) gives other tokens and
    pause probabilities than the clip alone, well past its first frames, and they differ with what
    came before."""
    after = {}
    for before in range(len(short_clips)):
        run = run_solo(remembering_engine_b3, np.concatenate([short_clips[before], short_clips[0]]))
        tail = slice(PROPERTY_FRAMES, 2 * PROPERTY_FRAMES)
        after[before] = (run.tokens[tail], run.pauses[tail])
    alone_tokens, alone_pauses = (run[:PROPERTY_FRAMES] for run in solo_runs[0])
    for tokens, pauses in after.values():
        changed = [k for k, (a, b) in enumerate(zip(tokens, alone_tokens)) if a != b]
        assert len(changed) >= PROPERTY_FRAMES // 4 and max(changed) >= PROPERTY_FRAMES // 2, changed
        assert max(abs(a - b) for a, b in zip(pauses, alone_pauses)) > 0.05
    assert len({tuple(tokens) for tokens, _ in after.values()}) > 1, "what came before should matter"
    assert all(len(set(tokens)) >= 5 for tokens, _ in solo_runs), "the clips should give varied tokens"


# Examples: 10 by default, more in CI (HYPOTHESIS_PROFILE=ci, see tests/conftest.py).
@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    clip_of=st.lists(st.integers(0, 2), min_size=2, max_size=4),
    ops=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 10), st.booleans()), max_size=30),
)
def test_batched_streams_equal_solo_runs(remembering_engine_b3, short_clips, solo_runs, clip_of, ops):
    """Streams starting, pausing and stopping at random in different slots of one batch produce
    exactly the tokens each produces alone, and its pause probabilities (within PAUSE_TOLERANCE,
    see there), on a checkpoint that remembers (a leak between slots or a missed
    reset would show). `ops` is (stream, frames to push, let the
    engine catch up before the next push): while one stream pushes, the others pause."""
    engine = remembering_engine_b3
    n = len(clip_of)
    frames = [list(short_clips[c].reshape(-1, FRAME)) for c in clip_of]
    collectors = [Collector() for _ in range(n)]
    streams: list = [None] * n

    def push(i: int, count: int) -> None:
        if streams[i] is None:
            wait_settled(engine)  # closed streams free their slots once flushed
            if engine.slots_in_use == engine.batch_size:  # finish the oldest to make room
                oldest = next(j for j in range(n) if streams[j] is not None and frames[j])
                push(oldest, len(frames[oldest]))
                assert collectors[oldest].done.wait(30)
                wait_settled(engine)
            streams[i] = engine.open_stream(collectors[i])
        if not frames[i]:
            return
        streams[i].push(np.concatenate(frames[i][:count]))
        del frames[i][:count]
        if not frames[i]:
            streams[i].close()

    for stream_index, count, catch_up in ops:
        push(stream_index % n, count)
        if catch_up:
            wait_settled(engine)
    for i in range(n):
        push(i, PROPERTY_FRAMES)
    for i in range(n):
        assert collectors[i].done.wait(30)
        tokens, pauses = solo_runs[clip_of[i]]
        assert collectors[i].tokens == tokens, f"stream {i} differs from its solo run"
        assert collectors[i].pauses == pytest.approx(pauses, abs=PAUSE_TOLERANCE), \
            f"stream {i}'s pause probabilities differ from its solo run"
    wait_settled(engine)


def test_kyutai_2_6b_style_config_prefix_and_no_vad(tmp_path, clips):
    """stt-2.6b-en has a one-second silence prefix, a longer delay and no VAD heads."""
    checkpoint = make_test_checkpoint(tmp_path / "big-style", seed=1, prefix_s=1.0, delay_s=2.5, vad=False)
    engine = SttEngine.load(str(checkpoint), device="cpu", batch_size=2)
    engine.start()
    try:
        assert not engine.has_vad and engine.text_delay_s == 2.5
        solo = run_solo(engine, clips[0])
        assert all(e.pause_prob is None for e in solo.events)
        assert solo.tokens == reference_tokens(checkpoint, clips[0])
        tokenizer = load_stt_model(str(checkpoint), "cpu").tokenizer
        assert solo.words == reference_words(solo.tokens, tokenizer, reference_offset_s(checkpoint))
        assert solo.words, "the clip should give words"
        assert len(solo.tokens) == 13 + math.ceil(len(clips[0]) / FRAME) + math.ceil(2.5 * 12.5)
    finally:
        engine.close()


def test_vad_heads_report_pauses(engine_b1, clips):
    """The checkpoint's VAD heads: high 'no voice' probability in silence, low during speech."""
    audio = np.concatenate([clips[0], np.zeros(24000 * 2, np.float32)])
    collector = run_solo(engine_b1, audio)
    probs = [e.pause_prob for e in collector.events if not e.ended]
    speech_frames = len(clips[0]) // FRAME
    assert np.mean(probs[5:speech_frames]) < 0.5 < np.mean(probs[-20:])


def test_checkpoint_is_deterministic_for_a_seed(tmp_path):
    a = make_test_checkpoint(tmp_path / "a", seed=3)
    b = make_test_checkpoint(tmp_path / "b", seed=3)
    for name in ("config.json", "model.safetensors", "mimi.safetensors", "tokenizer.model"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# ---- live streams on one frame clock ---------------------------------------------------------------

def drive_live(engine: SttEngine, audios: list[np.ndarray], start_ticks: list[int], clock: list[float],
               late_ms: float = 0.0):
    """Streams start at `start_ticks` and push 10 ms per tick (the clock moves 10 ms per tick), the
    engine draining between ticks. With `late_ms`, each stream's first push comes that late after
    its tick (its thread waited: a turn's start is busy), the others up to 2 ms, telling the engine
    when their audio was produced. Returns the collectors and the active slots of each step taken
    while every stream was pushing speech."""
    lateness = np.random.default_rng(7)
    collectors = [Collector() for _ in audios]
    streams: list = [None] * len(audios)
    offsets = [0] * len(audios)
    active: list[int] = []
    window = [False]
    engine.step_listeners.append(lambda timings: window[0] and active.append(timings.active))
    try:
        for tick in itertools.count():
            produced = clock[0] = 1000.0 + 0.01 * tick
            for i, audio in enumerate(audios):
                if tick < start_ticks[i] or offsets[i] > audio.size:
                    continue
                if streams[i] is None:
                    streams[i] = engine.open_stream(collectors[i])
                    wait_settled(engine)  # the prefix silence: stepped at once, out of the clock
                if offsets[i] == audio.size:
                    streams[i].close()
                    offsets[i] += 1
                    continue
                if late_ms:
                    clock[0] = produced + (late_ms if offsets[i] == 0 else lateness.uniform(0.0, 2.0)) / 1000
                    streams[i].push(audio[offsets[i]:offsets[i] + TICK_SAMPLES], produced_at=produced)
                else:
                    streams[i].push(audio[offsets[i]:offsets[i] + TICK_SAMPLES])
                offsets[i] += TICK_SAMPLES
            wait_settled(engine)
            # From when the last stream has pushed a frame and a half until the first one stops.
            window[0] = (tick >= max(start_ticks) + 12 and all(o < a.size for o, a in zip(offsets, audios)))
            if all(o > a.size for o, a in zip(offsets, audios)):
                break
        for collector in collectors:
            assert collector.done.wait(30), "stream never ended"
    finally:
        engine.step_listeners.clear()
    return collectors, active


@pytest.mark.parametrize(("align", "late_ms"), [(True, 0.0), (True, 8.0), (False, 0.0)],
                         ids=["shared-clock", "shared-clock-late-pushes", "unaligned"])
def test_live_speakers_who_start_at_different_moments_share_each_step(tiny_checkpoint, clips, monkeypatch,
                                                                        align, late_ms):
    """Four speakers join at different 10 ms ticks. On the shared clock every step carries all four
    (one step per 80 ms, instead of one per speaker), and each still gets exactly the words of its
    own audio, timed in its own audio; so too when each first push comes 8 ms after its tick (a
    busy worker: the caller says when the audio was produced). Unaligned (the behaviour before),
    steps carry fewer."""
    clock = [1000.0]
    monkeypatch.setattr("captions.stt.engine._now", lambda: clock[0])
    engine = SttEngine.load(str(tiny_checkpoint), device="cpu", batch_size=4, align_frames=align)
    engine.start()
    try:
        audios = [clips[i % 3][: FRAME * 24 + TICK_SAMPLES * i] for i in range(4)]
        collectors, active = drive_live(engine, audios, start_ticks=[0, 3, 13, 22], clock=clock, late_ms=late_ms)
        leads = [collector.events[-1].lead_samples for collector in collectors]
        # Each alone on the same engine, after the lead the engine put first: the model heard exactly that.
        solos = [run_solo(engine, np.concatenate([np.zeros(lead, np.float32), audio]))
                 for audio, lead in zip(audios, leads)] if align else []
    finally:
        engine.close()
    assert len(active) >= 8
    if not align:
        assert leads == [0, 0, 0, 0]
        assert sum(active) / len(active) < 3, "unaligned speakers should not share most steps"
        return
    assert active == [4] * len(active), "a step left out a speaker whose frame was due"
    assert len(set(leads[1:])) > 1 and all(0 < lead < FRAME for lead in leads[1:])
    for lead, collector, solo in zip(leads, collectors, solos):
        assert collector.tokens == solo.tokens
        shift = lead / 24000
        assert collector.words == [(text, pytest.approx(max(0.0, start - shift)), pytest.approx(max(0.0, end - shift)))
                                   for text, start, end in solo.words]
        assert collector.words, "the clip should give words"


# ---- spurts: a speaker's turns, each its own stream (captions/live/speaker.py) ---------------------

@pytest.fixture(scope="module")
def engine_b4(tiny_checkpoint):
    engine = SttEngine.load(str(tiny_checkpoint), device="cpu", batch_size=4)
    engine.start()
    yield engine
    engine.close()


def check_spurt_against_solo(engine: SttEngine, spurt: np.ndarray, collector: Collector) -> None:
    """The engine put `lead` samples of silence first (the shared frame clock): the spurt's words
    are those of that audio run alone on the same engine, timed in the spurt's own audio."""
    lead = collector.events[-1].lead_samples
    audio = np.concatenate([np.zeros(lead, np.float32), spurt])
    # Padded to whole frames, as the flush pads (a shorter solo push would get a lead of its own).
    audio = np.concatenate([audio, np.zeros(-audio.size % FRAME, np.float32)])
    solo = run_solo(engine, audio)
    assert collector.tokens == solo.tokens
    shift = lead / 24000
    assert collector.words == [(text, pytest.approx(max(0.0, start - shift)), pytest.approx(max(0.0, end - shift)))
                               for text, start, end in solo.words]


def test_a_spurt_that_starts_with_kept_audio_equals_kyutai_reference_on_its_audio(tiny_checkpoint, engine_b4,
                                                                                  clips):
    """A turn that waited for a slot: half a second of kept audio in its first push, then live
    chunks. Its tokens are what Kyutai's reference loop gives for that audio (after the lead)."""
    spurt = clips[1][: FRAME * 20 + 1000]
    other = clips[0][: FRAME * 20]
    collectors = drive_spurts(engine_b4, [other, spurt], start_ticks=[0, 7], backlogs=[0, 50])
    lead = collectors[1].events[-1].lead_samples
    assert 0 < lead < FRAME, "the spurt should join the other stream's frame clock"
    assert collectors[1].tokens == reference_tokens(tiny_checkpoint, np.concatenate([np.zeros(lead, np.float32), spurt]))
    assert collectors[1].words, "the spurt should give words"


# Examples: 10 by default, more in CI (HYPOTHESIS_PROFILE=ci, see tests/conftest.py).
@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cuts=st.lists(st.integers(TICK_SAMPLES, FRAME * 30 - TICK_SAMPLES), min_size=1, max_size=3, unique=True),
    start_ticks=st.lists(st.integers(0, 30), min_size=4, max_size=4),
    backlogs=st.lists(st.integers(0, 60), min_size=4, max_size=4),
)
def test_spurts_cut_anywhere_each_give_the_words_of_their_own_audio(engine_b4, clips, cuts, start_ticks,
                                                                   backlogs):
    """A speaker's speech cut into turns at any sample (where the gate released the slot), each
    turn a stream with some kept audio first, the turns in the batch at once and at any phase:
    every turn gives exactly the words of its own audio run alone on the same engine."""
    audio = np.concatenate([clips[0], clips[2]])[: FRAME * 30]
    spurts = [s for s in np.split(audio, sorted(cuts)) if s.size]
    collectors = drive_spurts(engine_b4, spurts, start_ticks[:len(spurts)], backlogs[:len(spurts)])
    for spurt, collector in zip(spurts, collectors):
        check_spurt_against_solo(engine_b4, spurt, collector)
    wait_settled(engine_b4)
