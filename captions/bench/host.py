"""`captions bench host`: what the whole host path costs per live talker and per silent participant.

Through a real livekit-server --dev on loopback, bot processes publish `--talkers` microphones that
speak (espeak-ng sentences with short pauses, looped) and `--silent` microphones that carry only
low noise (about -60 dBFS, a quiet room). For each configuration a fresh listener process runs the
product's receiving side as the worker does for one room: it subscribes to the chosen microphones,
and for each of them starts `k` of the product's `Speaker`s (captions/live/speaker.py: the kept
80 ms stream, the speech gate, turns, the 10 ms live stream, the slot queue, the segmenter; k > 1
stands for more talkers than this machine can run bots for, as `captions bench ingest` does), with
the real engine code (captions/stt/engine.py: slots, the frame clock) driving the tiny random
checkpoint on the CPU with one torch thread. The tiny model's step is not free, but it runs on the
engine's own thread, whose CPU time is measured apart and left out: the GPU's cost is `captions
bench engine`'s business. What is left out as well: publishing captions (signing, text streams);
the bench's room counts them instead.

Per configuration, over `--seconds` after a warm-up:

* host cores: the listener's CPU time less its engine thread's, over wall time, less the same
  process's idle baseline (connected, engine running, nothing subscribed), per participant;
* delivered: audio the speakers' tracks received / audio expected in real time; for talkers also
  the audio pushed to the engine;
* engine steps per 80 ms (the frame clock: 1.0 when every live talker steps together);
* caption latency beyond the model's delay: a word's arrival at the room less the capture time of
  its end, less the model's text delay (p50/p95).

Each configuration runs once with TODAY's host path (`CAPTIONS_HOST_PATH=today`: the SDK's FFI
dispatch narrowed by a filter per stream, Silero on every window) and once with the new one, in the
same run and on the same machine, in alternation, so that the machine's load weighs on both alike.
The 1-minute load average before each listener is in the JSON: on a shared machine the figures are
noisy, and the side-by-side comparison is what they are for.
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
    add_test_checkpoint_options,
    finish_report,
    listener_result,
    machine_description,
    resolve_test_checkpoint,
    run_child_process,
    save_figure,
    spawn_role,
    summarize_ms,
)
from captions.config import add_option, positive_int
from captions.stt.api import FRAME_S, SAMPLE_RATE

PATHS = ("today", "new")
PATH_ENV = "CAPTIONS_HOST_PATH"
"""Read by captions/live/sdk_fixes.py and vad.py: `today` turns this issue's optimisations off."""
CAPTURE_MS = 10
SUBSCRIBE_TIMEOUT_S = 30.0
BASELINE_S = 3.0
WARMUP_S = 3.0
NOISE_STD = 30.0
"""The silent microphones' noise, in int16 units (about -60 dBFS): a quiet room, not digital zero."""
SPEECH_SECONDS = 24.0


# ---- bots --------------------------------------------------------------------------------------------

async def _publish(config: dict) -> None:
    """Publishes the signals of `tracks` [(identity, .npy path)] in real time until `until`."""
    from livekit import rtc

    from captions.dev.bots import Publisher, server_from_config

    server = server_from_config(config)
    publishers = [await Publisher(server, config["room"], identity, auto_subscribe=False,
                                  queue_size_ms=0).connect() for identity, _ in config["tracks"]]
    signals = [np.load(path) for _, path in config["tracks"]]
    samples = SAMPLE_RATE * CAPTURE_MS // 1000
    origin, tick = time.monotonic(), 0
    try:
        while time.time() < config["until"]:
            delay = origin + (tick + 1) * CAPTURE_MS / 1000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            frames = []
            for signal in signals:
                offset = (tick * samples) % (signal.size - samples)
                frames.append(rtc.AudioFrame(signal[offset:offset + samples].tobytes(), SAMPLE_RATE, 1, samples))
            await asyncio.gather(*(p.source.capture_frame(f) for p, f in zip(publishers, frames)))
            tick += 1
    finally:
        for publisher in publishers:
            with contextlib.suppress(Exception):
                await publisher.disconnect()


# ---- the listener: the product's speakers in one measured process -------------------------------------

