"""tests/audio_match.py, the check that a worker's recording holds what a bot sent, on known input:
it accepts the clip after any silence, and refuses it with audio dropped, duplicated, resampled at a
wrong rate, at the wrong level, with a stretch missing, or another speaker's speech instead."""

from __future__ import annotations

import numpy as np
import pytest

from captions.stt.audio import read_audio_file
from tests.audio_match import CHUNK, match_recording
from tests.conftest import espeak_wav


@pytest.fixture(scope="module")
def clip(speech_dir) -> np.ndarray:
    return read_audio_file(espeak_wav("The quick brown fox jumps over the lazy dog near the river bank.",
                                      speech_dir / "audio-match.wav"))


def recorded(audio: np.ndarray) -> np.ndarray:
    """As the worker records it: the frame clock's lead and the wait for the bot, then the audio,
    then the silence the bot sends before it leaves."""
    return np.concatenate([np.zeros(12_700, np.float32), audio, np.zeros(24_000, np.float32)])


def every_tenth_chunk(audio: np.ndarray, keep) -> np.ndarray:
    chunks = audio[: audio.size // CHUNK * CHUNK].reshape(-1, CHUNK)
    return np.concatenate([piece for i, chunk in enumerate(chunks) for piece in keep(i % 10 == 9, chunk)])


def test_the_clip_after_silence_matches(clip):
    match = match_recording(clip, recorded(clip))
    assert match.problems() == []
    assert match.offset_s == pytest.approx(12_700 / 24_000, abs=0.01)


@pytest.mark.parametrize("broken", ["dropped", "duplicated", "resampled", "attenuated", "gap", "other speech"])
def test_ingest_faults_are_refused(clip, speech_dir, broken):
    faulty = {
        "dropped": lambda: every_tenth_chunk(clip, lambda tenth, c: [] if tenth else [c]),
        "duplicated": lambda: every_tenth_chunk(clip, lambda tenth, c: [c, c] if tenth else [c]),
        "resampled": lambda: np.interp(np.arange(0, clip.size - 1, 1.1), np.arange(clip.size), clip),
        "attenuated": lambda: clip * 0.5,
        "gap": lambda: np.concatenate([clip[:24_000], clip[24_000 + 7_200:]]),  # 300 ms lost
        "other speech": lambda: read_audio_file(espeak_wav(
            "Streaming speech recognition turns every word into text as it is spoken.", speech_dir / "other.wav")),
    }[broken]()
    assert match_recording(clip, recorded(faulty.astype(np.float32))).problems() != []
