"""The transcript file, the late viewers' backlog read from it, and retention."""

from __future__ import annotations

import os
import time

from captions.live.transcripts import (
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
