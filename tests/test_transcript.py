"""The transcript file and the late-joiner backlog."""

from __future__ import annotations

import time

from captions.live.transcripts import TranscriptStore, backlog_payload, read_transcript, transcript_path
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
    store.append(segment(1))
    # Read through a separate handle without closing the store: nothing waits in a buffer.
    assert read_transcript(tmp_path / "room.jsonl") == [segment_like(store.backlog()[0])]


def segment_like(s: FinalSegment) -> FinalSegment:
    return FinalSegment.from_json(s.to_json())


def test_backlog_keeps_recent_segments_and_forgets_older_than_retention(tmp_path):
    store = TranscriptStore(tmp_path / "room.jsonl", retention_s=30 * 60)
    now = time.time()
    store.append(segment(0, end=now - 31 * 60))
    store.append(segment(1, end=now - 29 * 60))
    store.append(segment(2, end=now))
    assert [s.segment_id for s in store.backlog()] == ["SG_1", "SG_2"]
    store.close()
    assert len(read_transcript(tmp_path / "room.jsonl")) == 3, "the file keeps everything"


def test_a_restarted_worker_continues_the_file_and_the_backlog(tmp_path):
    path = tmp_path / "room.jsonl"
    first = TranscriptStore(path)
    first.append(segment(0))
    first.close()
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"segment_id": "half a li')  # the previous worker died mid-write
    second = TranscriptStore(path)
    assert [s.segment_id for s in second.backlog()] == ["SG_0"]
    second.append(segment(1))
    second.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert FinalSegment.from_json(lines[-1]).segment_id == "SG_1", "the new record is not glued to the broken one"


def test_room_names_cannot_escape_the_data_dir(tmp_path):
    for name in ["../evil", "a/b", "..", ".hidden", "", "caf\u00e9 room"]:
        path = transcript_path(tmp_path, name)
        assert path.parent == tmp_path, name
        assert not path.name.startswith(".")
    assert transcript_path(tmp_path, "demo-room_1").name == "demo-room_1.jsonl"
    assert transcript_path(tmp_path, "a/b") != transcript_path(tmp_path, "a_b")


def test_backlog_payload_is_json_lines_of_segments():
    segments = [segment(0), segment(1)]
    lines = backlog_payload(segments).splitlines()
    assert [FinalSegment.from_json(line) for line in lines] == segments
