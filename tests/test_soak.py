"""A worker serves room after room without keeping anything of them (issue 16): `captions bench soak`
with a few dozen rooms through a real livekit-server and the real worker, then what the worker still
holds once they all ended, against what it held when idle after the warm-up rooms.

Each check is a leak a busy deployment would feel: per-room objects (RoomCaptioner, Speaker,
Segmenter, TranscriptStore, rtc.Room, AudioStream, JobContext...), livekit FFI handles, transcript
files left open, descriptors, threads (libwebrtc's threads stay while any native room is alive),
and the C heap (a native room kept per room is about 0.5 MB). Figures, not timings: no speed here.
"""

from __future__ import annotations

import json

import pytest

from tests.test_bench import captions

pytestmark = [pytest.mark.livekit, pytest.mark.slow]

ROOMS = 20
"""Rooms measured after the 5 warm-up rooms, 4 at a time."""
MB_PER_ROOM = 0.1
"""Issue 16's target is an RSS slope of 0.05 MB per room over 500 rooms; over 20 rooms the
allocator's noise is larger, so each bound is 0.1 MB per room, 2 MB in all. Measured without a leak
(README "Soak", bench/soak-*.json, and a 25-room run here): the C heap in use ends 0.2 to 0.5 MB above
idle (150 to 500 rooms; 0.17 MB after 20), and RSS after `malloc_trim` 2 to 10 MB *below* idle (idle
holds free arena pages). A leak of 0.24 MB per room (half a native room: what the previous bound of
0.25 let pass) adds 4.8 MB in use over 20 rooms and fails the C heap's bound; the RSS bound is the
backstop for memory outside glibc's heap (pymalloc arenas, mmapped blocks)."""
RSS_MB_PER_ROOM = 0.25
"""RSS after `malloc_trim` is noisier than the heap (a likely source, not confirmed: 20 rooms run up to
about 430 threads, and glibc keeps freed thread stacks in a cache of up to 40 MB outside the heap,
which `malloc_trim` does not touch, so what stays resident depends on which were kept). Measured on CI's machine
with the same code: 1.6 MB below idle in one run, 2.1 MB above in the next (heap in use +0.15 MB
both times). The RSS bound stays a backstop for a leak outside glibc's heap of a quarter of a
native room or more per room; the heap's bound (MB_PER_ROOM) is the tight one."""
PYTHON_OBJECTS_PER_ROOM = 20
"""One room's objects number in the thousands; noise (caches, interned strings) in the tens in all."""
EXTRA_THREADS_OR_FDS = ROOMS // 2
"""Fewer than one more thread or descriptor for every second room: a thread or a file kept per room
fails; what the process creates once and keeps does not (Python's default executor grows to its
bound, tokio's blocking pool keeps idle threads for a while, and libwebrtc's factory, 5 threads and
3 descriptors, lives while any native room does: a room the SDK itself failed to free now and then
under bursts of rooms, README "Soak")."""


@pytest.fixture(scope="module")
def soak(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-soak")
    result = captions("bench", "soak", "--scenarios", "rooms", "--rooms", str(ROOMS + 5), "--parallel", "4",
                      "--sample-every", "5", "--model", str(tiny_checkpoint), "--workdir", str(out / "work"),
                      "--json", str(out / "soak.json"), "--plot", str(out / "soak.png"), timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    [rooms] = json.loads((out / "soak.json").read_text())["scenarios"]
    return rooms, out, result.stdout


def test_every_room_gets_the_agent_and_is_sampled(soak):
    rooms, out, stdout = soak
    # Every speaker was captioned in an engine stream. (Whether the listener got the final is not
    # this test's business: the tiny model now and then hears no word in the short sentence, and a
    # final sent on behalf of a speaker who has just left can be cut by the server.)
    assert rooms["units"] == rooms["engine_streams"] == ROOMS + 5, rooms
    assert rooms["captioned"] == rooms["units"], f"only {rooms['captioned']} of {rooms['units']} rooms were captioned"
    assert rooms["room_start_s"]["rooms"] == rooms["units"], "every room's captioner says when it started listening"
    assert [s["units"] for s in rooms["samples"]] == [5, 10, 15, 20, 25]
    assert rooms["targets"]["rooms_at_least_500"] is False and rooms["targets"]["rss_slope_met"] is False
    assert (out / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"| rooms | {ROOMS + 5} rooms | {rooms['captioned']} |" in stdout


def test_no_room_object_ffi_handle_or_open_transcript_outlives_its_room(soak):
    rooms, *_ = soak
    idle, after = rooms["idle"], rooms["after"]
    assert after["room_objects"] == 0, f"objects of ended rooms are still alive: {after}"
    assert after["ffi_handles"] == idle["ffi_handles"] == 0, f"livekit FFI handles left: {after['ffi_handles']}"
    assert after["ffi_subscribers"] == idle["ffi_subscribers"], "FFI event subscribers left behind"
    assert after["open_transcripts"] == 0, f"{after['open_transcripts']} transcript files left open"
    growth = (after["python_objects"] - idle["python_objects"]) / ROOMS
    assert growth < PYTHON_OBJECTS_PER_ROOM, f"{growth:.0f} more Python objects per room"


def test_descriptors_threads_and_native_memory_come_back(soak):
    rooms, *_ = soak
    idle, after = rooms["idle"], rooms["after"]
    assert after["fds"] - idle["fds"] < EXTRA_THREADS_OR_FDS, (
        f"file descriptors: {idle['fds']} idle, {after['fds']} after {ROOMS} rooms")
    assert after["threads"] - idle["threads"] < EXTRA_THREADS_OR_FDS, (
        f"threads: {idle['threads']} idle, {after['threads']} after {ROOMS} rooms: {rooms['thread_names']}")
    growth = after["heap_in_use_mb"] - idle["heap_in_use_mb"]
    assert growth < ROOMS * MB_PER_ROOM, (
        f"the C heap in use grew by {growth:.2f} MB over {ROOMS} rooms ({growth / ROOMS:.3f} MB per room)")


def test_resident_memory_comes_back(soak):
    """RSS once the rooms are over and the allocator gave back its free pages (`after_trim`),
    against the idle worker: at most RSS_MB_PER_ROOM per room more."""
    rooms, *_ = soak
    idle, trimmed = rooms["idle"], rooms["after_trim"]
    growth = trimmed["rss_mb"] - idle["rss_mb"]
    assert growth < ROOMS * RSS_MB_PER_ROOM, (
        f"RSS {idle['rss_mb']:.1f} MB idle, {trimmed['rss_mb']:.1f} MB after {ROOMS} rooms and malloc_trim "
        f"({growth / ROOMS:.3f} MB per room)")


def test_speakers_who_leave_as_their_room_ends_still_reach_the_transcript(soak):
    """The bots delete each room as soon as its listener has a final caption, often while the
    speaker who just left is still being flushed: the room waits for those last words too."""
    rooms, out, _ = soak
    assert rooms["engine_stream_ends_lost"] == 0, (
        f"{rooms['engine_stream_ends_lost']} speakers' last words were lost: their room ended before their "
        "engine stream did")
    transcripts = sorted((out / "work" / "rooms" / "worker" / "data").glob("*.jsonl"))
    assert len(transcripts) == ROOMS + 5, "every room has its transcript file"
