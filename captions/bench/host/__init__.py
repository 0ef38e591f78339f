"""`captions bench host`: what the whole host path costs per live talker and per silent participant,
in one process or in several receiving processes feeding one engine process.

Through a real livekit-server --dev on loopback, bot processes publish `--talkers` microphones that
speak (espeak-ng sentences with short pauses, looped) and `--silent` microphones that carry only
low noise (about -60 dBFS, a quiet room). For each configuration fresh listener processes run the
product's receiving side as the worker does (listener.py): each subscribes to its share of the
chosen microphones, and for each of them starts `k` of the product's `Speaker`s (captions/live/
speaker.py: the kept 80 ms stream, the speech gate, turns, the live stream (`--live-chunk-ms`), the slot queue,
the segmenter; k > 1 stands for more talkers than this machine can run bots for, as `captions bench
ingest` does), with the real engine code (captions/stt/engine.py: slots, the frame clock) driving
the tiny random checkpoint on the CPU with one torch thread. The tiny model's step is not free, but
it runs on the engine's own thread, whose CPU time is measured apart and left out: the GPU's cost is
`captions bench engine`'s business. Captions are counted, and with `--publish on` also published
as the worker publishes them (captions/live/publisher.py: signed, one `lk.transcription` text
stream each, interims and finals; `--publish off,on` measures both side by side).

Shapes (`--receivers`, e.g. `--receivers 1 2`):

* P = 1, **in-process** (today's worker): one listener holds the speakers and the engine. Each
  configuration runs once with TODAY's host path (`CAPTIONS_HOST_PATH=today`: the SDK's FFI dispatch
  narrowed by a filter per stream, Silero on every window) and once with the new one, in alternation.
* **P over socket** (`captions worker --receivers P`): an engine process (the real `EngineServer`
  of captions/host/engine_server.py over the real engine) and P listeners, each with an equal share
  of the microphones, reaching it through the real `EngineClient` over the Unix socket: the wire's
  cost on the receiving side is the listener's own CPU, the engine process's side of it (its
  reader, writer and ticker threads) is reported apart. New path only. With P = 1 and some P >= 2
  asked for, one listener over the socket is measured too, so that the wire's own cost is visible.

Per configuration and per listener process, over `--seconds` after a warm-up, every process of a
configuration in the same window:

* host cores: the process's CPU time (less its engine thread's, in-process) over wall time, less the
  same process's idle baseline (connected, engine reachable, nothing subscribed), per participant;
* delivered: audio the speakers' tracks received / audio expected in real time; for talkers also
  the audio pushed to the engine;
* engine steps per 80 ms (the frame clock: 1.0 when every live talker steps together);
* caption latency beyond the model's delay: for each engine event that carries text, its arrival on
  the room's loop less the time at which WebRTC produced, in this process, the last audio sample
  the step had consumed (the track's production times, as the frame clock reads them) (p50/p95). The real model writes a word its text delay after that audio, so this is what the host
  path adds to it (transport from the speaker is `captions bench latency`'s business). Not a word's
  end: the tiny model's random segments end words many steps before they are written;
* parallelism: each process's CPU every 0.5 s, the time its threads waited for a core while
  runnable (/proc schedstat), the machine's busy cores (/proc/stat) and how many were left to the
  worker's processes by the bots, livekit-server and anything else.

The 1-minute load average before each configuration is in the JSON: on a shared machine the figures
are noisy, and the side-by-side comparison is what they are for.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from captions.bench.common import (
    BenchError,
    add_output_options,
    add_test_checkpoint_options,
    finish_report,
    machine_description,
    positive_ints,
    resolve_test_checkpoint,
)
from captions.bench.free_step import add_engine_step_options
from captions.bench.host.listener import BASELINE_S, WARMUP_S
from captions.bench.host.measure import NOISE_STD, measure
from captions.bench.host.report import PATHS, kept_up, markdown_table, plot, summary
from captions.config import add_option, live_chunk_list, positive_int
from captions.stt.api import LIVE_CHUNK_MS

__all__ = ["configure_parser", "kept_up", "markdown_table", "plot", "run", "summary"]


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
               help="host paths measured side by side in-process: today (issue 24's optimisations off) and new")
    add_option(parser, "--receivers", env="CAPTIONS_BENCH_RECEIVERS", type=positive_ints("receivers"), default=[1],
               nargs="+", help="receiving processes, e.g. `1 2` or 1,2: 1 is the in-process worker (both paths); "
                               "P >= 2 is an engine process and P listeners over its socket (new path); with both, "
                               "one listener over the socket is measured too; the microphones of each kind are shared out among them")
    add_option(parser, "--live-chunk-ms", env="CAPTIONS_BENCH_LIVE_CHUNK_MS", type=live_chunk_list, default=[LIVE_CHUNK_MS],
               help="live chunk lengths the new path is measured with, side by side (`captions worker "
                    "--live-chunk-ms`; today's path keeps 10 ms), e.g. 10,40")
    add_option(parser, "--publish", env="CAPTIONS_BENCH_PUBLISH", type=_publish, default=[False],
               help="whether the talkers' listeners publish their captions as the worker does (signed "
                    "lk.transcription text streams): off, on, or off,on side by side")
    add_option(parser, "--repeats", env="CAPTIONS_BENCH_REPEATS", type=positive_int, default=1,
               help="times each configuration is measured (alternating paths)")
    add_option(parser, "--bots-per-process", env="CAPTIONS_BENCH_BOTS_PER_PROCESS", type=positive_int,
               default=2, help="microphones sharing one bot process")
    add_option(parser, "--seconds", env="CAPTIONS_BENCH_SECONDS", type=float, default=10.0,
               help="seconds measured per configuration (after the idle baseline and a warm-up)")
    add_option(parser, "--profile", env="CAPTIONS_BENCH_PROFILE", type=Path,
               help="a folder for each listener's cProfile of its event loop while measured (slows it: "
                    "for finding where the time goes, not for the figures)")
    add_engine_step_options(parser)
    add_test_checkpoint_options(parser, "the checkpoint the engine steps (its thread's CPU is left out)")
    add_option(parser, "--from-json", env="CAPTIONS_BENCH_FROM_JSON", type=Path,
               help="print the table (and --plot) of an earlier run's JSON instead of measuring")
    add_output_options(parser)


def _paths(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values or set(values) - set(PATHS):
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(PATHS)}, got {text!r}")
    return list(dict.fromkeys(values))


def _publish(text: str) -> list[bool]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values or set(values) - {"off", "on"}:
        raise argparse.ArgumentTypeError(f"expected off, on or off,on, got {text!r}")
    return [value == "on" for value in dict.fromkeys(values)]


def _receivers(value) -> list[int]:
    """`--receivers 1 2` (a list of lists), `1,2`, or the environment's list: one sorted list."""
    flat = [v for item in value for v in (item if isinstance(item, list) else [item])]
    return sorted(set(flat))


