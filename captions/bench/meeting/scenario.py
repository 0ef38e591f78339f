"""The meetings of `captions bench meeting`: who says what, when (seeded), and each microphone's signal.

Several rooms (`plan_rooms`) share the worker's one engine: each room is a seeded meeting of its
own, and the first room may have participants who never stop talking (a TV, a presenter's
monologue: sentences back to back, the pauses between them shorter than a turn's release), who
would hold every slot without the slot queue's fair shares (captions/live/slots.py)."""

from __future__ import annotations

import hashlib
import random
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from captions.stt.api import SAMPLE_RATE

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
    rooms: list[int] = field(default_factory=list)
    """The room of each participant (empty: one room)."""
    nonstop: list[int] = field(default_factory=list)
    """Participants who never stop talking."""

    def room_of(self, participant: int) -> int:
        return self.rooms[participant] if self.rooms else 0

    @property
    def room_count(self) -> int:
        return max(self.rooms) + 1 if self.rooms else 1


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


NONSTOP_GAP_S = (0.15, 0.5)
"""Pauses between a never-stopping talker's sentences: shorter than any turn's release."""


def plan_rooms(rooms: int, participants: int, seconds: float, seed: int, bank: ClipBank,
               nonstop: int = 0) -> MeetingPlan:
    """`rooms` seeded meetings of `participants` people at once (room 0's is `plan_meeting`'s with
    this seed), and `nonstop` more people in room 0 who talk from the start to the end without
    stopping; participants are numbered room after room."""
    utterances: list[Utterance] = []
    silent: list[int] = []
    room_of: list[int] = []
    samples = int(seconds * SAMPLE_RATE)
    for room in range(rooms):
        first = len(room_of)
        plan = plan_meeting(participants, seconds, seed if room == 0 else seed * 1000 + room, _Renumbered(bank, first))
        utterances += [Utterance(first + u.participant, u.onset, u.end, u.kind, u.text) for u in plan.utterances]
        silent += [first + p for p in plan.silent]
        room_of += [room] * participants
        if room == 0:
            for k in range(nonstop):
                utterances += _monologue(random.Random(f"nonstop-{seed}-{k}"), bank, len(room_of), samples)
                room_of.append(0)
    nonstop_people = [p for p in range(len(room_of)) if room_of[p] == 0 and p >= participants]
    utterances.sort(key=lambda u: (u.onset, u.participant))
    return MeetingPlan(len(room_of), samples, utterances, silent, room_of, nonstop_people)


class _Renumbered:
    """A room's clips, spoken with the voices of the participants' numbers in the whole run."""

    def __init__(self, bank: ClipBank, first: int):
        self.bank, self.first = bank, first

    def clip(self, text: str, voice: int) -> np.ndarray:
        return self.bank.clip(text, self.first + voice)


def _monologue(rng: random.Random, bank: ClipBank, participant: int, samples: int) -> list[Utterance]:
    """Sentences back to back from START_S to the end margin, short pauses between."""
    out: list[Utterance] = []
    at, limit = int((START_S + rng.uniform(0.0, 1.0)) * SAMPLE_RATE), samples - int(END_MARGIN_S * SAMPLE_RATE)
    while True:
        text = rng.choice(SENTENCES)
        clip = bank.clip(text, participant)
        if at + clip.size > limit:
            return out
        out.append(Utterance(participant, at, at + clip.size, "monologue", text))
        at += clip.size + int(rng.uniform(*NONSTOP_GAP_S) * SAMPLE_RATE)


def meeting_signals(plan: MeetingPlan, bank: ClipBank, seed: int) -> list[np.ndarray]:
    """Each participant's microphone: a seeded noise floor plus their clips, int16."""
    signals = []
    for p in range(plan.participants):
        noise = np.random.default_rng([seed, plan.participants, p]).normal(0.0, NOISE_LEVEL, plan.samples)
        signals.append(noise)
    for u in plan.utterances:
        signals[u.participant][u.onset:u.end] += bank.clip(u.text, u.participant)
    return [np.clip(np.round(s), -32768, 32767).astype(np.int16) for s in signals]


