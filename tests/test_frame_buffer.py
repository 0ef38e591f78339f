"""captions/stt/audio.py's FrameBuffer: whatever the chunking, the frames it hands out are the audio,
in order, each its own array (later pushes, and the caller reusing its buffer, never change one
already handed out), and a flush pads the last one with silence."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from captions.stt.audio import FrameBuffer

FRAME = 16


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3 * FRAME + 1), max_size=30))
def test_any_chunking_gives_the_audio_in_whole_frames_then_a_padded_tail(sizes):
    audio = np.arange(1, sum(sizes) + 1, dtype=np.float32)
    buffer = FrameBuffer(FRAME)
    frames, offset = [], 0
    reused = np.empty(3 * FRAME + 1, dtype=np.float32)
    for size in sizes:
        reused[:size] = audio[offset:offset + size]
        frames += buffer.push(reused[:size])
        reused.fill(-1.0)  # the caller reuses its buffer
        offset += size
        assert buffer.pending == offset % FRAME
    assert len(frames) == audio.size // FRAME
    tail = buffer.flush()
    assert buffer.pending == 0 and buffer.flush() == []
    padded = np.concatenate([audio, np.zeros(-audio.size % FRAME, np.float32)])
    got = np.concatenate(frames + tail) if frames or tail else np.zeros(0, np.float32)
    assert np.array_equal(got, padded)
    assert all(frame.shape == (FRAME,) for frame in frames + tail)