def _check(args: argparse.Namespace) -> str | None:
    if args.talkers < 0 or args.silent < 0 or args.talkers + args.silent == 0:
        return "give some --talkers or --silent microphones"
    most = max(args.receivers)
    if most > 1 and any(0 < n < most for n in (args.talkers, args.silent)):
        return (f"--receivers {most} shares each kind's microphones out among {most} processes: "
                f"give at least {most} --talkers and --silent (or 0)")
    return None


def run(args: argparse.Namespace) -> int:
    from captions.bench.common import report_again
    from captions.dev.livekit_server import find_livekit_server

    if args.from_json:
        return report_again("host", args.from_json, args.plot, plot, markdown_table)
    if find_livekit_server() is None:
        print("captions bench host: livekit-server is missing: run `captions server --install-only`", file=sys.stderr)
        return 1
    args.receivers = _receivers(args.receivers)
    problem = _check(args)
    if problem:
        print(f"captions bench host: {problem}", file=sys.stderr)
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
                          "silent_k": args.silent_k, "paths": args.paths, "receivers": args.receivers,
                          "live_chunk_ms": args.live_chunk_ms,
                          "repeats": args.repeats, "seconds": args.seconds, "baseline_s": BASELINE_S,
                          "warmup_s": WARMUP_S, "model": str(checkpoint), "engine_step": args.engine_step,
                          "free_step_ms": args.free_step_ms if args.engine_step == "free" else None,
                          "latency": "engine event carrying text on the room's loop less the production time (this "
                                     "process's WebRTC tick) of the last sample its step consumed",
                          "engine": "captions.stt.engine.SttEngine, 1 torch thread, its thread's CPU left out; "
                                    "over the socket: captions.host.engine_server.EngineServer in its own process, "
                                    "captions.host.engine_client.EngineClient in each listener",
                          "noise_std_int16": NOISE_STD, "captions_published": args.publish}
    report["runs"] = runs
    report["summary"] = summary(runs)
    return finish_report(args, report, plot, markdown_table)
