"""Fair shares when slots run out (captions/live/slots.py and speaker.py): a room that holds every
slot while another room's speaker waits gives one back within the bound, and the turn that yields
loses nothing; a lone room is only rotated by the long-hold rule; a turn yields at a sentence end.

The product's Speaker, SlotQueue and track code on simulated microphones whose shared clock the
test advances tick by tick (no wall-clock timing in the logic), with the fake engine. The voice
gate is a loudness stand-in (the fake engine's words are tones, which Silero does not call speech);
the speaker logic is the product's.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from captions.dev.microphones import SimulatedMicrophone
from captions.live.slots import SlotQueue
from captions.live.speaker import Speaker
from captions.live.turn import Turn, TurnState
from captions.stt.api import SAMPLE_RATE
from tests.fake_engine import FakeEngine, fake_words
from tests.test_speaker import Host, located, options

pytestmark = [pytest.mark.timeout(120)]
WINDOW = 768
"""The gate judges 32 ms windows, as Silero does."""


class LoudnessGate:
    """speaker.py's SpeechGate, judged by loudness: speech while windows are loud, ending 0.3 s after
    the last loud one (the pauses between a talker's words do not end it)."""

    def __init__(self, options=None):
        self.speaking, self.onset, self.last_speech = False, None, None
        self._pending = np.zeros(0, dtype=np.int16)
        self._windows = 0

    def feed(self, pcm: np.ndarray) -> bool:
        self._pending = np.concatenate([self._pending, pcm])
        started = False
        while self._pending.size >= WINDOW:
            window, self._pending = self._pending[:WINDOW].astype(np.float64), self._pending[WINDOW:]
            index, self._windows = self._windows, self._windows + 1
            if np.sqrt(np.mean(window**2)) > 1000:
                if not self.speaking:
                    self.speaking, self.onset, started = True, index * WINDOW, True
                self.last_speech = (index + 1) * WINDOW
            elif self.speaking and index * WINDOW - self.last_speech >= 0.3 * SAMPLE_RATE:
                self.speaking = False
        return started

    def close(self) -> None:
        pass


@pytest.fixture(autouse=True)
def loudness_gate(monkeypatch):
    monkeypatch.setattr("captions.live.speaker.SpeechGate", LoudnessGate)


class SteppedClock:
    """microphones.MeetingClock's interface on a clock the test advances, 10 ms at a time."""

    def __init__(self):
        self.tick = 0
        self._advanced = asyncio.Event()

    def ticks(self) -> float:
        return float(self.tick)

    async def wait_tick(self, tick: int) -> None:
        while self.tick < tick:
            await self._advanced.wait()

    def advance(self) -> None:
        self.tick += 1
        advanced, self._advanced = self._advanced, asyncio.Event()
        advanced.set()


def talker(start_s: float, seconds: float, word_s: float = 0.3, gap_s: float = 0.25, seed: int = 0) -> np.ndarray:
    """A low noise floor (every stretch of the signal is unique), and from `start_s` on words (tones)
    with short gaps for `seconds`: never a pause long enough to end a turn; every tone is one word
    of the fake engine."""
    rate = SAMPLE_RATE
    t = np.arange(int(word_s * rate)) / rate
    word = 0.3 * 32767 * np.sin(2 * np.pi * 220 * t)
    one = np.concatenate([word, np.zeros(int(gap_s * rate))])
    words = np.tile(one, int(seconds / (word_s + gap_s)) + 1)
    signal = np.concatenate([np.zeros(int(start_s * rate)), words])
    signal += np.random.default_rng(seed).integers(-30, 30, signal.size)
    return np.round(signal).astype(np.int16)


class Meeting:
    """Speakers of several rooms on one engine and one slot queue, on a stepped clock."""

    def __init__(self, batch_size: int, has_vad: bool = False, **option_values):
        self.engine = FakeEngine(batch_size=batch_size, has_vad=has_vad)
        self.queue = SlotQueue(self.engine, poll_s=0.05)
        self.options = options(**option_values)
        self.clock = SteppedClock()
        self.hosts: dict[str, Host] = {}
        self.speakers: dict[str, Speaker] = {}
        self.signals: dict[str, np.ndarray] = {}
        self.granted_at: dict[str, list[int]] = {}
        """Ticks at which each speaker's turns went live."""
        self.waiting_since: dict[str, int] = {}

    def add(self, room: str, name: str, signal: np.ndarray) -> None:
        host = self.hosts.setdefault(room, Host(self.engine, self.options, room_name=room, slots=self.queue))
        self.signals[name] = signal
        self.speakers[name] = Speaker(host, name, name, f"TR_{name}", SimulatedMicrophone(signal, self.clock))

    def _grant_in_flight(self) -> bool:
        waiting = set(self.queue.waiting())
        for s in self.speakers.values():
            turn = s.turn
            if turn is not None and turn.state is TurnState.WAITING and turn.stream is None \
                    and turn.client.label not in waiting and not s._stopped:
                return True  # granted: the stream hops over to the room's loop
        return self.engine.slots_in_use < self.engine.batch_size and len(self.queue) > 0

    async def settle(self) -> None:
        for _ in range(4):
            await asyncio.sleep(0)
        deadline = time.monotonic() + 5
        while self._grant_in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.001)  # the dispatcher thread grants a freed slot
        for _ in range(2):
            await asyncio.sleep(0)

    async def run(self, seconds: float) -> None:
        for _ in range(int(seconds * 100)):
            self.clock.advance()
            await self.settle()
            for name, s in self.speakers.items():
                turn = s.turn
                if turn is None:
                    continue
                if turn.state is TurnState.WAITING:
                    self.waiting_since.setdefault(name, self.clock.tick)
                elif turn.state is TurnState.LIVE and (not self.granted_at.get(name) or
                                                       self.granted_at[name][-1][0] is not turn):
                    self.granted_at.setdefault(name, []).append((turn, self.clock.tick))

    async def finish(self) -> None:
        for s in self.speakers.values():
            s.stop()
        for _ in range(200):  # a waiting turn is granted and flushed
            if all(s.ended.is_set() for s in self.speakers.values()):
                break
            await self.settle()
            await asyncio.sleep(0.005)
        assert all(s.ended.is_set() for s in self.speakers.values()), "every speaker flushed"
        self.queue.close()

    def streams_of(self, name: str) -> list:
        ids = speaker_stream_ids.get(self.speakers[name], set())
        return [stream for stream in self.engine.opened if stream.id in ids]

    def pushed_audio(self, name: str) -> list[np.ndarray]:
        """Each of the speaker's engine streams' audio, int16, in order."""
        return [np.round(np.concatenate(stream.pushed) * 32768).astype(np.int16)
                for stream in self.streams_of(name) if stream.pushed]

    def finals(self, name: str) -> list[str]:
        host = self.speakers[name].host
        return [w.text for who, u, _ in host.captions if who == name and u.final for w in u.words]


