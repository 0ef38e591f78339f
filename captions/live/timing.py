"""`--timing-attributes` (diagnostics): when the audio behind each caption was received, stepped and
published, attached to every caption stream as the `captions.timing` attribute. `captions bench
latency` reads it to split a caption's latency; it is not part of the viewer protocol."""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from captions.stt.api import FRAME_SIZE, StreamEvent

ATTR_TIMING = "captions.timing"
ONSET_THRESHOLD = 64
"""|int16 sample| above which a stream's audio counts as started (-54 dBFS; digital silence stays 0)."""


class StreamTiming:
    """When each sample of one engine stream was received."""

    def __init__(self, frame_size: int = FRAME_SIZE):
        self.frame_size = frame_size
        self.onset_sample: int | None = None
        """Index of the stream's first sample above ONSET_THRESHOLD (aligns it with the sender's audio)."""
        self._samples = 0
        self._chunks: deque[tuple[int, float]] = deque()
        """(index after the chunk's last sample, Unix time it was received), oldest first."""

    def record(self, pcm16: np.ndarray, received_at: float) -> None:
        if self.onset_sample is None:
            loud = np.flatnonzero(np.abs(pcm16.astype(np.int32)) > ONSET_THRESHOLD)
            if loud.size:
                self.onset_sample = self._samples + int(loud[0])
        self._samples += pcm16.size
        self._chunks.append((self._samples, received_at))

    def frame_received_at(self, frame: int, lead_samples: int) -> float | None:
        """When the last sample of engine frame `frame` (0-based) was received. Events come in
        frame order, so the chunks before it are dropped."""
        last = (frame + 1) * self.frame_size - lead_samples - 1
        while self._chunks and self._chunks[0][0] <= last:
            self._chunks.popleft()
        return self._chunks[0][1] if self._chunks else None

    def for_event(self, event: StreamEvent) -> dict | None:
        """The attribute's fields for the captions this event produces (the publisher adds
        `published`); None before the stream's first step."""
        if event.frames <= 0 or not event.step_started:
            return None
        frame = event.frames - 1
        return {"frame": frame, "lead_samples": event.lead_samples,
                "frame_received": self.frame_received_at(frame, event.lead_samples),
                "onset_sample": self.onset_sample, "step_started": event.step_started,
                "step_ended": event.step_ended, "event_handled": time.time()}
