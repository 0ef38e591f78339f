"""What every benchmark shares: its error, the description of the machine its figures were measured
on, summary statistics, JSON and plot output, the test checkpoint and the speech it speaks."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from captions.config import add_option
from captions.dev.speech import speech_samples
from captions.log import logger
from captions.stt.api import FRAME_S, FRAME_SIZE


class BenchError(Exception):
    """The benchmark cannot run or its figures would be wrong; the message says why."""


BOT_NICENESS = 10
"""Speaker bots stand for people on other machines: they run niced, so the worker comes first."""


def run_child_process(main, config_path: str, label: str, bots: bool = True) -> int:
    """The body of a benchmark's child process: `asyncio.run(main(config))` with the JSON config at
    `config_path`, warnings-only logging, niced when it runs bots; a BenchError is one line on stderr."""
    import asyncio
    import logging
    import sys

    logging.basicConfig(level=logging.WARNING)
    if bots:
        os.nice(BOT_NICENESS)
    config = json.loads(Path(config_path).read_text())
    try:
        asyncio.run(main(config))
    except BenchError as e:
        print(f"{label}: {e}", file=sys.stderr)
        return 1
    return 0

# Checkpoints the benchmark builds itself: make_test_checkpoint arguments.
BUILT_CHECKPOINTS: dict[str, dict] = {
    "tiny": {},
    "prod-shaped": {"full_mimi": True, "lm_dim": 512, "lm_layers": 6, "lm_heads": 8},
}

_SENTENCES = [
    "Good morning everyone, thank you for joining the weekly planning meeting.",
    "The budget for the next quarter looks reasonable, but travel costs went up.",
    "Could you share your screen so that we can all see the latest figures?",
    "I think we should ship the new release before the end of the month.",
    "Bonjour à tous, nous allons commencer la réunion dans quelques instants.",
    "Let me summarise the three decisions we took during the last call.",
    "The customer asked whether live captions also work on mobile phones.",
    "Je pense que la nouvelle version est prête pour les tests utilisateurs.",
]
_VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-us+f3", "en-gb-x-rp", "en-us+m3"]
_FRENCH_VOICES = ["fr", "fr+f2"]


# ---- inputs: checkpoints and speech ---------------------------------------------------------------

def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kyutai-livekit-captions" / "bench"


def ensure_checkpoint(name: str, cache_dir: Path) -> Path:
    """Builds the named checkpoint once; the directory name changes with the generator's source
    and arguments, so a changed generator never serves a stale checkpoint."""
    from captions.dev import tiny_checkpoint

    kwargs = BUILT_CHECKPOINTS[name]
    key = hashlib.sha256(Path(tiny_checkpoint.__file__).read_bytes() + json.dumps(kwargs).encode())
    directory = cache_dir / f"{name}-{key.hexdigest()[:12]}"
    if (directory / "config.json").is_file():
        return directory
    logger.info("building the %s checkpoint into %s (once)", name, directory)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
    tiny_checkpoint.make_test_checkpoint(partial, seed=0, **kwargs)
    partial.rename(directory)  # atomic: a crash mid-build never leaves a checkpoint that looks whole
    return directory


def speech_streams(count: int, seconds: float) -> list[np.ndarray]:
    """`count` different streams of speech, each exactly `seconds` long (whole 80 ms frames).

    Stream i reads sentences i, i+1, ... in voice i (English accents, French for the French
    sentences) at one of four speeds, with short pauses between sentences, as people speak."""
    frames = max(1, round(seconds / FRAME_S))
    samples = frames * FRAME_SIZE
    pause = np.zeros(7200, dtype=np.float32)  # 0.3 s
    cache: dict[tuple[int, str, int], np.ndarray] = {}
    streams = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(count):
            pieces, length, j = [], 0, 0
            while length < samples:
                index = (i + j) % len(_SENTENCES)
                french = _SENTENCES[index].startswith(("Bonjour", "Je "))
                voice = (_FRENCH_VOICES if french else _VOICES)[i % (2 if french else len(_VOICES))]
                key = (index, voice, 140 + 15 * (i % 4))
                if key not in cache:
                    cache[key] = speech_samples(_SENTENCES[index], Path(tmp), voice=voice, speed=key[2])
                pieces += [cache[key], pause]
                length += cache[key].size + pause.size
                j += 1
            streams.append(np.concatenate(pieces)[:samples].copy())
    return streams


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


# ---- what a process measures of itself ---------------------------------------------------------------

def thread_cpu(thread) -> float:
    """CPU seconds of `thread` (a threading.Thread; None: 0)."""
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident)) if thread is not None else 0.0


def process_threads() -> dict[int, tuple[str, float, float]]:
    """{tid: (name, CPU seconds, seconds runnable but waiting for a core)} of this process (/proc: Linux)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError, ValueError):
            stat = (task / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            wait = int((task / "schedstat").read_text().split()[1]) / 1e9
            out[int(task.name)] = (stat[stat.index("(") + 1:stat.rindex(")")],
                                   (int(fields[11]) + int(fields[12])) / ticks, wait)
    return out


def thread_figures(before: dict, after: dict, wall: float, leave_out: int | None) -> tuple[dict, float]:
    """CPU cores by thread name (over 0.5 % of a core), and the cores' worth of time this process's
    threads (but `leave_out`) waited for a CPU while runnable."""
    cores: dict[str, float] = {}
    waited = 0.0
    for tid, (name, cpu, wait) in after.items():
        _, cpu0, wait0 = before.get(tid, (name, 0.0, 0.0))
        cores[name] = cores.get(name, 0.0) + (cpu - cpu0) / wall
        if tid != leave_out:
            waited += (wait - wait0) / wall
    shown = {name: round(c, 3) for name, c in sorted(cores.items(), key=lambda kv: -kv[1]) if c > 0.005}
    return shown, round(waited, 4)


def summarize_ms(seconds: list[float]) -> dict:
    """Mean, p50, p95 and p99 of durations given in seconds, in milliseconds."""
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
    add_option(parser, "--model", env="CAPTIONS_BENCH_MODEL",
               help=f"{model_help}; unset: the tiny test checkpoint, built once")
    add_option(parser, "--cache-dir", env="CAPTIONS_BENCH_CACHE", type=Path, default=default_cache_dir(),
               help="where the built test checkpoint is kept")


def resolve_test_checkpoint(args: argparse.Namespace) -> Path:
    """The directory of --model, or the tiny test checkpoint (built on first use); raises
    CheckpointError for a bad --model."""
    from captions.stt.model import resolve_checkpoint_dir

    return resolve_checkpoint_dir(args.model) if args.model else ensure_checkpoint("tiny", args.cache_dir)


def finish_report(args: argparse.Namespace, report: dict, plot, markdown_table) -> int:
    """The end of every benchmark: the load average now, --json, --plot, and the table on stdout."""
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        write_json(args.json, report)
    if args.plot:
        plot(report, args.plot)
    with contextlib.suppress(BrokenPipeError):
        print(markdown_table(report))
    return 0


def report_again(command: str, path: Path, plot_path: Path | None, plot, markdown_table) -> int:
    """`--from-json`: an earlier run's table (and `--plot`) again, without measuring."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"captions bench {command}: cannot read {path}: {e}", file=sys.stderr)
        return 1
    if plot_path:
        plot(report, plot_path)
    print(markdown_table(report))
    return 0


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """--json and --plot, shared by every benchmark."""
    add_option(parser, "--json", env="CAPTIONS_BENCH_JSON", type=Path, help="write the results here")
    add_option(parser, "--plot", env="CAPTIONS_BENCH_PLOT", type=Path, help="write a PNG plot here")


def spawn_role(module: str, role: str, config: dict, workdir: Path, name: str,
               env: dict | None = None) -> subprocess.Popen:
    """`python -m module role <workdir/name.json>`, its output in `workdir/name.log`: a benchmark's
    bots or listener in a process of its own."""
    path = workdir / f"{name}.json"
    path.write_text(json.dumps(config))
    log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process by the OS
    return subprocess.Popen([sys.executable, "-m", module, role, str(path)],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, **(env or {})))


def listener_result(listener: subprocess.Popen, timeout_s: float, out: Path, workdir: Path, name: str,
                    bots: list[subprocess.Popen]) -> dict:
    """The JSON a listener process wrote to `out` once it ended; a BenchError, naming its log, when
    it did not end in time, failed, or a bot process stopped meanwhile."""
    try:
        code = listener.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        listener.kill()
        raise BenchError(f"the listener did not finish: see {workdir}/{name}.log") from None
    if code != 0 or not out.exists():
        tail = (workdir / f"{name}.log").read_text(errors="replace")[-2000:]
        raise BenchError(f"the listener failed ({code}):\n{tail}")
    if any(bot.poll() is not None for bot in bots):
        raise BenchError(f"a bot process stopped early: see {workdir}/bots-*.log")
    return json.loads(out.read_text())


CAPTURE_MS = 10
"""A bot publishes 10 ms per tick, as a browser's WebRTC stack does."""


async def publish_in_real_time(config: dict, identities: list[str], chunk: Callable[[int, int, int], np.ndarray]) -> None:
    """Bots `identities` in config's room each publish `chunk(bot, tick, samples)` (24 kHz mono int16,
    `samples` long) every CAPTURE_MS, on a clock that does not drift, until `config["until"]`
    (time.time()); then they leave."""
    from livekit import rtc

    from captions.dev.bots import Publisher, server_from_config
    from captions.stt.api import SAMPLE_RATE

    server = server_from_config(config)
    publishers = [await Publisher(server, config["room"], identity, auto_subscribe=False,
                                  queue_size_ms=0).connect() for identity in identities]
    samples = SAMPLE_RATE * CAPTURE_MS // 1000
    origin, tick = time.monotonic(), 0
    try:
        while time.time() < config["until"]:
            delay = origin + (tick + 1) * CAPTURE_MS / 1000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await asyncio.gather(*(
                p.source.capture_frame(rtc.AudioFrame(chunk(i, tick, samples).tobytes(), SAMPLE_RATE, 1, samples))
                for i, p in enumerate(publishers)))
            tick += 1
    finally:
        for publisher in publishers:
            with contextlib.suppress(Exception):
                await publisher.disconnect()


def stop_processes(bots: list[subprocess.Popen], server) -> None:
    """The bot processes (asked to stop, then waited for, 10 s each at most) and the livekit-server."""
    for bot in bots:
        bot.terminate()
    for bot in bots:
        with contextlib.suppress(subprocess.TimeoutExpired):
            bot.wait(timeout=10)
    server.stop()
