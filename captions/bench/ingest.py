"""`captions bench ingest`: what receiving the speakers' audio costs the worker's process.

The GPU takes the model off the CPU, but not this: every speaker's audio reaches the worker as
livekit FFI events handled in Python, in one process (all rooms share it). Through a real
livekit-server --dev on loopback, bot processes publish `--tracks` microphones (a different tone
each, in real time); for each configuration a fresh listener process subscribes to them all, opens
`k` audio streams per track (24 kHz mono, as the worker does; k > 1 stands for more speakers than
the bots this machine can run) and measures, over `--seconds`:

* cores: the listener's CPU time / wall time (its WebRTC decoding included);
* delivered: audio handed to the streams / audio expected in real time (below 100 %: it falls behind).

Configurations: chunk size (10 ms: the worker's frame clock; 80 ms: `--unaligned-frames`) x fan-out
(`sdk`: the SDK's rtc.AudioStream, woken by every stream's audio; `narrowed`: captions.live.sdk_fixes's
stream, woken by its own only, as the worker uses it), and `idle`: what the worker does with the
microphone of someone who is not talking (captions/live/track_audio.py: the narrowed stream in its
80 ms chunks, each kept for a pre-roll and judged by the voice-activity model, vad.py), whatever
`--chunk-ms` says. The bots' tones are not speech: the gate stays closed, as for a silent participant.
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
from pathlib import Path

import numpy as np

from captions.bench.common import (
    BenchError,
    add_output_options,
    finish_report,
    listener_result,
    machine_description,
    positive_ints,
    publish_in_real_time,
    run_child_process,
    save_figure,
    spawn_role,
    stop_processes,
)
from captions.config import add_option, positive_int
from captions.stt.api import SAMPLE_RATE

FANOUTS = ("sdk", "narrowed", "idle")
WARMUP_S = 2.0
SUBSCRIBE_TIMEOUT_S = 30.0


def fanouts(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values or set(values) - set(FANOUTS):
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(FANOUTS)}, got {text!r}")
    return list(dict.fromkeys(values))


# ---- child processes -------------------------------------------------------------------------------

async def _publish(config: dict) -> None:
    """Publishes tracks `indices` (tone 200 + 150 i Hz) in real time until `until` (time.time())."""
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE  # one second, looped: every tone has whole periods
    tones = [(np.sin(2 * np.pi * (200 + 150 * i) * t) * 6000).astype(np.int16) for i in config["indices"]]

    def chunk(bot: int, tick: int, samples: int) -> np.ndarray:
        offset = (tick * samples) % SAMPLE_RATE
        return tones[bot][offset:offset + samples]

    await publish_in_real_time(config, [f"mic-{i:02d}" for i in config["indices"]], chunk)


async def _listen(config: dict) -> None:
    """Measures, writes the figures to config['out'] and ends the process."""
    from livekit import rtc

    from captions.dev.bots import make_token, server_from_config
    from captions.live.sdk_fixes import open_audio_stream

    room = rtc.Room()
    tracks: list[rtc.Track] = []
    room.on("track_subscribed", lambda track, *_: tracks.append(track))
    await room.connect(config["url"], make_token(server_from_config(config), config["room"], f"listener-{os.getpid()}"))
    deadline = time.monotonic() + SUBSCRIBE_TIMEOUT_S
    while len(tracks) < config["tracks"]:
        if time.monotonic() > deadline:
            raise BenchError(f"subscribed to {len(tracks)} of {config['tracks']} tracks in {SUBSCRIBE_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.05)

    chunk_ms = config["chunk_ms"]
    received = [0]

    def open_stream(track: rtc.Track) -> rtc.AudioStream:
        if config["fanout"] == "narrowed":
            return open_audio_stream(track, sample_rate=SAMPLE_RATE, frame_size_ms=chunk_ms)
        return rtc.AudioStream.from_track(track=track, sample_rate=SAMPLE_RATE, num_channels=1, frame_size_ms=chunk_ms)

    async def consume(stream: rtc.AudioStream) -> None:
        async for event in stream:
            received[0] += event.frame.samples_per_channel

    copies = [track for track in tracks for _ in range(config["streams_per_track"])]
    if config["fanout"] == "idle":
        microphones = [_idle_microphone(track) for track in copies]

        def received_samples() -> int:
            return sum(microphone.end for microphone in microphones)
    else:
        streams = [open_stream(track) for track in copies]
        readers = [asyncio.create_task(consume(stream)) for stream in streams]  # noqa: F841 - run until exit

        def received_samples() -> int:
            return received[0]
    await asyncio.sleep(WARMUP_S)
    samples0, cpu0, wall0 = received_samples(), time.process_time(), time.monotonic()
    await asyncio.sleep(config["seconds"])
    samples1, cpu1, wall1 = received_samples(), time.process_time(), time.monotonic()
    wall = wall1 - wall0
    result = {"cores": round((cpu1 - cpu0) / wall, 3),
              "delivered": round((samples1 - samples0) / (len(copies) * SAMPLE_RATE * wall), 3),
              "events_per_s": round((samples1 - samples0) / (SAMPLE_RATE * chunk_ms / 1000) / wall, 1)}
    Path(config["out"]).write_text(json.dumps(result))
    # Leave the room (so the server stops forwarding to us), then the process, without closing the
    # streams one by one: a stream's close waits until its queue has drained, which behind the SDK
    # fan-out's backlog took longer than the run; and one such teardown aborted in native code
    # (livekit 1.1.21). The figures are written already.
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(room.disconnect(), 5.0)
    os._exit(0)


def _idle_microphone(track):
    """A silent participant's microphone as the worker reads it (speaker.py keeps about a second)."""
    from captions.live.track_audio import RtcTrackSource, TrackAudio
    from captions.live.vad import SpeechGate

    def forget_old_audio() -> None:
        audio.keep_from(audio.end - SAMPLE_RATE)

    audio = TrackAudio(RtcTrackSource(track), SpeechGate(), forget_old_audio, label=track.sid)
    return audio


