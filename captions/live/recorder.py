"""`--record-dir`: exactly the audio one engine stream consumed, as a 24 kHz 16-bit mono WAV, so that
`captions transcribe` of the file can be compared with the live captions."""

from __future__ import annotations

import hashlib
import urllib.parse
import wave
from pathlib import Path

import numpy as np

from captions.stt.api import SAMPLE_RATE

PART_MAX = 96
"""Room and identity take at most this many bytes each of a recording's file name (255 in all)."""


def _safe_name(text: str) -> str:
    """`text` escaped for a file name; a long one cut and told apart by a hash of the whole (a room
    named in CJK characters escapes to about 9 bytes a character)."""
    safe = urllib.parse.quote(text, safe="-_.@") or "_"
    if len(safe) <= PART_MAX:
        return safe
    prefix = safe[:PART_MAX - 17]
    cut = prefix.rfind("%", len(prefix) - 2)  # never end inside a %XX escape
    return f"{prefix[:cut] if cut != -1 else prefix}+{hashlib.sha256(text.encode()).hexdigest()[:16]}"


class StreamRecorder:
    """The silence the engine put first to align the stream's frames (`lead_samples`), then every
    sample pushed."""

    def __init__(self, directory: Path, room: str, identity: str, stream_id: int):
        directory.mkdir(parents=True, exist_ok=True)
        stem = f"{_safe_name(room)}-{_safe_name(identity)}-{stream_id}"
        path, n = directory / f"{stem}.wav", 1
        while path.exists():  # stream ids restart with the worker: never overwrite a recording
            n += 1
            path = directory / f"{stem}-{n}.wav"
        self.path = path
        self._wav = wave.open(str(path), "wb")  # noqa: SIM115 - open for the stream's lifetime
        self._wav.setnchannels(1)
        self._wav.setsampwidth(2)
        self._wav.setframerate(SAMPLE_RATE)
        self._started = False

    def write(self, pcm_int16: np.ndarray, lead_samples: int) -> None:
        if not self._started:
            self._started = True
            self._wav.writeframes(bytes(2 * lead_samples))
        self._wav.writeframes(pcm_int16.tobytes())

    def close(self) -> None:
        self._wav.close()
