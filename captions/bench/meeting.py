"""`captions bench meeting`: how many people B engine slots caption in a meeting, with nothing lost.

A seeded meeting (`plan_meeting`): one main speaker at a time (a few participants dominate), 1-3
sentences per turn with short pauses, back-channels ("yes", "mm hmm") from listeners, some overlap
between speakers, occasional long silences, and participants who never speak. Speech is espeak-ng,
synthesised once into the cache directory; each participant's signal is a low noise floor plus
their clips, and the schedule (who, onset, end, kind) is the ground truth.

The meeting runs in this process, in real time, through the product's own room code: one
`Speaker` (captions/live/speaker.py: Silero VAD, turns, the slot queue, kept audio, the live
splice) per simulated microphone (captions/dev/microphones.py) on one 10 ms clock, and the real
engine with B slots. Not through a real livekit-server: 16-24 WebRTC bots need more CPU than the
machines this runs on (bots, server and worker would share two cores, and the figures would be the
bots' load), and the WebRTC path is covered by the end-to-end tests and `captions bench ingest`.

What each engine stream got is recorded exactly (the benchmark's Speaker subclass wraps `_push`),
so that after the meeting:

- speech coverage: every scheduled utterance's samples are inside audio pushed to the engine, and
  that audio equals the participant's signal sample for sample;
- words said vs words captioned: for each engine stream, the words of its audio (its lead silence
  and everything pushed) run alone through the engine (`transcribe_audio`) against the words of
  its final captions; equal while no wait exceeds `max_wait_s`;
- first-word latency per utterance: from the end of its first captioned word (capture time) to the
  first caption carrying it, by how its turn got a slot: held (the speaker's turn was open at the
  onset), acquired (a new turn, slot at once) or waited (queued);
- context cost: a turn starts without the context of the speaker's earlier turns; its words
  against the same span when the participant's whole signal runs in one held slot. With the tiny
  test checkpoint (random weights) these figures mean nothing; use --model kyutai/stt-1b-en_fr.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import queue
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from captions.bench.common import (
    BenchError,
    add_output_options,
    add_test_checkpoint_options,
    finish_report,
    machine_description,
    positive_ints,
    resolve_test_checkpoint,
    save_figure,
    summarize_ms,
)
from captions.config import add_option, device_name, positive_int
from captions.stt.api import FRAME_S, SAMPLE_RATE

SENTENCES = [
    "Good morning everyone, let us start with the numbers.",
    "The budget for the next quarter looks reasonable.",
    "Could you share your screen so that we can all see it?",
    "I think we should ship the release before the end of the month.",
    "Let me summarise the three decisions we took last week.",
    "The customer asked whether captions also work on mobile phones.",
    "We tested it yesterday and it worked.",
    "I am not sure that the deadline is realistic, to be honest.",
    "Maybe we can ask the design team for help.",
    "That is a good point.",
    "Travel costs went up again this year, mostly because of the conference in spring.",
    "Let us move on to the next item on the agenda.",
]
BACK_CHANNELS = ["yes", "right", "okay", "mm hmm"]
VOICES = [("en-us", 160), ("en-gb", 150), ("en-us+f3", 170), ("en-gb-scotland", 145), ("en-gb-x-rp", 155)]
"""espeak-ng voice and words per minute; participant i speaks with voice i mod 5."""
NOISE_LEVEL = 12.0
"""Standard deviation of each microphone's noise floor, in int16 units (about -68 dBFS)."""
START_S = 2.0
"""Nobody speaks before this (a microphone's first chunk is not its signal: microphones.py)."""
END_MARGIN_S = 2.0
"""Nobody speaks in the meeting's last seconds (the speakers stop at its end and are flushed)."""
MAX_TURNS = 1000
SAMPLE_EVERY_S = 0.1
"""Slot occupancy is read this often."""
FLUSH_TIMEOUT_S = 120.0
"""After the meeting: the longest wait for every speaker's last captions."""
EXTRA_TARGET_S = 0.3
"""A meeting is served when nothing is lost and the p95 extra first-word latency is at most this."""
CAUGHT_UP_LAG_S = 0.16
"""A stream has caught up with live audio once the engine steps its frames within two frames of their capture."""
LATENCY_CLASSES = ("held", "acquired", "waited")


# ---- the meeting: who says what, when (seeded) ------------------------------------------------------

@dataclass
class Utterance:
    participant: int
    onset: int
    """Signal sample of the first voiced sample."""
    end: int
    kind: str
    """"sentence" or "back-channel"."""
    text: str


@dataclass
class MeetingPlan:
    participants: int
    samples: int
    utterances: list[Utterance]
    silent: list[int]
    """Participants who never speak."""