def _bench_classes():
    from captions.live.segmenter import SegmenterOptions
    from captions.live.speaker import Speaker, SpeakerOptions

    class Host:
        """One room as the speakers see it (speaker.SpeakerHost); captions are counted, not published."""

        def __init__(self, slots, text_delay_s: float):
            self.room_name = "bench-host"
            self.slots = slots
            self.segmenter_options = SegmenterOptions()
            self.speaker_options = SpeakerOptions()
            self.record_dir = None
            self.timing_attributes = False
            self.text_delay_s = text_delay_s
            self.measuring = False
            self.latencies: list[float] = []
            self.captions = 0

        def status_changed(self) -> None:
            pass

        def caption(self, speaker, update, wall_time, timing=None) -> None:
            if self.measuring:
                self.captions += 1

    class BenchSpeaker(Speaker):
        """Counts the audio it pushed and each word's latency."""

        pushed = 0

        def _push(self, turn, parts) -> None:
            self.pushed += sum(pcm.size for _, pcm in parts)
            super()._push(turn, parts)

        def _on_event(self, turn, event) -> None:
            host = self.host
            if host.measuring and turn.segmenter is not None:
                now = time.time()
                host.latencies += [now - turn.wall_time(w.end) - host.text_delay_s for w in event.words]
            super()._on_event(turn, event)

    return Host, BenchSpeaker


