"""One run of `captions bench latency`: the bots speak in a fresh room while a hidden subscriber
collects every caption and the CPU of each process is sampled."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from captions.bench.common import BenchError
from captions.bench.latency.speakers import BotFailed
from captions.dev.worker_process import engine_activity, engine_counters, metric_values
from captions.log import logger

SETTLE_TIMEOUT_S = 30.0
READING_TIMEOUT_S = 30.0
"""How long the captioner may take to start translating once its readers are set."""


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
    reading: tuple[str, ...] = ()
    """The languages read in the room (translation on), or none."""
    translation_metrics: dict[str, float] = field(default_factory=dict)
    """The worker's ``captions_translation*`` samples once the captions settled (translation on)."""


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


async def run_session(server, worker, clips: list[np.ndarray], lead_in_s: float, tail_s: float,
                      timeout_s: float, workdir: Path, bots_per_process: int = 1,
                      reading: tuple[str, ...] = ()) -> Session:
    """N bots speak at once in a fresh room; the subscriber, here, collects every caption. The bots
    run in child processes (`_speak`), `bots_per_process` in each, so that their pacing and this
    process's arrival times do not wait on each other's event loop. With `reading` (languages), the
    room reads captions in those languages, so the worker translates them (`_read_in`) before anyone
    speaks."""
    from captions.dev.bots import Subscriber

    room = f"bench-latency-{len(clips)}-{uuid.uuid4().hex[:6]}"
    deadline = time.monotonic() + timeout_s
    load_before = [round(x, 2) for x in os.getloadavg()]
    steps_before = await asyncio.to_thread(engine_counters, worker.metrics_port)
    started = time.time()
    np.savez(workdir / "clips.npz", *clips)
    sub = await Subscriber(server, room).connect()
    children: list[asyncio.subprocess.Process] = []
    try:
        if reading:
            await _read_in(server, room, sub, worker, reading)
        for first in range(0, len(clips), bots_per_process):
            indices = list(range(first, min(len(clips), first + bots_per_process)))
            config = {"url": server.url, "api_key": server.api_key, "api_secret": server.api_secret,
                      "room": room, "clips": str(workdir / "clips.npz"), "indices": indices, "lead_in_s": lead_in_s,
                      "tail_s": tail_s, "timeout_s": timeout_s, "out_dir": str(workdir)}
            config_path = workdir / f"bots-{first:02d}-config.json"
            config_path.write_text(json.dumps(config))
            children.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "captions.bench.latency.speakers", str(config_path),
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
        translation = {}
        if reading:
            translation = {name: value for name, value in
                           (await asyncio.to_thread(metric_values, worker.metrics_port)).items()
                           if name.startswith("captions_translation") and "_created" not in name}
        cpu = _cores_used(_CPU_SAMPLES, max(r["speech_started_at"] for r in spoken),
                          min(r["ended_at"] for r in spoken))
        return Session(
            len(clips), {r["identity"]: (r["track_sid"], r["clip_onset"]) for r in spoken},
            {r["identity"]: clips[i] for i, r in enumerate(spoken)},
            {r["identity"]: r["speech_started_at"] for r in spoken},
            {r["identity"]: r["handed_at"] for r in spoken}, list(sub.captions),
            [late for r in spoken for late in r["lateness"]], load_before, load_after, cpu, engine,
            tuple(reading), translation)
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
                await child.wait()
        await sub.disconnect()


async def _read_in(server, room: str, sub, worker, languages: tuple[str, ...]) -> None:
    """Sets ``captions.reading`` on the room's captioner through the server API, as the viewer
    server's hidden relay does for its viewers, and waits until the worker says it translates into
    those languages (a hidden subscriber's own attributes are seen by nobody)."""
    from livekit import api

    from captions.protocol import ATTR_READING

    agent = await sub.wait_for_agent(READING_TIMEOUT_S)
    lkapi = api.LiveKitAPI(server.url, server.api_key, server.api_secret)
    try:
        await lkapi.room.update_participant(api.UpdateParticipantRequest(
            room=room, identity=agent.identity, attributes={ATTR_READING: ",".join(languages)}))
    finally:
        await lkapi.aclose()
    said = f"room {room}: translating captions into {', '.join(sorted(languages))}\n".encode()
    deadline = time.monotonic() + READING_TIMEOUT_S
    while said not in worker.log_path.read_bytes():
        if time.monotonic() > deadline:
            raise BenchError(f"the worker did not start translating into {','.join(languages)} within "
                             f"{READING_TIMEOUT_S:.0f} s; see {worker.log_path}")
        await asyncio.sleep(0.1)


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