class ClipBank:
    """espeak-ng clips (int16, 24 kHz, trimmed to the voice), synthesised once into `directory`."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._clips: dict[tuple[str, int], np.ndarray] = {}

    def clip(self, text: str, voice: int) -> np.ndarray:
        key = (text, voice)
        if key not in self._clips:
            self._clips[key] = self._load(text, *VOICES[voice % len(VOICES)])
        return self._clips[key]

    def _load(self, text: str, voice: str, speed: int) -> np.ndarray:
        from captions.dev.speech import speech_samples

        name = hashlib.sha256(f"{text}|{voice}|{speed}".encode()).hexdigest()[:16]
        path = self.directory / f"{name}.npy"
        if path.is_file():
            return np.load(path)
        self.directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            audio = speech_samples(text, Path(tmp), voice=voice, speed=speed)
        voiced = np.flatnonzero(np.abs(audio) > 0.02)
        audio = audio[voiced[0]:voiced[-1] + 1] if voiced.size else audio
        clip = np.clip(np.round(audio * 0.8 * 32767), -32768, 32767).astype(np.int16)
        partial = path.with_suffix(f".{threading.get_ident()}.tmp.npy")
        np.save(partial, clip)
        partial.rename(path)  # atomic: a crash never leaves half a clip
        return clip


class _Timeline:
    """The utterances placed so far; a participant never overlaps their own speech."""

    def __init__(self, limit: int):
        self.limit = limit
        self.utterances: list[Utterance] = []
        self._busy: dict[int, list[tuple[int, int]]] = {}

    def free_from(self, participant: int, at: int, size: int) -> int:
        """The first start at or after `at` where `participant` is silent for `size` samples (+0.2 s)."""
        margin = SAMPLE_RATE // 5
        for start, end in sorted(self._busy.get(participant, [])):
            if at < end + margin and start - margin < at + size:
                at = end + margin
        return at

    def add(self, participant: int, at: int, clip: np.ndarray, kind: str, text: str) -> bool:
        if at + clip.size > self.limit or self.free_from(participant, at, clip.size) != at:
            return False
        self.utterances.append(Utterance(participant, at, at + clip.size, kind, text))
        self._busy.setdefault(participant, []).append((at, at + clip.size))
        return True


def plan_meeting(participants: int, seconds: float, seed: int, bank: ClipBank) -> MeetingPlan:
    """A seeded meeting of `participants` people over `seconds` (see the module notes)."""
    rng = random.Random(f"meeting-{seed}-{participants}")
    people = list(range(participants))
    rng.shuffle(people)
    silent = sorted(people[:participants // 4])
    talkers = people[participants // 4:]
    weights = [1 / (rank + 1) ** 1.3 for rank in range(len(talkers))]  # a few dominate
    samples = int(seconds * SAMPLE_RATE)
    timeline = _Timeline(samples - int(END_MARGIN_S * SAMPLE_RATE))
    back_channel_rate = 0.08 + 0.006 * participants  # per second of main speech: grows with the audience
    t, previous = int(START_S * SAMPLE_RATE), None
    for _ in range(MAX_TURNS):
        choices = [(p, w) for p, w in zip(talkers, weights) if p != previous] or list(zip(talkers, weights))
        main = rng.choices([p for p, _ in choices], [w for _, w in choices])[0]
        turn = _main_turn(rng, timeline, bank, main, t)
        if turn is None:
            break
        start, end = turn
        _back_channels(rng, timeline, bank, [p for p in talkers if p != main], start, end, back_channel_rate)
        t = _next_start(rng, end)
        previous = main
    utterances = sorted(timeline.utterances, key=lambda u: (u.onset, u.participant))
    return MeetingPlan(participants, samples, utterances, silent)


def _main_turn(rng: random.Random, timeline: _Timeline, bank: ClipBank, main: int,
               t: int) -> tuple[int, int] | None:
    """1-3 sentences of `main` from `t` (or when they are next free), with 0.2-1.0 s pauses."""
    placed: list[Utterance] = []
    for _ in range(rng.choice([1, 1, 2, 2, 3])):
        text = rng.choice(SENTENCES)
        clip = bank.clip(text, main)
        at = timeline.free_from(main, t, clip.size)
        if not timeline.add(main, at, clip, "sentence", text):
            break
        placed.append(timeline.utterances[-1])
        t = at + clip.size + int(rng.uniform(0.2, 1.0) * SAMPLE_RATE)
    if not placed:
        return None
    return placed[0].onset, placed[-1].end


def _back_channels(rng: random.Random, timeline: _Timeline, bank: ClipBank, listeners: list[int],
                   start: int, end: int, rate: float) -> None:
    """Listeners' back-channels during a turn (Poisson arrivals at `rate` per second)."""
    if not listeners:
        return
    at = start + int(rng.expovariate(rate) * SAMPLE_RATE)
    for _ in range(100):
        if at >= end:
            return
        who, text = rng.choice(listeners), rng.choice(BACK_CHANNELS)
        timeline.add(who, at, bank.clip(text, who), "back-channel", text)
        at += int(rng.expovariate(rate) * SAMPLE_RATE)


def _next_start(rng: random.Random, end: int) -> int:
    """When the next main speaker starts: after a long silence, overlapping, or after a short gap."""
    draw = rng.random()
    if draw < 0.1:
        return end + int(rng.uniform(4.0, 8.0) * SAMPLE_RATE)
    if draw < 0.3:
        return end - int(rng.uniform(0.3, 1.0) * SAMPLE_RATE)
    return end + int(rng.uniform(0.2, 1.5) * SAMPLE_RATE)


def meeting_signals(plan: MeetingPlan, bank: ClipBank, seed: int) -> list[np.ndarray]:
    """Each participant's microphone: a seeded noise floor plus their clips, int16."""
    signals = []
    for p in range(plan.participants):
        noise = np.random.default_rng([seed, plan.participants, p]).normal(0.0, NOISE_LEVEL, plan.samples)
        signals.append(noise)
    for u in plan.utterances:
        signals[u.participant][u.onset:u.end] += bank.clip(u.text, u.participant)
    return [np.clip(np.round(s), -32768, 32767).astype(np.int16) for s in signals]


# ---- the live run: the product's speakers on simulated microphones ---------------------------------

@dataclass
class CaptionLog:
    arrival: float
    """time.time() when the room got it."""
    final: bool
    words: list[tuple[str, float, float]]
    """(text, wall start, wall end) of its completed words."""


@dataclass
class TurnLog:
    """One turn of one speaker: the engine stream it got, what went in and what came out."""

    participant: int
    begun_at: float
    start: int
    """Track index where the turn starts (its pre-roll)."""
    immediate: bool = False
    granted_at: float | None = None
    first_push_at: float | None = None
    first_push_samples: int = 0
    closed_at: float | None = None
    ended_at: float | None = None
    error: str | None = None
    stream_id: int | None = None
    lead: int = 0
    parts: list[tuple[int, np.ndarray]] = field(default_factory=list)
    """(track index, int16 samples) of every push, in order."""
    captions: list[CaptionLog] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    """Per engine event: its arrival less the capture time of the end of the audio it covers."""
    caught_up_at: float | None = None
    """When an event first came within CAUGHT_UP_LAG_S of live (the kept audio was stepped)."""


