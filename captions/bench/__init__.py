"""`captions bench <kind>`: the benchmarks whose figures the README publishes.

Each kind lives in its own module, listed in BENCHMARKS, exposing `configure_parser(parser)` and
`run(args) -> int` like a top-level command (`captions bench engine ...`, `captions bench latency
...`); what they share is in common.py.
"""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS: dict[str, tuple[str, str]] = {
    "engine": ("captions.bench.engine",
               "batched engine throughput against one model state per stream (batch size 1)"),
    "latency": ("captions.bench.latency",
                "caption latency per word through a real livekit-server and the real worker, with its split"),
    "clock": ("captions.bench.clock",
              "engine steps and latency for live speakers with frames on one clock or each at its own phase"),
    "ingest": ("captions.bench.ingest",
               "CPU cost of receiving every speaker's audio in the worker's process, per chunk size and fan-out"),
    "meeting": ("captions.bench.meeting",
                "simulated meetings: how many participants B engine slots caption with nothing lost, and at what latency"),
    "soak": ("captions.bench.soak",
             "the worker's memory, threads, descriptors and FFI handles over hundreds of rooms, and in one long room"),
    "host": ("captions.bench.host",
             "the whole host path through a real livekit-server: cores per live talker and per silent participant"),
    "wire": ("captions.bench.wire",
             "the engine channel's CPU per live stream on each side of its socket, with nothing else running"),
    "translate": ("captions.bench.translate",
                  "batched translation throughput, and the latency it adds from a final to its translation"),
}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="benchmark", required=True, metavar="{" + ",".join(BENCHMARKS) + "}")
    for name, (module, text) in BENCHMARKS.items():
        sub = kinds.add_parser(name, help=text, description=text)
        importlib.import_module(module).configure_parser(sub)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "plot", None) and not _have_matplotlib():
        # Checked before minutes of measuring, not when the plot is drawn.
        print(f"captions bench {args.benchmark}: --plot needs matplotlib, from the bench dependency group: "
              "uv sync --all-groups (or drop --plot)", file=sys.stderr)
        return 2
    from captions.dev.processes import stop_on_signals

    stop_on_signals()  # the benchmarks start servers, workers and bots: their `finally` stops them
    return importlib.import_module(BENCHMARKS[args.benchmark][0]).run(args)


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