speaker_stream_ids: dict[Speaker, set[int]] = {}


@pytest.fixture(autouse=True)
def stream_ids(monkeypatch):
    """Which engine streams each speaker got (the fake engine does not say whose a stream is)."""
    speaker_stream_ids.clear()
    granted = Speaker._granted

    def recording(self, turn, stream):
        speaker_stream_ids.setdefault(self, set()).add(stream.id)
        return granted(self, turn, stream)

    monkeypatch.setattr(Speaker, "_granted", recording)


def assert_exact_and_whole(meeting: Meeting, name: str) -> None:
    """Every stream of the speaker, one after the other, is one stretch of its signal, sample for
    sample: nothing lost at a yield and nothing pushed twice; each stream's words are final."""
    parts = meeting.pushed_audio(name)
    assert parts, f"{name} was captioned"
    audio = np.concatenate(parts)
    signal = np.concatenate([meeting.signals[name], np.zeros(30 * SAMPLE_RATE, np.int16)])  # then silence
    start = located(audio.astype(np.float32) / 32768, signal)
    assert start >= 0, f"{name}'s streams, end to end, are its signal exactly (no gap, no overlap)"
    onset = int(np.flatnonzero(np.abs(signal) > 1000)[0])
    assert start <= onset, f"{name}'s first turn starts before the first word (pre-roll)"
    said = [word for part in parts for word in fake_words(part.astype(np.float32) / 32768)]
    assert meeting.finals(name) == said, f"every word of each of {name}'s streams became final"


async def test_a_room_holding_every_slot_gives_one_to_a_waiting_room_within_the_bound():
    """B = 2: room A's two talkers never stop and hold both slots; room B's talker waits. A's oldest
    turn yields (no sentence end: after the bound) and B gets a slot; A's yielding talker waits and
    loses nothing: its streams, end to end, are exactly what it said."""
    meeting = Meeting(batch_size=2, max_turn_hold_s=60.0, yield_within_s=1.0)
    meeting.add("A", "a1", talker(1.0, 12.0, seed=1))
    meeting.add("A", "a2", talker(1.2, 12.0, seed=2))
    meeting.add("B", "b1", talker(3.0, 6.0, seed=3))
    await meeting.run(12.0)
    assert "b1" in meeting.waiting_since, "room B's talker had to wait"
    assert meeting.granted_at.get("b1"), "room B's talker got a slot"
    waited = (meeting.granted_at["b1"][0][1] - meeting.waiting_since["b1"]) / 100
    assert waited <= meeting.options.yield_within_s + 0.5, f"B waited {waited:.2f} s, beyond the bound"
    assert len(meeting.granted_at["a1"]) >= 2, "a1 (the longest held) yielded and got a slot again"
    assert len(meeting.granted_at.get("a2", [])) == 1, "one yield was enough: a2 kept its slot"
    await meeting.finish()
    for name in ("a1", "a2", "b1"):
        assert_exact_and_whole(meeting, name)
    for speaker in meeting.speakers.values():
        assert not speaker.turn