def _live_classes():
    """The benchmark's subclasses of the product's classes (imported late: they load the VAD)."""
    from captions.dev.microphones import SimulatedMicrophone
    from captions.live.speaker import Speaker
    from captions.live.track_audio import IDLE_CHUNK_MS

    idle_chunk = SAMPLE_RATE * IDLE_CHUNK_MS // 1000

    class Microphone(SimulatedMicrophone):
        """Remembers where its first 80 ms stream (the track's kept audio, index 0) starts in the signal."""

        kept_start: int | None = None

        def sample(self, start: int, size: int) -> np.ndarray:
            if size == idle_chunk and self.kept_start is None:
                self.kept_start = start
            return super().sample(start, size)

    class MeetingSpeaker(Speaker):
        """A Speaker that logs its turns, what each pushed to the engine, and its captions."""

        def __init__(self, host, participant: int, source: Microphone):
            self.participant, self.logs, self.event_turn, self._beginning = participant, {}, None, False
            super().__init__(host, f"p{participant:02d}", f"Participant {participant}", f"TR_{participant}", source)

        def log_of(self, turn) -> TurnLog:
            if turn not in self.logs:
                self.logs[turn] = TurnLog(self.participant, time.time(), turn.open_start or 0)
            return self.logs[turn]

        def _begin_turn(self, start: int) -> None:
            begun, self._beginning = time.time(), True
            try:
                super()._begin_turn(start)
            finally:
                self._beginning = False
            if self.turn is not None:
                log = self.log_of(self.turn)
                log.begun_at, log.start = begun, start

        def _granted(self, turn, stream) -> None:
            log = self.log_of(turn)
            log.granted_at, log.immediate = time.time(), self._beginning
            super()._granted(turn, stream)

        def _push(self, turn, parts) -> None:
            super()._push(turn, parts)
            if turn.stream is None or not any(pcm.size for _, pcm in parts):
                return
            log = self.log_of(turn)
            if not log.parts:
                log.first_push_at, log.stream_id, log.lead = time.time(), turn.stream.id, turn.stream.lead_samples
                log.first_push_samples = sum(pcm.size for _, pcm in parts)
            log.parts.extend((index, pcm) for index, pcm in parts if pcm.size)

        def _close_turn(self, turn, flush: bool = True) -> None:
            log = self.log_of(turn)
            log.closed_at = log.closed_at or time.time()
            super()._close_turn(turn, flush)

        def _on_event(self, turn, event) -> None:
            log = self.log_of(turn)
            if event.ended:
                log.ended_at, log.error = time.time(), event.error
            elif (audio_s := event.frames * FRAME_S - event.lead_samples / SAMPLE_RATE) > 0:
                now = time.time()
                log.lags.append(now - turn.wall_time(audio_s))
                if log.caught_up_at is None and log.lags[-1] <= CAUGHT_UP_LAG_S:
                    log.caught_up_at = now
            self.event_turn = turn
            try:
                super()._on_event(turn, event)
            finally:
                self.event_turn = None

    return Microphone, MeetingSpeaker


class _Host:
    """The room as the speakers see it (speaker.SpeakerHost); captions go to each turn's log."""

    def __init__(self, slots, options):
        from captions.live.segmenter import SegmenterOptions

        self.room_name = "meeting"
        self.slots = slots
        self.segmenter_options = SegmenterOptions()
        self.speaker_options = options
        self.record_dir = None
        self.timing_attributes = False

    def status_changed(self) -> None:
        pass

    def caption(self, speaker, update, wall_time, timing=None) -> None:
        words = [(w.text, wall_time(w.start), wall_time(w.end)) for w in update.words]
        speaker.log_of(speaker.event_turn).captions.append(CaptionLog(time.time(), update.final, words))


@dataclass
class LiveRun:
    origin: float
    """Wall time of the meeting clock's tick 0."""
    speakers: list
    microphones: list
    occupancy: list[tuple[float, int, int]]
    """(seconds into the meeting, slots in use, speakers waiting), every SAMPLE_EVERY_S."""
    steps: list[tuple[float, int, float]]
    """(wall time, streams stepped, seconds) of every engine step."""
    stopped_at: float = 0.0


async def _sample_occupancy(engine, slots, origin: float, out: list, seconds: float) -> None:
    deadline = time.time() + seconds + FLUSH_TIMEOUT_S
    while time.time() < deadline:
        out.append((round(time.time() - origin, 3), engine.slots_in_use, len(slots)))
        await asyncio.sleep(SAMPLE_EVERY_S)


