"""captions/live/sdk_fixes.py against the real livekit SDK and a real livekit-server: each speaker's audio stream
is handed its own track's audio only, and still gets all of its own audio; and two rooms connecting at once
in a fresh process both connect once the FFI runtime was created early (and one of them hangs
without that, which is why the worker does it)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from livekit import rtc

from captions.dev.bots import Publisher, make_token
from captions.live.sdk_fixes import open_audio_stream
from captions.stt.api import SAMPLE_RATE

pytestmark = pytest.mark.livekit

RATE = SAMPLE_RATE
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


def tone_passed(chunks: list[np.ndarray]) -> bool:
    """The stream has received a loud stretch and, after it, a quiet chunk: the whole tone is in."""
    loud = [i for i, chunk in enumerate(chunks) if np.abs(chunk).max(initial=0) > 1000]
    return bool(loud) and loud[-1] < len(chunks) - 1


async def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.05)


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
        await wait_until(lambda: all(tone_passed(chunks) for chunks in received.values()), 10,
                         "the end of each tone to reach its stream")
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
    # The router hands each routed stream's audio to that stream only, so an unrouted stream of the
    # SDK's own sees only its own audio as well (the SDK's fan-out itself: tests/test_sdk_fixes.py).
    assert set(plain_counter.handles) == {plain._ffi_handle.handle}, dict(plain_counter.handles)

    # Each stream still carries its own speaker, whole: 1.5 s of its tone.
    for name, hz in TONES_HZ.items():
        pcm = np.concatenate(received[name])
        loud = pcm[np.abs(pcm) > 1000]
        assert loud.size >= 1.2 * RATE, f"{name}: {loud.size / RATE:.2f} s of its tone arrived"
        assert abs(dominant_hz(pcm) - hz) < 20, f"{name}: heard {dominant_hz(pcm):.0f} Hz, sent {hz:.0f} Hz"


@pytest.mark.parametrize("path", ["new", "today"])
async def test_audio_chunks_carry_each_tracks_own_audio_whole_by_either_path(livekit_server, tmp_path, monkeypatch,
                                                                            path):
    """sdk_fixes.audio_chunks, as the worker reads every microphone: through the router (each chunk
    taken out of its event on the loop's hand-over) or, with CAPTIONS_HOST_PATH=today, the narrowed
    SDK stream. Two readers on each track (the kept and the live stream of one speaker)."""
    from captions.live.sdk_fixes import audio_chunks

    monkeypatch.setenv("CAPTIONS_HOST_PATH", path)
    room_name = f"lkffi-chunks-{path}"
    speakers = {name: await Publisher(livekit_server, room_name, name, auto_subscribe=False).connect()
                for name in TONES_HZ}
    listener = rtc.Room()
    subscribed: dict[str, rtc.Track] = {}
    listener.on("track_subscribed", lambda track, _pub, who: subscribed.__setitem__(who.identity, track))
    await listener.connect(livekit_server.url, make_token(livekit_server, room_name, "listener"))
    received: dict[tuple[str, int], list[np.ndarray]] = {}
    try:
        await wait_until(lambda: set(subscribed) == set(TONES_HZ), 10, "both tracks")

        async def read(key: tuple[str, int]) -> None:
            async for pcm in audio_chunks(subscribed[key[0]], sample_rate=RATE, frame_size_ms=key[1]):
                received[key].append(pcm.copy())

        keys = [(name, chunk_ms) for name in TONES_HZ for chunk_ms in (80, 10)]
        received.update({key: [] for key in keys})
        readers = [asyncio.create_task(read(key)) for key in keys]
        await asyncio.gather(*(speakers[name].play(tone_wav(tmp_path / f"{name}.wav", hz, 1.5))
                               for name, hz in TONES_HZ.items()))
        await wait_until(lambda: all(tone_passed(chunks) for chunks in received.values()), 10,
                         "the end of each tone to reach each reader")
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)  # each closes its stream
    finally:
        await listener.disconnect()
        for speaker in speakers.values():
            await speaker.disconnect()

    for (name, chunk_ms), chunks in received.items():
        assert {chunk.size for chunk in chunks} == {RATE * chunk_ms // 1000}
        pcm = np.concatenate(chunks)
        loud = pcm[np.abs(pcm) > 1000]
        assert loud.size >= 1.2 * RATE, f"{name}/{chunk_ms}: {loud.size / RATE:.2f} s of its tone arrived"
        assert abs(dominant_hz(pcm) - TONES_HZ[name]) < 20, f"{name}/{chunk_ms}: heard {dominant_hz(pcm):.0f} Hz"
    # The two readers of a track resample the same decoded audio: the 10 ms one's samples, after
    # its cold first chunk, lie whole in the 80 ms one's (what track_audio.py's splice relies on).
    for name in TONES_HZ:
        kept, live = np.concatenate(received[(name, 80)]), np.concatenate(received[(name, 10)][1:])
        probe = live[RATE:RATE + 3 * RATE // 100]
        assert any(np.array_equal(kept[i:i + probe.size], probe) for i in range(0, kept.size - probe.size, RATE // 100))


# Two rooms connect at the same moment from two threads, each with its own event loop (as the
# worker's THREAD executor runs two rooms dispatched at once), in a process that has not used the
# SDK yet. Prints {"0": outcome, "1": outcome}.
TWO_ROOMS_AT_ONCE = """
import asyncio, json, os, sys, threading
from livekit import rtc
url, early, tokens = sys.argv[1], sys.argv[2] == "early", sys.argv[3:]
if early:
    from captions.live.sdk_fixes import start_livekit_runtime
    start_livekit_runtime()
barrier, outcomes = threading.Barrier(len(tokens)), {}

def join(i):
    async def connect():
        room = rtc.Room()
        barrier.wait()
        try:
            await asyncio.wait_for(room.connect(url, tokens[i]), CONNECT_TIMEOUT_S)
            outcomes[i] = "connected"
            await room.disconnect()
        except Exception as e:
            outcomes[i] = type(e).__name__
    asyncio.run(connect())

threads = [threading.Thread(target=join, args=(i,)) for i in range(len(tokens))]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(outcomes), flush=True)
os._exit(0)  # a room that never connected would hold the interpreter at exit
"""
CONNECT_TIMEOUT_S = 5


def connect_two_rooms_at_once(server, attempt: str, early_runtime: bool) -> dict[str, str]:
    tokens = [make_token(server, f"lkffi-race-{attempt}-{i}", f"agent-{i}") for i in range(2)]
    code = TWO_ROOMS_AT_ONCE.replace("CONNECT_TIMEOUT_S", str(CONNECT_TIMEOUT_S))
    out = subprocess.run([sys.executable, "-c", code, server.url, "early" if early_runtime else "lazy", *tokens],
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_two_rooms_connecting_at_once_in_a_fresh_process_both_connect_once_the_runtime_exists(livekit_server):
    """sdk_fixes.start_livekit_runtime, as the worker calls it before registering: every attempt
    connects both rooms. Without it, livekit 1.1.21 creates its FFI client lazily and without a
    lock: each thread creates one, the second replaces the first as the one that receives every
    event, and the room that subscribed to the first never sees its connect answer."""
    for attempt in range(3):
        assert connect_two_rooms_at_once(livekit_server, f"early-{attempt}", early_runtime=True) == \
            {"0": "connected", "1": "connected"}
    lazy = [connect_two_rooms_at_once(livekit_server, f"lazy-{attempt}", early_runtime=False) for attempt in range(3)]
    # When this fails, the SDK (livekit.rtc._ffi_client.FfiClient.instance) creates its runtime
    # safely: start_livekit_runtime can go.
    assert any(set(outcomes.values()) == {"connected", "TimeoutError"} for outcomes in lazy), (
        f"without the early runtime both rooms connected every time: {lazy}")
