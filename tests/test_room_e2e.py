"""End to end: the real `captions worker` (subprocess, tiny real-format checkpoint on CPU) in rooms of a
real livekit-server, with WebRTC bots speaking espeak-ng audio and a bot viewer collecting captions.

The tiny model's words are meaningless, so these tests compare structure and consistency: who is
captioned, interim -> final, the transcript file, the live words against `captions transcribe` of
the audio the engine consumed (recorded by the worker with --record-dir), and that recording against
what each bot sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from captions.dev.bots import Caption, Publisher, Subscriber
from captions.dev.processes import free_port, free_port_triple
from captions.dev.worker_process import engine_activity, engine_counters, metric_values, settled_metric
from captions.live.transcripts import read_transcript, transcript_path
from captions.protocol import (
    ATTR_AGENT_QUEUED,
    ATTR_AGENT_STATUS,
    ATTR_SEGMENT_ID,
    ATTR_TRANSCRIPTION_FINAL,
    FinalSegment,
)
from captions.stt.api import SAMPLE_RATE
from captions.stt.audio import read_audio_file
from tests.audio_match import match_recording
from tests.conftest import espeak_wav, start_captions_worker, start_livekit_server

pytestmark = [pytest.mark.livekit, pytest.mark.timeout(300), pytest.mark.asyncio(loop_scope="session")]

SENTENCES = {
    "alice": "The quick brown fox jumps over the lazy dog near the river bank.",
    "bob": "Streaming speech recognition turns every word into text as it is spoken.",
    "carol": "Please remember to bring your umbrella because it might rain later today.",
    "dave": "I have been waiting patiently for my turn to speak in this meeting.",
}
# Publishers at different formats: the agent must resample any rate and mix down any channel count.
FORMATS = {"alice": (24000, 1), "bob": (48000, 2), "carol": (16000, 1), "dave": (24000, 1)}
CAPTION_WAIT_S = 30


def speech(speech_dir: Path, identity: str, text: str | None = None) -> Path:
    rate, channels = FORMATS[identity]
    path = speech_dir / f"{identity}-{rate}-{channels}{'-' + str(abs(hash(text))) if text else ''}.wav"
    return path if path.exists() else espeak_wav(text or SENTENCES[identity], path, rate, channels)


async def publisher(server, room: str, identity: str) -> Publisher:
    rate, channels = FORMATS[identity]
    # Not listening to each other: the only subscriber of a microphone is the agent (wait_subscribed).
    return await Publisher(server, room, identity, sample_rate=rate, channels=channels,
                           auto_subscribe=False).connect()


def words_of(captions: list[Caption]) -> list[str]:
    """The words of final captions, in the order they were spoken (by their first word's time)."""
    finals = sorted((c for c in captions if c.final and c.text), key=lambda c: c.words[0][1])
    return [w[0] for c in finals for w in c.words]


def recordings(record_dir: Path, room: str, identity: str) -> list[Path]:
    """The worker's recordings of one speaker, in engine-stream order."""
    pattern = re.compile(rf"^{re.escape(room)}-{re.escape(identity)}-(\d+)(-\d+)?\.wav$")
    found = [(int(m.group(1)), p) for p in record_dir.glob("*.wav") if (m := pattern.match(p.name))]
    return [p for _, p in sorted(found)]


async def wait_reading(worker, before: float, more: int) -> None:
    """Until the worker reads `more` microphones than `before` (its `captions_microphones` gauge).
    A publisher hears of the agent's subscription before the agent's side has the track; under load
    that gap reached seconds, and a short utterance was over before the agent read it."""
    deadline = time.monotonic() + CAPTION_WAIT_S
    while metric_values(worker.metrics_port)["captions_microphones"] < before + more:
        assert time.monotonic() < deadline, f"the worker did not start reading {more} microphones"
        await asyncio.sleep(0.05)


async def microphones_read(worker) -> float:
    return await asyncio.to_thread(settled_metric, worker.metrics_port, "captions_microphones")


def segment_ids_on_disk(path: Path) -> set[str]:
    """Segment ids of the transcript's complete lines (the worker may be writing the next one)."""
    if not path.exists():
        return set()
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    return {json.loads(line)["segment_id"] for line in lines if line.strip()}


def transcribe(checkpoint: Path, wav: Path) -> list[str]:
    """`captions transcribe --json` of a file: the offline reference for the live captions."""
    captions = Path(sys.executable).parent / "captions"
    out = subprocess.run([str(captions), "transcribe", "--json", "--model", str(checkpoint), "--device", "cpu",
                          str(wav)], capture_output=True, text=True, timeout=180, check=True)
    return [w["text"] for w in json.loads(out.stdout)["words"]]


async def wait_for_finals_after_leaving(sub: Subscriber, identities: list[str], quiet_s: float = 2.0) -> None:
    """After speakers stopped, their flushed final captions arrive: wait until each of their segments
    is final and no caption came for `quiet_s` (a straggler would show up as a second final)."""
    def settled() -> bool:
        mine = [s for s in sub.by_segment().values() if s[0].sender in identities]
        return all(any(c.final for c in s) for s in mine) and time.time() - last_caption_at() >= quiet_s

    def last_caption_at() -> float:
        return max((c.received_at for c in sub.captions), default=0.0)

    try:
        await sub.wait_until(settled, CAPTION_WAIT_S, f"final captions of {identities}")
    except TimeoutError:
        open_segments = {k: [(c.sender, c.final, c.text) for c in v] for k, v in sub.by_segment().items()
                         if not any(c.final for c in v)}
        raise TimeoutError(f"segments never closed: {open_segments}") from None


@dataclass
class Conversation:
    room: str
    captions: list[Caption]
    tracks: dict[str, str]
    """identity -> microphone track sid"""
    started: float
    ended: float
    on_disk_when_received: dict[str, bool]
    """final caption's segment id -> whether the transcript file held it when the caption's stream
    reached the viewer"""


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def conversation(livekit_server, captions_worker, speech_dir) -> Conversation:
    """Three people (24 kHz mono, 48 kHz stereo, 16 kHz mono) speak at the same time, then leave."""
    room = "e2e-three-speakers"
    started = time.time()
    transcript = transcript_path(captions_worker.data_dir, room)
    on_disk_when_received: dict[str, bool] = {}

    def check_transcript(attributes: dict[str, str]) -> None:
        if attributes.get(ATTR_TRANSCRIPTION_FINAL) == "true":
            segment_id = attributes[ATTR_SEGMENT_ID]
            on_disk_when_received[segment_id] = segment_id in segment_ids_on_disk(transcript)

    sub = await Subscriber(livekit_server, room, on_caption_opened=check_transcript).connect()
    before = await microphones_read(captions_worker)
    speakers = {name: await publisher(livekit_server, room, name) for name in ("alice", "bob", "carol")}
    await sub.wait_for_agent()
    await wait_reading(captions_worker, before, 3)
    await asyncio.gather(*(p.wait_heard() for p in speakers.values()))  # the agent reads each microphone
    await asyncio.gather(*(p.play(speech(speech_dir, name)) for name, p in speakers.items()))
    await asyncio.gather(*(p.silence(1.0) for p in speakers.values()))
    tracks = {name: p.track_sid for name, p in speakers.items()}
    for p in speakers.values():
        await p.disconnect()
    await wait_for_finals_after_leaving(sub, list(speakers))
    await sub.disconnect()
    return Conversation(room, list(sub.captions), tracks, started, time.time(), on_disk_when_received)


async def test_three_simultaneous_speakers_are_each_captioned_with_their_identity_and_track(conversation):
    assert conversation.captions, "no caption at all"
    for name, track_sid in conversation.tracks.items():
        mine = [c for c in conversation.captions if c.sender == name]
        assert any(c.final and c.text for c in mine), f"{name} got no final caption"
        assert {c.track_id for c in mine} == {track_sid}, f"{name}'s captions name another track"
    assert {c.sender for c in conversation.captions} == set(conversation.tracks), "caption from a non-speaker"
    for segment_id, updates in _by_segment(conversation).items():
        assert len({(c.sender, c.track_id) for c in updates}) == 1, f"segment {segment_id} mixes speakers"


def _by_segment(conversation: Conversation) -> dict[str, list[Caption]]:
    segments: dict[str, list[Caption]] = {}
    for c in conversation.captions:
        segments.setdefault(c.segment_id, []).append(c)
    return segments


async def test_each_segment_gets_interim_updates_then_exactly_one_final(conversation):
    segments = _by_segment(conversation)
    assert any(sum(not c.final for c in updates) >= 2 for updates in segments.values()), \
        "no segment was shown growing before it was final"
    for segment_id, updates in segments.items():
        finals = [c for c in updates if c.final]
        assert len(finals) == 1, f"segment {segment_id} has {len(finals)} finals"
        assert updates[-1].final, f"segment {segment_id} got an interim update after its final"
        final_words = finals[0].text.split()
        for interim in updates[:-1]:
            # Each interim carries the full text so far: completed words, then the text in progress
            # (whose last word may still change). Up to that last word it agrees with the final
            # text, which may end earlier (a segment cut at its maximum length leaves the words in
            # progress to the next segment).
            settled = interim.text.split()[:-1]
            common = min(len(settled), len(final_words))
            assert settled[:common] == final_words[:common], (segment_id, interim.text, finals[0].text)


async def test_final_captions_carry_word_times_in_wall_clock(conversation):
    for c in conversation.captions:
        if c.final and c.text:
            assert [w[0] for w in c.words] == c.text.split()
            for _, start, end in c.words:
                assert conversation.started - 1 <= start <= end <= conversation.ended + 1


async def test_final_captions_equal_the_transcript_file(conversation, captions_worker):
    on_disk = read_transcript(transcript_path(captions_worker.data_dir, conversation.room))
    published = {c.segment_id: c for c in conversation.captions if c.final and c.text}
    assert {s.segment_id for s in on_disk} == set(published)
    for segment in on_disk:
        caption = published[segment.segment_id]
        assert (segment.text, segment.participant_identity, segment.track_id) == \
            (caption.text, caption.sender, caption.track_id)
        assert segment.words == caption.words


async def test_every_final_is_in_the_transcript_file_before_its_caption_arrives(conversation):
    finals = [c for c in conversation.captions if c.final and c.text]
    assert finals
    late = [c.segment_id for c in finals if not conversation.on_disk_when_received.get(c.segment_id)]
    assert not late, f"finals published before they were in the transcript file: {late}"


async def test_the_recorded_audio_is_what_each_speaker_sent(conversation, captions_worker, speech_dir):
    """The audio the engine consumed (--record-dir) against each bot's clip, converted to 24 kHz
    mono offline: the whole clip, once, at its speed and level, after the leading silence (so that
    live == offline below cannot hide an ingest fault present on both sides)."""
    for name in conversation.tracks:
        files = recordings(captions_worker.record_dir, conversation.room, name)
        assert len(files) == 1, f"{name}: expected one engine stream, got {files}"
        match = match_recording(read_audio_file(speech(speech_dir, name)), read_audio_file(files[0]))
        assert match.problems() == [], f"{name} ({FORMATS[name]}): {match}"


async def test_live_captions_equal_captions_transcribe_of_the_recorded_audio(
        conversation, captions_worker, tiny_checkpoint):
    for name in conversation.tracks:
        files = recordings(captions_worker.record_dir, conversation.room, name)
        assert len(files) == 1, f"{name}: expected one engine stream, got {files}"
        live = words_of([c for c in conversation.captions if c.sender == name])
        assert live, f"{name}: no live words"
        assert live == transcribe(tiny_checkpoint, files[0]), name


async def test_a_late_viewer_receives_the_backlog_from_the_viewer_server(conversation, captions_worker):
    """A viewer joining after everyone left gets the room's captions so far: the viewer server reads
    them from the worker's transcript file, for the room its signed link names (and no other)."""
    from aiohttp.test_utils import TestClient, TestServer

    from captions.viewer.links import make_link
    from captions.viewer.server import WebSettings, create_app

    expected = read_transcript(transcript_path(captions_worker.data_dir, conversation.room))
    assert expected, "the conversation left no transcript"
    settings = WebSettings(livekit_url="ws://unused", api_key="key", api_secret="secret",
                           viewer_secret="viewer-secret", data_dir=captions_worker.data_dir)
    async with TestClient(TestServer(create_app(settings))) as client:
        link = {"link": make_link("viewer-secret", conversation.room, 600)}
        response = await client.get("/api/backlog", params=link)
        assert response.status == 200
        assert [FinalSegment(**s) for s in (await response.json())["segments"]] == expected
        other = {"link": make_link("another-deployment", conversation.room, 600)}
        assert (await client.get("/api/backlog", params=other)).status == 403


CUT_S = 2.0
"""Where Alice leaves and Bob mutes, into their sentences."""
STREAM_END_SLACK_S = 0.5
"""An engine stream ends when its speaker leaves or mutes: the clip's trailing silence (0.47 s for
Bob's) need not be in it, nor the last 10s of ms a bot that leaves at once never sent (70 ms seen).
Speech lost beyond the jitter's 0.2 s still fails (tests/audio_match.py)."""


async def test_leave_mute_and_rejoin_mid_sentence_lose_no_word(
        livekit_server, captions_worker, speech_dir, tiny_checkpoint):
    """Alice leaves mid-sentence and comes back; Bob mutes mid-sentence and unmutes. The engine
    consumed exactly the audio each bot sent (the first two seconds of the sentence, then all of
    it: nothing lost at the leave, the mute, the unmute or the rejoin), and every word the engine
    produced from it reaches the captions (flush on stop)."""
    room = "e2e-leave-mute-rejoin"
    sub = await Subscriber(livekit_server, room).connect()
    before = await microphones_read(captions_worker)
    alice, bob = await publisher(livekit_server, room, "alice"), await publisher(livekit_server, room, "bob")
    await sub.wait_for_agent()
    await wait_reading(captions_worker, before, 2)
    bob_first_track = bob.track_sid
    await asyncio.gather(alice.play(speech(speech_dir, "alice"), stop_after_s=CUT_S),
                         bob.play(speech(speech_dir, "bob"), stop_after_s=CUT_S))
    await alice.disconnect()  # mid-sentence, no trailing silence
    bob.mute()
    await wait_for_finals_after_leaving(sub, ["alice", "bob"])
    assert sub.finals("alice") and sub.finals("bob"), "a speaker who stopped got no final caption"

    alice = await publisher(livekit_server, room, "alice")
    bob.unmute()
    await wait_reading(captions_worker, before, 2)
    # An unmuted track has no new subscription to wait for: a second of silence before speaking, as
    # people do; the speech's start is kept whatever the agent's delay (the pre-roll).
    await asyncio.gather(alice.silence(1.0), bob.silence(1.0))
    await asyncio.gather(alice.play(speech(speech_dir, "alice")), bob.play(speech(speech_dir, "bob")))
    await alice.disconnect()
    await bob.disconnect()
    await wait_for_finals_after_leaving(sub, ["alice", "bob"])
    await sub.disconnect()

    assert {c.track_id for c in sub.captions if c.sender == "bob"} == {bob_first_track}, \
        "an unmuted track keeps its track id"
    for name in ("alice", "bob"):
        files = recordings(captions_worker.record_dir, room, name)
        assert len(files) == 2, f"{name}: one engine stream before and one after, got {files}"
        # What the bot sent (its clip at 24 kHz mono): the sentence cut where it left or muted, then
        # the whole sentence. Each engine stream holds its part, whole and once (tests/audio_match.py).
        clip = read_audio_file(speech(speech_dir, name))
        for sent, recorded in zip((clip[: int(CUT_S * SAMPLE_RATE)], clip), files):
            match = match_recording(sent, read_audio_file(recorded), cut_short_s=STREAM_END_SLACK_S)
            assert match.problems() == [], f"{name}: {recorded.name} is not the audio the bot sent: {match}"
        offline = [w for f in files for w in transcribe(tiny_checkpoint, f)]
        assert words_of([c for c in sub.captions if c.sender == name]) == offline, name


@contextlib.asynccontextmanager
async def own_server(tmp_path: Path):
    """A livekit-server of the test's own, with no worker registered (the session's worker, on the
    session's server, joins every new room there)."""
    server = await asyncio.to_thread(start_livekit_server, tmp_path / "livekit-server.log")
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


@contextlib.asynccontextmanager
async def own_server_and_worker(checkpoint: Path, tmp_path: Path, batch_size: int = 3,
                                extra_args: tuple[str, ...] = ()):
    """A livekit-server and a fresh worker of the test's own (with the session's worker registered
    too, LiveKit would share the test's rooms between the two workers)."""
    async with own_server(tmp_path) as server:
        worker = await asyncio.to_thread(start_captions_worker, server, checkpoint, tmp_path / "worker", batch_size,
                                         extra_args)
        try:
            yield server, worker
        finally:
            await asyncio.to_thread(worker.stop)


async def test_rooms_opened_at_once_on_a_fresh_worker_all_get_captions_and_share_each_step(
        tiny_checkpoint, speech_dir, tmp_path):
    """Two rooms open at the same moment on a worker that has served none yet (as after a deploy):
    both get the agent. Then three people in them, who joined at different moments, talk at once:
    the engine advances all three in each step (the shared frame clock) instead of one step per
    speaker, read from the worker's /metrics as an operator would."""
    rooms = {"alice": "e2e-clock-a", "bob": "e2e-clock-a", "carol": "e2e-clock-b"}
    async with own_server_and_worker(tiny_checkpoint, tmp_path) as (livekit_server, worker):
        subs = await asyncio.gather(*(Subscriber(livekit_server, room).connect()
                                      for room in sorted(set(rooms.values()))))
        speakers = {}
        for name, room in rooms.items():
            speakers[name] = await publisher(livekit_server, room, name)
            await asyncio.sleep(0.37)  # joins at another phase of the 80 ms frame
        await asyncio.gather(*(sub.wait_for_agent() for sub in subs))
        await asyncio.gather(*(p.wait_subscribed() for p in speakers.values()))

        async def talk(p: Publisher, name: str) -> None:
            await p.play(speech(speech_dir, name))
            await p.silence(4.0)  # keeps streaming: the window below is inside everyone's audio

        talking = asyncio.gather(*(talk(p, name) for name, p in speakers.items()))
        await asyncio.sleep(1.0)  # a measuring window inside everyone's speech, not a synchronisation
        before, started = engine_counters(worker.metrics_port), time.time()
        await asyncio.sleep(2.5)
        activity = engine_activity(before, engine_counters(worker.metrics_port), time.time() - started)
        await talking
        for p in speakers.values():
            await p.disconnect()
        for sub in subs:
            await sub.disconnect()
    assert activity["steps"] >= 10, activity
    # Unaligned (`--unaligned-frames`), three speakers at three phases averaged about 1 per step.
    assert activity["streams_per_step"] >= 2.5, activity


async def test_more_talkers_than_slots_wait_visibly_then_every_word_is_captioned(
        livekit_server, captions_worker, speech_dir, tiny_checkpoint):
    """The worker has 3 slots, taken by three people talking. A fourth starts talking: he waits
    (shown in the agent's attributes), his audio is kept, and once someone stops, everything he said
    is captioned (the engine catches up), then the rest live: not a word lost."""
    room = "e2e-queue"
    sub = await Subscriber(livekit_server, room).connect()
    first = {name: await publisher(livekit_server, room, name) for name in ("alice", "bob", "carol")}
    agent = await sub.wait_for_agent()
    await asyncio.gather(*(p.wait_subscribed() for p in first.values()))
    talking = {name: asyncio.create_task(p.talk(speech(speech_dir, name))) for name, p in first.items()}
    dave = await publisher(livekit_server, room, "dave")
    await dave.wait_heard()
    said = asyncio.create_task(dave.play(speech(speech_dir, "dave")))
    await sub.wait_until(lambda: agent.attributes.get(ATTR_AGENT_QUEUED) == '["dave"]', CAPTION_WAIT_S,
                         "dave shown as waiting")
    assert agent.attributes[ATTR_AGENT_STATUS] == "waiting"
    assert not [c for c in sub.captions if c.sender == "dave"], "dave has no slot yet"
    await asyncio.sleep(1.5)  # dave talks while he waits: that part must not be lost
    talking["alice"].cancel()
    await first["alice"].disconnect()  # frees a slot (after the flush)
    await said
    await dave.silence(1.0)
    await sub.wait_until(lambda: agent.attributes.get(ATTR_AGENT_QUEUED) == "[]", CAPTION_WAIT_S,
                         "the queue to empty")
    for name in ("bob", "carol"):
        talking[name].cancel()
    for p in [dave, first["bob"], first["carol"]]:
        await p.disconnect()
    await wait_for_finals_after_leaving(sub, ["dave"])
    await sub.disconnect()
    files = recordings(captions_worker.record_dir, room, "dave")
    assert len(files) == 1, f"dave: one turn, got {files}"
    clip = read_audio_file(speech(speech_dir, "dave"))
    match = match_recording(clip, read_audio_file(files[0]))
    assert match.problems() == [], f"dave's turn is not his whole sentence: {match}"
    assert words_of(sub.finals("dave")) == transcribe(tiny_checkpoint, files[0]), "every word, once"


async def test_a_room_opened_while_every_slot_is_taken_still_gets_the_agent(tiny_checkpoint, tmp_path, speech_dir):
    """A worker with one slot, taken by a speaker talking in one room for longer than the worker's
    load report interval (2.5 s). A room opened then still gets the agent, which shows its speaker
    waiting (livekit-server dispatches a room only when it is created, and not to a worker reporting a
    load at or above its target load)."""
    async with own_server_and_worker(tiny_checkpoint, tmp_path, batch_size=1) as (server, worker):
        first_room = await Subscriber(server, "e2e-full-a").connect()
        alice = await publisher(server, "e2e-full-a", "alice")
        await first_room.wait_for_agent()
        await alice.wait_subscribed()
        talking = asyncio.create_task(alice.talk(speech(speech_dir, "alice")))
        await first_room.wait_until(lambda: len(captions_worker_streams(worker, "e2e-full-a")) == 1,
                                    CAPTION_WAIT_S, "alice in the only slot")
        await asyncio.sleep(3.5)  # the worker has reported its load with every slot taken
        second_room = await Subscriber(server, "e2e-full-b").connect()
        bob = await publisher(server, "e2e-full-b", "bob")
        agent = await second_room.wait_for_agent()
        await bob.wait_subscribed()
        bob_talks = asyncio.create_task(bob.talk(speech(speech_dir, "bob")))
        await second_room.wait_until(lambda: agent.attributes.get(ATTR_AGENT_QUEUED) == '["bob"]',
                                     CAPTION_WAIT_S, "bob shown as waiting")
        for task in (talking, bob_talks):
            task.cancel()
        for participant in (alice, bob, first_room, second_room):
            await participant.disconnect()


async def test_a_talk_spurt_gets_its_first_word_whole_and_silence_gives_the_slot_back(
        tiny_checkpoint, tmp_path, speech_dir):
    """One slot. Alice's speech starts abruptly after digital silence (no lead-in in the clip): her
    engine stream still holds the whole clip with silence before it (the pre-roll), so its first
    word is not clipped. Then she stays connected and unmuted but silent: after the release delay
    her slot is free (read from /metrics) and Bob, who talks next, is captioned without waiting."""
    abrupt = speech_dir / "alice-abrupt.wav"
    await asyncio.to_thread(subprocess.run, ["sox", str(speech(speech_dir, "alice")), str(abrupt),
                                             "silence", "1", "0.005", "0.5%"], check=True)
    release_after = 1.5
    async with own_server_and_worker(tiny_checkpoint, tmp_path, batch_size=1,
                                     extra_args=("--release-after", str(release_after))) as (server, worker):
        room = "e2e-gate"
        sub = await Subscriber(server, room).connect()
        alice, bob = await publisher(server, room, "alice"), await publisher(server, room, "bob")
        agent = await sub.wait_for_agent()
        await asyncio.gather(alice.wait_subscribed(), bob.wait_subscribed())
        await alice.silence(1.0)
        await alice.play(abrupt)
        await alice.silence(release_after + 1.5)  # still there, microphone open, not talking
        await sub.wait_until(lambda: sub.finals("alice"), CAPTION_WAIT_S, "alice's captions")
        assert metric_values(worker.metrics_port)["captions_streams"] == 0, \
            "a silent participant still holds an engine slot"
        await bob.play(speech(speech_dir, "bob"))
        await bob.silence(1.0)
        await sub.wait_until(lambda: sub.finals("bob"), CAPTION_WAIT_S, "bob's captions")
        assert all(status.get(ATTR_AGENT_QUEUED, "[]") == "[]" for who, status in sub.statuses
                   if who == agent.identity), "bob had to wait although alice was silent"
        for p in (alice, bob, sub):
            await p.disconnect()
    files = recordings(worker.record_dir, room, "alice")
    assert len(files) == 1, f"alice: one turn, got {files}"
    match = match_recording(read_audio_file(abrupt), read_audio_file(files[0]))
    assert match.problems() == [], f"alice's turn is not her whole sentence: {match}"
    assert match.offset_s >= 0.25, f"the turn starts {match.offset_s:.2f} s before her first word: no pre-roll"


def captions_worker_streams(worker, room: str) -> list[Path]:
    """Engine streams opened in `room` so far (one recording each)."""
    return list(worker.record_dir.glob(f"{room}-*.wav"))



async def _start_captions_up(checkpoint: Path, tmp_path: Path):
    """`captions up` as a user starts it; returns (process, output file, LiveKit port, web port,
    the printed viewer link) once the link is printed."""
    livekit_port, web_port = free_port_triple(), free_port()
    out_path = tmp_path / "up.out"
    command = [str(Path(sys.executable).parent / "captions"), "up", "--model", str(checkpoint),
               "--device", "cpu", "--batch-size", "2", "--data-dir", str(tmp_path / "data"),
               "--livekit-port", str(livekit_port), "--web-port", str(web_port), "--room", "up-room",
               "--receivers", "1"]  # the same shape on any machine (auto: from its cores)
    up = _start_logged(command, out_path)
    link = None
    deadline = time.monotonic() + 120
    while link is None and time.monotonic() < deadline and up.poll() is None:
        match = re.search(r"Open the captions of room 'up-room':\s+(\S+)", out_path.read_text(errors="replace"))
        link = match.group(1) if match else None
        await asyncio.sleep(0.2)
    if link is None:
        up.kill()
    assert link, f"no viewer link printed:\n{out_path.read_text(errors='replace')[-3000:]}"
    return up, out_path, livekit_port, web_port, link


def _assert_all_stopped(livekit_port: int, web_port: int) -> None:
    import socket

    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", livekit_port)) != 0, "livekit-server still running"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", web_port)) != 0, "viewer still running"


