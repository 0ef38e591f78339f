"""The processes `captions bench host` starts (`python -m captions.bench.host.listener ROLE CONFIG`):

* `bots`: publishes microphones (speech or low noise) in real time;
* `listen`: one listener, the product's receiving side for its share of the microphones: per
  microphone `k` of the product's `Speaker`s, with either the real engine in-process (the engine
  thread's CPU measured apart and left out) or, as a receiving process of `captions worker
  --receivers P` does, the engine process's slot queue and streams through the real `EngineClient`
  over its Unix socket (the wire's cost is then the listener's own CPU);
* `engine`: the engine process of the socket configurations: the real `SttEngine` on the tiny
  checkpoint and the real `EngineServer`, as captions/host/engine_process.py serves them.

Listeners and the engine process measure in the same windows: each listener says it reached a
phase (`baseline`, `measure`) with a file in the run's sync folder, and the parent writes the wall
time at which every process starts that phase once all of them are there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from captions.bench.common import (
    BenchError,
    process_threads,
    publish_in_real_time,
    run_child_process,
    summarize_ms,
    thread_cpu,
    thread_figures,
)
from captions.bench.free_step import FREE_STEP_MS, make_step_free
from captions.stt.api import FRAME_S, FRAME_SIZE, SAMPLE_RATE

TRACE_ENV = "CAPTIONS_BENCH_TRACE"
"""A folder: the engine's pushes and steps are written there, to see which streams step apart."""
PATH_ENV = "CAPTIONS_HOST_PATH"
"""Read by captions/live/sdk_fixes.py and vad.py: `today` turns issue 24's optimisations off."""
SUBSCRIBE_TIMEOUT_S = 30.0
BASELINE_S = 3.0
WARMUP_S = 3.0
SAMPLE_S = 0.5
"""Each process's CPU time is sampled this often while measured (for the parallelism figures)."""


# ---- bots --------------------------------------------------------------------------------------------

async def _publish(config: dict) -> None:
    """Publishes the signals of `tracks` [(identity, .npy path)] in real time until `until`."""
    signals = [np.load(path) for _, path in config["tracks"]]

    def chunk(bot: int, tick: int, samples: int) -> np.ndarray:
        offset = (tick * samples) % (signals[bot].size - samples)
        return signals[bot][offset:offset + samples]

    await publish_in_real_time(config, [identity for identity, _ in config["tracks"]], chunk)


# ---- what a process measures of itself ---------------------------------------------------------------

class _Sampler(threading.Thread):
    """`cpu()` every SAMPLE_S of wall time from `start` (every process samples at the same instants)."""

    def __init__(self, cpu, start: float, seconds: float):
        super().__init__(name="bench-sampler", daemon=True)
        self._cpu, self._start, self._count = cpu, start, int(seconds / SAMPLE_S)
        self.cores: list[float] = []

    def run(self) -> None:
        last = self._cpu()
        for i in range(1, self._count + 1):
            time.sleep(max(0.0, self._start + i * SAMPLE_S - time.time()))
            now = self._cpu()
            self.cores.append(round((now - last) / SAMPLE_S, 3))
            last = now


async def _phase(config: dict, name: str) -> None:
    """Says this process reached phase `name` and returns at the wall time the parent sets for it."""
    folder = Path(config["sync_dir"])
    (folder / f"{name}-{config['index']}").touch()
    go = folder / f"{name}.go"
    while not go.exists():
        await asyncio.sleep(0.05)
    await asyncio.sleep(max(0.0, float(go.read_text()) - time.time()))


# ---- the listener: the product's speakers in one measured process -------------------------------------