async def run_meeting(engine, signals: list[np.ndarray], options, seconds: float) -> LiveRun:
    """The meeting in real time: every participant's Speaker on one clock, until `seconds`, then
    every speaker stops (their last turns are flushed; a waiting one keeps its place)."""
    from captions.dev.microphones import MeetingClock
    from captions.live.slots import SlotQueue

    Microphone, MeetingSpeaker = _live_classes()
    slots = SlotQueue(engine, poll_s=0.05)
    clock = MeetingClock(speed=1.0)
    run = LiveRun(time.time() - (time.monotonic() - clock.start), [], [], [], [])
    listener = lambda timings: run.steps.append((time.time(), timings.active, timings.total_s))  # noqa: E731
    engine.step_listeners.append(listener)
    sampler = asyncio.create_task(_sample_occupancy(engine, slots, run.origin, run.occupancy, seconds))
    try:
        host = _Host(slots, options)
        run.microphones = [Microphone(signal, clock) for signal in signals]
        run.speakers = [MeetingSpeaker(host, p, mic) for p, mic in enumerate(run.microphones)]
        await asyncio.sleep(max(0.0, clock.start + seconds - time.monotonic()))
        run.stopped_at = time.time()
        for speaker in run.speakers:
            speaker.stop()
        waits = [asyncio.create_task(s.ended.wait()) for s in run.speakers]
        _, pending = await asyncio.wait(waits, timeout=FLUSH_TIMEOUT_S)
        for task in pending:
            task.cancel()
        if pending:
            raise BenchError(f"{len(pending)} speakers were not flushed within {FLUSH_TIMEOUT_S:.0f} s")
        others = asyncio.all_tasks() - {asyncio.current_task(), sampler}
        if others:  # the tracks close (and their VAD)
            await asyncio.wait(others, timeout=5)
    finally:
        sampler.cancel()
        slots.close()
        engine.step_listeners.remove(listener)
    return run


# ---- references: the same audio through the engine, offline ----------------------------------------

def transcribe_all(engine, audios: list[np.ndarray]) -> list[list]:
    """`transcribe_audio` for every clip, B at a time (one thread per slot), bounded in time."""
    from captions.stt.transcribe import transcribe_audio

    results: list = [None] * len(audios)
    jobs: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in sorted(range(len(audios)), key=lambda i: -audios[i].size):
        jobs.put(i)
    errors: list[BaseException] = []

    def work() -> None:
        while not errors:
            try:
                i = jobs.get_nowait()
            except queue.Empty:
                return
            try:
                results[i] = transcribe_audio(engine, audios[i])
            except Exception as e:  # noqa: BLE001 - reported below, as the benchmark's error
                errors.append(e)

    threads = [threading.Thread(target=work, name=f"meeting-reference-{k}", daemon=True)
               for k in range(min(engine.batch_size, len(audios)))]
    for thread in threads:
        thread.start()
    audio_s = sum(a.size for a in audios) / SAMPLE_RATE
    deadline = time.monotonic() + 120 + 4 * audio_s / engine.batch_size
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if errors:
        raise BenchError(f"a reference transcription failed: {errors[0]}")
    if any(thread.is_alive() for thread in threads):
        raise BenchError(f"the reference transcriptions ({audio_s:.0f} s of audio) did not finish in time")
    return results


def stream_audio(log: TurnLog) -> np.ndarray:
    """Exactly what the engine stream got: its lead silence, then everything pushed."""
    pcm = np.concatenate([pcm for _, pcm in log.parts])
    return np.concatenate([np.zeros(log.lead, np.float32), pcm.astype(np.float32) / 32768.0])


def _signal_index(log: TurnLog, seconds: float, kept_start: int) -> int:
    """Signal sample of `seconds` into a stream's reference audio (lead included)."""
    sample = seconds * SAMPLE_RATE - log.lead
    turn_sample = 0
    for index, pcm in log.parts:
        if sample < turn_sample + pcm.size:
            return kept_start + index + int(max(0.0, sample - turn_sample))
        turn_sample += pcm.size
    index, pcm = log.parts[-1]
    return kept_start + index + pcm.size


