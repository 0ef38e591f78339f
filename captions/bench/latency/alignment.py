"""Aligning each speaker's clip with the worker's recording of its stream, so that every sample the
engine consumed has the wall time at which the bot captured it."""

from __future__ import annotations

import json
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from captions.bench.common import summarize_ms
from captions.stt.api import SAMPLE_RATE

if TYPE_CHECKING:
    from captions.bench.latency.session import Session

ALIGN_WINDOW_S = 0.5
ALIGN_STEP_S = 0.5
ALIGN_SEARCH_S = 0.15
ALIGN_MIN_PEAK = 1000
ALIGN_MIN_CORRELATION = 0.5


@dataclass
class Alignment:
    """Where the clip sits in the stream the engine consumed: stream index = clip index + shift,
    with the shift measured at several points (the sender or the jitter buffer may insert or
    drop samples, so one offset at the onset does not hold for the whole speech)."""

    anchors: list[tuple[int, int]]
    """(stream index where the shift was measured, shift), in stream order."""
    onset_shift: int
    """The shift the onsets alone give (agent's onset_sample - the clip's onset)."""
    measured: bool

    @staticmethod
    def from_onset(onset_sample: int, clip_onset: int) -> Alignment:
        shift = onset_sample - clip_onset
        return Alignment([(onset_sample, shift)], shift, measured=False)

    def clip_index(self, stream_index: int) -> int:
        """The clip sample at `stream_index`, with the last shift measured at or before it."""
        shift = self.anchors[0][1]
        for at, anchor_shift in self.anchors:
            if at > stream_index:
                break
            shift = anchor_shift
        return stream_index - shift

    def describe(self) -> dict:
        shifts = [shift for _, shift in self.anchors]
        jump = int(np.abs(np.diff(shifts)).max()) if len(shifts) > 1 else 0
        return {"measured": self.measured, "anchors": len(self.anchors),
                "onset_error_ms": round((shifts[0] - self.onset_shift) / SAMPLE_RATE * 1000, 2),
                "drift_ms": round((shifts[-1] - shifts[0]) / SAMPLE_RATE * 1000, 2),
                "largest_jump_ms": round(jump / SAMPLE_RATE * 1000, 2)}


def measure_alignment(clip: np.ndarray, clip_onset: int, recorded: np.ndarray,
                      onset_sample: int) -> Alignment:
    """Cross-correlates windows of the clip, every ALIGN_STEP_S, with the recording of the stream,
    each searched near the previous window's shift (starting from the onsets' shift)."""
    shift = onset_shift = onset_sample - clip_onset
    window, step = int(ALIGN_WINDOW_S * SAMPLE_RATE), int(ALIGN_STEP_S * SAMPLE_RATE)
    search = int(ALIGN_SEARCH_S * SAMPLE_RATE)
    anchors = []
    for at in range(clip_onset, clip.size - window + 1, step):
        reference = clip[at:at + window]
        if np.abs(reference).max() < ALIGN_MIN_PEAK:
            continue  # a pause: nothing to correlate
        lag = _best_lag(reference, recorded, at + shift, search)
        if lag is None:
            continue
        shift = lag - at
        anchors.append((lag, shift))
    if not anchors:
        return Alignment.from_onset(onset_sample, clip_onset)
    return Alignment(anchors, onset_shift, measured=True)


def _best_lag(reference: np.ndarray, signal: np.ndarray, expected: int, search: int) -> int | None:
    """The offset of `reference` in `signal` near `expected`: the peak of the normalised
    cross-correlation (FFT), or None when no offset matches well (Opus-coded speech against its
    source correlates well above ALIGN_MIN_CORRELATION; a raw correlation would favour loud
    stretches and jump to a wrong offset)."""
    lo = max(0, expected - search)
    hi = min(signal.size, expected + search + reference.size)
    segment = signal[lo:hi].astype(np.float64)
    reference = reference.astype(np.float64)
    if segment.size < reference.size or not np.any(reference):
        return None
    n = 1 << int(np.ceil(np.log2(segment.size + reference.size)))
    lags = segment.size - reference.size + 1
    corr = np.fft.irfft(np.fft.rfft(segment, n) * np.conj(np.fft.rfft(reference, n)), n)[:lags]
    energy = np.concatenate([[0.0], np.cumsum(segment ** 2)])
    local = np.sqrt(np.maximum(energy[reference.size:reference.size + lags] - energy[:lags], 1e-9))
    normalised = corr / (local * np.linalg.norm(reference))
    best = int(np.argmax(normalised))
    return lo + best if normalised[best] >= ALIGN_MIN_CORRELATION else None


def _read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)


def speaker_alignments(session: Session, record_dir: Path) -> dict[str, Alignment]:
    """Each speaker's measured alignment, from the worker's recording of its one engine stream."""
    from captions.live.timing import ATTR_TIMING

    onsets, leads = {}, {}
    for caption in session.captions:
        raw = caption.attributes.get(ATTR_TIMING)
        if raw is not None and json.loads(raw).get("onset_sample") is not None:
            onsets.setdefault(caption.sender, json.loads(raw)["onset_sample"])
            leads.setdefault(caption.sender, json.loads(raw).get("lead_samples", 0))
    alignments = {}
    for identity, onset in onsets.items():
        recordings = sorted(record_dir.glob(f"*-{identity}-*.wav"))
        if identity not in session.voices or len(recordings) != 1:
            continue  # one engine stream per speaker expected; otherwise fall back to the onset
        _, clip_onset = session.voices[identity]
        # The recording starts with the engine's alignment silence; stream indices count pushed audio.
        recorded = _read_wav(recordings[0])[leads[identity]:]
        alignments[identity] = measure_alignment(session.clips[identity], clip_onset, recorded, onset)
    return alignments


def alignment_summary(alignments: dict[str, Alignment], speakers: int) -> dict:
    described = [a.describe() for a in alignments.values() if a.measured]
    return {
        "method": (f"cross-correlation of {ALIGN_WINDOW_S:g} s windows of each clip, every "
                   f"{ALIGN_STEP_S:g} s, with the worker's recording of the stream"),
        "speakers_measured": len(described),
        "speakers_onset_only": speakers - len(described),
        "onset_error_ms": summarize_ms([abs(d["onset_error_ms"]) / 1000 for d in described]),
        "drift_ms": summarize_ms([abs(d["drift_ms"]) / 1000 for d in described]),
        "largest_jump_ms": max((d["largest_jump_ms"] for d in described), default=None),
        # A jump as large as the search window means the shift moved further than we looked: the
        # stream lost or gained that much audio (an overloaded machine), and the split is unreliable.
        "reliable": bool(described) and len(described) == speakers and all(
            d["largest_jump_ms"] < 0.9 * ALIGN_SEARCH_S * 1000 for d in described),
        "per_speaker": {identity: a.describe() for identity, a in alignments.items()},
    }


