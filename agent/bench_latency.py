"""`captions bench latency`: how long a spoken word takes to reach a viewer, through a real server.

For each speaker count N: a livekit-server --dev on free loopback ports, the real worker as a
subprocess (`captions worker dev --batch-size N --timing-attributes`), N publisher bots speaking
espeak-ng speech in real time into one room, and one hidden subscriber collecting the
`lk.transcription` streams. Every clock is this machine's time.time().

Latency of a caption update that adds a word = its arrival at the subscriber minus the capture
time of the last audio frame the model had consumed when it emitted the update. The worker's
`captions.timing` attribute (agent/room.py) splits it:

    transport   frame received by the agent (rtc.AudioStream)  - frame captured at the publisher
    queue       engine step started                             - frame received
    step        engine step ended (tokens decoded)              - step started
    agent       caption handed to LiveKit (stream_text)         - step ended
                (= event hop to the room's loop + waiting in the room's publish queue)
    delivery    caption read whole by the subscriber            - handed to LiveKit

Aligning the publisher's audio with the agent's stream: the bots send digital silence until the
agent has subscribed to every microphone, then a fixed lead-in, then speech. The speech starts at
clip sample s0 (first |sample| > ONSET_THRESHOLD) captured at known wall time; the agent reports
the index of its stream's first such sample (`onset_sample`), so stream sample p was captured at
T(s0) + (p - onset) / 24000. The sender or the receiver's jitter buffer may insert or drop samples
later on, so the worker's recording of each stream is cross-correlated with the clip every 0.5 s
and the shift measured there replaces the onset's (its error and drift are reported).

The bots (a child process) are microphones: the 20 ms holding timeline samples [480 j, 480 j + 480)
are complete (captured) at origin + (j + 1) * 20 ms and are handed to WebRTC then, with no queue in
between; the bots' lateness against that schedule is reported (it counts as transport, as a slow
sender would).

The model's own text delay (0.5 s for stt-1b-en_fr, learnt: the model waits that long before
writing a word) is not in these figures: it is reported beside them. The tiny test checkpoint
answers at once (see tiny_checkpoint.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bench import (
    add_output_options,
    add_test_checkpoint_options,
    finish_report,
    frame_modes,
    machine_description,
    positive_ints,
    resolve_test_checkpoint,
    save_figure,
    summarize_ms,
)
from .config import add_option, positive_int
from .log import logger

SAMPLE_RATE = 24000
FRAME_SIZE = 1920
TICK_S = 0.02
TICK_SAMPLES = 480
"""The bots wake every 20 ms, the Opus packet duration WebRTC sends anyway, and hand over two 10 ms
frames (real-time capture takes 10 ms frames); waking every 10 ms would cost them twice the Python
work for no earlier packet."""
CAPTURE_SAMPLES = 240
BOT_NICENESS = 10
PUBLISHER_QUEUE_MS = int(os.environ.get("CAPTIONS_BENCH_PUBLISHER_QUEUE_MS", "0"))
"""0: the bots' AudioSource hands each frame straight to WebRTC (real-time capture, no queue)."""
COMPONENTS = ("transport", "queue", "step", "agent", "delivery")
AGENT_PARTS = ("agent_hop", "agent_publish_queue")
SUBSCRIBE_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 30.0
ALIGN_WINDOW_S = 0.5
ALIGN_STEP_S = 0.5
ALIGN_SEARCH_S = 0.15
ALIGN_MIN_PEAK = 1000
ALIGN_MIN_CORRELATION = 0.5
RUN_ATTEMPTS = 2
TARGET_SPEAKERS = 8
TARGET_P95_MS = 150.0


class BenchError(Exception):
    """The benchmark cannot run or its figures would be wrong; the message says why."""


class BotFailed(BenchError):
    """A speaker bot process failed."""


# ---- the speaking bots ---------------------------------------------------------------------------

@dataclass
class Voice:
    """One publisher and the speech it will say."""

    publisher: object
    clip: np.ndarray
    """int16 mono 24 kHz speech."""
    clip_onset: int
    """Index of the clip's first sample above the onset threshold."""
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)