def _bench_classes():
    from captions.live.publisher import OutgoingCaption
    from captions.live.segmenter import SegmenterOptions
    from captions.live.speaker import Speaker, SpeakerOptions
    from captions.protocol import words_attribute
    from captions.stt.api import Word

    class Host:
        """One room as the speakers see it (speaker.SpeakerHost); captions are counted, not published."""

        def __init__(self, slots, text_delay_s: float, live_chunk_ms: int = 10, publisher=None):
            self.room_name = "bench-host"
            self.slots = slots
            self.segmenter_options = SegmenterOptions()
            self.speaker_options = SpeakerOptions(live_chunk_ms=live_chunk_ms)
            self.record_dir = None
            self.timing_attributes = False
            self.text_delay_s = text_delay_s
            self.measuring = False
            self.latencies: list[float] = []
            self.captions = 0
            self.publisher = publisher
            """A CaptionPublisher (`--publish on`): captions go out as the worker's room sends them."""

        def status_changed(self) -> None:
            pass

        def caption(self, speaker, update, wall_time, timing=None) -> None:
            if self.measuring:
                self.captions += 1
            if self.publisher is not None:  # as room.py's caption(), less the transcript
                words = None
                if update.final and update.text:
                    words = words_attribute([Word(w.text, wall_time(w.start), wall_time(w.end)) for w in update.words])
                self.publisher.put(OutgoingCaption(speaker.identity, speaker.track_sid, update, words, timing))

    class BenchSpeaker(Speaker):
        """Counts the audio it pushed and the latency of each event that carries text."""

        pushed = 0

        def _push(self, turn, parts) -> None:
            self.pushed += sum(pcm.size for _, pcm in parts)
            super()._push(turn, parts)

        def _on_event(self, turn, event) -> None:
            host = self.host
            if host.measuring and turn.segmenter is not None and (event.words or event.partial):
                # The last sample the step consumed (less the engine's leading silence; a flush's
                # silence after the turn's last audio has none), as a track index, and when WebRTC
                # produced it in this process (track_audio.py: the lower envelope of arrivals, not
                # the first chunk's arrival, which a loaded start makes late).
                consumed = event.frames * FRAME_SIZE - event.lead_samples
                produced = (self.track.produced_at(round(turn.track_index(consumed - 1)) + 1)
                            if 0 < consumed <= turn.pushed else None)
                if produced is not None:
                    host.latencies.append(time.monotonic() - produced)
            super()._on_event(turn, event)

    return Host, BenchSpeaker


def _publish_errors() -> int:
    """Captions the publisher gave up on (every attempt failed), this process's whole run."""
    from captions.live.metrics import METRICS

    return METRICS.errors().get("publish", 0)


def _engine(config: dict):
    """(engine or its stand-in, slot queue, the engine's thread or None, text delay): in-process, or
    the engine process's through `EngineClient` when the config names its socket."""
    if config.get("socket"):
        from captions.host.engine_client import EngineClient

        client = EngineClient(config["socket"], config["index"])
        return client.engine, client.slots, None, config["text_delay_s"]
    from captions.live.slots import SlotQueue

    engine = _load_engine(config)
    config["dump_trace"] = _trace_engine(engine, "in-process")
    engine.start()
    return engine, SlotQueue(engine), engine._thread, engine.text_delay_s


def _load_engine(config: dict):
    """The real `SttEngine` on the checkpoint; with `engine_step` "free", its model step stands in
    (captions/bench/free_step.py)."""
    from captions.stt.engine import SttEngine

    engine = SttEngine.load(config["model"], device="cpu", batch_size=config["batch_size"])
    if config.get("engine_step", "model") == "free":
        make_step_free(engine, config.get("free_step_ms", FREE_STEP_MS))
    return engine


