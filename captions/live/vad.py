"""When a speaker talks: LiveKit's own Silero voice-activity model on each microphone, on the CPU.

livekit-agents ships Silero in `livekit.local_inference` (native, one 32 ms window of 16 kHz audio
per call, per-instance state, weights inside the package: nothing is downloaded). Its agents'
stream wrapper hands every window to a thread pool, which costs more than the model itself; here
the windows are fed directly, from the audio the worker already receives at 24 kHz.

`SpeechGate` turns the per-window probabilities into a few facts about one track, in samples of
its 24 kHz audio: whether the speaker talks now, where the current stretch of speech started, and
where the speaker last spoke. How long a pause ends a turn is the caller's business (speaker.py).

Most microphones are silent most of the time, and Silero costs the same on silence as on speech.
So a window is first weighed by its energy (issue 24): while the gate is closed, a window quieter
than `GateOptions.energy_floor_dbfs`, with no louder window in the `AWAKE_WINDOWS` before it, is
judged silence without Silero (and without resampling). The floor (-70 dBFS) sits under any voice
a microphone carries: a review measured that at -55 dBFS a far or quiet speaker (-58 to -63 dBFS)
lost whole short answers ("Yes.") that Silero alone caught, and that resetting Silero's state after
skipped windows lost them too (its first windows then score lower): so the floor is low, Silero's
state carries over the skipped windows, and when a loud window wakes it, it first hears the
`WARM_UP_WINDOWS` windows before (measured on espeak speech at -50 to -63 dBFS: every start heard
where Silero on every window hears it, or earlier). It skips digital silence and the quietest noise;
a microphone with a noise floor above -70 dBFS gets Silero on every window, as before. Once a
window is loud, Silero judges every window until `AWAKE_WINDOWS` quiet ones in a row, and always
while the gate is open (its end is Silero's decision, as before). The speaker's pre-roll (0.5 s
before the detected onset, speaker.py) holds an onset noticed a window or two late.

A margin over each microphone's own noise (skip windows within 3 dB of its steady hiss) was tried
and reverted (2026-12-08, docs/benchmarks/host.md): it lost quiet answers soon after a noise stopped
(its estimate lagged, and Silero's state after seconds of skipped windows scored them lower);
tests/test_vad_pregate.py keeps those cases.

The 24 -> 16 kHz resampling for Silero is done here in numpy (a 48-tap windowed-sinc low-pass,
polyphase), one window at a time, instead of a round trip to the native resampler for every chunk.

`CAPTIONS_HOST_PATH=today` (captions/live/sdk_fixes.py) keeps the path before these changes: the
native resampler and Silero on every window (`captions bench host` measures both).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from livekit import rtc
from livekit.local_inference import VAD, VAD_WINDOW_SAMPLES

from captions.live.sdk_fixes import todays_host_path
from captions.stt.api import SAMPLE_RATE

VAD_SAMPLE_RATE = 16000
WINDOW_24K = VAD_WINDOW_SAMPLES * SAMPLE_RATE // VAD_SAMPLE_RATE
"""One VAD window (32 ms) in samples of the track's 24 kHz audio."""
AWAKE_WINDOWS = 16
"""Quiet windows in a row (0.5 s) after a loud one during which Silero still judges every window."""
WARM_UP_WINDOWS = 8
"""Windows before a loud one that Silero hears first when it wakes (256 ms)."""


@dataclass
class GateOptions:
    activation: float = 0.5
    """Speech starts when the probability reaches this..."""
    onset_windows: int = 2
    """...for this many windows in a row (64 ms: a click is not speech)."""
    deactivation: float = 0.35
    """Speech goes on while the probability stays at or above this."""
    energy_floor_dbfs: float | None = -70.0
    """A window quieter than this (RMS, dB of full scale) is silence without asking Silero, while
    the gate is closed and nothing loud came just before (module notes); None: Silero judges all."""


