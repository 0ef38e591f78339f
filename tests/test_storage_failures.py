"""A room whose transcript cannot be written keeps its live captions, says so once, counts every final
it could not save, and recovers by itself (issue 23). The store's writer thread keeps the disk off the
room's event loop. Unit tests of `TranscriptStore` on real failing files (a path under a regular
file, /dev/full); a stalled disk is a patched `os.fsync`."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest

from captions.live import transcripts
from captions.live.metrics import METRICS
from captions.live.transcripts import RETRY_FIRST_S, TranscriptStore, read_transcript
from captions.protocol import FinalSegment


def segment(n: int) -> FinalSegment:
    end = time.time()
    return FinalSegment(f"SG_{n}", "alice", "Alice", "TR_1", f"words {n}", end - 1, end, [])


def metric(name: str, **labels: str) -> float:
    return METRICS.registry.get_sample_value(name, labels) or 0.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_transcript_that_cannot_be_opened_is_reported_once_retried_and_recovers(tmp_path, caplog):
    blocker = tmp_path / "data"
    blocker.write_text("a file where the data directory should be")
    path = blocker / "room.jsonl"
    clock, changes = FakeClock(), []
    unavailable, unsaved = metric("captions_transcript_unavailable"), metric("captions_transcript_unsaved_segments_total")
    errors = metric("captions_transcript_errors_total", reason="other")
    caplog.set_level(logging.INFO, logger="captions")

    store = TranscriptStore(path, on_problem=lambda: changes.append("changed"), clock=clock)  # does not raise
    assert store.problem and "open failed" in store.problem, store.problem
    assert metric("captions_transcript_unavailable") == unavailable + 1, "the alert is raised"
    assert store.append(segment(0)) is False
    clock.now += RETRY_FIRST_S * 4
    assert store.append(segment(1)) is False, "retried, failed the same way"
    assert metric("captions_transcript_errors_total", reason="other") == errors + 2, "both attempts counted"
    assert metric("captions_transcript_unsaved_segments_total") == unsaved + 2
    reports = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(reports) == 1 and store.problem in reports[0].getMessage(), "once, with its cause"
    assert reports[0].exc_info is None, "no traceback"
    lost = [r.getMessage() for r in caplog.records if "final segment" in r.getMessage()]
    assert len(lost) == 2 and "SG_0" in lost[0] and "SG_1" in lost[1], "each unsaved final is named"

    blocker.unlink()  # the operator frees the path
    store.append(segment(2))
    assert store.problem is not None, "no retry before the backoff"
    clock.now += RETRY_FIRST_S * 4
    assert store.append(segment(3)) is True
    assert store.problem is None and changes == ["changed", "changed"], "the room is told twice: down, up"
    assert metric("captions_transcript_unavailable") == unavailable, "the alert clears"
    store.close()
    assert [s.segment_id for s in read_transcript(path)] == ["SG_3"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_full_disk_while_captioning_loses_no_caption_silently_and_raises_the_alert(caplog):
    no_space = metric("captions_transcript_errors_total", reason="no_space")
    unavailable = metric("captions_transcript_unavailable")
    errors = metric("captions_errors_total", kind="transcript")
    store = TranscriptStore("/dev/full", clock=FakeClock())  # opens; every write: ENOSPC
    assert store.problem is None
    assert store.append(segment(7)) is False, "append does not raise"
    assert "space" in store.problem
    assert metric("captions_transcript_errors_total", reason="no_space") == no_space + 1
    assert metric("captions_transcript_unavailable") == unavailable + 1
    assert metric("captions_errors_total", kind="transcript") == errors + 1, "the existing alert fires too"
    assert any("final segment SG_7" in r.getMessage() for r in caplog.records)
    store.close()
    assert metric("captions_transcript_unavailable") == unavailable, "a closed room is no longer counted"


def test_a_stalled_disk_never_blocks_the_caller_and_its_backlog_is_bounded(tmp_path, monkeypatch):
    stalled, release, real_fsync = threading.Event(), threading.Event(), os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (stalled.set(), release.wait(), real_fsync(fd)))
    backlog = metric("captions_transcript_errors_total", reason="backlog")
    store = TranscriptStore(tmp_path / "room.jsonl")
    first = store.submit(segment(0))  # returns at once: the writer thread waits for the disk
    assert stalled.wait(timeout=30)
    queued = [store.submit(segment(n)) for n in range(1, transcripts.WRITE_QUEUE_MAX + 1)]
    over = store.submit(segment(transcripts.WRITE_QUEUE_MAX + 1))
    assert not first.done() and not queued[-1].done(), "the disk has not taken them"
    assert over.done() and over.result() is False, "past the bound, refused at once (and counted)"
    assert metric("captions_transcript_errors_total", reason="backlog") == backlog + 1
    release.set()
    assert first.result(timeout=30) is True and all(f.result(timeout=30) for f in queued)
    store.close()
    ids = [s.segment_id for s in read_transcript(tmp_path / "room.jsonl")]
    assert ids == [f"SG_{n}" for n in range(transcripts.WRITE_QUEUE_MAX + 1)], "in order"
