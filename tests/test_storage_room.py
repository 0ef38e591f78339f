"""End to end (the real worker, a real livekit-server): a room is captioned whatever its name, and a
room whose transcript cannot be written is still captioned live and says so (issue 23)."""

from __future__ import annotations

import asyncio
import time

import pytest

from captions.dev.bots import Publisher, Subscriber
from captions.dev.worker_process import metric_values, settled_metric
from captions.live.transcripts import PROBLEM_TRANSCRIPT_UNAVAILABLE, read_transcript, transcript_path
from captions.protocol import ATTR_AGENT_PROBLEM
from tests.conftest import espeak_wav

pytestmark = [pytest.mark.livekit, pytest.mark.timeout(300), pytest.mark.asyncio(loop_scope="session")]

WAIT_S = 30


async def alice_speaks(livekit_server, captions_worker, speech_dir, room: str) -> Subscriber:
    """A viewer joins `room`, alice says a sentence and leaves; returns the viewer (still connected)
    once alice's final caption arrived."""
    sub = await Subscriber(livekit_server, room).connect()
    before = await asyncio.to_thread(settled_metric, captions_worker.metrics_port, "captions_microphones")
    alice = await Publisher(livekit_server, room, "alice", sample_rate=24000, channels=1,
                            auto_subscribe=False).connect()
    await sub.wait_for_agent()  # a room whose job died never gets one
    deadline = time.monotonic() + WAIT_S
    while metric_values(captions_worker.metrics_port)["captions_microphones"] < before + 1:
        assert time.monotonic() < deadline, "the worker never read alice's microphone"
        await asyncio.sleep(0.05)
    await alice.wait_heard()
    wav = speech_dir / "storage-alice.wav"
    await alice.play(wav if wav.exists() else espeak_wav("The quick brown fox jumps over the lazy dog.", wav,
                                                          24000, 1))
    await alice.silence(1.0)
    await alice.disconnect()
    await sub.wait_until(lambda: sub.finals("alice"), WAIT_S, "alice's final caption")
    return sub


async def test_a_room_named_with_42_cjk_characters_is_captioned_with_a_transcript(livekit_server, captions_worker,
                                                                                   speech_dir):
    # Escaped, the name is 378 bytes: the job used to die opening its transcript (ENAMETOOLONG) and be
    # dispatched again forever; the test worker's recordings (--record-dir) had the same problem.
    room = "\u56fd\u9645\u4f1a\u8bae" * 10 + "\u5ba4\u4e00"
    sub = await alice_speaks(livekit_server, captions_worker, speech_dir, room)
    try:
        assert sub.agent().attributes.get(ATTR_AGENT_PROBLEM, "") == "", "its transcript is writable"
        written = [s.segment_id for s in read_transcript(transcript_path(captions_worker.data_dir, room))]
        assert [c.segment_id for c in sub.finals("alice")] == written, "the live finals are the transcript's"
    finally:
        await sub.disconnect()


async def test_a_room_whose_transcript_cannot_be_written_is_captioned_live_and_says_so(
        livekit_server, captions_worker, speech_dir):
    room = "storage-unwritable"
    path = transcript_path(captions_worker.data_dir, room)
    path.mkdir(parents=True)  # a directory where the file should be: every open fails (EISDIR)
    sub = await alice_speaks(livekit_server, captions_worker, speech_dir, room)
    try:
        finals = [c for c in sub.finals("alice") if c.text]
        assert finals, "live captions go on without a transcript"
        await sub.wait_until(lambda: sub.agent().attributes.get(ATTR_AGENT_PROBLEM) == PROBLEM_TRANSCRIPT_UNAVAILABLE,
                             WAIT_S, "the agent saying its transcript is unavailable")
        # The rooms' metrics reach /metrics from the receiving processes about once a second.
        await sub.wait_until(lambda: metric_values(captions_worker.metrics_port)[
            "captions_transcript_unsaved_segments_total"] >= len(finals), 5, "each lost final counted")
        assert metric_values(captions_worker.metrics_port)["captions_transcript_unavailable"] >= 1, "the alert is raised"
        log = captions_worker.log_path.read_text(errors="replace")
        assert log.count(f"transcript {path} cannot be written") == 1, "reported once, not in a loop"
        for caption in finals:
            assert f"final segment {caption.segment_id} of alice" in log, "each unsaved final is named"
        assert "Traceback" not in log.split(f"transcript {path} cannot be written")[1], "no crash after it"
    finally:
        await sub.disconnect()