async def test_captions_up_runs_server_worker_and_viewer_and_ctrl_c_stops_all(tiny_checkpoint, tmp_path,
                                                                               speech_dir):
    """`captions up` with a local checkpoint: the printed viewer link works, a speaker in the room
    is captioned, and one Ctrl-C stops the whole process tree with status 0."""
    import urllib.request

    from tests.conftest import LiveKitServer

    up, out_path, livekit_port, web_port, link = await _start_captions_up(tiny_checkpoint, tmp_path)
    try:
        assert (await asyncio.to_thread(urllib.request.urlopen, link, timeout=5)).status == 200

        server = LiveKitServer(f"ws://127.0.0.1:{livekit_port}", "", "devkey", "secret", up)
        sub = await Subscriber(server, "up-room").connect()
        alice = await publisher(server, "up-room", "alice")
        await sub.wait_for_agent(timeout=120)
        await asyncio.wait_for(alice.publication.wait_for_subscription(), CAPTION_WAIT_S)  # by the agent
        await alice.play(speech(speech_dir, "alice"))
        await alice.disconnect()
        await sub.wait_until(lambda: sub.finals("alice"), CAPTION_WAIT_S, "alice's captions")
        await sub.disconnect()
    finally:
        if up.poll() is None:
            up.send_signal(2)
        status = up.wait(timeout=90)
    assert status == 0, out_path.read_text(errors="replace")[-3000:]
    _assert_all_stopped(livekit_port, web_port)