def _child_main(role: str, config_path: str) -> int:
    if role == "bots":
        return run_child_process(_publish, config_path, "bench ingest bots")
    return run_child_process(_listen, config_path, "bench ingest listener", bots=False)


# ---- the parent --------------------------------------------------------------------------------------

def _spawn(role: str, config: dict, workdir: Path, name: str) -> subprocess.Popen:
    return spawn_role("captions.bench.ingest", role, config, workdir, name)


def _configurations(args: argparse.Namespace) -> list[dict]:
    from captions.live.track_audio import IDLE_CHUNK_MS

    runs = []
    for k in args.streams_per_track:
        for chunk in args.chunk_ms:
            runs += [{"streams_per_track": k, "chunk_ms": chunk, "fanout": f} for f in args.fanout if f != "idle"]
        if "idle" in args.fanout:
            runs.append({"streams_per_track": k, "chunk_ms": IDLE_CHUNK_MS, "fanout": "idle"})
    return runs


def measure(args: argparse.Namespace, workdir: Path) -> list[dict]:
    from captions.dev.livekit_server import start_dev_server

    configurations = _configurations(args)
    per_run_s = args.seconds + WARMUP_S + 8.0  # connect, subscribe, leave
    server = start_dev_server(workdir / "livekit-server.log")
    bots: list[subprocess.Popen] = []
    try:
        base = {"url": server.url, "api_key": server.api_key, "api_secret": server.api_secret, "room": "bench-ingest"}
        until = time.time() + 5.0 + len(configurations) * per_run_s
        indices = list(range(args.tracks))
        for n, start in enumerate(range(0, args.tracks, args.bots_per_process)):
            bots.append(_spawn("bots", {**base, "indices": indices[start:start + args.bots_per_process],
                                        "until": until}, workdir, f"bots-{n}"))
        time.sleep(3.0)
        runs = []
        for n, configuration in enumerate(configurations):
            out = workdir / f"listener-{n}.out.json"
            config = {**base, **configuration, "tracks": args.tracks, "seconds": args.seconds, "out": str(out)}
            listener = _spawn("listen", config, workdir, f"listener-{n}")
            load_before = round(os.getloadavg()[0], 2)
            result = listener_result(listener, per_run_s + SUBSCRIBE_TIMEOUT_S, out, workdir, f"listener-{n}", bots)
            streams = args.tracks * configuration["streams_per_track"]
            run = {**configuration, "tracks": args.tracks, "streams": streams, **result,
                   "cores_per_stream": round(result["cores"] / streams, 4), "load_1min_before": load_before}
            print(f"{streams} streams, {configuration['chunk_ms']} ms chunks, {configuration['fanout']}: "
                  f"{result['cores']:.2f} cores, {100 * result['delivered']:.0f} % delivered", flush=True)
            runs.append(run)
        return runs
    finally:
        stop_processes(bots, server)