async def test_a_lone_room_with_more_talkers_than_slots_yields_only_to_the_long_hold_rule():
    """B = 2, one room, three talkers who never stop, nobody else waiting: the room is within its
    share (all B slots), so nobody yields before `max_turn_hold_s`; then the longest-held turn
    yields (within the bound) to the third talker."""
    meeting = Meeting(batch_size=2, max_turn_hold_s=3.0, yield_within_s=1.0)
    meeting.add("A", "a1", talker(1.0, 12.0, seed=1))
    meeting.add("A", "a2", talker(1.1, 12.0, seed=2))
    meeting.add("A", "a3", talker(1.5, 12.0, seed=3))
    await meeting.run(3.8)  # a1 and a2 took their slots at about 1 s: under 3 s held
    assert "a3" in meeting.waiting_since and "a3" not in meeting.granted_at
    assert [len(meeting.granted_at[n]) for n in ("a1", "a2")] == [1, 1], "nobody yielded before the long hold"
    assert not any(stream.ended for stream in meeting.engine.opened), "no turn was ended"
    await meeting.run(2.7)
    assert meeting.granted_at.get("a3"), "the long hold made a slot free for the third talker"
    granted = meeting.granted_at["a3"][0][1] / 100
    first_live = min(meeting.granted_at[n][0][1] for n in ("a1", "a2")) / 100
    assert granted <= first_live + 3.0 + 1.0 + 0.5, "within max_turn_hold_s + yield_within_s"
    assert len(meeting.granted_at["a2"]) == 1, "one yield per waiter: a2 kept its slot"
    await meeting.finish()
    for name in ("a1", "a2", "a3"):
        assert_exact_and_whole(meeting, name)


async def test_a_turn_asked_to_yield_does_so_at_a_sentence_end():
    """With pauses the engine's VAD sees, a long-held turn yields at the first sentence end after it
    was asked, well before the bound, and the cut lies in a pause, not in a word."""
    meeting = Meeting(batch_size=1, has_vad=True, max_turn_hold_s=2.0, yield_within_s=5.0)
    meeting.add("A", "a1", talker(1.0, 10.0, word_s=0.6, gap_s=0.2, seed=1))
    meeting.add("B", "b1", talker(1.5, 6.0, seed=2))
    await meeting.run(5.0)
    assert meeting.granted_at.get("b1"), "b1 got the slot"
    asked_by = (meeting.granted_at["a1"][0][1] / 100) + 2.0
    assert meeting.granted_at["b1"][0][1] / 100 <= asked_by + 1.5, "yielded at a sentence end, not at the bound"
    first = meeting.pushed_audio("a1")[0]
    assert np.all(np.abs(first[-int(0.01 * SAMPLE_RATE):]) < 100), "the first stream ends in a pause"
    await meeting.finish()
    assert_exact_and_whole(meeting, "a1")
    assert_exact_and_whole(meeting, "b1")


def test_a_long_turns_spans_stay_few():
    """Turn.spans maps word times to capture times: a live turn pushes every 10 ms, and its spans
    do not grow with its length (contiguous pushes extend the last span), yet map times as before."""

    class Track:
        def capture_time(self, index: float) -> float:
            return 1000.0 + index / SAMPLE_RATE

    class Owner:
        track = Track()

    turn = Turn(Owner(), 0)
    turn.record(1000, 4800)  # kept audio, before a gap cut out while waiting
    turn.record(12000, 2400)
    for k in range(60 * 100):  # an hour-long monologue would be 360 000 of these
        turn.record(14400 + 240 * k, 240)
    assert len(turn.spans) <= 3
    assert turn.wall_time(0.1) == pytest.approx(1000.0 + (1000 + 2400) / SAMPLE_RATE)
    assert turn.wall_time(0.3) == pytest.approx(1000.0 + (12000 + 2400) / SAMPLE_RATE)
    assert turn.wall_time(30.0) == pytest.approx(1000.0 + (14400 + 30 * SAMPLE_RATE - 7200) / SAMPLE_RATE)


async def test_a_turn_gives_its_slot_back_after_the_pause_while_the_microphone_stays():
    """(Issue 23: the older version of this check in test_speaker.py held by construction, since its
    run stopped every speaker first.) Alice talks for 2 s and falls silent: `release_after_s` later
    her slot is free again, her microphone still subscribed and read; she talks again: a new turn."""
    meeting = Meeting(batch_size=1, release_after_s=1.0)
    signal = np.concatenate([talker(0.5, 2.0), np.zeros(4 * SAMPLE_RATE, dtype=np.int16), talker(0.0, 1.0, seed=1)])
    meeting.add("room", "alice", signal)
    await meeting.run(2.5)
    assert meeting.engine.slots_in_use == 1, "talking: she holds the slot"
    await meeting.run(2.5)  # 2 s of silence: past the 0.3 s gate tail plus release_after_s
    assert meeting.engine.slots_in_use == 0, "silent: the slot is given back"
    assert not meeting.speakers["alice"].ended.is_set(), "her microphone is still read"
    await meeting.run(2.5)
    assert meeting.engine.slots_in_use == 1 and len(meeting.engine.opened) == 2, "talking again: a new turn"
    await meeting.finish()
