"""Real synthetic speech for tests, benchmarks, the test checkpoint and `captions speak`: espeak-ng
writes a WAV; sox converts it to another rate or channel count, sphn reads it as model input."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

from captions.stt.api import SAMPLE_RATE


class SpeechUnavailable(RuntimeError):
    """A tool that makes speech is not installed; the message says how to get it."""


def _require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise SpeechUnavailable(f"{tool} is not installed (apt-get install {package})")
    return path


def espeak(text: str, path: Path, *, voice: str = "en", speed: int = 150) -> Path:
    """espeak-ng's WAV of `text` (22.05 kHz mono 16-bit) at `path`."""
    _require("espeak-ng", "espeak-ng")
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return path


def espeak_wav(text: str, path: Path, rate: int = SAMPLE_RATE, channels: int = 1, voice: str = "en",
               speed: int = 150) -> Path:
    """Speech as a 16-bit WAV at `rate` Hz with `channels` channels (sox converts espeak-ng's)."""
    _require("sox", "sox")
    raw = espeak(text, path.with_suffix(".espeak.wav"), voice=voice, speed=speed)
    subprocess.run(["sox", str(raw), "-r", str(rate), "-c", str(channels), "-b", "16", str(path)], check=True)
    raw.unlink()
    return path


def speech_samples(text: str, directory: Path, *, voice: str = "en", speed: int = 150,
                   sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Speech as mono float32 samples at `sample_rate` (a scratch WAV is written in `directory`)."""
    from captions.stt.audio import read_audio_file

    path = directory / f"speech-{abs(hash((text, voice, speed)))}.wav"
    return read_audio_file(espeak(text, path, voice=voice, speed=speed), sample_rate)