class Chorus:
    """Drives every publisher from one clock: silence until `start_speech`, then each its clip,
    then silence. One loop for all (one timer per bot would cost more than the bots' audio)."""

    def __init__(self, voices: list[Voice], tail_s: float):
        self.voices = voices
        self.tail_ticks = round(tail_s / TICK_S)
        self.origin_wall = 0.0
        self.speech_tick: int | None = None
        self.lateness: list[float] = []
        self.handed_at: list[float] = []
        """Wall time at which each 20 ms of speech (from the clip's start) was handed to WebRTC."""
        self._end_tick: int | None = None
        self._silence = np.zeros(TICK_SAMPLES, dtype=np.int16)

    @property
    def speech_started_at(self) -> float:
        """Wall time at which clip sample 0 was captured (the microphone's timeline)."""
        assert self.speech_tick is not None
        return self.origin_wall + self.speech_tick * TICK_S

    def start_speech(self, after_s: float, at_tick: int) -> None:
        self.speech_tick = at_tick + round(after_s / TICK_S)
        longest = max(v.clip.size for v in self.voices)
        self._end_tick = self.speech_tick + -(-longest // TICK_SAMPLES) + self.tail_ticks

    def _chunk(self, voice: Voice, tick: int) -> np.ndarray:
        if self.speech_tick is None or tick < self.speech_tick:
            return self._silence
        offset = (tick - self.speech_tick) * TICK_SAMPLES
        chunk = voice.clip[offset:offset + TICK_SAMPLES]
        if chunk.size < TICK_SAMPLES:
            chunk = np.concatenate([chunk, np.zeros(TICK_SAMPLES - chunk.size, np.int16)])
        return chunk

    async def run(self, ready: asyncio.Future, deadline: float) -> None:
        """Plays until the tail after the speech ends; `ready` resolves (to the lead-in in seconds)
        once the agent has subscribed to every bot."""
        from livekit import rtc

        origin = time.monotonic()
        self.origin_wall = time.time() - (time.monotonic() - origin)
        tick = 0
        while self._end_tick is None or tick < self._end_tick:
            if time.monotonic() > deadline:
                raise BenchError("the speakers did not finish in time (is the machine overloaded?)")
            if self.speech_tick is None and ready.done():
                self.start_speech(ready.result(), tick)
            # Frame `tick` is complete at the end of its 20 ms; a microphone hands it over then.
            due = origin + (tick + 1) * TICK_S
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.speech_tick is not None and tick >= self.speech_tick:
                self.lateness.append(time.monotonic() - due)
                self.handed_at.append(time.time())
            # All bots at once: the FFI round trips overlap rather than add up.
            await asyncio.gather(*(self._capture(rtc, v, self._chunk(v, tick)) for v in self.voices))
            tick += 1

    @staticmethod
    async def _capture(rtc, voice: Voice, chunk: np.ndarray) -> None:
        for start in range(0, chunk.size, CAPTURE_SAMPLES):
            part = chunk[start:start + CAPTURE_SAMPLES]
            frame = rtc.AudioFrame(part.tobytes(), SAMPLE_RATE, 1, part.size)
            await voice.publisher.source.capture_frame(frame)


def onset_of(pcm16: np.ndarray) -> int | None:
    from .room import ONSET_THRESHOLD

    loud = np.flatnonzero(np.abs(pcm16.astype(np.int32)) > ONSET_THRESHOLD)
    return int(loud[0]) if loud.size else None


def speech_clips(count: int, seconds: float) -> list[np.ndarray]:
    """`count` different int16 speech clips (espeak-ng voices and sentences, see bench_engine)."""
    from .bench_engine import BenchError as EngineBenchError
    from .bench_engine import speech_streams

    try:
        streams = speech_streams(count, seconds)
    except EngineBenchError as e:
        raise BenchError(str(e)) from None
    return [np.clip(np.round(s * 32767.0), -32768, 32767).astype(np.int16) for s in streams]


# ---- one measurement ------------------------------------------------------------------------------

@dataclass
class Session:
    """What one speaker count's run gives the analysis."""

    speakers: int
    voices: dict[str, tuple[str, int]]
    """identity -> (microphone track sid, clip onset index)"""
    clips: dict[str, np.ndarray]
    speech_started_at: dict[str, float]
    """identity -> wall time at which its clip's sample 0 was captured (on the bot's schedule)"""
    handed_at: dict[str, list[float]]
    """identity -> when each 20 ms of its clip was handed to WebRTC (see `captured_at`)"""
    captions: list
    lateness: list[float]
    load_before: list[float]
    load_after: list[float]
    cpu_cores: dict[str, float]
    engine: dict[str, float]
    """Engine steps while the bots played, from the worker's /metrics (see `engine_activity`)."""


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


async def run_session(server, worker, clips: list[np.ndarray], lead_in_s: float, tail_s: float,
                      timeout_s: float, workdir: Path, bots_per_process: int = 1) -> Session:
    """N bots speak at once in a fresh room; the subscriber, here, collects every caption. The bots
    run in child processes (`_speak`), `bots_per_process` in each, so that their pacing and this
    process's arrival times do not wait on each other's event loop."""
    from .bots import Subscriber

    room = f"bench-latency-{len(clips)}-{uuid.uuid4().hex[:6]}"
    deadline = time.monotonic() + timeout_s
    load_before = [round(x, 2) for x in os.getloadavg()]
    steps_before = await asyncio.to_thread(engine_counters, worker.metrics_port)
    started = time.time()
    np.savez(workdir / "clips.npz", *clips)
    sub = await Subscriber(server, room).connect()
    children: list[asyncio.subprocess.Process] = []
    try:
        for first in range(0, len(clips), bots_per_process):
            indices = list(range(first, min(len(clips), first + bots_per_process)))
            config = {"url": server.url, "api_key": server.api_key, "api_secret": server.api_secret,
                      "room": room, "clips": str(workdir / "clips.npz"), "indices": indices, "lead_in_s": lead_in_s,
                      "tail_s": tail_s, "timeout_s": timeout_s, "out_dir": str(workdir)}
            config_path = workdir / f"bots-{first:02d}-config.json"
            config_path.write_text(json.dumps(config))
            children.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent.bench_latency", str(config_path),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE))
        processes = {"worker": [worker.process.pid], "livekit_server": [server.process.pid],
                     "speaker_bots": [c.pid for c in children], "subscriber": [os.getpid()]}
        sampler = asyncio.create_task(_sample_cpu(processes))
        try:
            results = await asyncio.wait_for(asyncio.gather(*(c.communicate() for c in children)),
                                             max(1.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise BenchError(f"the speaker bots did not finish within {timeout_s:.0f} s") from None
        finally:
            sampler.cancel()
        # Results are written before the bots disconnect: a crash while leaving loses nothing.
        missing = [i for i in range(len(clips)) if not (workdir / f"speaker-{i:02d}.json").is_file()]
        if missing:
            errors = "\n".join(stderr.decode(errors="replace")[-2000:] for child, (_, stderr)
                               in zip(children, results) if child.returncode != 0)
            raise BotFailed(f"speaker bots {missing} failed: {errors}")
        spoken = [json.loads((workdir / f"speaker-{i:02d}.json").read_text()) for i in range(len(clips))]
        load_after = [round(x, 2) for x in os.getloadavg()]
        engine = engine_activity(steps_before, await asyncio.to_thread(engine_counters, worker.metrics_port),
                                 time.time() - started)
        await _wait_until_settled(sub, min(SETTLE_TIMEOUT_S, max(1.0, deadline - time.monotonic())))
        cpu = _cores_used(_CPU_SAMPLES, max(r["speech_started_at"] for r in spoken),
                          min(r["ended_at"] for r in spoken))
        return Session(
            len(clips), {r["identity"]: (r["track_sid"], r["clip_onset"]) for r in spoken},
            {r["identity"]: clips[i] for i, r in enumerate(spoken)},
            {r["identity"]: r["speech_started_at"] for r in spoken},
            {r["identity"]: r["handed_at"] for r in spoken}, list(sub.captions),
            [late for r in spoken for late in r["lateness"]], load_before, load_after, cpu, engine)
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
                await child.wait()
        await sub.disconnect()


def engine_counters(port: int) -> tuple[float, float]:
    """(engine steps so far, sum over them of the streams each carried), from the worker's /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("captions_engine_step_active_streams_count", "captions_engine_step_active_streams_sum"):
            values[name] = float(value)
    return values.get("captions_engine_step_active_streams_count", 0.0), values.get(
        "captions_engine_step_active_streams_sum", 0.0)


def engine_activity(before: tuple[float, float], after: tuple[float, float], seconds: float) -> dict:
    """Steps per second and streams per step while the bots played: with every speaker's frames
    on one clock, about 12.5 steps/s each carrying every speaker."""
    steps, streams = after[0] - before[0], after[1] - before[1]
    return {"steps": int(steps), "seconds": round(seconds, 2),
            "steps_per_s": round(steps / seconds, 2) if seconds > 0 else None,
            "streams_per_step": round(streams / steps, 2) if steps else None}


_CPU_SAMPLES: list[tuple[float, dict[str, float]]] = []


async def _sample_cpu(processes: dict[str, list[int]], period_s: float = 0.5) -> None:
    """Every `period_s`, each group of processes' CPU seconds so far (into _CPU_SAMPLES)."""
    _CPU_SAMPLES.clear()
    while True:
        _CPU_SAMPLES.append((time.time(), {name: sum(_cpu_seconds(pid) for pid in pids)
                                           for name, pids in processes.items()}))
        await asyncio.sleep(period_s)


def _cores_used(samples: list[tuple[float, dict[str, float]]], start: float, end: float) -> dict[str, float]:
    """CPU cores each process used between the samples nearest to `start` and `end`."""
    inside = [(t, cpu) for t, cpu in samples if start <= t <= end]
    if len(inside) < 2:
        return {}
    (t0, first), (t1, last) = inside[0], inside[-1]
    return {name: round((last[name] - first[name]) / (t1 - t0), 2) for name in first}


# ---- the speaker bots (a child process) -----------------------------------------------------------

async def _speak(config: dict) -> None:
    """Connects the publishers of clips `indices`, waits until the agent subscribed to them all,
    then speaks; writes each speaker's result. The livekit FFI hands every event to every room of a
    process, so many bots in one process cost quadratically more (see `--bots-per-process`)."""
    from .bots import Publisher, server_from_config
    from .captions import TOPIC_TRANSCRIPTION

    server = server_from_config(config)
    with np.load(config["clips"]) as archive:
        clips = {i: archive[f"arr_{i}"] for i in config["indices"]}
    deadline = time.monotonic() + config["timeout_s"]
    voices: list[Voice] = []
    try:
        for i, clip in clips.items():
            publisher = await Publisher(server, config["room"], f"speaker-{i:02d}", auto_subscribe=False,
                                        queue_size_ms=PUBLISHER_QUEUE_MS).connect()
            onset = onset_of(clip)
            if onset is None:
                raise BenchError(f"speech clip {i} is silent")
            voice = Voice(publisher, clip, onset)
            # The agent is the only one that subscribes to the bots' microphones.
            publisher.room.on("local_track_subscribed", lambda _track, v=voice: v.subscribed.set())
            # Participants' clients receive the captions too (and would log each one unread).
            publisher.room.register_text_stream_handler(TOPIC_TRANSCRIPTION, _drain)
            voices.append(voice)
        chorus = Chorus(voices, config["tail_s"])
        ready: asyncio.Future = asyncio.get_running_loop().create_future()
        playing = asyncio.create_task(chorus.run(ready, deadline))
        try:
            await _wait_for_agent(voices, playing)
            ready.set_result(config["lead_in_s"])
            await playing
        finally:
            if not playing.done():
                playing.cancel()
                with contextlib.suppress(asyncio.CancelledError, BenchError):
                    await playing
        ended_at = time.time()
        for i, voice in zip(clips, voices):
            result = {"identity": voice.publisher.identity, "track_sid": voice.publisher.track_sid,
                      "clip_onset": voice.clip_onset, "speech_started_at": chorus.speech_started_at,
                      "ended_at": ended_at, "lateness": chorus.lateness, "handed_at": chorus.handed_at}
            (Path(config["out_dir"]) / f"speaker-{i:02d}.json").write_text(json.dumps(result))
    finally:
        for voice in voices:
            with contextlib.suppress(Exception):
                await voice.publisher.disconnect()


def _drain(reader, _identity: str) -> None:
    task = asyncio.ensure_future(reader.read_all())
    _DRAINING.add(task)
    task.add_done_callback(_DRAINING.discard)


_DRAINING: set[asyncio.Future] = set()


async def _wait_for_agent(voices: list[Voice], playing: asyncio.Task) -> None:
    """Until the agent has subscribed to every microphone (the bots send silence meanwhile)."""
    waiting = asyncio.ensure_future(asyncio.gather(*(v.subscribed.wait() for v in voices)))
    done, _ = await asyncio.wait({waiting, playing}, timeout=SUBSCRIBE_TIMEOUT_S,
                                 return_when=asyncio.FIRST_COMPLETED)
    if playing in done:
        waiting.cancel()
        playing.result()  # raises what stopped the bots
    if waiting not in done:
        waiting.cancel()
        missing = sum(not v.subscribed.is_set() for v in voices)
        raise BenchError(f"the agent did not subscribe to {missing} of {len(voices)} speakers within "
                         f"{SUBSCRIBE_TIMEOUT_S:.0f} s")


def _child_main(config_path: str) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING)
    # The bots stand for people on other machines: they yield the CPU to the agent under test.
    os.nice(BOT_NICENESS)
    config = json.loads(Path(config_path).read_text())
    try:
        asyncio.run(_speak(config))
    except BenchError as e:
        print(f"speaker bots: {e}", file=sys.stderr)
        return 1
    return 0


async def _wait_until_settled(sub, timeout: float, quiet_s: float = 1.5) -> None:
    """Until every segment is final and nothing arrived for `quiet_s` (bounded by `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        segments = sub.by_segment().values()
        last = max((c.received_at for c in sub.captions), default=0.0)
        if all(any(c.final for c in s) for s in segments) and time.time() - last >= quiet_s:
            return
        await asyncio.sleep(0.1)
    logger.warning("some segments were still open after %.0f s", timeout)


# ---- analysis -------------------------------------------------------------------------------------

def word_updates(captions: list) -> list:
    """The caption updates that add a word: more words than the segment's previous update
    (the first update of a segment counts when it has text)."""
    counts: dict[str, int] = {}
    added = []
    for caption in sorted(captions, key=lambda c: c.order):
        words = len(caption.text.split())
        if words > counts.get(caption.segment_id, 0):
            added.append(caption)
        counts[caption.segment_id] = max(words, counts.get(caption.segment_id, 0))
    return added


def latency_records(session: Session, alignments: dict[str, Alignment]) -> tuple[list[dict], dict]:
    """One record of seconds per word-adding update, and counts of what could not be used."""
    from .room import ATTR_TIMING

    records, skipped = [], {"no_timing": 0, "unknown_speaker": 0, "no_receive_time": 0, "no_onset": 0}
    for caption in word_updates(session.captions):
        if caption.sender not in session.voices:
            skipped["unknown_speaker"] += 1
            continue
        raw = caption.attributes.get(ATTR_TIMING)
        if raw is None:
            skipped["no_timing"] += 1
            continue
        timing = json.loads(raw)
        if timing.get("frame_received") is None:
            skipped["no_receive_time"] += 1
            continue
        if timing.get("onset_sample") is None:
            skipped["no_onset"] += 1
            continue
        _, clip_onset = session.voices[caption.sender]
        alignment = alignments.get(caption.sender) or Alignment.from_onset(timing["onset_sample"], clip_onset)
        # The end of frame k, on the publisher's microphone timeline.
        stream_end = (timing["frame"] + 1) * FRAME_SIZE - timing.get("lead_samples", 0)
        captured = captured_at(session, caption.sender, alignment.clip_index(stream_end))
        records.append({
            "speaker": caption.sender,
            "final": caption.final,
            "total": caption.received_at - captured,
            "transport": timing["frame_received"] - captured,
            "queue": timing["step_started"] - timing["frame_received"],
            "step": timing["step_ended"] - timing["step_started"],
            "agent": timing["published"] - timing["step_ended"],
            "agent_hop": timing["event_handled"] - timing["step_ended"],
            "agent_publish_queue": timing["published"] - timing["event_handled"],
            "delivery": caption.received_at - timing["published"],
            "onset_sample": timing["onset_sample"],
        })
    return records, skipped


def captured_at(session: Session, identity: str, clip_end: int) -> float:
    """When the clip's samples before `clip_end` had all been captured: the moment the bot handed
    the 20 ms holding the last of them to WebRTC. That is its schedule (a microphone delivers 20 ms
    once recorded), or later when the bot was late: the bot's own lateness is not the pipeline's,
    and is reported apart."""
    tick = (clip_end - 1) // TICK_SAMPLES
    handed = session.handed_at[identity]
    if 0 <= tick < len(handed):
        return handed[tick]
    return session.speech_started_at[identity] + clip_end / SAMPLE_RATE


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
    from .room import ATTR_TIMING

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


def summarize_run(session: Session, records: list[dict], skipped: dict, alignment: dict) -> dict:
    keys = ("total", *COMPONENTS, *AGENT_PARTS)
    latency = {key: summarize_ms([r[key] for r in records]) for key in keys}
    component_sum = sum(latency[key]["mean"] or 0.0 for key in COMPONENTS)
    return {
        "speakers": session.speakers,
        "captions_received": len(session.captions),
        "finals_received": sum(c.final for c in session.captions),
        "word_updates": len(records),
        "skipped_updates": skipped,
        "speakers_captioned": len({r["speaker"] for r in records}),
        "latency_ms": latency,
        "components_mean_sum_ms": round(component_sum, 3),
        "publisher_lateness_ms": summarize_ms(session.lateness),
        "alignment": alignment,
        "cpu_cores_used": session.cpu_cores,
        "engine": session.engine,
        "load_average_before": session.load_before,
        "load_average_after": session.load_after,
        "samples_ms": {key: [round(r[key] * 1000, 2) for r in records] for key in ("total", *COMPONENTS)},
    }


# ---- the whole benchmark --------------------------------------------------------------------------

def model_text_delay_s(checkpoint: Path) -> float | None:
    """The checkpoint's configured text delay (stt_config.audio_delay_seconds)."""
    try:
        config = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError):
        return None
    delay = (config.get("stt_config") or {}).get("audio_delay_seconds")
    return float(delay) if delay is not None else None


async def _measure_all(args: argparse.Namespace, checkpoint: Path, workdir: Path) -> list[dict]:
    from .lkserver import start_dev_server

    clips = speech_clips(max(args.speakers), args.seconds)
    server = await asyncio.to_thread(start_dev_server, workdir / "livekit-server.log")
    runs = []
    try:
        for n in args.speakers:
            for frames in args.frames:
                runs.append(await _measure(args, server, checkpoint, workdir, clips[:n], frames))
    finally:
        await asyncio.to_thread(server.stop)
    return runs


async def _measure(args: argparse.Namespace, server, checkpoint: Path, workdir: Path, clips: list[np.ndarray],
                   frames: str) -> dict:
    """One speaker count with one frame mode: a fresh worker, the bots, the analysis."""
    from .devstack import start_captions_worker

    n = len(clips)
    worker_args = ("--timing-attributes", *(("--unaligned-frames",) if frames == "unaligned" else ()))
    logger.info("latency with %d speakers (%s frames): starting a worker with %d slots", n, frames, n)
    for attempt in range(1, RUN_ATTEMPTS + 1):
        workdir_n = workdir / f"worker-{n}-{frames}-{attempt}"
        worker = await asyncio.to_thread(start_captions_worker, server, checkpoint, workdir_n, n, worker_args)
        try:
            session = await run_session(server, worker, clips, args.lead_in, args.tail, args.timeout, workdir_n,
                                        args.bots_per_process)
            break
        except BotFailed as e:
            # A bot's WebRTC library crashed (seen once, under heavy load): say so, run again.
            if attempt == RUN_ATTEMPTS:
                raise
            logger.warning("%d speakers, attempt %d: %s; running again", n, attempt, e)
        finally:
            await asyncio.to_thread(worker.stop)
    alignments = speaker_alignments(session, worker.record_dir)
    records, skipped = latency_records(session, alignments)
    if not records:
        raise BenchError(f"no caption with timings arrived with {n} speakers; see {worker.log_path}")
    onsets = [r["onset_sample"] for r in records]
    if min(onsets) < args.lead_in * SAMPLE_RATE / 2:
        raise BenchError("a speaker's engine stream began after its speech had started "
                         f"(onset at sample {min(onsets)}): raise --lead-in")
    run = summarize_run(session, records, skipped, alignment_summary(alignments, n))
    run["frames"] = frames
    run["attempt"] = attempt
    logger.info("%d speakers, %s frames: %d word updates, total p50 %.1f / p95 %.1f / p99 %.1f ms, "
                "%.1f steps/s, load %s > %s", n, frames, run["word_updates"], run["latency_ms"]["total"]["p50"],
                run["latency_ms"]["total"]["p95"], run["latency_ms"]["total"]["p99"],
                run["engine"]["steps_per_s"] or 0.0, run["load_average_before"], run["load_average_after"])
    return run


def _targets(runs: list[dict]) -> dict:
    by_n = {run["speakers"]: run for run in runs if run.get("frames", "shared") == "shared"}
    run = by_n.get(TARGET_SPEAKERS)
    p95 = run["latency_ms"]["total"]["p95"] if run is not None else None
    # Without a reliable alignment the capture times are wrong: no verdict either way.
    valid = run is not None and run["alignment"]["reliable"]
    return {"p95_ms_at_8_speakers": p95, "alignment_reliable": run["alignment"]["reliable"] if run else None,
            "p95_at_8_speakers_at_most_150_ms": p95 <= TARGET_P95_MS if valid else None}


def markdown_table(report: dict) -> str:
    """The README table, generated from the JSON (figures are never typed in by hand)."""
    lines = [("| speakers | frames | steps/s (speakers per step) | word updates | total p50 / p95 / p99 (ms) | "
              "transport | queue | step | agent | delivery | bots late p95 | alignment | CPU cores: worker / bots "
              "| load (1 min) before / after |"),
             "|---:|---|---|---:|---|---|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        lat = run["latency_ms"]
        parts = " | ".join(f"{lat[key]['p50']:.1f} / {lat[key]['p95']:.1f}" for key in COMPONENTS)
        engine, cores = run.get("engine") or {}, run.get("cpu_cores_used") or {}
        lines.append(f"| {run['speakers']} | {run.get('frames', 'shared')} | "
                     f"{engine.get('steps_per_s') or 0:.1f} ({engine.get('streams_per_step') or 0:.1f}) | "
                     f"{run['word_updates']} | {lat['total']['p50']:.1f} / "
                     f"{lat['total']['p95']:.1f} / {lat['total']['p99']:.1f} | {parts} | "
                     f"{run['publisher_lateness_ms']['p95']:.1f} | "
                     f"{'ok' if run['alignment']['reliable'] else 'LOST'} | "
                     f"{cores.get('worker', float('nan')):.2f} / {cores.get('speaker_bots', float('nan')):.2f} | "
                     f"{run['load_average_before'][0]:.2f} / {run['load_average_after'][0]:.2f} |")
    lines.append("")
    lines.append("Components: p50 / p95 in ms (percentiles of the parts do not add up; their means do).")
    return "\n".join(lines)


def _label(run: dict) -> str:
    return f"{run['speakers']} speakers, {run.get('frames', 'shared')} frames"


def plot(report: dict, path: Path) -> None:
    """The latency distribution per speaker count (CDF), and the mean split of each."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, (cdf, bars) = plt.subplots(1, 2, figsize=(12, 4.8))
    # A row whose alignment was lost has wrong capture times: drawn apart, never as a figure.
    valid = [run["alignment"]["reliable"] for run in runs]
    for run, ok in zip(runs, valid):
        values = np.sort(np.asarray(run["samples_ms"]["total"]))
        note = f"p95 {run['latency_ms']['total']['p95']:.0f} ms" if ok else "alignment LOST: not valid"
        cdf.plot(values, np.arange(1, values.size + 1) / values.size, label=f"{_label(run)} ({note})",
                 linestyle="-" if ok else ":", alpha=1.0 if ok else 0.5)
    cdf.axvline(TARGET_P95_MS, color="grey", linestyle=":",
                label=f"target p95 at 8 speakers: {TARGET_P95_MS:.0f} ms")
    cdf.axhline(0.95, color="grey", linestyle="--", linewidth=0.8)
    cdf.set_xlabel("caption latency per new word (ms): arrival - capture of the last frame consumed")
    cdf.set_ylabel("fraction of word updates")
    cdf.set_title("Latency distribution (CDF)")
    cdf.grid(True, alpha=0.3)
    cdf.legend(fontsize=8)
    positions = np.arange(len(runs))
    bottom = np.zeros(len(runs))
    for key in COMPONENTS:
        values = np.array([run["latency_ms"][key]["mean"] if ok else 0.0 for run, ok in zip(runs, valid)])
        bars.bar(positions, values, bottom=bottom, label=key)
        bottom += values
    for position, ok in zip(positions, valid):
        if not ok:
            bars.text(position, 0, "alignment\nLOST:\nnot valid", ha="center", va="bottom", fontsize=8)
    bars.set_xticks(positions, [_label(run).replace(" speakers, ", "\n") for run in runs], fontsize=8)
    bars.set_xlabel("speakers (engine batch size = speakers), frame clock")
    bars.set_ylabel("mean latency (ms)")
    bars.set_title("Where the time goes (means)")
    bars.legend(fontsize=8)
    machine = report["machine"]
    fig.suptitle(f"captions bench latency - {machine['cpu_model']}, {machine['cpu_cores']} cores, "
                 f"{machine['date'][:10]}; model text delay ({report['model_text_delay_s']} s) not included",
                 fontsize=10)
    save_figure(fig, path)


# ---- command line ---------------------------------------------------------------------------------

def _seconds(text: str) -> float:
    value = float(text)
    if not 1.0 <= value <= 600:
        raise argparse.ArgumentTypeError(f"seconds of speech must be between 1 and 600, got {text}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--speakers", env="CAPTIONS_BENCH_SPEAKERS", type=positive_ints("speaker counts"), default=[1, 8, 32],
               help="speaker counts; each runs that many bots at once, with as many engine slots")
    add_option(parser, "--frames", env="CAPTIONS_BENCH_FRAMES", type=frame_modes, default=["shared"],
               help="frame clocks to measure, comma-separated: shared (the worker's default: every "
                    "speaker's frames on one clock) and/or unaligned (each speaker its own phase, as before)")
    add_option(parser, "--bots-per-process", env="CAPTIONS_BENCH_BOTS_PER_PROCESS", type=positive_int,
               default=2, help="speaker bots sharing one process (and one WebRTC stack)")
    add_option(parser, "--seconds", env="CAPTIONS_BENCH_SECONDS", type=_seconds, default=20.0,
               help="seconds of speech per speaker")
    add_test_checkpoint_options(parser, "local checkpoint directory for the worker")
    add_option(parser, "--lead-in", env="CAPTIONS_BENCH_LEAD_IN", type=float, default=1.0,
               help="seconds of silence between the agent's subscription and the speech")
    add_option(parser, "--tail", env="CAPTIONS_BENCH_TAIL", type=float, default=1.5,
               help="seconds of silence after the speech, before the bots leave")
    add_option(parser, "--timeout", env="CAPTIONS_BENCH_TIMEOUT", type=float, default=300.0,
               help="give up on one speaker count after this many seconds")
    add_option(parser, "--workdir", env="CAPTIONS_BENCH_WORKDIR", type=Path, default=None,
               help="keep the server and worker logs and recordings here (default: a temporary directory)")
    add_output_options(parser)


def run(args: argparse.Namespace) -> int:
    from .lkserver import find_livekit_server
    from .model import CheckpointError

    try:
        if find_livekit_server() is None:
            raise BenchError("livekit-server is missing: run `captions server --install-only`")
        checkpoint = resolve_test_checkpoint(args)
        with contextlib.ExitStack() as stack:
            workdir = args.workdir
            if workdir is None:
                workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-latency-")))
            workdir.mkdir(parents=True, exist_ok=True)
            report = {"benchmark": "latency", "machine": machine_description("cpu")}
            runs = asyncio.run(_measure_all(args, checkpoint, workdir))
    except (BenchError, CheckpointError, RuntimeError, subprocess.CalledProcessError) as e:
        print(f"captions bench latency: {e}", file=sys.stderr)
        return 1
    report.update({
        "settings": {"speakers": args.speakers, "frames": args.frames, "seconds_per_speaker": args.seconds,
                     "lead_in_s": args.lead_in, "tail_s": args.tail, "publisher_frame_ms": TICK_S * 1000,
                     "checkpoint": str(checkpoint),
                     "worker": "captions worker dev --device cpu --batch-size <speakers> "
                               "--timing-attributes [--unaligned-frames]"},
        "model_text_delay_s": model_text_delay_s(checkpoint),
        "model_text_delay_note": (
            "the model's learnt wait before writing a word; not included in the figures (each is measured "
            "from the last frame the model consumed). The tiny test checkpoint does not actually wait; "
            "stt-1b-en_fr adds 0.5 s per word."),
        "definitions": {
            "total": "caption read whole at the subscriber - capture of the end of the last audio frame the "
                     "engine consumed before emitting it (word-adding updates only)",
            "transport": "frame received from rtc.AudioStream by the agent - its capture at the publisher",
            "queue": "engine step start - frame received", "step": "engine step end - start",
            "agent": "caption handed to LiveKit - step end (agent_hop: to the room's loop; "
                     "agent_publish_queue: the rest)",
            "delivery": "caption read whole by the subscriber - handed to LiveKit",
        },
        "runs": runs,
        "targets": _targets(runs),
    })
    return finish_report(args, report, plot, markdown_table)


if __name__ == "__main__":
    raise SystemExit(_child_main(sys.argv[1]))
