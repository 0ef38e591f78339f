"""The transcript file, the late viewers' backlog read from it, and retention."""

from __future__ import annotations

import os
import time
import urllib.parse
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from captions.live.transcripts import (
    NAME_MAX,
    TranscriptStore,
    read_transcript,
    recent_segments,
    remove_expired,
    transcript_path,
)
from captions.protocol import FinalSegment


def segment(n: int, end: float | None = None) -> FinalSegment:
    end = time.time() if end is None else end
    return FinalSegment(f"SG_{n}", "alice", "Alice <b>", "TR_1", f"words {n} <script>", end - 1, end,
                        [["words", end - 1, end - 0.5], [str(n), end - 0.5, end]])


def test_segments_are_appended_and_read_back_in_order(tmp_path):
    store = TranscriptStore(tmp_path / "room.jsonl")
    for n in range(3):
        store.append(segment(n))
    store.close()
    assert [s.segment_id for s in read_transcript(tmp_path / "room.jsonl")] == ["SG_0", "SG_1", "SG_2"]


def test_a_segment_is_on_disk_as_soon_as_append_returns(tmp_path):
    store = TranscriptStore(tmp_path / "room.jsonl")
    written = segment(1)
    store.append(written)
    # Read through a separate handle without closing the store: nothing waits in a buffer.
    assert read_transcript(tmp_path / "room.jsonl") == [segment_like(written)]


def segment_like(s: FinalSegment) -> FinalSegment:
    return FinalSegment.from_json(s.to_json())


def test_the_backlog_is_the_recent_segments_and_the_file_keeps_everything(tmp_path):
    store = TranscriptStore(tmp_path / "room.jsonl")
    now = time.time()
    store.append(segment(0, end=now - 31 * 60))
    store.append(segment(1, end=now - 29 * 60))
    store.append(segment(2, end=now))
    store.close()
    assert [s.segment_id for s in recent_segments(tmp_path / "room.jsonl", window_s=30 * 60)] == ["SG_1", "SG_2"]
    assert [s.segment_id for s in recent_segments(tmp_path / "room.jsonl", limit=1)] == ["SG_2"]
    assert len(read_transcript(tmp_path / "room.jsonl")) == 3, "the file keeps everything"
    assert recent_segments(tmp_path / "no-such-room.jsonl") == []


def test_a_worker_taking_a_room_over_continues_the_file_after_a_half_written_line(tmp_path):
    path = tmp_path / "room.jsonl"
    first = TranscriptStore(path)
    first.append(segment(0))
    first.close()
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"segment_id": "half a li')  # the previous worker died mid-write
    second = TranscriptStore(path)
    second.append(segment(1))
    second.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert FinalSegment.from_json(lines[-1]).segment_id == "SG_1", "the new record is not glued to the broken one"
    assert [s.segment_id for s in recent_segments(path)] == ["SG_0", "SG_1"], "the broken line is skipped"


def test_retention_removes_old_transcripts_and_recordings_only(tmp_path):
    old, fresh, other = tmp_path / "old.jsonl", tmp_path / "fresh.jsonl", tmp_path / "notes.txt"
    recording = tmp_path / "old-room-alice-1.wav"
    for path in (old, fresh, other, recording):
        path.write_text("x")
    ten_days_ago = time.time() - 10 * 86400
    for path in (old, other, recording):
        os.utime(path, (ten_days_ago, ten_days_ago))
    removed = remove_expired(tmp_path, max_age_s=7 * 86400)
    assert sorted(removed) == sorted([old, recording])
    assert fresh.exists() and other.exists()


def test_room_names_cannot_escape_the_data_dir(tmp_path):
    for name in ["../evil", "a/b", "..", ".hidden", "", "caf\u00e9 room"]:
        path = transcript_path(tmp_path, name)
        assert path.parent == tmp_path, name
        assert not path.name.startswith(".")
    assert transcript_path(tmp_path, "demo-room_1").name == "demo-room_1.jsonl"
    assert transcript_path(tmp_path, "a/b") != transcript_path(tmp_path, "a_b")


# LiveKit accepts room names of up to 256 characters, any Unicode but control characters. Lengths are
# drawn uniformly: left to itself, hypothesis rarely tries the long names that used to fail.
room_names = st.integers(1, 256).flatmap(
    lambda n: st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=n, max_size=n))


@given(st.lists(room_names, min_size=2, max_size=5, unique=True))
def test_any_room_name_gets_its_own_file_that_the_file_system_accepts(names):
    data_dir = Path("/srv/captions/transcripts")
    paths = [transcript_path(data_dir, name) for name in names]
    for name, path in zip(names, paths, strict=True):
        assert len(path.name.encode("utf-8")) <= NAME_MAX, name
        assert path.parent == data_dir and not path.name.startswith("."), name
        assert path.suffix == ".jsonl"
    assert len(set(paths)) == len(paths), "two rooms would share one transcript"


def test_a_room_named_with_42_cjk_characters_is_written_and_read_back(tmp_path):
    room = "\u56fd\u9645\u4f1a\u8bae" * 10 + "\u5ba4\u4e00"  # 42 characters: 378 bytes once escaped
    path = transcript_path(tmp_path, room)
    store = TranscriptStore(path)
    assert store.problem is None
    assert store.append(segment(1))
    store.close()
    assert [s.segment_id for s in recent_segments(transcript_path(tmp_path, room))] == ["SG_1"]
    assert path.name.startswith("%E5%9B%BD"), "the file name starts readable"
    other = transcript_path(tmp_path, room[:-1] + "\u4e8c")
    assert other != path, "a name differing only past the readable prefix gets another file"


def test_a_room_keeps_the_file_it_had_before_long_names_were_hashed(tmp_path):
    # Names that always fitted keep their original file name: a worker upgraded mid-meeting continues the
    # room's transcript, and the viewer's backlog still finds what was said before the upgrade.
    for name in ["demo-room_1", "caf\u00e9 room", "\u4f1a\u8bae" * 9, "x" * 249]:
        legacy = urllib.parse.quote(name, safe="-_.") + ".jsonl"
        assert transcript_path(tmp_path, name).name == legacy, name
