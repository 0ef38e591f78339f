"""`captions bench soak`: does a long-running worker give back what each room took? (issue 16)

A worker serves thousands of rooms a day in one process: what a room leaves behind adds up. Three
scenarios, each reporting over time the worker's resident memory (RSS), its C heap in use and free
(glibc; Python objects and native libraries alike), Python objects (gc), open file descriptors,
threads, livekit FFI handles and open transcript files, and their slope per unit: least squares
over the second half of the samples, after the warm-up.

* `rooms`: N rooms, K at a time, through a real livekit-server and the real worker subprocess (tiny
  test checkpoint, CPU, `--diagnostics-file`): in each, a speaker bot says a short espeak-ng
  sentence and leaves, a hidden listener waits for its final caption, then the room is deleted, as
  a meeting ends. Unit: a room. After the last room, threads, descriptors, open transcripts and FFI
  handles must be back to their idle values (measured after the warm-up rooms).
* `long-room`: one room open for the whole run; speakers join, speak, mute, unmute, speak again
  and leave, P at a time. Unit: a speaker's turn.
* `hour`: one room's hour of speech, in process and faster than real time: speakers' turns through
  the real engine and what the room keeps per speaker and per caption (segmenter, transcript file,
  recorder, timing diagnostics), laid one after another on the room's clock. Unit: a minute of
  speech. (The 30-minute backlog is not the worker's: the viewer server reads it from the
  transcript file.)

Every loop is bounded in count and time (`--max-minutes`). The package: common.py (what is
sampled), bots.py and hour.py (the child processes), runs.py (the parent), report.py.
"""

from __future__ import annotations

import argparse
import contextlib
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
    report_again,
)
from captions.bench.soak.common import (
    SCENARIOS,
    SENTENCES,
    scenarios,
    slopes,  # noqa: F401 - tests read it here
)
from captions.bench.soak.report import markdown_table, plot
from captions.bench.soak.runs import measure
from captions.config import add_option, positive_int


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--scenarios", env="CAPTIONS_BENCH_SCENARIOS", type=scenarios, default=list(SCENARIOS),
               help="rooms (N rooms through a real server), long-room (speakers rotating in one room), "
                    "hour (one room's hour of speech in process, faster than real time)")
    add_option(parser, "--rooms", env="CAPTIONS_BENCH_ROOMS", type=positive_int, default=500,
               help="rooms of the rooms scenario (the first 5 warm up)")
    add_option(parser, "--parallel", env="CAPTIONS_BENCH_PARALLEL", type=positive_int, default=4,
               help="rooms in flight at once")
    add_option(parser, "--turns", env="CAPTIONS_BENCH_TURNS", type=positive_int, default=100,
               help="speaker turns of the long-room scenario (join, speak, mute, unmute, speak, leave)")
    add_option(parser, "--speakers", env="CAPTIONS_BENCH_SPEAKERS", type=positive_int, default=3,
               help="speakers at once in the long-room and hour scenarios")
    add_option(parser, "--minutes", env="CAPTIONS_BENCH_MINUTES", type=positive_int, default=60,
               help="minutes of speech of the hour scenario")
    add_option(parser, "--turn-seconds", env="CAPTIONS_BENCH_TURN_SECONDS", type=float, default=20.0,
               help="seconds of speech per speaker turn in the hour scenario")
    add_option(parser, "--sample-every", env="CAPTIONS_BENCH_SAMPLE_EVERY", type=positive_int, default=10,
               help="rooms or turns between two samples of the worker")
    add_option(parser, "--max-minutes", env="CAPTIONS_BENCH_MAX_MINUTES", type=float, default=90.0,
               help="time limit of each scenario: no new room or turn starts after it")
    add_option(parser, "--workdir", env="CAPTIONS_BENCH_WORKDIR", type=Path, default=None,
               help="keep the server, worker and bot logs and the worker's diagnostics here "
                    "(default: a temporary directory)")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="run the worker under PYTHONTRACEMALLOC (the Python heap in the samples; "
                             "slower, and its own memory shows in the RSS)")
    add_test_checkpoint_options(parser, "checkpoint directory for the worker")
    add_output_options(parser)
    add_option(parser, "--from-json", env="CAPTIONS_BENCH_FROM_JSON", type=Path,
               help="measure nothing: print the table (and --plot) of an earlier run's JSON")


def run(args: argparse.Namespace) -> int:
    from captions.dev.livekit_server import find_livekit_server

    if args.from_json:
        return report_again("soak", args.from_json, args.plot, plot, markdown_table)
    if set(args.scenarios) - {"hour"} and find_livekit_server() is None:
        print("captions bench soak: livekit-server is missing: run `captions server --install-only`",
              file=sys.stderr)
        return 1
    from livekit import rtc

    report = {"benchmark": "soak", "machine": machine_description("cpu")}
    report["machine"]["livekit"] = rtc.__version__
    report["machine"]["malloc_arena_max"] = os.environ.get("MALLOC_ARENA_MAX")
    report["settings"] = {"scenarios": args.scenarios, "rooms": args.rooms, "parallel": args.parallel,
                          "turns": args.turns, "speakers": args.speakers, "minutes": args.minutes,
                          "turn_seconds": args.turn_seconds, "sample_every": args.sample_every,
                          "max_minutes": args.max_minutes, "tracemalloc": args.tracemalloc,
                          "sentences": list(SENTENCES)}
    try:
        with contextlib.ExitStack() as stack:
            workdir = args.workdir
            if workdir is None:
                workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-soak-")))
            workdir.mkdir(parents=True, exist_ok=True)
            report["scenarios"] = measure(args, workdir)
    except (BenchError, RuntimeError) as e:
        print(f"captions bench soak: {e}", file=sys.stderr)
        return 1
    return finish_report(args, report, plot, markdown_table)