class _Resampler:
    """24 kHz int16 windows to 16 kHz for Silero: upsampling by 2 (zeros between samples), a
    windowed-sinc low-pass at 7.2 kHz, and every third sample kept, computed as two polyphase dot
    products per output sample pair. Each window is resampled with the samples before it as its
    context, so that the windows Silero is asked about need not be contiguous."""

    TAPS = 48
    CONTEXT = TAPS // 2

    def __init__(self) -> None:
        n = np.arange(self.TAPS) - (self.TAPS - 1) / 2
        cutoff = 7200 / (2 * SAMPLE_RATE)  # of the 48 kHz upsampled rate
        h = 2 * cutoff * np.sinc(2 * cutoff * n) * np.kaiser(self.TAPS, 6.0)
        even, odd = h[0::2], h[1::2]
        # Rows: the 25 block samples from 3q - 23 to 3q + 1 (the context before the block's start);
        # columns: output 2q (the even taps, up to sample 3q) and 2q + 1 (the odd ones, up to 3q + 1).
        taps = np.zeros((self.CONTEXT + 1, 2), dtype=np.float32)
        taps[:-1, 0] = (even / even.sum())[::-1]
        taps[1:, 1] = (odd / odd.sum())[::-1]
        self._taps = taps
        self._indices: dict[int, np.ndarray] = {}

    def windows(self, context: np.ndarray, block: np.ndarray) -> np.ndarray:
        """16 kHz int16 samples of `block` (whole windows, n x WINDOW_24K samples) as an (n, 512)
        array; `context`: the CONTEXT samples before the block. Output 2q lies on input sample 3q,
        output 2q + 1 between 3q + 1 and 3q + 2: each pair is one gather of the 25 samples up to
        them and one small matrix product (the even taps, the odd taps)."""
        x = np.concatenate([context, block]).astype(np.float32)
        pairs = block.size // 3
        out = (x[self._gather(pairs)] @ self._taps).reshape(-1)
        return np.clip(out, -32768, 32767, out=out).astype(np.int16).reshape(-1, 2 * WINDOW_24K // 3)

    def _gather(self, pairs: int) -> np.ndarray:
        index = self._indices.get(pairs)
        if index is None:
            index = self._indices[pairs] = 1 + 3 * np.arange(pairs)[:, None] + np.arange(self.CONTEXT + 1)[None, :]
        return index


class SpeechGate:
    """Silero VAD over one track's 24 kHz int16 audio, fed in chunks of any size."""

    def __init__(self, options: GateOptions | None = None):
        self.options = options or GateOptions()
        self._vad = VAD()
        self._today = todays_host_path()
        if self._today:
            self._resampler = rtc.AudioResampler(SAMPLE_RATE, VAD_SAMPLE_RATE, num_channels=1,
                                                 quality=rtc.AudioResamplerQuality.QUICK)
        else:
            self._window_resampler = _Resampler()
            self._history = np.zeros(WARM_UP_WINDOWS * WINDOW_24K + _Resampler.CONTEXT, dtype=np.int16)
            """The audio just before the windows being fed: resampling context, and Silero's warm-up."""
            self._skipped_last = False
            floor = self.options.energy_floor_dbfs
            self._floor_energy = None if floor is None else WINDOW_24K * (32768 * 10 ** (floor / 20)) ** 2
            self._awake = 0
            """Windows Silero still judges whatever their energy (after a loud one)."""
        self.silero_windows = 0
        """Windows Silero judged."""
        self.skipped_windows = 0
        """Windows judged silence by their energy alone."""
        self._pending = np.zeros(0, dtype=np.int16)
        self._windows = 0
        """Windows judged so far: window w covers 24 kHz samples [w, w + 1) * WINDOW_24K."""
        self._run = 0
        self.speaking = False
        self.onset: int | None = None
        """Where the current (or last) stretch of speech started (24 kHz sample index)."""
        self.last_speech: int | None = None
        """The end of the last window judged speech (24 kHz sample index)."""

    def feed(self, pcm: np.ndarray) -> bool:
        """Judges the windows this audio completes; True when speech started in it."""
        if self._today:
            return self._feed_today(pcm)
        pending = np.concatenate([self._pending, pcm]) if self._pending.size else pcm
        count = pending.size // WINDOW_24K
        block, self._pending = pending[:count * WINDOW_24K], pending[count * WINDOW_24K:]
        resampled = None  # the block's windows at 16 kHz, made once if Silero is asked about one
        started = False
        history = self._history.size
        audio = np.concatenate([self._history, block]) if count else self._history
        for i in range(count):
            window = block[i * WINDOW_24K:(i + 1) * WINDOW_24K]
            if self._skip(window):
                probability, self._skipped_last = 0.0, True
            else:
                if self._skipped_last:  # waking up: Silero hears the windows just before first
                    self._warm_up(audio[:history + i * WINDOW_24K])
                    self._skipped_last = False
                if resampled is None:
                    resampled = self._window_resampler.windows(self._history[-_Resampler.CONTEXT:], block)
                probability = self._silero(resampled[i])
            started |= self._judge(probability)
        if count:
            self._history = audio[-history:]
        return started

    def _warm_up(self, before: np.ndarray) -> None:
        """Feeds Silero the `WARM_UP_WINDOWS` windows at the end of `before` (their verdicts unused):
        after skipped windows its state is stale, and a cold or stale state scores a quiet voice's
        first windows too low (a review measured quiet answers lost)."""
        warm = before[-WARM_UP_WINDOWS * WINDOW_24K - _Resampler.CONTEXT:]
        for window16 in self._window_resampler.windows(warm[:_Resampler.CONTEXT], warm[_Resampler.CONTEXT:]):
            self._silero(window16)

    def _skip(self, window: np.ndarray) -> bool:
        """Whether the window is silence by its energy alone (module notes)."""
        if self._floor_energy is None:
            return False
        samples = window.astype(np.float32)
        if float(np.dot(samples, samples)) >= self._floor_energy:
            self._awake = AWAKE_WINDOWS
            return False
        if self._awake > 0:
            self._awake -= 1
            return False
        if self.speaking:
            return False
        self.skipped_windows += 1
        return True

    def _silero(self, window16: np.ndarray) -> float:
        self.silero_windows += 1
        return self._vad.predict(window16)

    def _feed_today(self, pcm: np.ndarray) -> bool:
        frame = rtc.AudioFrame(pcm.tobytes(), SAMPLE_RATE, 1, pcm.size)
        resampled = [np.frombuffer(f.data, dtype=np.int16) for f in self._resampler.push(frame)]
        if resampled:
            self._pending = np.concatenate([self._pending, *resampled])
        started = False
        while self._pending.size >= VAD_WINDOW_SAMPLES:
            window, self._pending = self._pending[:VAD_WINDOW_SAMPLES], self._pending[VAD_WINDOW_SAMPLES:]
            self.silero_windows += 1
            started |= self._judge(self._vad.predict(np.ascontiguousarray(window)))
        return started

    def _judge(self, probability: float) -> bool:
        index, self._windows = self._windows, self._windows + 1
        options = self.options
        if self.speaking:
            if probability >= options.deactivation:
                self.last_speech = (index + 1) * WINDOW_24K
            else:
                self.speaking = False
            return False
        self._run = self._run + 1 if probability >= options.activation else 0
        if self._run < options.onset_windows:
            return False
        self.speaking, self._run = True, 0
        self.onset = (index + 1 - options.onset_windows) * WINDOW_24K
        self.last_speech = (index + 1) * WINDOW_24K
        return True

    def close(self) -> None:
        self._vad.close()