async def _listen(config: dict) -> None:
    """Measures one listener, writes its figures to config['out'] and ends the process."""
    import torch
    from livekit import rtc

    from captions.dev.bots import make_token, server_from_config
    from captions.live.sdk_fixes import start_livekit_runtime
    from captions.live.track_audio import RtcTrackSource

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    start_livekit_runtime()
    engine, slots, engine_thread, text_delay_s = _engine(config)
    Host, BenchSpeaker = _bench_classes()
    host = Host(slots, text_delay_s, config.get("live_chunk_ms", 10))

    def host_cpu() -> float:
        return time.process_time() - thread_cpu(engine_thread)

    room = rtc.Room()
    tracks: dict[str, rtc.Track] = {}
    room.on("track_subscribed", lambda track, publication, participant: tracks.__setitem__(participant.identity, track))
    await room.connect(config["url"], make_token(server_from_config(config), config["room"],
                                                 f"listener-{config['index']}-{os.getpid()}"),
                       options=rtc.RoomOptions(auto_subscribe=False))
    if config.get("publish"):
        from captions.live.publisher import CaptionPublisher
        from captions.protocol import CaptionSigner

        host.publisher = CaptionPublisher(room, CaptionSigner())
        host.publishing = asyncio.create_task(host.publisher.run())
    wanted = set(config["identities"])
    deadline = time.monotonic() + SUBSCRIBE_TIMEOUT_S
    while not wanted <= {p.identity for p in room.remote_participants.values() if p.track_publications}:
        if time.monotonic() > deadline:
            raise BenchError(f"the bots' microphones did not show up in {SUBSCRIBE_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.05)

    await asyncio.sleep(1.0)
    await _phase(config, "baseline")
    cpu0, wall0 = host_cpu(), time.monotonic()
    await asyncio.sleep(BASELINE_S)
    baseline = (host_cpu() - cpu0) / (time.monotonic() - wall0)

    for participant in room.remote_participants.values():
        if participant.identity in wanted:
            for publication in participant.track_publications.values():
                publication.set_subscribed(True)
    deadline = time.monotonic() + SUBSCRIBE_TIMEOUT_S
    while len(tracks) < len(wanted):
        if time.monotonic() > deadline:
            raise BenchError(f"subscribed to {len(tracks)} of {len(wanted)} microphones")
        await asyncio.sleep(0.05)
    speakers = [BenchSpeaker(host, f"{identity}#{j}", identity, track.sid, RtcTrackSource(track))
                for identity, track in sorted(tracks.items()) for j in range(config["streams_per_track"])]
    await asyncio.sleep(WARMUP_S)
    await _phase(config, "measure")

    def totals():
        return (sum(s.track.end for s in speakers), sum(s.pushed for s in speakers),
                sum(s.gate.silero_windows for s in speakers), sum(s.gate.skipped_windows for s in speakers),
                engine.steps if engine_thread is not None else 0, time.process_time(), thread_cpu(engine_thread),
                time.monotonic())

    profiler = None
    if config.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    host.measuring = True
    sampler = _Sampler(host_cpu, time.time(), config["seconds"])
    sampler.start()
    threads_before, before = process_threads(), totals()
    await asyncio.sleep(config["seconds"])
    after, threads_after = totals(), process_threads()
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(config["profile"])
    host.measuring = False
    sampler.join(timeout=2 * SAMPLE_S)
    received, pushed, silero, skipped, steps, cpu, engine_cpu, wall = (b - a for a, b in zip(before, after))
    n = len(speakers)
    host_cores = (cpu - engine_cpu) / wall
    thread_cores, waited = thread_figures(threads_before, threads_after, wall,
                                           engine_thread.native_id if engine_thread is not None else None)
    result = {"index": config["index"], "pid": os.getpid(), "participants": n, "tracks": len(tracks),
              "baseline_cores": round(baseline, 4), "process_cores": round(cpu / wall, 4),
              "engine_cores": round(engine_cpu / wall, 4), "host_cores": round(host_cores, 4),
              "cores_per_participant": round((host_cores - baseline) / n, 5),
              "delivered": round(received / (n * SAMPLE_RATE * wall), 3),
              "pushed": round(pushed / (n * SAMPLE_RATE * wall), 3) if config["talking"] else None,
              "steps_per_frame": round(steps / (wall / FRAME_S), 3) if engine_thread is not None else None,
              "captions": host.captions, "live_turns": sum(s.turn is not None for s in speakers),
              "silero_windows": silero, "skipped_windows": skipped, "seconds": round(wall, 2),
              "publish_errors": _publish_errors() if host.publisher is not None else None,
              "latency_beyond_delay_ms": summarize_ms(host.latencies) if host.latencies else None,
              "latencies_ms": [round(1000 * x, 1) for x in host.latencies],
              "waited_for_cpu_cores": waited, "cpu_samples": sampler.cores, "thread_cores": thread_cores}
    Path(config["out"]).write_text(json.dumps(result))
    config.get("dump_trace", lambda: None)()
    # Leave without closing every stream one by one (see captions bench ingest): the figures are written.
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(room.disconnect(), 5.0)
    os._exit(0)


# ---- the engine process of the socket configurations ---------------------------------------------------

def _trace_engine(engine, name: str):
    """With TRACE_ENV set: records every push the engine takes (arrival, slot, samples, produced_at,
    samples of an unfinished frame before it) and every step (start, its slots), and returns what writes
    them to `<TRACE_ENV>/<name>-<pid>.json` (called at the end of the measured window)."""
    folder = os.environ.get(TRACE_ENV)
    if not folder:
        return lambda: None
    pushes, steps = [], []
    take, step = engine._take, engine._step

    def traced_take(slot, pcm, produced_at, now):
        pushes.append((time.monotonic(), slot.index, int(np.size(pcm)), produced_at, slot.buffer.pending))
        return take(slot, pcm, produced_at, now)

    def traced_step(batch, reset):
        # Per slot: its index, frames still queued after this one (catching up), the size of its
        # latest push (a live chunk or more), closing (a flush).
        steps.append((time.monotonic(), [(s.index, len(s.queue), s.last_chunk, s.closing) for s, _ in batch]))
        return step(batch, reset)

    engine._take, engine._step = traced_take, traced_step

    def dump():
        Path(folder, f"{name}-{os.getpid()}.json").write_text(json.dumps({"pushes": pushes, "steps": steps}))
    return dump


async def _serve_engine(config: dict) -> None:
    """The real engine and `EngineServer` (as engine_process.py serves them), measured in the
    listeners' windows; serves until SIGTERM."""
    import torch

    from captions.host.engine_server import EngineServer
    from captions.live.slots import SlotQueue
    from captions.stt.frame_clock import SEVERAL_PHASES_GATHER_WAIT_S

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    engine = _load_engine(config)
    engine.clock.gather_wait_s = SEVERAL_PHASES_GATHER_WAIT_S  # as engine_process.py sets it
    dump = _trace_engine(engine, "engine")
    engine.start()
    slots = SlotQueue(engine)
    server = EngineServer(engine, slots)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    ready = Path(config["ready"])
    ready.with_suffix(".tmp").write_text(json.dumps({"socket": server.path, "text_delay_s": engine.text_delay_s}))
    ready.with_suffix(".tmp").rename(ready)
    try:
        thread = engine._thread

        def server_cpu() -> float:
            return time.process_time() - thread_cpu(thread)

        await _phase(config, "baseline")
        cpu0, wall0 = server_cpu(), time.monotonic()
        await asyncio.sleep(BASELINE_S)
        baseline = (server_cpu() - cpu0) / (time.monotonic() - wall0)
        await _phase(config, "measure")
        sampler = _Sampler(server_cpu, time.time(), config["seconds"])
        sampler.start()
        threads0, steps0, cpu0, engine0, wall0 = (process_threads(), engine.steps, time.process_time(), thread_cpu(thread),
                                                  time.monotonic())
        await asyncio.sleep(config["seconds"])
        wall = time.monotonic() - wall0
        cpu, engine_cpu, steps = time.process_time() - cpu0, thread_cpu(thread) - engine0, engine.steps - steps0
        thread_cores, waited = thread_figures(threads0, process_threads(), wall, thread.native_id)
        sampler.join(timeout=2 * SAMPLE_S)
        dump()
        result = {"pid": os.getpid(), "baseline_cores": round(baseline, 4), "process_cores": round(cpu / wall, 4),
                  "engine_cores": round(engine_cpu / wall, 4), "server_cores": round((cpu - engine_cpu) / wall, 4),
                  "steps_per_frame": round(steps / (wall / FRAME_S), 3), "waited_for_cpu_cores": waited,
                  "cpu_samples": sampler.cores, "thread_cores": thread_cores, "seconds": round(wall, 2)}
        Path(config["out"]).write_text(json.dumps(result))
        await stop.wait()
    finally:
        server.close()
        slots.close()
        engine.close()


def _child_main(role: str, config_path: str) -> int:
    if role == "bots":
        return run_child_process(_publish, config_path, "bench host bots")
    if role == "engine":
        return run_child_process(_serve_engine, config_path, "bench host engine", bots=False)
    return run_child_process(_listen, config_path, "bench host listener", bots=False)


if __name__ == "__main__":
    raise SystemExit(_child_main(sys.argv[1], sys.argv[2]))