def _thread_cpu(thread) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def _threads_cpu() -> dict[str, float]:
    """CPU seconds of this process's threads, summed by thread name (/proc: Linux)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            stat = (task / "stat").read_text()
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return out


async def _listen(config: dict) -> None:
    """Measures one configuration, writes the figures to config['out'] and ends the process."""
    import torch
    from livekit import rtc

    from captions.dev.bots import make_token, server_from_config
    from captions.live.sdk_fixes import start_livekit_runtime
    from captions.live.slots import SlotQueue
    from captions.live.track_audio import RtcTrackSource
    from captions.stt.engine import SttEngine

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    start_livekit_runtime()
    engine = SttEngine.load(config["model"], device="cpu", batch_size=config["batch_size"])
    engine.start()
    slots = SlotQueue(engine)
    Host, BenchSpeaker = _bench_classes()
    host = Host(slots, engine.text_delay_s)

    room = rtc.Room()
    tracks: dict[str, rtc.Track] = {}
    room.on("track_subscribed", lambda track, publication, participant: tracks.__setitem__(participant.identity, track))
    await room.connect(config["url"], make_token(server_from_config(config), config["room"], f"listener-{os.getpid()}"),
                       options=rtc.RoomOptions(auto_subscribe=False))
    wanted = set(config["identities"])
    deadline = time.monotonic() + SUBSCRIBE_TIMEOUT_S
    while not wanted <= {p.identity for p in room.remote_participants.values() if p.track_publications}:
        if time.monotonic() > deadline:
            raise BenchError(f"the bots' microphones did not show up in {SUBSCRIBE_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.05)

    engine_thread = engine._thread
    await asyncio.sleep(1.0)
    cpu0, engine0, wall0 = time.process_time(), _thread_cpu(engine_thread), time.monotonic()
    await asyncio.sleep(BASELINE_S)
    baseline = ((time.process_time() - cpu0) - (_thread_cpu(engine_thread) - engine0)) / (time.monotonic() - wall0)

    for participant in room.remote_participants.values():
        if participant.identity in wanted:
            for publication in participant.track_publications.values():
                publication.set_subscribed(True)
    while len(tracks) < len(wanted):
        if time.monotonic() > deadline + SUBSCRIBE_TIMEOUT_S:
            raise BenchError(f"subscribed to {len(tracks)} of {len(wanted)} microphones")
        await asyncio.sleep(0.05)
    speakers = [BenchSpeaker(host, f"{identity}#{j}", identity, track.sid, RtcTrackSource(track))
                for identity, track in sorted(tracks.items()) for j in range(config["streams_per_track"])]
    await asyncio.sleep(WARMUP_S)

    def totals():
        return (sum(s.track.end for s in speakers), sum(s.pushed for s in speakers), engine.steps,
                time.process_time(), _thread_cpu(engine_thread), time.monotonic())

    profiler = None
    if config.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    host.measuring = True
    threads_before, before = _threads_cpu(), totals()
    await asyncio.sleep(config["seconds"])
    after, threads_after = totals(), _threads_cpu()
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(config["profile"])
    host.measuring = False
    received, pushed, steps, cpu, engine_cpu, wall = (b - a for a, b in zip(before, after))
    n = len(speakers)
    host_cores = (cpu - engine_cpu) / wall
    result = {"participants": n, "baseline_cores": round(baseline, 4), "process_cores": round(cpu / wall, 4),
              "engine_cores": round(engine_cpu / wall, 4), "host_cores": round(host_cores, 4),
              "cores_per_participant": round((host_cores - baseline) / n, 5),
              "delivered": round(received / (n * SAMPLE_RATE * wall), 3),
              "pushed": round(pushed / (n * SAMPLE_RATE * wall), 3) if config["talking"] else None,
              "steps_per_frame": round(steps / (wall / FRAME_S), 3), "captions": host.captions,
              "live_turns": sum(s.turn is not None for s in speakers), "seconds": round(wall, 2),
              "latency_beyond_delay_ms": summarize_ms(host.latencies) if host.latencies else None,
              "thread_cores": {name: round((cpu_s - threads_before.get(name, 0.0)) / wall, 3)
                               for name, cpu_s in sorted(threads_after.items(), key=lambda kv: -kv[1])
                               if cpu_s - threads_before.get(name, 0.0) > 0.005 * wall}}
    Path(config["out"]).write_text(json.dumps(result))
    # Leave without closing every stream one by one (see captions bench ingest): the figures are written.
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(room.disconnect(), 5.0)
    os._exit(0)


def _child_main(role: str, config_path: str) -> int:
    if role == "bots":
        return run_child_process(_publish, config_path, "bench host bots")
    return run_child_process(_listen, config_path, "bench host listener", bots=False)


# ---- the parent --------------------------------------------------------------------------------------

def _spawn(role: str, config: dict, workdir: Path, name: str, env: dict | None = None) -> subprocess.Popen:
    return spawn_role("captions.bench.host", role, config, workdir, name, env)


def _signals(args: argparse.Namespace, workdir: Path) -> list[tuple[str, str]]:
    """(identity, .npy of int16 samples) of every bot microphone: talkers first, then silent ones."""
    from captions.bench.common import speech_streams

    tracks = []
    for i, speech in enumerate(speech_streams(args.talkers, SPEECH_SECONDS)):
        path = workdir / f"talker-{i}.npy"
        np.save(path, (np.clip(speech, -1, 1) * 32767).astype(np.int16))
        tracks.append((f"talker-{i:02d}", str(path)))
    noise = np.random.default_rng(0)
    for i in range(args.silent):
        path = workdir / f"silent-{i}.npy"
        np.save(path, noise.normal(0, NOISE_STD, SAMPLE_RATE * 10).astype(np.int16))
        tracks.append((f"silent-{i:02d}", str(path)))
    return tracks


def _configurations(args: argparse.Namespace) -> list[dict]:
    runs = []
    for _ in range(args.repeats):
        for kind, tracks, k in (("talkers", args.talkers, args.talker_k), ("silent", args.silent, args.silent_k)):
            if tracks:
                runs += [{"kind": kind, "path": path, "tracks": tracks, "streams_per_track": k} for path in args.paths]
    return runs


def measure(args: argparse.Namespace, workdir: Path, checkpoint: Path) -> list[dict]:
    from captions.dev.livekit_server import start_dev_server

    configurations = _configurations(args)
    signals = _signals(args, workdir)
    per_run_s = args.seconds + BASELINE_S + WARMUP_S + 15.0  # engine load, connect, subscribe, leave
    server = start_dev_server(workdir / "livekit-server.log")
    bots: list[subprocess.Popen] = []
    try:
        base = {"url": server.url, "api_key": server.api_key, "api_secret": server.api_secret, "room": "bench-host"}
        until = time.time() + 10.0 + len(configurations) * (per_run_s + 10)
        for n, start in enumerate(range(0, len(signals), args.bots_per_process)):
            bots.append(_spawn("bots", {**base, "tracks": signals[start:start + args.bots_per_process],
                                        "until": until}, workdir, f"bots-{n}"))
        time.sleep(3.0)
        runs = []
        for n, configuration in enumerate(configurations):
            kind = configuration["kind"]
            identities = [identity for identity, _ in signals if identity.startswith(kind[:6])]
            participants = len(identities) * configuration["streams_per_track"]
            out = workdir / f"listener-{n}.out.json"
            profile = str(args.profile / f"{n}-{kind}-{configuration['path']}.prof") if args.profile else None
            config = {**base, **configuration, "identities": identities, "seconds": args.seconds, "profile": profile,
                      "out": str(out), "model": str(checkpoint), "talking": kind == "talkers",
                      "batch_size": participants if kind == "talkers" else 1}
            load_before = [round(x, 2) for x in os.getloadavg()]
            listener = _spawn("listen", config, workdir, f"listener-{n}", env={PATH_ENV: configuration["path"]})
            result = listener_result(listener, per_run_s + 2 * SUBSCRIBE_TIMEOUT_S, out, workdir, f"listener-{n}",
                                     bots)
            run = {**configuration, **result, "load_before": load_before}
            run["kept_up"] = kept_up(run)
            runs.append(run)
            print(f"{kind} {participants} ({configuration['tracks']} x {configuration['streams_per_track']}), "
                  f"{configuration['path']}: {1000 * run['cores_per_participant']:.2f} millicores each, "
                  f"{100 * run['delivered']:.0f} % delivered, load {load_before[0]}", flush=True)
        return runs
    finally:
        for bot in bots:
            bot.terminate()
        for bot in bots:
            with contextlib.suppress(subprocess.TimeoutExpired):
                bot.wait(timeout=10)
        server.stop()


KEPT_UP = (0.95, 1.05)
"""A run kept up when the audio received (and, for talkers, pushed) in its window was this share of
real time: outside it the process fell behind, or caught up a backlog, and its cost is not per
second of audio (a machine loaded far beyond its cores does that)."""


def kept_up(run: dict) -> bool:
    low, high = KEPT_UP
    return low <= run["delivered"] <= high and (run.get("pushed") is None or low <= run["pushed"] <= high)


def summary(runs: list[dict]) -> dict:
    """Per kind and path: the median over the repeats that kept up of the cost per participant,
    and today / new."""
    out: dict = {}
    for kind in ("talkers", "silent"):
        per_path = {}
        for path in PATHS:
            values = sorted(r["cores_per_participant"] for r in runs
                            if r["kind"] == kind and r["path"] == path and kept_up(r))
            if values:
                per_path[path] = values[len(values) // 2]
        if per_path:
            out[kind] = {f"cores_per_participant_{p}": v for p, v in per_path.items()}
            if len(per_path) == 2 and per_path["new"] > 0:
                out[kind]["today_over_new"] = round(per_path["today"] / per_path["new"], 2)
    return out


def markdown_table(report: dict) -> str:
    header = ("| kind | path | participants (tracks x k) | host cores | idle baseline | per participant "
              "| delivered | pushed | steps / 80 ms | latency beyond delay p50 / p95 | load before | kept up |")
    lines = [header,
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["runs"]:
        latency = r.get("latency_beyond_delay_ms")
        lat = f"{latency['p50']:.0f} / {latency['p95']:.0f} ms" if latency else "-"
        pushed = f"{100 * r['pushed']:.0f} %" if r.get("pushed") is not None else "-"
        lines.append(f"| {r['kind']} | {r['path']} | {r['participants']} ({r['tracks']} x {r['streams_per_track']}) "
                     f"| {r['host_cores']:.3f} | {r['baseline_cores']:.3f} | {r['cores_per_participant']:.4f} "
                     f"| {100 * r['delivered']:.0f} % | {pushed} | {r['steps_per_frame']:.2f} | {lat} "
                     f"| {r['load_before'][0]:.2f} | {'yes' if kept_up(r) else 'no'} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    kinds = [k for k in ("talkers", "silent") if any(r["kind"] == k for r in report["runs"])]
    width = 0.35
    for offset, p in enumerate(PATHS):
        for i, kind in enumerate(kinds):
            rows = [r for r in report["runs"] if r["kind"] == kind and r["path"] == p]
            values = [1000 * r["cores_per_participant"] for r in rows if kept_up(r)]
            x = i + (offset - 0.5) * width
            if values:
                ax.bar(x, float(np.median(values)), width, color=("tab:gray", "tab:blue")[offset],
                       label=p if i == 0 else None)
                ax.plot([x] * len(values), values, "k.", markersize=4)
            behind = [1000 * r["cores_per_participant"] for r in rows if not kept_up(r)]
            if behind:
                ax.plot([x] * len(behind), behind, "rx", markersize=5,
                        label="did not keep up" if i == 0 and offset == 0 else None)
    targets = {"talkers": 5.0, "silent": 1.0}
    for i, kind in enumerate(kinds):
        ax.hlines(targets[kind], i - 0.45, i + 0.45, colors="tab:red", linestyles="dashed",
                  label="issue 24 target" if i == 0 else None)
    ax.set_xticks(range(len(kinds)), ["per live talker" if k == "talkers" else "per silent participant" for k in kinds])
    ax.set_ylabel("host CPU, millicores")
    ax.legend()
    machine = report["machine"]
    fig.suptitle(f"captions bench host, {machine['cpu_model']}, {machine['cpu_cores']} cores, "
                 f"{machine['date'][:10]}, load {machine.get('load_average_at_start', ['?'])[0]}", fontsize=9)
    save_figure(fig, path)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--talkers", env="CAPTIONS_BENCH_TALKERS", type=int, default=4,
               help="bot microphones that speak (0: none)")
    add_option(parser, "--talker-k", env="CAPTIONS_BENCH_TALKER_K", type=positive_int, default=4,
               help="speakers the listener starts on each talking microphone (more talkers than bots)")
    add_option(parser, "--silent", env="CAPTIONS_BENCH_SILENT", type=int, default=4,
               help="bot microphones that carry only low noise (0: none)")
    add_option(parser, "--silent-k", env="CAPTIONS_BENCH_SILENT_K", type=positive_int, default=8,
               help="speakers the listener starts on each silent microphone")
    add_option(parser, "--paths", env="CAPTIONS_BENCH_PATHS", type=_paths, default=list(PATHS),
               help="host paths measured side by side: today (this issue's optimisations off) and new")
    add_option(parser, "--repeats", env="CAPTIONS_BENCH_REPEATS", type=positive_int, default=1,
               help="times each configuration is measured (alternating paths)")
    add_option(parser, "--bots-per-process", env="CAPTIONS_BENCH_BOTS_PER_PROCESS", type=positive_int,
               default=2, help="microphones sharing one bot process")
    add_option(parser, "--seconds", env="CAPTIONS_BENCH_SECONDS", type=float, default=10.0,
               help="seconds measured per configuration (after the idle baseline and a warm-up)")
    add_option(parser, "--profile", env="CAPTIONS_BENCH_PROFILE", type=Path,
               help="a folder for each listener's cProfile of its event loop while measured (slows it: "
                    "for finding where the time goes, not for the figures)")
    add_test_checkpoint_options(parser, "the checkpoint the engine steps (its thread's CPU is left out)")
    add_option(parser, "--from-json", env="CAPTIONS_BENCH_FROM_JSON", type=Path,
               help="print the table (and --plot) of an earlier run's JSON instead of measuring")
    add_output_options(parser)


def _paths(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values or set(values) - set(PATHS):
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(PATHS)}, got {text!r}")
    return list(dict.fromkeys(values))


def run(args: argparse.Namespace) -> int:
    from captions.bench.common import report_again
    from captions.dev.livekit_server import find_livekit_server

    if args.from_json:
        return report_again("host", args.from_json, args.plot, plot, markdown_table)
    if find_livekit_server() is None:
        print("captions bench host: livekit-server is missing: run `captions server --install-only`", file=sys.stderr)
        return 1
    if args.talkers < 0 or args.silent < 0 or args.talkers + args.silent == 0:
        print("captions bench host: give some --talkers or --silent microphones", file=sys.stderr)
        return 1
    from livekit import rtc

    report = {"benchmark": "host", "machine": machine_description("cpu")}
    report["machine"]["livekit"] = rtc.__version__
    report["machine"]["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    try:
        checkpoint = resolve_test_checkpoint(args)
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="bench-host-") as tmp:
            runs = measure(args, Path(tmp), checkpoint)
    except (BenchError, RuntimeError) as e:
        print(f"captions bench host: {e}", file=sys.stderr)
        return 1
    report["settings"] = {"talkers": args.talkers, "talker_k": args.talker_k, "silent": args.silent,
                          "silent_k": args.silent_k, "paths": args.paths, "repeats": args.repeats,
                          "seconds": args.seconds, "baseline_s": BASELINE_S, "warmup_s": WARMUP_S,
                          "model": str(checkpoint), "engine": "captions.stt.engine.SttEngine, 1 torch thread, "
                          "its thread's CPU left out", "noise_std_int16": NOISE_STD,
                          "captions_published": False}
    report["runs"] = runs
    report["summary"] = summary(runs)
    return finish_report(args, report, plot, markdown_table)


if __name__ == "__main__":
    raise SystemExit(_child_main(sys.argv[1], sys.argv[2]))
