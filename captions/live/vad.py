"""When a speaker talks: LiveKit's own Silero voice-activity model on each microphone, on the CPU.

livekit-agents ships Silero in `livekit.local_inference` (native, one 32 ms window of 16 kHz audio
per call, per-instance state, weights inside the package: nothing is downloaded). Its agents'
stream wrapper hands every window to a thread pool, which costs more than the model itself; here
the windows are fed directly, from the audio the worker already receives at 24 kHz.

`SpeechGate` turns the per-window probabilities into a few facts about one track, in samples of
its 24 kHz audio: whether the speaker talks now, where the current stretch of speech started, and
where the speaker last spoke. How long a pause ends a turn is the caller's business (speaker.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from livekit import rtc
from livekit.local_inference import VAD, VAD_WINDOW_SAMPLES

from captions.stt.api import SAMPLE_RATE

VAD_SAMPLE_RATE = 16000
WINDOW_24K = VAD_WINDOW_SAMPLES * SAMPLE_RATE // VAD_SAMPLE_RATE
"""One VAD window (32 ms) in samples of the track's 24 kHz audio."""


@dataclass
class GateOptions:
    activation: float = 0.5
    """Speech starts when the probability reaches this..."""
    onset_windows: int = 2
    """...for this many windows in a row (64 ms: a click is not speech)."""
    deactivation: float = 0.35
    """Speech goes on while the probability stays at or above this."""


class SpeechGate:
    """Silero VAD over one track's 24 kHz int16 audio, fed in chunks of any size."""

    def __init__(self, options: GateOptions | None = None):
        self.options = options or GateOptions()
        self._vad = VAD()
        self._resampler = rtc.AudioResampler(SAMPLE_RATE, VAD_SAMPLE_RATE, num_channels=1,
                                             quality=rtc.AudioResamplerQuality.QUICK)
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
        frame = rtc.AudioFrame(pcm.tobytes(), SAMPLE_RATE, 1, pcm.size)
        resampled = [np.frombuffer(f.data, dtype=np.int16) for f in self._resampler.push(frame)]
        if resampled:
            self._pending = np.concatenate([self._pending, *resampled])
        started = False
        while self._pending.size >= VAD_WINDOW_SAMPLES:
            window, self._pending = self._pending[:VAD_WINDOW_SAMPLES], self._pending[VAD_WINDOW_SAMPLES:]
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
