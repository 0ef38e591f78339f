"""`captions bench <kind>`: the benchmarks whose figures the README publishes.

Each kind lives in its own module, listed in BENCHMARKS, exposing `configure_parser(parser)` and
`run(args) -> int` like a top-level command (`captions bench engine ...`, `captions bench latency
...`). This module also holds what every benchmark's JSON shares: the description of the machine
the figures were measured on, and the summary statistics.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
from pathlib import Path

BENCHMARKS: dict[str, tuple[str, str]] = {
    "engine": ("agent.bench_engine",
               "batched engine throughput against one model state per stream (batch size 1)"),
    "latency": ("agent.bench_latency",
                "caption latency per word through a real livekit-server and the real worker, with its split"),
    "clock": ("agent.bench_clock",
              "engine steps and latency for live speakers with frames on one clock or each at its own phase"),
    "ingest": ("agent.bench_ingest",
               "CPU cost of receiving every speaker's audio in the worker's process, per chunk size and fan-out"),
}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="benchmark", required=True, metavar="{" + ",".join(BENCHMARKS) + "}")
    for name, (module, text) in BENCHMARKS.items():
        sub = kinds.add_parser(name, help=text, description=text)
        importlib.import_module(module).configure_parser(sub)


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(BENCHMARKS[args.benchmark][0]).run(args)


# ---- shared by every benchmark --------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_description(device: str) -> dict:
    """What the figures depend on: CPU, cores, RAM, GPU, library versions, date, and the load
    average (other processes on the machine slow every figure down)."""
    import moshi
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    description = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_cores": usable,
        "ram_gib": _ram_gib(),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "moshi": getattr(moshi, "__version__", "unknown"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    return description


def summarize_ms(seconds: list[float]) -> dict:
    """Mean, p50, p95 and p99 of durations given in seconds, in milliseconds."""
    import numpy as np

    if not seconds:
        return {"count": 0, "mean": None, "p50": None, "p95": None, "p99": None}
    values = np.asarray(seconds) * 1000.0
    return {
        "count": int(values.size),
        "mean": round(float(values.mean()), 3),
        "p50": round(float(np.percentile(values, 50)), 3),
        "p95": round(float(np.percentile(values, 95)), 3),
        "p99": round(float(np.percentile(values, 99)), 3),
    }


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path


def save_figure(fig, path: Path) -> None:
    """Writes a matplotlib figure as PNG and frees it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def positive_ints(what: str):
    """argparse type for a comma-separated list of positive integers, e.g. 1,8,32."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers such as 1,8,32, got {text!r}") from None
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"{what} must be positive integers, got {text!r}")
        return sorted(set(values))

    return parse


FRAME_MODES = ("shared", "unaligned")
"""How live speakers' frames meet the engine: on one clock (the worker's default) or each at its
own phase (`captions worker --unaligned-frames`, the behaviour before)."""


def frame_modes(text: str) -> list[str]:
    """argparse type for a comma-separated subset of FRAME_MODES."""
    modes = [part.strip() for part in text.split(",") if part.strip()]
    if not modes or set(modes) - set(FRAME_MODES):
        raise argparse.ArgumentTypeError(f"expected shared and/or unaligned, got {text!r}")
    return list(dict.fromkeys(modes))


def add_test_checkpoint_options(parser: argparse.ArgumentParser, model_help: str) -> None:
    """--model (unset: the tiny test checkpoint) and --cache-dir (where that one is built once)."""
    from .bench_engine import default_cache_dir
    from .config import add_option

    add_option(parser, "--model", env="CAPTIONS_BENCH_MODEL",
               help=f"{model_help}; unset: the tiny test checkpoint, built once")
    add_option(parser, "--cache-dir", env="CAPTIONS_BENCH_CACHE", type=Path, default=default_cache_dir(),
               help="where the built test checkpoint is kept")


def resolve_test_checkpoint(args: argparse.Namespace) -> Path:
    """The directory of --model, or the tiny test checkpoint (built on first use); raises
    CheckpointError for a bad --model."""
    from .bench_engine import ensure_checkpoint
    from .model import resolve_checkpoint_dir

    return resolve_checkpoint_dir(args.model) if args.model else ensure_checkpoint("tiny", args.cache_dir)


def finish_report(args: argparse.Namespace, report: dict, plot, markdown_table) -> int:
    """The end of every benchmark: the load average now, --json, --plot, and the table on stdout."""
    import contextlib

    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        write_json(args.json, report)
    if args.plot:
        plot(report, args.plot)
    with contextlib.suppress(BrokenPipeError):
        print(markdown_table(report))
    return 0


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """--json and --plot, shared by every benchmark."""
    from .config import add_option

    add_option(parser, "--json", env="CAPTIONS_BENCH_JSON", type=Path, help="write the results here")
    add_option(parser, "--plot", env="CAPTIONS_BENCH_PLOT", type=Path, help="write a PNG plot here")
