"""Does a recording hold the audio a bot sent? For the end-to-end tests: the worker records what its
engine consumed (--record-dir); that must be the publisher's clip, whole, once, at the right speed
and level, after some silence (the frame clock's lead, and whatever arrived before the bot played).

WebRTC is not bit-exact: Opus, resampling, and a jitter buffer that stretches or squeezes the audio
by tens of milliseconds here and there. So the comparison is on the loudness profile, RMS per 10 ms
chunk: the clip is aligned as a whole by cross-correlation, then each 400 ms window of its speech is
looked for near that place. Audio dropped, duplicated or resampled at a wrong rate shifts the
windows against each other and changes the speech's length; 10 % of it does so by hundreds of
milliseconds, well beyond the jitter buffer's doing (the tolerances below sit between the two; the
measurements are in the README, "How it is tested"). Losses or repeats below about 0.2 s in all can
pass as jitter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from captions.stt.api import SAMPLE_RATE

CHUNK = SAMPLE_RATE // 100
"""10 ms, WebRTC's own tick."""
WINDOW = 40
"""Chunks per window of the clip looked for in the recording (400 ms)."""
SEARCH = 15
"""How far (chunks) from the clip's alignment a window is looked for (150 ms)."""
MAX_SPAN_DIFFERENCE_S = 0.2
"""How much the speech's length (first to last loud chunk) may differ from the clip's."""
MAX_WINDOW_SPREAD_S = 0.15
"""How far apart the windows' best places may be."""
MIN_MEDIAN_CORRELATION = 0.9
"""Of the windows' profiles with the recording at their best places, the median (another speaker's
speech correlates far less)."""
MIN_WINDOW_CORRELATION = 0.4
"""Of every window: lower, that part of the clip is missing (a window the jitter buffer stretched
correlates less than the others, but not that little)."""
LEVEL_RANGE = (0.7, 1.4)
"""RMS of the aligned recording over the clip's (about +-3 dB: WebRTC keeps the level)."""


@dataclass
class AudioMatch:
    offset_s: float
    """Where the clip starts in the recording."""
    sent_span_s: float
    recorded_span_s: float
    window_correlations: list[float]
    window_shifts_s: list[float]
    """Each speech window's best place, relative to the clip's alignment."""
    level_ratio: float

    def problems(self) -> list[str]:
        found = []
        if abs(self.recorded_span_s - self.sent_span_s) > MAX_SPAN_DIFFERENCE_S:
            found.append(f"speech lasts {self.recorded_span_s:.2f} s recorded, {self.sent_span_s:.2f} s sent")
        if not self.window_correlations or np.median(self.window_correlations) < MIN_MEDIAN_CORRELATION:
            found.append(f"the clip's loudness profile is not in the recording: {self.window_correlations}")
        elif min(self.window_correlations) < MIN_WINDOW_CORRELATION:
            found.append(f"a part of the clip is missing from the recording: {self.window_correlations}")
        elif max(self.window_shifts_s) - min(self.window_shifts_s) > MAX_WINDOW_SPREAD_S:
            found.append(f"parts of the clip drift apart in the recording: {self.window_shifts_s}")
        if not LEVEL_RANGE[0] <= self.level_ratio <= LEVEL_RANGE[1]:
            found.append(f"level ratio {self.level_ratio:.2f}")
        return found


def rms_profile(audio: np.ndarray) -> np.ndarray:
    n = audio.size // CHUNK
    return np.sqrt(np.mean(audio[: n * CHUNK].reshape(n, CHUNK).astype(np.float64) ** 2, axis=1))


def _best_offset(haystack: np.ndarray, needle: np.ndarray) -> int:
    """Where `needle` fits best, wholly inside `haystack` (cross-correlation)."""
    n = 1 << int(np.ceil(np.log2(haystack.size + needle.size)))
    correlation = np.fft.irfft(np.fft.rfft(haystack, n) * np.conj(np.fft.rfft(needle, n)), n)
    return int(np.argmax(correlation[: haystack.size - needle.size + 1]))


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def _windows(sent: np.ndarray, recorded: np.ndarray, offset: int) -> list[tuple[float, int]]:
    """(best correlation, its shift in chunks) of each window of the clip that holds speech."""
    found = []
    for start in range(0, sent.size - WINDOW + 1, WINDOW):
        window = sent[start:start + WINDOW]
        if window.max() < 0.1 * sent.max():
            continue
        places = [offset + start + shift for shift in range(-SEARCH, SEARCH + 1)]
        found.append(max((_correlation(window, recorded[at:at + WINDOW]), at - offset - start)
                         for at in places if 0 <= at <= recorded.size - WINDOW))
    return found


def _speech_span(profile: np.ndarray) -> int:
    """Chunks from the first to the last one louder than a tenth of the loudest."""
    loud = np.nonzero(profile > 0.1 * profile.max())[0]
    return int(loud[-1] - loud[0]) if loud.size else 0


def match_recording(sent: np.ndarray, recorded: np.ndarray, cut_short_s: float = 0.0) -> AudioMatch:
    """Compares 24 kHz mono float32 audio: `sent` (the clip) inside `recorded` (longer).

    `cut_short_s`: the recording may end up to this much before the clip does (an engine stream that
    ended when the speaker left or muted: the clip's trailing silence, the last packets in flight).
    The recording is padded with that much silence; speech missing from it still shows in the
    speech span and the windows."""
    recorded = np.concatenate([recorded, np.zeros(int(cut_short_s * SAMPLE_RATE), dtype=recorded.dtype)])
    sent_profile, recorded_profile = rms_profile(sent), rms_profile(recorded)
    assert recorded_profile.size >= sent_profile.size, (
        f"the recording ({recorded.size / SAMPLE_RATE:.2f} s) is shorter than the clip ({sent.size / SAMPLE_RATE:.2f} s)")
    offset = _best_offset(recorded_profile, sent_profile)
    aligned = recorded_profile[offset: offset + sent_profile.size]
    windows = _windows(sent_profile, recorded_profile, offset)
    seconds = CHUNK / SAMPLE_RATE
    return AudioMatch(
        offset_s=offset * seconds,
        sent_span_s=_speech_span(sent_profile) * seconds,
        recorded_span_s=_speech_span(recorded_profile) * seconds,
        window_correlations=[round(c, 2) for c, _ in windows],
        window_shifts_s=[shift * seconds for _, shift in windows],
        level_ratio=float(np.sqrt(np.mean(aligned**2) / np.mean(sent_profile**2))),
    )
