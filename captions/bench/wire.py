"""`captions bench wire`: what the engine channel (captions/host/) costs per live stream, on each
side of its Unix socket, with nothing else running.

`captions bench host` measures the whole host path, LiveKit and voice detection included, where the
channel's share is small and noisy. This benchmark isolates it: for each `--streams N`,

* an **engine process** runs the real `SttEngine` (slots, frame buffers, the frame clock, events for
  every slot on every step) behind the real `EngineServer`, with the model's step replaced by one
  that returns no token: the model's cost is `captions bench engine`'s business, and the tiny test
  checkpoint on this CPU would take more than the 80 ms of a frame at a few hundred slots;
* a **receiving process** opens N streams through the real `EngineClient` and pushes each a 10 ms
  chunk (240 samples) per tick in real time from one event loop, as the rooms of a receiving
  process do, and takes every event.

Both measure their own CPU over the same `--seconds` of wall time after a warm-up: cores per stream
on the receiving side (the whole process: its loop's pushes, the channel's writer and reader
threads) and on the engine process's side (every thread but the engine's stepping thread). Also:
the share of the pushed audio the engine received, steps per 80 ms, and ticks the pusher was late.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from captions.bench.common import (
    BenchError,
    add_output_options,
    add_test_checkpoint_options,
    finish_report,
    machine_description,
    positive_ints,
    process_threads,
    resolve_test_checkpoint,
    run_child_process,
    save_figure,
    spawn_role,
    thread_cpu,
    thread_figures,
)
from captions.config import add_option, positive_int
from captions.stt.api import FRAME_S, SAMPLE_RATE

CHUNK = SAMPLE_RATE // 100
"""10 ms: what WebRTC hands a receiving process per tick."""
WARMUP_S = 3.0
START_TIMEOUT_S = 60.0


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--streams", env="CAPTIONS_BENCH_STREAMS", type=positive_ints("--streams"), default=[64, 256],
               help="live streams per configuration, e.g. 64,256")
    add_option(parser, "--seconds", env="CAPTIONS_BENCH_SECONDS", type=float, default=10.0, help="measured seconds per configuration")
    add_option(parser, "--repeats", env="CAPTIONS_BENCH_REPEATS", type=positive_int, default=1, help="runs of each configuration")
    add_test_checkpoint_options(parser, "checkpoint whose engine (model step left out) serves the streams")
    add_output_options(parser)


def run(args: argparse.Namespace) -> int:
    model = resolve_test_checkpoint(args)
    runs = []
    with tempfile.TemporaryDirectory(prefix="captions-bench-wire-") as tmp:
        for repeat in range(args.repeats):
            for streams in args.streams:
                try:
                    result = _measure(Path(tmp) / f"{streams}-{repeat}", str(model), streams, args.seconds)
                except BenchError as e:
                    print(f"captions bench wire: {e}", file=sys.stderr)
                    return 1
                print(_row(result), flush=True)
                runs.append(result)
    report = {"benchmark": "wire", "machine": machine_description("cpu"), "chunk_samples": CHUNK,
              "seconds": args.seconds, "runs": runs}
    return finish_report(args, report, plot, markdown_table)


def _measure(workdir: Path, model: str, streams: int, seconds: float) -> dict:
    workdir.mkdir(parents=True)
    common = {"model": model, "streams": streams, "seconds": seconds}
    engine = spawn_role(__name__, "engine", dict(common, ready=str(workdir / "ready.json"),
                                                  out=str(workdir / "engine-out.json")), workdir, "engine")
    pusher = None
    try:
        ready = _wait_for(workdir / "ready.json", engine, workdir / "engine.log")
        start = time.time() + WARMUP_S + 2.0  # the pusher's imports and its N requests come first
        (workdir / "start").write_text(str(start))
        pusher = spawn_role(__name__, "push", dict(common, socket=ready["socket"], start=start,
                                                   out=str(workdir / "push-out.json")), workdir, "push")
        pushed = _wait_for(workdir / "push-out.json", pusher, workdir / "push.log", start + seconds + START_TIMEOUT_S)
        served = _wait_for(workdir / "engine-out.json", engine, workdir / "engine.log", time.time() + 10)
    finally:
        for process in (pusher, engine):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in (pusher, engine):
            if process is not None:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
    return {"streams": streams, "load_average_before": pushed["load_average_before"],
            "receiving_cores_per_stream": round(pushed["cores"] / streams, 6),
            "engine_side_cores_per_stream": round(served["server_cores"] / streams, 6),
            "delivered": round(served["samples"] / max(1, pushed["samples"]), 4),
            "late_ticks": pushed["late_ticks"], "ticks": pushed["ticks"], "events": pushed["events"],
            "socket_writes": pushed["writes"], "steps_per_frame": served["steps_per_frame"],
            "receiving": pushed, "engine_process": served}


def _wait_for(path: Path, process: subprocess.Popen, log: Path, deadline: float | None = None) -> dict:
    deadline = deadline or time.time() + START_TIMEOUT_S
    while not path.exists():
        if process.poll() is not None or time.time() > deadline:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise BenchError(f"{log.stem} did not answer ({process.poll()}):\n{tail}")
        time.sleep(0.05)
    return json.loads(path.read_text())


# ---- the two processes ---------------------------------------------------------------------------

def _no_model_step(engine):
    from captions.stt.engine import StepTimings

    def step(batch, reset):
        return np.full(engine.batch_size, -1, dtype=np.int64), np.zeros(engine.batch_size), StepTimings(len(batch), 0.0, 0.0, 0.0, 0.0)
    return step


async def _serve(config: dict) -> None:
    """The engine process: the real engine (model step left out) and `EngineServer`, until SIGTERM."""
    from captions.host.engine_server import EngineServer
    from captions.live.slots import SlotQueue
    from captions.stt.engine import SttEngine
    from captions.stt.frame_clock import SEVERAL_PHASES_GATHER_WAIT_S

    engine = SttEngine.load(config["model"], device="cpu", batch_size=config["streams"])
    engine._run_model = _no_model_step(engine)
    engine.clock.gather_wait_s = SEVERAL_PHASES_GATHER_WAIT_S  # as engine_process.py sets it
    engine.start()
    slots = SlotQueue(engine)
    server = EngineServer(engine, slots)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    ready = Path(config["ready"])
    ready.with_suffix(".tmp").write_text(json.dumps({"socket": server.path}))
    ready.with_suffix(".tmp").rename(ready)
    try:
        start = Path(ready.parent / "start")
        while not start.exists():
            await asyncio.sleep(0.05)
        await asyncio.sleep(max(0.0, float(start.read_text()) - time.time()))
        thread = engine._thread

        def received() -> int:
            return sum(slot.pushed for slot in engine._slots)

        threads0, steps0, cpu0, engine0, samples0, wall0 = (process_threads(), engine.steps, time.process_time(),
                                                            thread_cpu(thread), received(), time.monotonic())
        await asyncio.sleep(config["seconds"])
        wall = time.monotonic() - wall0
        cpu, engine_cpu = time.process_time() - cpu0, thread_cpu(thread) - engine0
        thread_cores, waited = thread_figures(threads0, process_threads(), wall, thread.native_id)
        result = {"server_cores": round((cpu - engine_cpu) / wall, 4), "engine_cores": round(engine_cpu / wall, 4),
                  "samples": received() - samples0, "steps_per_frame": round((engine.steps - steps0) / (wall / FRAME_S), 3),
                  "thread_cores": thread_cores, "waited_for_cpu_cores": waited, "seconds": round(wall, 2)}
        Path(config["out"]).write_text(json.dumps(result))
        await stop.wait()
    finally:
        server.close()
        slots.close()
        engine.close()


async def _push(config: dict) -> None:
    """The receiving process: N streams, a 10 ms chunk each per tick, measured from `start`."""
    from captions.host.engine_client import EngineClient
    from captions.live.slots import Waiter

    client = EngineClient(config["socket"])
    events = 0

    def on_event(event) -> None:
        nonlocal events
        events += 1

    def refuse(stream) -> None:
        raise BenchError("a stream waited for a slot: the engine has one per stream")

    streams = []
    for i in range(config["streams"]):
        stream = client.slots.request(Waiter(f"bench/{i}", on_event=on_event, on_granted=refuse))
        if stream is None:
            raise BenchError("no slot for a stream: the engine has one per stream")
        streams.append(stream)
    chunk = (np.random.default_rng(0).standard_normal(CHUNK) * 0.01).astype(np.float32)
    loop = asyncio.get_running_loop()
    start, seconds = config["start"], config["seconds"]
    first_tick = time.time()
    tick = late = samples = 0
    measuring = None
    while True:
        now = time.time()
        if measuring is None and now >= start:
            measuring = (process_threads(), time.process_time(), time.monotonic(), tick, late, samples, events,
                         client.writes, os.getloadavg()[0])
        if now >= start + seconds:
            break
        produced = time.monotonic()
        for stream in streams:
            stream.push(chunk, produced_at=produced)
        samples += CHUNK * len(streams)
        tick += 1
        wait = first_tick + tick * 0.01 - time.time()
        if wait < -0.005:
            late += 1
        await asyncio.sleep(max(0.0, wait))
    threads0, cpu0, wall0, tick0, late0, samples0, events0, writes0, load = measuring
    wall = time.monotonic() - wall0
    thread_cores, waited = thread_figures(threads0, process_threads(), wall, None)
    result = {"cores": round((time.process_time() - cpu0) / wall, 4), "ticks": tick - tick0, "late_ticks": late - late0,
              "samples": samples - samples0, "events": events - events0, "writes": client.writes - writes0,
              "thread_cores": thread_cores, "waited_for_cpu_cores": waited, "load_average_before": round(load, 2),
              "seconds": round(wall, 2)}
    await loop.run_in_executor(None, lambda: time.sleep(0.5))  # the last pushes reach the engine first
    for stream in streams:
        stream.abort()
    client.close()
    Path(config["out"]).write_text(json.dumps(result))


# ---- the report -----------------------------------------------------------------------------------

def _row(run: dict) -> str:
    return (f"| {run['streams']} | {run['receiving_cores_per_stream']:.5f} | {run['engine_side_cores_per_stream']:.5f} "
            f"| {run['delivered']:.3f} | {run['late_ticks']}/{run['ticks']} | {run['steps_per_frame']:.2f} "
            f"| {run['load_average_before']:.1f} |")


def markdown_table(report: dict) -> str:
    lines = [("| streams | receiving process, cores per stream | engine process (not stepping), cores per stream "
              "| audio received | pusher ticks late | steps per 80 ms | load before |"),
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [_row(run) for run in report["runs"]]
    machine = report["machine"]
    lines.append(f"\n{machine['cpu_model']}, {machine['cpu_cores']} cores, {machine['date'][:10]}; {report['seconds']} s per run")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    runs = report["runs"]
    for key, label, marker in (("receiving_cores_per_stream", "receiving process", "o"),
                               ("engine_side_cores_per_stream", "engine process (not stepping)", "s")):
        ax.plot([r["streams"] for r in runs], [r[key] for r in runs], marker, label=label)
    ax.set_xlabel("live streams")
    ax.set_ylabel("cores per stream")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title("The engine channel's cost per 10 ms stream")
    save_figure(fig, path)


def _child_main(role: str, config_path: str) -> int:
    return run_child_process(_serve if role == "engine" else _push, config_path, f"bench wire {role}", bots=False)


if __name__ == "__main__":
    raise SystemExit(_child_main(sys.argv[1], sys.argv[2]))
