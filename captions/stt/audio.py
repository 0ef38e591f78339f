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
    """Collects samples of any chunk size and hands out whole frames of `frame_size`. A 10 ms push is
    one copy into the frame being filled (the engine process takes one per live stream per tick)."""

    def __init__(self, frame_size: int):
        self.frame_size = frame_size
        self._frame = np.empty(frame_size, dtype=np.float32)
        self._filled = 0

    @property
    def pending(self) -> int:
        """Samples waiting for the rest of their frame."""
        return self._filled

    def push(self, pcm: np.ndarray) -> list[np.ndarray]:
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        frames = []
        taken = 0
        while taken < pcm.size:
            n = min(self.frame_size - self._filled, pcm.size - taken)
            self._frame[self._filled:self._filled + n] = pcm[taken:taken + n]
            self._filled += n
            taken += n
            if self._filled == self.frame_size:
                frames.append(self._frame)
                self._frame, self._filled = np.empty(self.frame_size, dtype=np.float32), 0
        return frames

    def flush(self) -> list[np.ndarray]:
        """The last partial frame, right-padded with silence (as the reference pads the audio)."""
        if self._filled == 0:
            return []
        frame = self._frame
        frame[self._filled:] = 0.0
        self._frame, self._filled = np.empty(self.frame_size, dtype=np.float32), 0
        return [frame]


def int16_to_float32(samples: np.ndarray) -> np.ndarray:
    return samples.astype(np.float32) / 32768.0