def edit_distance(a: list[str], b: list[str]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


# ---- the figures of one run ---------------------------------------------------------------------------

def _coverage(plan: MeetingPlan, run: LiveRun, logs: list[TurnLog]) -> tuple[dict, list[bool]]:
    """Every utterance inside pushed audio; pushed audio equal to the signal; nothing pushed twice."""
    pushed: dict[int, list[tuple[int, int]]] = {}
    mismatched = duplicated = 0
    for log in logs:
        mic = run.microphones[log.participant]
        last_end = None
        for index, pcm in log.parts:
            start = mic.kept_start + index
            mismatched += int(np.count_nonzero(mic.sample(start, pcm.size) != pcm))
            if last_end is not None and start < last_end:
                duplicated += last_end - start
            last_end = start + pcm.size
            pushed.setdefault(log.participant, []).append((start, start + pcm.size))
    merged = {p: _merge(spans) for p, spans in pushed.items()}
    covered = [any(s <= u.onset and u.end <= e for s, e in merged.get(u.participant, [])) for u in plan.utterances]
    speech = sum(u.end - u.onset for u in plan.utterances)
    inside = sum(_overlap(merged.get(u.participant, []), u.onset, u.end) for u in plan.utterances)
    return {"utterances": len(plan.utterances), "utterances_covered": sum(covered),
            "speech_s": round(speech / SAMPLE_RATE, 2),
            "speech_share_pushed": round(inside / speech, 6) if speech else None,
            "samples_pushed": sum(pcm.size for log in logs for _, pcm in log.parts),
            "samples_not_equal_to_signal": mismatched, "samples_pushed_twice": duplicated}, covered


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def _overlap(spans: list[tuple[int, int]], start: int, end: int) -> int:
    return sum(max(0, min(e, end) - max(s, start)) for s, e in spans)


def _final_words(log: TurnLog) -> list[str]:
    return [text for caption in log.captions if caption.final for text, _, _ in caption.words]


def _words(logs: list[TurnLog], references: list[list]) -> dict:
    said = [[w.text for w in words] for words in references]
    captioned = [_final_words(log) for log in logs]
    equal = sum(a == b for a, b in zip(said, captioned))
    return {"streams": len(logs), "streams_equal": equal, "said": sum(map(len, said)),
            "captioned": sum(map(len, captioned)),
            "errors": sum(edit_distance(a, b) for a, b in zip(said, captioned)),
            "stream_errors": sum(log.error is not None for log in logs)}


def _wall(run: LiveRun, participant: int, sample: int) -> float:
    """Capture time of signal sample `sample` as the participant's track reckons it."""
    track = run.speakers[participant].track
    return track.capture_time(sample - run.microphones[participant].kept_start)


def _classify(u: Utterance, onset_wall: float, logs: list[TurnLog], run: LiveRun) -> tuple[str, TurnLog | None]:
    """held / acquired / waited by the turn whose pushed audio holds the onset; missed: none does."""
    kept_start = run.microphones[u.participant].kept_start
    for log in logs:
        if log.participant == u.participant and any(
                kept_start + i <= u.onset < kept_start + i + pcm.size for i, pcm in log.parts):
            break
    else:
        return "missed", None
    if log.begun_at <= onset_wall:  # the turn was open before this utterance began
        held = log.granted_at is not None and log.granted_at <= onset_wall
        return ("held" if held else "waited"), log
    return ("acquired" if log.immediate else "waited"), log


def _first_word_latency(u: Utterance, run: LiveRun, logs: list[TurnLog], pre_roll: float) -> float | None:
    """First caption carrying a word that starts in [onset - pre-roll, end], less that word's end."""
    low = _wall(run, u.participant, u.onset) - pre_roll
    high = _wall(run, u.participant, u.end)
    captions = sorted((c for log in logs if log.participant == u.participant for c in log.captions),
                      key=lambda c: c.arrival)
    for caption in captions:
        inside = [(start, end) for _, start, end in caption.words if low <= start <= high]
        if inside:
            return caption.arrival - min(inside)[1]
    return None


def _utterances(plan: MeetingPlan, run: LiveRun, logs: list[TurnLog], covered: list[bool], pre_roll: float) -> list[dict]:
    rows = []
    for u, is_covered in zip(plan.utterances, covered):
        onset_wall = _wall(run, u.participant, u.onset)
        kind, log = _classify(u, onset_wall, logs, run)
        latency = _first_word_latency(u, run, logs, pre_roll)
        row = {"participant": u.participant, "kind": u.kind, "onset_s": round(u.onset / SAMPLE_RATE, 3),
               "end_s": round(u.end / SAMPLE_RATE, 3), "class": kind, "covered": is_covered,
               "first_word_latency_ms": None if latency is None else round(latency * 1000, 1)}
        if kind in ("acquired", "waited") and log is not None and log.begun_at > onset_wall:
            row["split_ms"] = _split(log, onset_wall)
        rows.append(row)
    return rows


def _split(log: TurnLog, onset_wall: float) -> dict:
    """Where a new turn's time went: voice onset -> turn requested -> slot -> first push."""
    ms = lambda a, b: None if a is None or b is None else round((b - a) * 1000, 1)  # noqa: E731
    return {"onset_to_request": ms(onset_wall, log.begun_at), "request_to_slot": ms(log.begun_at, log.granted_at),
            "slot_to_first_push": ms(log.granted_at, log.first_push_at),
            "onset_to_caught_up": ms(onset_wall, log.caught_up_at),
            "first_push_s": round(log.first_push_samples / SAMPLE_RATE, 3)}


def _latencies(rows: list[dict]) -> dict:
    by_class = {kind: [r["first_word_latency_ms"] / 1000 for r in rows
                       if r["class"] == kind and r["first_word_latency_ms"] is not None] for kind in LATENCY_CLASSES}
    summary = {kind: summarize_ms(values) for kind, values in by_class.items()}
    taken = summarize_ms(by_class["acquired"] + by_class["waited"])
    held = summary["held"]["p95"]
    summary["taken"] = taken
    summary["extra_p95_ms"] = None if held is None or taken["p95"] is None else round(taken["p95"] - held, 1)
    p50 = summary["held"]["p50"]
    summary["extra_p50_ms"] = None if p50 is None or taken["p50"] is None else round(taken["p50"] - p50, 1)
    summary["without_word"] = sum(r["first_word_latency_ms"] is None for r in rows)
    splits = [r["split_ms"] for r in rows if "split_ms" in r]
    summary["new_turn_split_ms"] = {key: summarize_ms([s[key] / 1000 for s in splits if s[key] is not None])
                                    for key in ("onset_to_request", "request_to_slot", "slot_to_first_push",
                                                "onset_to_caught_up")}
    return summary


def _occupancy(run: LiveRun, batch_size: int, seconds: float) -> dict:
    inside = [(used, waiting) for t, used, waiting in run.occupancy if 0 <= t <= seconds]
    used = np.array([u for u, _ in inside] or [0])
    waiting = np.array([w for _, w in inside] or [0])
    return {"mean": round(float(used.mean()), 3), "max": int(used.max()),
            "all_busy_share": round(float(np.mean(used >= batch_size)), 4),
            "queue_max": int(waiting.max()), "queue_nonempty_share": round(float(np.mean(waiting > 0)), 4)}


def _waits(logs: list[TurnLog]) -> dict:
    waits = [log.granted_at - log.begun_at for log in logs if not log.immediate and log.granted_at is not None]
    summary = summarize_ms(waits)
    summary["max"] = round(max(waits) * 1000, 1) if waits else None
    return summary


def _steps(run: LiveRun, seconds: float, logs: list[TurnLog]) -> dict:
    inside = [(active, total) for t, active, total in run.steps if t - run.origin <= seconds]
    live = []  # the engine's lag behind live audio once each stream has caught up
    for log in logs:
        first = next((i for i, lag in enumerate(log.lags) if lag <= CAUGHT_UP_LAG_S), len(log.lags))
        live += log.lags[first:]
    return {"steps": len(inside), "per_s": round(len(inside) / seconds, 2),
            "streams_per_step": round(float(np.mean([a for a, _ in inside])), 2) if inside else None,
            "step_ms": summarize_ms([total for _, total in inside]), "live_lag_ms": summarize_ms(live)}


def _context_cost(engine, plan: MeetingPlan, run: LiveRun, logs: list[TurnLog], references: list[list],
                  signals: list[np.ndarray], meaningful: bool) -> dict:
    """Each later turn's own words against the words of its span in one held slot (whole signal)."""
    later: dict[int, list[int]] = {}
    for i, log in enumerate(logs):
        later.setdefault(log.participant, []).append(i)
    people = sorted(p for p, turns in later.items() if len(turns) > 1)
    wholes = transcribe_all(engine, [signals[p].astype(np.float32) / 32768.0 for p in people])
    compared = agree = errors = words = 0
    for p, whole in zip(people, wholes):
        kept_start = run.microphones[p].kept_start
        for i in later[p][1:]:
            log, own = logs[i], [w.text for w in references[i]]
            first, last = _signal_index(log, 0.0, kept_start), _signal_index(log, 1e9, kept_start)
            held = [w.text for w in whole if first <= w.start * SAMPLE_RATE < last]
            compared += 1
            agree += bool(own and held and own[0] == held[0]) or (not own and not held)
            errors += edit_distance(own, held)
            words += len(held)
    return {"meaningful": meaningful,
            "note": None if meaningful else "tiny test checkpoint (random weights): these figures mean nothing",
            "turns_compared": compared, "first_word_agreement": round(agree / compared, 4) if compared else None,
            "word_errors": errors, "held_slot_words": words,
            "error_rate": round(errors / words, 4) if words else None}


def analyse(engine, plan: MeetingPlan, signals: list[np.ndarray], run: LiveRun, options, batch_size: int,
            seconds: float, overflow_frames: float, meaningful: bool) -> dict:
    """Every figure of one meeting (the module notes say what each means)."""
    logs = [log for speaker in run.speakers for log in speaker.logs.values() if log.parts]
    references = transcribe_all(engine, [stream_audio(log) for log in logs])
    coverage, covered = _coverage(plan, run, logs)
    rows = _utterances(plan, run, logs, covered, options.pre_roll_s)
    words = _words(logs, references)
    latency = _latencies(rows)
    spoke = sorted({u.participant for u in plan.utterances})
    captioned = sorted({log.participant for log in logs if _final_words(log)})
    lossless = (coverage["utterances_covered"] == coverage["utterances"] and words["streams_equal"] == words["streams"]
                and coverage["samples_not_equal_to_signal"] == 0 and coverage["samples_pushed_twice"] == 0
                and overflow_frames == 0 and words["stream_errors"] == 0)
    extra = latency["extra_p95_ms"]
    return {
        "participants": plan.participants, "batch_size": batch_size,
        "participants_silent": len(plan.silent), "participants_with_speech": len(spoke),
        "participants_captioned": len(captioned), "coverage": coverage, "words": words,
        "frames_dropped_waiting_overflow": int(overflow_frames),
        "slots": _occupancy(run, batch_size, seconds), "waits_ms": _waits(logs), "engine": _steps(run, seconds, logs),
        "first_word_latency_ms": latency,
        "context_cost": _context_cost(engine, plan, run, logs, references, signals, meaningful),
        "lossless": lossless, "serves": lossless and extra is not None and extra <= EXTRA_TARGET_S * 1000,
        "utterances": rows,
        "turns": [_turn_row(log, run) for log in logs],
        "occupancy": [[t, used, waiting] for t, used, waiting in run.occupancy],
    }


def _turn_row(log: TurnLog, run: LiveRun) -> dict:
    at = lambda t: None if t is None else round(t - run.origin, 3)  # noqa: E731
    return {"participant": log.participant, "stream": log.stream_id, "begun_s": at(log.begun_at),
            "granted_s": at(log.granted_at), "closed_s": at(log.closed_at), "ended_s": at(log.ended_at),
            "immediate": log.immediate, "lead": log.lead,
            "pushed_s": round(sum(pcm.size for _, pcm in log.parts) / SAMPLE_RATE, 3)}


# ---- the command ---------------------------------------------------------------------------------------

def _overflow_frames() -> float:
    from captions.live.metrics import METRICS

    return METRICS.registry.get_sample_value("captions_frames_dropped_total", {"reason": "waiting_overflow"}) or 0.0


def run_all(args: argparse.Namespace, checkpoint: Path) -> list[dict]:
    from captions.live.speaker import SpeakerOptions
    from captions.stt.engine import SttEngine

    bank = ClipBank(args.cache_dir / "meeting-speech")
    plans = [plan_meeting(n, args.seconds, args.seed, bank) for n in args.participants]
    options = SpeakerOptions()
    engine = SttEngine.load(str(checkpoint), device=args.device, batch_size=args.batch_size)
    engine.start()
    results = []
    try:
        for plan in plans:
            signals = meeting_signals(plan, bank, args.seed)
            dropped = _overflow_frames()
            run = asyncio.run(run_meeting(engine, signals, options, args.seconds))
            result = analyse(engine, plan, signals, run, options, args.batch_size, args.seconds,
                             _overflow_frames() - dropped, meaningful=args.model is not None)
            print(_summary_line(result), file=sys.stderr)
            results.append(result)
    finally:
        engine.close()
    return results


def _summary_line(r: dict) -> str:
    lat = r["first_word_latency_ms"]
    return (f"{r['participants']} participants, B={r['batch_size']}: {r['participants_captioned']}/"
            f"{r['participants_with_speech']} captioned, {r['coverage']['utterances_covered']}/"
            f"{r['coverage']['utterances']} utterances covered, words {r['words']['said']} said / "
            f"{r['words']['captioned']} captioned, slots mean {r['slots']['mean']}, waits {r['waits_ms']['count']}, "
            f"p95 held {lat['held']['p95']} / taken {lat['taken']['p95']} ms, extra {lat['extra_p95_ms']} ms, "
            f"serves: {r['serves']}")


def largest_served(results: list[dict]) -> int | None:
    """The largest N served, every smaller N measured being served too."""
    largest = None
    for r in sorted(results, key=lambda r: r["participants"]):
        if not r["serves"]:
            break
        largest = r["participants"]
    return largest


TABLE_HEADER = ("| participants (spoke / captioned) | B | utterances covered | words said / captioned (streams equal) "
                "| overflow frames | slots mean / max, all busy | waits: n, p50 / p95 / max (s) "
                "| first word p95: held / acquired / waited (ms) | extra p95 (ms) | context cost*: first word, WER "
                "| serves |\n|---:|---:|---:|---|---:|---|---|---|---:|---|---|")


def markdown_table(report: dict) -> str:
    m, s, results = report["machine"], report["settings"], report["results"]
    machine = (f"Measured {m['date'][:10]} on {m['cpu_model']} ({m['cpu_cores']} cores, {m['device']}), load "
               f"average {m['load_average_at_start'][0]} at start / {m['load_average_at_end'][0]} at end; "
               f"{s['checkpoint_name']}, {s['seconds']:.0f} s meetings, seed {s['seed']}.")
    served = (f"Largest meeting served with B = {s['batch_size']}: {report['largest_served'] or 'none'} "
              f"(nothing lost and extra p95 <= {EXTRA_TARGET_S * 1000:.0f} ms).")
    note = results[0]["context_cost"]["note"] if results else None
    return "\n".join([machine, "", TABLE_HEADER, *map(_row, results), "", served,
                      "*" + (note or "the cost of starting each turn without the earlier turns' context")])


def _row(r: dict) -> str:
    c, w, slots, waits, lat = r["coverage"], r["words"], r["slots"], r["waits_ms"], r["first_word_latency_ms"]
    sec = lambda v: "-" if v is None else f"{v / 1000:.1f}"  # noqa: E731
    ms = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    cost = r["context_cost"]
    agreement = "-" if cost["first_word_agreement"] is None else f"{cost['first_word_agreement']:.0%}"
    rate = "-" if cost["error_rate"] is None else f"{cost['error_rate']:.0%}"
    return (f"| {r['participants']} ({r['participants_with_speech']} / {r['participants_captioned']}) "
            f"| {r['batch_size']} | {c['utterances_covered']}/{c['utterances']} "
            f"| {w['said']} / {w['captioned']} ({w['streams_equal']}/{w['streams']}) "
            f"| {r['frames_dropped_waiting_overflow']} | {slots['mean']:.1f} / {slots['max']}, "
            f"{slots['all_busy_share']:.0%} | {waits['count']}, {sec(waits['p50'])} / {sec(waits['p95'])} / "
            f"{sec(waits['max'])} | {ms(lat['held']['p95'])} / {ms(lat['acquired']['p95'])} / "
            f"{ms(lat['waited']['p95'])} | {ms(lat['extra_p95_ms'])} | {agreement}, {rate} "
            f"| {'yes' if r['serves'] else 'no'} |")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--participants", env="CAPTIONS_BENCH_PARTICIPANTS", type=positive_ints("participant counts"),
               default=[16], help="people in the meeting, one meeting per count (e.g. 8,16,24)")
    add_option(parser, "--batch-size", env="CAPTIONS_BENCH_BATCH_SIZE", type=positive_int, default=4,
               help="engine slots (B)")
    add_option(parser, "--seconds", env="CAPTIONS_BENCH_SECONDS", type=float, default=90.0,
               help="length of each meeting (real time)")
    add_option(parser, "--seed", env="CAPTIONS_BENCH_SEED", type=int, default=0,
               help="the meetings' random seed (who talks when, noise)")
    add_test_checkpoint_options(parser, "checkpoint directory or Hugging Face repo")
    add_option(parser, "--device", env="CAPTIONS_DEVICE", default="cpu", type=device_name,
               help="cpu, cuda or auto")
    add_output_options(parser)


