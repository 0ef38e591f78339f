"""`--record-dir`: exactly the audio one engine stream consumed, as a 24 kHz 16-bit mono WAV, so that
`captions transcribe` of the file can be compared with the live captions."""

from __future__ import annotations

import urllib.parse
import wave
from pathlib import Path

import numpy as np

from captions.stt.api import SAMPLE_RATE


def _safe_name(text: str) -> str:
    return urllib.parse.quote(text, safe="-_.@") or "_"


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
