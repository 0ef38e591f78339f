"""captions/live/sdk_fixes.py against the real livekit SDK and a real livekit-server: each speaker's audio stream
is woken by its own track only, and still gets all of its own audio."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from livekit import rtc

from captions.dev.bots import Publisher, make_token
from captions.live.sdk_fixes import open_audio_stream

pytestmark = pytest.mark.livekit

RATE = 24000
TONES_HZ = {"low": 300.0, "high": 1700.0}


def tone_wav(path: Path, hz: float, seconds: float) -> Path:
    import wave

    t = np.arange(int(seconds * RATE)) / RATE
    pcm = (np.sin(2 * np.pi * hz * t) * 8000).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.tobytes())
    return path


def dominant_hz(pcm16: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(pcm16.astype(np.float64)))
    return float(np.fft.rfftfreq(pcm16.size, 1 / RATE)[int(np.argmax(spectrum))])


class CountingQueue:
    """Counts, per stream handle, the audio events the FFI layer hands to one stream's queue."""

    def __init__(self, stream: rtc.AudioStream):
        self.handles: Counter[int] = Counter()
        queue = stream._ffi_queue
        put = queue.put_nowait

        def counting_put(event) -> None:
            if event.WhichOneof("message") == "audio_stream_event":
                self.handles[event.audio_stream_event.stream_handle] += 1
            put(event)

        queue.put_nowait = counting_put


async def test_each_speakers_audio_stream_is_woken_only_by_its_own_track(livekit_server, tmp_path):
    room_name = "lkffi-fanout"
    speakers = {name: await Publisher(livekit_server, room_name, name, auto_subscribe=False).connect()
                for name in TONES_HZ}
    listener = rtc.Room()
    subscribed: dict[str, rtc.Track] = {}
    listener.on("track_subscribed", lambda track, _pub, who: subscribed.__setitem__(who.identity, track))
    await listener.connect(livekit_server.url, make_token(livekit_server, room_name, "listener"))
    try:
        for _ in range(100):
            if set(subscribed) == set(TONES_HZ):
                break
            await asyncio.sleep(0.1)
        assert set(subscribed) == set(TONES_HZ), f"listener subscribed to {sorted(subscribed)}"

        narrowed = {name: open_audio_stream(track, sample_rate=RATE, frame_size_ms=10)
                    for name, track in subscribed.items()}
        # The SDK's own stream, on the same track, for comparison.
        plain = rtc.AudioStream.from_track(track=subscribed["low"], sample_rate=RATE, num_channels=1,
                                           frame_size_ms=10)
        counters = {name: CountingQueue(stream) for name, stream in narrowed.items()}
        plain_counter = CountingQueue(plain)
        received: dict[str, list[np.ndarray]] = {name: [] for name in narrowed}

        async def read(name: str, stream: rtc.AudioStream) -> None:
            async for event in stream:
                received[name].append(np.frombuffer(event.frame.data, dtype=np.int16).copy())

        async def drain(stream: rtc.AudioStream) -> None:
            async for _ in stream:
                pass

        readers = [asyncio.create_task(read(name, stream)) for name, stream in narrowed.items()]
        readers.append(asyncio.create_task(drain(plain)))
        await asyncio.gather(*(speakers[name].play(tone_wav(tmp_path / f"{name}.wav", hz, 1.5))
                               for name, hz in TONES_HZ.items()))
        await asyncio.sleep(0.3)
        for stream in [*narrowed.values(), plain]:
            await stream.aclose()
        for reader in readers:
            reader.cancel()
    finally:
        await listener.disconnect()
        for speaker in speakers.values():
            await speaker.disconnect()

    handles = {name: stream._ffi_handle.handle for name, stream in narrowed.items()}
    for name, counter in counters.items():
        assert set(counter.handles) <= {handles[name]}, (
            f"{name}'s stream was handed other streams' audio: {dict(counter.handles)}")
        assert counter.handles[handles[name]] >= 100, f"{name}'s stream got {dict(counter.handles)}"
    # Without the fix every stream sees every stream's events. When this fails, the SDK filters by
    # stream itself (livekit >= 1.2 does): captions/live/sdk_fixes.open_audio_stream can go.
    assert set(plain_counter.handles) > {plain._ffi_handle.handle}, (
        f"the SDK no longer fans audio out to every stream: {dict(plain_counter.handles)}")

    # Each stream still carries its own speaker, whole: 1.5 s of its tone.
    for name, hz in TONES_HZ.items():
        pcm = np.concatenate(received[name])
        loud = pcm[np.abs(pcm) > 1000]
        assert loud.size >= 1.2 * RATE, f"{name}: {loud.size / RATE:.2f} s of its tone arrived"
        assert abs(dominant_hz(pcm) - hz) < 20, f"{name}: heard {dominant_hz(pcm):.0f} Hz, sent {hz:.0f} Hz"