def run(args: argparse.Namespace) -> int:
    from captions.dev.speech import SpeechUnavailable
    from captions.live.speaker import SpeakerOptions
    from captions.stt.model import CheckpointError

    if args.seconds < 8:
        print("captions bench meeting: --seconds must be at least 8", file=sys.stderr)
        return 2
    try:
        checkpoint = resolve_test_checkpoint(args)
        report = {"benchmark": "meeting", "machine": machine_description(args.device)}
        results = run_all(args, checkpoint)
    except (BenchError, CheckpointError, SpeechUnavailable, RuntimeError) as e:
        print(f"captions bench meeting: {e}", file=sys.stderr)
        return 1
    options = SpeakerOptions()
    report.update({
        "settings": {"participants": args.participants, "batch_size": args.batch_size, "seconds": args.seconds,
                     "seed": args.seed, "checkpoint": str(checkpoint),
                     "checkpoint_name": args.model or "tiny test checkpoint",
                     "pre_roll_s": options.pre_roll_s, "release_after_s": options.release_after_s,
                     "max_wait_s": options.max_wait_s, "path": "in process: the product's Speaker and slot queue, "
                     "simulated microphones on one real-time clock, the real engine (no livekit-server)"},
        "definitions": DEFINITIONS,
        "results": results,
        "largest_served": largest_served(results),
    })
    print(f"largest meeting served with B = {args.batch_size}: {report['largest_served']}", file=sys.stderr)
    return finish_report(args, report, plot, markdown_table)


