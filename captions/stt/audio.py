"""Audio in: reading files, converting to the model's 24 kHz mono float32, cutting 80 ms frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from captions.stt.api import SAMPLE_RATE


class AudioError(Exception):
    """The input is not usable audio; the message says why."""


def read_audio_file(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Any file sphn (Symphonia) decodes (wav, mp3, ogg/opus, flac), at any rate and channel count,
    as mono float32 at `sample_rate`. Channels are averaged, as Kyutai's reference script does."""
    import sphn

    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    try:
        data, _ = sphn.read(str(path), sample_rate=sample_rate)
    except Exception as e:
        raise AudioError(f"{path}: not a readable audio file ({e})") from e
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 2:
        data = data.mean(axis=0)
    if data.size == 0:
        raise AudioError(f"{path}: contains no audio")
    return np.ascontiguousarray(data, dtype=np.float32)


class FrameBuffer:
    """Collects samples of any chunk size and hands out whole frames of `frame_size`."""

    def __init__(self, frame_size: int):
        self.frame_size = frame_size
        self._tail = np.zeros(0, dtype=np.float32)

    @property
    def pending(self) -> int:
        """Samples waiting for the rest of their frame."""
        return self._tail.size

    def push(self, pcm: np.ndarray) -> list[np.ndarray]:
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        data = np.concatenate([self._tail, pcm]) if self._tail.size else pcm
        n_frames = data.size // self.frame_size
        frames = [data[i * self.frame_size:(i + 1) * self.frame_size].copy() for i in range(n_frames)]
        self._tail = data[n_frames * self.frame_size:].copy()
        return frames

    def flush(self) -> list[np.ndarray]:
        """The last partial frame, right-padded with silence (as the reference pads the audio)."""
        if self._tail.size == 0:
            return []
        frame = np.zeros(self.frame_size, dtype=np.float32)
        frame[: self._tail.size] = self._tail
        self._tail = np.zeros(0, dtype=np.float32)
        return [frame]


def int16_to_float32(samples: np.ndarray) -> np.ndarray:
    return samples.astype(np.float32) / 32768.0