async def test_captions_up_stops_everything_on_sigterm(tiny_checkpoint, tmp_path):
    """A service manager's SIGTERM stops the whole tree too (the children run in their own
    sessions: without this they would outlive `captions up`)."""
    up, out_path, livekit_port, web_port, _ = await _start_captions_up(tiny_checkpoint, tmp_path)
    up.send_signal(signal.SIGTERM)
    assert up.wait(timeout=90) == 0, out_path.read_text(errors="replace")[-3000:]
    _assert_all_stopped(livekit_port, web_port)


def _start_logged(command: list[str], out_path: Path) -> subprocess.Popen:
    with open(out_path, "wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("scenario", ["SIMULATE_SIGNAL_RECONNECT", "SIMULATE_FULL_RECONNECT"])
async def test_captions_resume_after_the_agent_reconnects(speech_dir, tmp_path, caplog, scenario):
    """The agent's connection drops (LiveKit's own reconnection scenarios, forced on the agent's
    room) and comes back: the speaker goes on being captioned, and no word is lost or repeated. The
    room logic runs in this process, with tests/fake_engine.py as the engine (the worker subprocess
    cannot be told to drop), on a server of its own: the only agent in the room is the one under
    test, and every caption must be a word the fake engine made of the audio this agent received.
    No room event handler may fail along the way (they are the room's only view of the speakers)."""
    from livekit import rtc

    from captions.dev.bots import make_token
    from captions.live.room import RoomCaptioner, RoomOptions
    from captions.live.slots import SlotQueue
    from tests.fake_engine import FakeEngine, fake_words

    room_name, agent_identity = "e2e-reconnect", "captions-agent-under-test"
    engine = FakeEngine(batch_size=2)
    slots = SlotQueue(engine)
    connection: dict[str, float] = {}
    """First time each connection event of the agent's room happened."""
    agent_room = rtc.Room()
    for event in ("reconnecting", "reconnected", "disconnected"):
        agent_room.on(event, lambda *_, event=event: connection.setdefault(event, time.time()))

    def received_since_reconnection() -> int:
        """Samples of alice's microphone this agent received since it reconnected."""
        return sum(s.track.end - received_at_reconnection.get(s, 0) for s in captioner.speakers())

    async with own_server(tmp_path) as server:
        await agent_room.connect(server.url, make_token(server, room_name, agent_identity, agent=True))
        captioner = RoomCaptioner(agent_room, slots, RoomOptions(tmp_path / "data"))
        await captioner.start()
        sub = await Subscriber(server, room_name).connect()
        alice = await publisher(server, room_name, "alice")
        try:
            assert (await sub.wait_for_agent()).identity == agent_identity
            await alice.wait_subscribed()
            await alice.play(speech(speech_dir, "alice"), stop_after_s=2.0)
            await alice.silence(1.5)
            await sub.wait_until(lambda: sub.finals("alice"), CAPTION_WAIT_S, "captions before the drop")
            speakers_before = captioner.speakers()

            await agent_room.simulate_scenario(getattr(rtc.SimulateScenarioKind, scenario))
            await sub.wait_until(lambda: "reconnected" in connection, CAPTION_WAIT_S, "the agent to reconnect")
            received_at_reconnection = {s: s.track.end for s in captioner.speakers()}
            assert connection["reconnecting"] <= connection["reconnected"], connection
            await sub.wait_until(lambda: received_since_reconnection() >= SAMPLE_RATE // 10, CAPTION_WAIT_S,
                                 "alice's audio reaching the agent after the reconnection")
            await alice.play(speech(speech_dir, "alice"))
            await alice.silence(1.5)
            resumed_at = connection["reconnected"]
            await sub.wait_until(lambda: any(c.words and c.words[0][1] >= resumed_at for c in sub.finals("alice")),
                                 CAPTION_WAIT_S, "captions of speech after the agent reconnected")
            speakers_after = captioner.speakers()
        finally:
            await alice.disconnect()
            await sub.disconnect()
            await captioner.aclose()
            await agent_room.disconnect()
            slots.close()

    failures = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.exc_info]
    assert not failures, f"exceptions in the room's handlers: {failures}"
    assert "disconnected" not in connection or connection["disconnected"] > resumed_at, \
        "the agent's room gave up instead of reconnecting"
    if scenario == "SIMULATE_SIGNAL_RECONNECT":
        # A resume keeps the media connection: the same subscription carries on.
        assert speakers_after == speakers_before, "a signal reconnection restarted alice's microphone"
    else:
        # A full reconnection rebuilds the media connection: the track is subscribed anew.
        assert not set(speakers_after) & set(speakers_before), "no new subscription after a full reconnection"
    made = [w for stream in engine.opened for w in fake_words(np.concatenate(stream.pushed))]
    captioned = [w[0] for c in sub.finals("alice") for w in c.words]
    assert captioned == made, "the captions are not the words this agent's engine made of alice's audio"