DEFINITIONS = {
    "coverage": "an utterance is covered when all its samples are inside audio pushed to an engine stream of its "
                "participant; pushed audio is compared with the signal sample for sample",
    "words": "per engine stream: said = the words of exactly its audio (lead silence + everything pushed) run alone "
             "through the engine; captioned = the words of its final captions",
    "first_word_latency_ms": "arrival of the first caption carrying a word that starts in [onset - pre-roll, end] "
                             "of the utterance, less that word's end (capture times); held: the speaker's turn was "
                             "open at the onset; acquired: a new turn got a slot at once; waited: it queued",
    "extra_p95_ms": "p95 of acquired + waited less p95 of held (extra_p50_ms: the same with medians)",
    "new_turn_split_ms": "for a new turn: voice onset -> turn requested (the VAD's delay) -> slot -> first push "
                         "(the live splice) and -> caught up (the first engine event within "
                         f"{CAUGHT_UP_LAG_S * 1000:.0f} ms of live: the kept audio has been stepped)",
    "live_lag_ms": "engine events once a stream caught up: arrival less the capture time of the audio they cover",
    "slots": "engine slots in use, sampled every 100 ms during the meeting",
    "waits_ms": "turns that queued: from the request (voice detected) to the slot",
    "context_cost": "each turn after a participant's first: its own words against the words of the same span when "
                    "the participant's whole signal runs in one held slot",
    "serves": f"nothing lost (every utterance covered, audio exact, words equal, no overflow) and extra p95 <= "
              f"{EXTRA_TARGET_S * 1000:.0f} ms",
}


