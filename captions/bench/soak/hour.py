"""The hour scenario: one room's hour of speech, in process, through the real engine."""


from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from captions.bench.common import (
    BenchError,
)
from captions.bench.soak.common import emit, sample_from_report

# ---- child process: an hour of speech in process -------------------------------------------------

class _HourRoom:
    """What the worker keeps for one room's speakers and captions, without LiveKit: per engine
    stream a segmenter, timing diagnostics and a recording; per final caption a transcript line.
    Engine events are handled on the engine's thread, one stream at a time."""

    def __init__(self, engine, data_dir: Path, record_dir: Path):
        from captions.live.transcripts import TranscriptStore, transcript_path

        self.engine = engine
        self.record_dir = record_dir
        self.transcript = TranscriptStore(transcript_path(data_dir, "hour"))
        self.finals = 0
        self._lock = threading.Lock()

    def speak(self, identity: str, audio: np.ndarray, origin: float, chunk: int) -> None:
        """One speaker's turn: the clip in 10 ms chunks as fast as the engine takes them, then the
        close that flushes the last words; returns once the stream has ended."""
        from captions.live.recorder import StreamRecorder
        from captions.live.segmenter import Segmenter
        from captions.live.timing import StreamTiming

        ended = threading.Event()
        segmenter, timing = Segmenter(), StreamTiming()
        state: dict = {}

        def on_event(event) -> None:
            timing.for_event(event)
            for update in segmenter.feed(event):
                if update.final and update.text:
                    self._append(identity, origin, update)
            if event.ended:
                ended.set()

        stream = self.engine.open_stream(on_event)
        state["recorder"] = recorder = StreamRecorder(self.record_dir, "hour", identity, stream.id)
        pcm16 = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
        for start in range(0, pcm16.size, chunk):
            piece = pcm16[start:start + chunk]
            stream.push(piece.astype(np.float32) / 32768.0)
            recorder.write(piece, stream.lead_samples)
            timing.record(piece, time.time())
        stream.close()
        if not ended.wait(timeout=len(audio) / 24000 * 4 + 30):
            raise BenchError(f"the engine did not end {identity}'s stream")
        recorder.close()

    def _append(self, identity: str, origin: float, update) -> None:
        from captions.protocol import FinalSegment

        words = [[w.text, round(origin + w.start, 3), round(origin + w.end, 3)] for w in update.words]
        segment = FinalSegment(segment_id=update.segment_id, participant_identity=identity,
                               participant_name=identity, track_id="TR_hour", text=update.text,
                               start=words[0][1] if words else origin, end=words[-1][2] if words else origin,
                               words=words)
        with self._lock:
            self.transcript.append(segment)
            self.finals += 1


def _hour(config: dict) -> None:
    """The `hour` scenario in this process; one JSON line per sample on stdout."""
    from captions.live.diagnostics import Diagnostics, proc_figures
    from captions.stt.api import SAMPLE_RATE
    from captions.stt.engine import SttEngine

    workdir = Path(config["workdir"])
    data_dir, record_dir = workdir / "data", workdir / "recordings"
    engine = SttEngine.load(config["checkpoint"], device="cpu", batch_size=config["parallel"])
    engine.start()
    clips = [np.load(path) for path in config["clips"]]
    total_s, deadline = config["units"] * 60.0, time.time() + config["max_seconds"]
    # The room's clock: the speakers' turns follow one another on it (while the engine runs them
    # side by side, faster than real time); captions are stamped on it.
    state = {"cursor": 0.0, "turns": 0, "next_sample": 0.0}
    lock = threading.Lock()
    started = time.time()

    room = _HourRoom(engine, data_dir, record_dir)
    diagnostics = Diagnostics(workdir / "unused.jsonl")

    def sample() -> None:
        report = diagnostics.report()
        figures = proc_figures(under=data_dir)
        point = sample_from_report(report, round(state["cursor"] / 60.0), started, figures["open_files_under"])
        point["finals"] = room.finals
        emit({"sample": point})

    def next_turn() -> tuple[int, float] | None:
        with lock:
            if state["cursor"] >= total_s or time.time() > deadline:
                return None
            turn, offset = state["turns"], state["cursor"]
            state["turns"] += 1
            state["cursor"] += clips[turn % len(clips)].size / SAMPLE_RATE
            return turn, offset

    def lane() -> None:
        while (turn := next_turn()) is not None:
            index, offset = turn
            origin = started + offset
            room.speak(f"speaker-{index % 8}", clips[index % len(clips)], origin, SAMPLE_RATE // 100)
            with lock:
                due = state["cursor"] >= state["next_sample"]
                if due:
                    state["next_sample"] += config["sample_every"] * 60.0
            if due:
                sample()

    sample()
    lanes = [threading.Thread(target=lane, name=f"speaker-lane-{i}") for i in range(config["parallel"])]
    for thread in lanes:
        thread.start()
    for thread in lanes:
        thread.join()
    sample()
    room.transcript.close()
    engine.close()
