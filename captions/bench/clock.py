"""`captions bench clock`: what putting every live speaker's frames on one clock saves, in process.

The engine alone (no WebRTC, no worker): N live streams start at different 10 ms ticks (seeded)
and each gets its chunk of speech on the tick that completes it, from one driver thread, as WebRTC
hands the worker every remote track's audio on one shared tick. Ways of feeding the engine,
measured in one run:

    shared      live chunks (`--live-chunk-ms`, 10 to 40 ms); the engine aligns every stream's frames on one
                clock (the default)
    no-hold     the same, without the clock's hold (captions/stt/frame_clock.py; the clock before
                2026-12-07): a stream whose lead came out off steps on its own
    unaligned   80 ms frames, each completing at its stream's own phase (the worker before)

`--misplaced-ms X`: each stream's first push is said to have been produced up to X ms before or
after it was (seeded), as a starved host's estimates can be: its lead then comes out ticks off.
`--late-hand-overs F`: after a share F of the ticks (seeded), the driver hands over 20 to 70 ms late,
then every tick each stream is owed at once, stream after stream, as an event loop short of CPU does
(docs/benchmarks/host.md, "The hold's phase choice and stall test"). `--engine-step free`: the
model's compute is replaced by a wait without CPU (captions/bench/free_step.py), so that the tiny
model's CPU step does not decide the grouping.

Reported per mode: engine steps per second (12.5 when every step carries every stream), streams per
step, and push-to-event latency: from the push that completed a frame to the engine's event for
that frame (queueing before the step + the step + delivery). `captions bench latency` measures the
same through a real server; this one isolates the engine from the bots' and WebRTC's noise.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from pathlib import Path

import numpy as np

from captions.bench.common import (
    add_output_options,
    add_test_checkpoint_options,
    finish_report,
    machine_description,
    positive_ints,
    resolve_test_checkpoint,
    save_figure,
    speech_streams,
    summarize_ms,
)
from captions.bench.free_step import add_engine_step_options, make_step_free
from captions.config import add_option, device_name, live_chunk_list
from captions.stt.api import FRAME_SIZE, LIVE_CHUNK_MS

TICK_S = 0.01
TICK_SAMPLES = 240
CLOCK_MODES = ("shared", "no-hold", "unaligned")


def clock_modes(text: str) -> list[str]:
    """argparse type for a comma-separated subset of CLOCK_MODES."""
    modes = [part.strip() for part in text.split(",") if part.strip()]
    if not modes or set(modes) - set(CLOCK_MODES):
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(CLOCK_MODES)}, got {text!r}")
    return list(dict.fromkeys(modes))


def measure(engine, clips: list[np.ndarray], start_ticks: list[int], chunk: int, skews: list[float],
            late_hand_overs: float = 0.0, seed: int = 0) -> dict:
    """Drives one engine with live streams pushing `chunk` samples whenever that much is due; stream
    i's first push says its audio was produced `skews[i]` seconds before it was; after a share
    `late_hand_overs` of the ticks, the next hand-over comes 2 to 7 ticks late."""
    lock = threading.Lock()
    completed: dict[tuple[int, int], float] = {}
    latencies: list[float] = []
    since_produced: list[float] = []

    def on_event(index: int):
        def handle(event) -> None:
            if event.ended or event.frames <= 0:
                return
            now = time.monotonic()
            with lock:
                pushed_at = completed.pop((index, event.frames - 1), None)
            if pushed_at is not None:
                latencies.append(now - pushed_at)
                # The frame's last sample was produced on its 10 ms tick (lead and skew aside).
                last = event.frames * FRAME_SIZE - event.lead_samples - 1
                since_produced.append(now - (origin + (start_ticks[index] + last // TICK_SAMPLES) * TICK_S))
        return handle

    streams: list = [None] * len(clips)
    offsets = [0] * len(clips)
    handed = list(start_ticks)
    """Per stream, the first tick not handed over yet."""
    per_push = chunk // TICK_SAMPLES
    ticks = max(start + clip.size // TICK_SAMPLES for start, clip in zip(start_ticks, clips))
    late, late_until = random.Random(seed), 0
    steps, active = [], []
    engine.step_listeners.append(lambda timings: (steps.append(time.monotonic()), active.append(timings.active)))
    origin = time.monotonic()
    try:
        for tick in range(ticks):
            delay = origin + tick * TICK_S - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if tick < late_until:
                continue  # this hand-over is late: its ticks go with the next one
            for i, clip in enumerate(clips):
                for owed in range(handed[i], tick + 1):  # stream after stream, every tick it is owed
                    if streams[i] is None:
                        streams[i] = engine.open_stream(on_event(i))
                    # An 80 ms reader hands over its frame on the tick that completes it.
                    if (owed - start_ticks[i] + 1) % per_push or offsets[i] + chunk > clip.size:
                        continue
                    produced = origin + owed * TICK_S - (skews[i] if offsets[i] == 0 else 0.0)
                    streams[i].push(clip[offsets[i]:offsets[i] + chunk], produced_at=produced)
                    now = time.monotonic()
                    lead = streams[i].lead_samples
                    with lock:
                        for frame in range((offsets[i] + lead) // FRAME_SIZE,
                                           (offsets[i] + chunk + lead) // FRAME_SIZE):
                            completed[(i, frame)] = now
                    offsets[i] += chunk
                handed[i] = max(handed[i], tick + 1)
            if late.random() < late_hand_overs and tick + 8 < ticks:  # the last ticks are handed over
                late_until = tick + 1 + late.randint(2, 7)
        # Steady state: from when the last stream started until the first one ran out of speech.
        steady_from = origin + (max(start_ticks) + 8) * TICK_S
        steady_to = origin + (min(s + c.size // TICK_SAMPLES for s, c in zip(start_ticks, clips)) - 8) * TICK_S
        time.sleep(0.5)
    finally:
        for stream in streams:
            if stream is not None:
                stream.abort()
        engine.step_listeners.clear()
    inside = [a for t, a in zip(steps, active) if steady_from <= t <= steady_to]
    seconds = steady_to - steady_from
    return {"steps_per_s": round(len(inside) / seconds, 2) if seconds > 0 else None,
            "streams_per_step": round(float(np.mean(inside)), 2) if inside else None,
            "push_to_event_ms": summarize_ms(latencies),
            "produced_to_event_ms": summarize_ms(since_produced),
            "frames_captioned": len(latencies),
            "leads": [stream.lead_samples for stream in streams]}


def run_all(args: argparse.Namespace, checkpoint: Path) -> list[dict]:

    results = []
    for n in args.speakers:
        clips = speech_streams(n, args.seconds)
        rng = random.Random(n)
        start_ticks = sorted(rng.randrange(0, 24) for _ in range(n))  # a quarter second of arrivals
        skews = [rng.uniform(-args.misplaced_ms, args.misplaced_ms) / 1000 for _ in range(n)]
        for mode in args.frames:
            for chunk_ms in [80] if mode == "unaligned" else args.live_chunk_ms:
                result = _measure_once(args, checkpoint, mode, clips, start_ticks, skews, chunk_ms, n)
                result.update(speakers=n, frames=mode, chunk_ms=chunk_ms, misplaced_ms=args.misplaced_ms,
                              late_hand_overs=args.late_hand_overs)
                latency, produced = result["push_to_event_ms"], result["produced_to_event_ms"]
                print(f"{n} speakers, {mode} frames, {chunk_ms} ms chunks: {result['steps_per_s']} steps/s, "
                      f"{result['streams_per_step']} streams per step, push-to-event p50 {latency['p50']} / "
                      f"p95 {latency['p95']} ms, produced-to-event p50 {produced['p50']} / p95 {produced['p95']} ms",
                      file=sys.stderr)
                results.append(result)
    return results


def _measure_once(args: argparse.Namespace, checkpoint: Path, mode: str, clips: list[np.ndarray],
                  start_ticks: list[int], skews: list[float], chunk_ms: int, n: int) -> dict:
    from captions.stt.engine import SttEngine

    engine = SttEngine.load(str(checkpoint), device=args.device, batch_size=n, align_frames=mode != "unaligned")
    if args.engine_step == "free":
        make_step_free(engine, args.free_step_ms)
    if mode == "no-hold":
        engine.clock.hold_s = 0.0
    engine.start()
    try:
        return measure(engine, clips, start_ticks, TICK_SAMPLES * chunk_ms // 10, skews, args.late_hand_overs, seed=n)
    finally:
        engine.close()


def markdown_table(report: dict) -> str:
    lines = [("| speakers | frames | chunk | steps/s | streams per step | push-to-event p50 / p95 / p99 (ms) "
              "| produced-to-event p50 / p95 (ms) |"),
             "|---:|---|---:|---:|---:|---|---|"]
    for r in report["results"]:
        lat, produced = r["push_to_event_ms"], r.get("produced_to_event_ms")
        chunk = r.get("chunk_ms", 80 if r["frames"] == "unaligned" else 10)
        since = f"{produced['p50']:.1f} / {produced['p95']:.1f}" if produced and produced.get("p50") is not None else "-"
        lines.append(f"| {r['speakers']} | {r['frames']} | {chunk} ms | {r['steps_per_s']:.1f} | "
                     f"{r['streams_per_step']:.1f} | {lat['p50']:.1f} / {lat['p95']:.1f} / {lat['p99']:.1f} | {since} |")
    return "\n".join(lines)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--speakers", env="CAPTIONS_BENCH_SPEAKERS", type=positive_ints("speaker counts"),
               default=[8, 32, 64], help="live streams at once (engine batch size = streams)")
    add_option(parser, "--frames", env="CAPTIONS_BENCH_FRAMES", type=clock_modes, default=list(CLOCK_MODES),
               help="shared (one clock, the default of the worker), no-hold (the clock without its hold) "
                    "and/or unaligned (each stream its phase)")
    add_option(parser, "--misplaced-ms", env="CAPTIONS_BENCH_MISPLACED_MS", type=float, default=0.0,
               help="each stream's first push is said to be produced up to this many ms off (seeded): "
                    "a starved host's estimate, which puts its lead ticks off")
    add_option(parser, "--late-hand-overs", env="CAPTIONS_BENCH_LATE_HAND_OVERS", type=float, default=0.0,
               help="share of the ticks after which the driver hands over 20-70 ms late, every owed tick at "
                    "once, stream after stream (seeded): an event loop short of CPU")
    add_option(parser, "--live-chunk-ms", env="CAPTIONS_BENCH_LIVE_CHUNK_MS", type=live_chunk_list, default=[LIVE_CHUNK_MS],
               help="live chunk lengths of the shared and no-hold modes, side by side (`captions worker "
                    "--live-chunk-ms`), e.g. 10,40")
    add_option(parser, "--seconds", env="CAPTIONS_BENCH_SECONDS", type=float, default=8.0,
               help="seconds of speech per stream")
    add_engine_step_options(parser)
    add_test_checkpoint_options(parser, "checkpoint directory or Hugging Face repo")
    add_option(parser, "--device", env="CAPTIONS_DEVICE", default="cpu", type=device_name,
               help="cpu, cuda or auto")
    add_output_options(parser)


def run(args: argparse.Namespace) -> int:
    from captions.stt.model import CheckpointError

    if args.seconds < 1:
        print("captions bench clock: --seconds must be at least 1", file=sys.stderr)
        return 2
    if not 0 <= args.late_hand_overs <= 0.5:
        print("captions bench clock: --late-hand-overs must be between 0 and 0.5", file=sys.stderr)
        return 2
    if not 0 <= args.misplaced_ms <= 100:
        print("captions bench clock: --misplaced-ms must be between 0 and 100", file=sys.stderr)
        return 2
    try:
        checkpoint = resolve_test_checkpoint(args)
        report = {"benchmark": "clock", "machine": machine_description(args.device)}
        results = run_all(args, checkpoint)
    except (CheckpointError, RuntimeError) as e:
        print(f"captions bench clock: {e}", file=sys.stderr)
        return 1
    report.update({
        "settings": {"speakers": args.speakers, "frames": args.frames, "seconds_per_stream": args.seconds,
                     "live_chunk_ms": args.live_chunk_ms,
                     "checkpoint": str(checkpoint), "tick_ms": TICK_S * 1000,
                     "starts": "each stream at a random 10 ms tick of the first 240 ms (seeded)",
                     "misplaced_ms": args.misplaced_ms, "late_hand_overs": args.late_hand_overs,
                     "engine_step": args.engine_step,
                     "free_step_ms": args.free_step_ms if args.engine_step == "free" else None},
        "definitions": {
            "steps_per_s": "engine steps per second while every stream is speaking (12.5 = one per 80 ms)",
            "streams_per_step": "mean streams advanced by one step, same window",
            "push_to_event_ms": "push that completed a frame -> the engine's event for it",
            "produced_to_event_ms": "the tick that produced a frame's last sample -> the engine's event for it "
                                    "(with chunks over 10 ms, the wait for the chunk that completes it included)"},
        "results": results,
    })
    return finish_report(args, report, plot, markdown_table)


def plot(report: dict, path: Path) -> None:
    """Steps per second and push-to-event p50/p95 per speaker count, one bar per frame mode."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

    results = report["results"]
    speakers = sorted({r["speakers"] for r in results})
    modes = [m for m in CLOCK_MODES if any(r["frames"] == m for r in results)]
    fig, (steps, latency) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(modes)
    colours = {"shared": "tab:blue", "no-hold": "tab:green", "unaligned": "tab:orange"}
    steps.axhline(12.5, color="grey", linestyle=":", label="one step per 80 ms")
    for k, mode in enumerate(modes):
        rows = {r["speakers"]: r for r in results if r["frames"] == mode}
        x = np.arange(len(speakers)) + k * width
        colour = colours[mode]
        steps.bar(x, [rows[n]["steps_per_s"] or 0 for n in speakers], width, label=f"{mode} frames", color=colour)
        latency.bar(x, [rows[n]["push_to_event_ms"]["p95"] or 0 for n in speakers], width,
                    label=f"{mode} frames, p95", color=colour, alpha=0.4)
        latency.bar(x, [rows[n]["push_to_event_ms"]["p50"] or 0 for n in speakers], width * 0.5,
                    label=f"{mode} frames, p50", color=colour)
    for axis in (steps, latency):
        axis.set_xticks(np.arange(len(speakers)) + width * (len(modes) - 1) / 2, [str(n) for n in speakers])
        axis.set_xlabel("live speakers (engine batch size)")
        axis.grid(True, axis="y", alpha=0.3)
        axis.legend(fontsize=8)
    steps.set_ylabel("engine steps per second")
    steps.set_title("Steps (each costs the full batch)")
    latency.set_ylabel("push that completed a frame -> its event (ms)")
    latency.set_title("Engine latency per frame")
    machine = report["machine"]
    fig.suptitle(f"captions bench clock - {machine['cpu_model']}, {machine['cpu_cores']} cores, "
                 f"{machine['device']}, {machine['date'][:10]}", fontsize=10)
    save_figure(fig, path)