# ---- the plot ----------------------------------------------------------------------------------------------

def plot(report: dict, path: Path) -> None:
    """Who talked and who held a slot, slots in use, and first-word latency per class (the run
    nearest 16 participants), with p95 per class against meeting size."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

    results = report["results"]
    shown = min(results, key=lambda r: (abs(r["participants"] - 16), -r["participants"]))
    fig = plt.figure(figsize=(14, 10))
    grid = fig.add_gridspec(3, 2, height_ratios=[3, 1.2, 2])
    timeline = fig.add_subplot(grid[0, :])
    slots = fig.add_subplot(grid[1, :], sharex=timeline)
    _plot_timeline(timeline, shown)
    _plot_slots(slots, shown)
    _plot_cdf(fig.add_subplot(grid[2, 0]), shown)
    _plot_p95(fig.add_subplot(grid[2, 1]), results)
    m = report["machine"]
    fig.suptitle(f"captions bench meeting - {m['cpu_model']}, {m['cpu_cores']} cores, {m['device']}, "
                 f"load {m['load_average_at_start'][0]}, {m['date'][:10]}, {report['settings']['checkpoint_name']}",
                 fontsize=10)
    save_figure(fig, path)


def _plot_timeline(ax, r: dict) -> None:
    for u in r["utterances"]:
        colour = "black" if u["kind"] == "sentence" else "tab:purple"
        ax.plot([u["onset_s"], u["end_s"]], [u["participant"]] * 2, color=colour, linewidth=5, solid_capstyle="butt")
    for t in r["turns"]:
        y = t["participant"] + 0.3
        if not t["immediate"] and t["granted_s"] is not None:
            ax.plot([t["begun_s"], t["granted_s"]], [y, y], color="tab:red", linewidth=2)
        if t["granted_s"] is not None:
            ax.plot([t["granted_s"], t["ended_s"] or t["granted_s"]], [y, y], color="tab:green", linewidth=2)
    ax.plot([], [], color="black", linewidth=5, label="sentence")
    ax.plot([], [], color="tab:purple", linewidth=5, label="back-channel")
    ax.plot([], [], color="tab:green", linewidth=2, label="engine slot held (until flushed)")
    ax.plot([], [], color="tab:red", linewidth=2, label="waiting for a slot")
    ax.set_ylabel("participant")
    ax.set_yticks(range(r["participants"]))
    ax.set_ylim(-0.7, r["participants"])
    ax.set_title(f"{r['participants']} participants, B = {r['batch_size']}: who talked and who held a slot")
    ax.legend(fontsize=8, loc="upper right", ncol=4)


def _plot_slots(ax, r: dict) -> None:
    t = [row[0] for row in r["occupancy"]]
    ax.step(t, [row[1] for row in r["occupancy"]], where="post", label="slots in use")
    ax.step(t, [row[2] for row in r["occupancy"]], where="post", color="tab:red", label="speakers waiting")
    ax.axhline(r["batch_size"], color="grey", linestyle=":", label="B")
    ax.set_xlabel("seconds into the meeting")
    ax.set_ylabel("count")
    ax.legend(fontsize=8, loc="upper right")


def _plot_cdf(ax, r: dict) -> None:
    for kind, colour in zip(LATENCY_CLASSES, ["tab:blue", "tab:orange", "tab:red"]):
        values = sorted(u["first_word_latency_ms"] for u in r["utterances"]
                        if u["class"] == kind and u["first_word_latency_ms"] is not None)
        if values:
            ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", color=colour,
                    label=f"{kind} ({len(values)})")
    ax.set_xlabel("first-word latency (ms)")
    ax.set_ylabel("share of utterances")
    ax.set_title(f"First-word latency by how the turn got its slot ({r['participants']} participants)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def _plot_p95(ax, results: list[dict]) -> None:
    sizes = [r["participants"] for r in results]
    for kind, colour in zip(LATENCY_CLASSES, ["tab:blue", "tab:orange", "tab:red"]):
        values = [r["first_word_latency_ms"][kind]["p95"] for r in results]
        ax.plot(sizes, [math.nan if v is None else v for v in values], "o-", color=colour, label=f"p95 {kind}")
    extra = [r["first_word_latency_ms"]["extra_p95_ms"] for r in results]
    ax.plot(sizes, [math.nan if v is None else v for v in extra], "s--", color="black", label="extra p95")
    ax.axhline(EXTRA_TARGET_S * 1000, color="grey", linestyle=":", label="extra target")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xlabel("participants")
    ax.set_ylabel("ms")
    ax.set_title("First-word latency p95 by meeting size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