def markdown_table(report: dict) -> str:
    lines = ["| streams (tracks x k) | chunk | fan-out | listener cores | per stream | audio delivered | events/s |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    for run in report["runs"]:
        lines.append(f"| {run['streams']} ({run['tracks']} x {run['streams_per_track']}) | {run['chunk_ms']} ms "
                     f"| {run['fanout']} | {run['cores']:.2f} | {run['cores_per_stream']:.3f} "
                     f"| {100 * run['delivered']:.0f} % | {run['events_per_s']:.0f} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for chunk in sorted({r["chunk_ms"] for r in report["runs"]}):
        for fanout in FANOUTS:
            rows = [r for r in report["runs"] if r["chunk_ms"] == chunk and r["fanout"] == fanout]
            if rows:
                label = f"{chunk} ms, {fanout}"
                axes[0].plot([r["streams"] for r in rows], [r["cores"] for r in rows], marker="o", label=label)
                axes[1].plot([r["streams"] for r in rows], [100 * r["delivered"] for r in rows], marker="o", label=label)
    axes[0].set(xlabel="audio streams in one process", ylabel="CPU cores", title="cost of receiving the audio")
    axes[1].set(xlabel="audio streams in one process", ylabel="% of real-time audio delivered",
                title="keeping up", ylim=(0, 105))
    axes[0].legend()
    fig.suptitle(f"captions bench ingest, {report['machine']['cpu_model']}, {report['machine']['cpu_cores']} cores, "
                 f"{report['machine']['date'][:10]}", fontsize=9)
    save_figure(fig, path)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--tracks", env="CAPTIONS_BENCH_TRACKS", type=positive_int, default=8,
               help="microphones published by the bots")
    add_option(parser, "--streams-per-track", env="CAPTIONS_BENCH_STREAMS_PER_TRACK",
               type=positive_ints("streams per track"), default=[1, 4],
               help="audio streams the listener opens on each track (more speakers than bots)")
    add_option(parser, "--chunk-ms", env="CAPTIONS_BENCH_CHUNK_MS", type=positive_ints("chunk sizes"),
               default=[10, 80], help="audio chunk sizes in ms (10: the worker's frame clock; 80: unaligned)")
    add_option(parser, "--fanout", env="CAPTIONS_BENCH_FANOUT", type=fanouts, default=list(FANOUTS),
               help="sdk (rtc.AudioStream as is), narrowed (captions.live.sdk_fixes, what the worker uses) "
                    "and idle (a silent participant in the worker: narrowed, 80 ms, voice detection)")
    add_option(parser, "--bots-per-process", env="CAPTIONS_BENCH_BOTS_PER_PROCESS", type=positive_int,
               default=2, help="microphones sharing one bot process")
    add_option(parser, "--seconds", env="CAPTIONS_BENCH_SECONDS", type=float, default=10.0,
               help="seconds measured per configuration (after a 2 s warm-up)")
    add_output_options(parser)


def run(args: argparse.Namespace) -> int:
    from captions.dev.livekit_server import find_livekit_server

    if find_livekit_server() is None:
        print("captions bench ingest: livekit-server is missing: run `captions server --install-only`",
              file=sys.stderr)
        return 1
    if any(chunk % 10 for chunk in args.chunk_ms):
        print("captions bench ingest: chunk sizes must be multiples of 10 ms", file=sys.stderr)
        return 1
    from livekit import rtc

    report = {"benchmark": "ingest", "machine": machine_description("cpu")}
    report["machine"]["livekit"] = rtc.__version__
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
            runs = measure(args, Path(tmp))
    except (BenchError, RuntimeError) as e:
        print(f"captions bench ingest: {e}", file=sys.stderr)
        return 1
    report["settings"] = {"tracks": args.tracks, "streams_per_track": args.streams_per_track,
                          "chunk_ms": args.chunk_ms, "fanout": args.fanout, "seconds": args.seconds,
                          "sample_rate": SAMPLE_RATE, "bots_per_process": args.bots_per_process}
    report["runs"] = runs
    return finish_report(args, report, plot, markdown_table)


if __name__ == "__main__":
    raise SystemExit(_child_main(sys.argv[1], sys.argv[2]))
