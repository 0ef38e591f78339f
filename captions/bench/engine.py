"""`captions bench engine`: batched engine throughput against one model state per stream.

For each batch size B, B streams of real speech (espeak-ng, different sentences and voices) are
queued whole into one SttEngine with B slots, so that every step runs all B slots, as when B
people talk at once. Each step's time is split into Mimi encode, LM step, and host-side work
(everything else the engine loop does: gathering frames, masks, token decoding, event dispatch).

The baseline, in the same run, is the approach of one model state per stream: B separate
batch-size-1 engines (sharing the weights, each with its own streaming state), stepped stream
after stream, one frame each per round, as a server that keeps one model per speaker would.

Without --model the benchmark builds the checkpoints it needs (random weights in the real Kyutai
layout, see tiny_checkpoint.py) into a cache directory: the tiny test checkpoint, and one shaped
like production where a CPU can afford it (full-size Mimi, a reduced LM).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from captions.bench.common import (
    BUILT_CHECKPOINTS,
    BenchError,
    add_output_options,
    default_cache_dir,
    ensure_checkpoint,
    finish_report,
    machine_description,
    positive_ints,
    report_again,
    save_figure,
    speech_streams,
    summarize_ms,
)
from captions.config import add_option, device_name
from captions.log import logger
from captions.stt.api import FRAME_S

SKIPPED_STEPS = 2
"""Left out of the step statistics: the first steps reset every slot's state."""
BASELINE_MIN_ROUNDS = 2

# ---- the model, shared ----------------------------------------------------------------------------

def _share_weights(model):
    """A copy of the model whose modules share every weight with the original but own their
    streaming state, so that several engines (each with its own state) fit in memory."""

    def shared(module):
        memo = {id(t): t for t in [*module.parameters(), *module.buffers()]}
        return copy.deepcopy(module, memo)

    return dataclasses.replace(model, mimi=shared(model.mimi), lm=shared(model.lm))


def _off_main_thread(function) -> None:
    """Runs `function` on a short-lived thread. On the shared 2-core test machine, torch ops issued
    from the main thread ran several times slower than the same ops from any other thread (its
    OpenMP team, probably, competing for the busy cores); the engine steps on its own thread, so
    warming up on one too keeps the setup short."""
    with ThreadPoolExecutor(1, thread_name_prefix="bench-warm-up") as pool:
        pool.submit(function).result()  # re-raises the function's exception here


def _parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe_checkpoint(name: str, directory: Path, model) -> dict:
    """Shapes and parameter counts, read from the checkpoint's config and the loaded modules."""
    config = json.loads((directory / "config.json").read_text())
    lm_keys = ("dim", "num_layers", "num_heads", "n_q", "card", "text_card", "context")
    mimi = {"codebooks": int(model.mimi.num_codebooks), "note": "moshi's default Mimi configuration"}
    if config.get("mimi_config_name") and (directory / config["mimi_config_name"]).is_file():
        mimi_config = json.loads((directory / config["mimi_config_name"]).read_text())
        mimi = {
            "codebooks": int(model.mimi.num_codebooks),
            "codebook_size": mimi_config["quantizer"]["bins"],
            "seanet_filters": mimi_config["seanet"]["n_filters"],
            "seanet_dimension": mimi_config["seanet"]["dimension"],
            "transformer_dim": mimi_config["transformer"]["d_model"],
            "transformer_layers": mimi_config["transformer"]["num_layers"],
        }
    return {
        "name": name,
        "path": str(directory),
        "built_with": BUILT_CHECKPOINTS.get(name),
        "mimi_params": _parameters(model.mimi),
        "lm_params": _parameters(model.lm),
        "mimi": mimi,
        "lm": {key: config.get(key) for key in lm_keys},
        "text_delay_s": model.delay_s,
        "has_vad": model.has_vad,
    }


# ---- measuring --------------------------------------------------------------------------------

class _Progress:
    """One stream's events, as they arrive on the engine thread."""

    def __init__(self):
        self._cond = threading.Condition()
        self.frames = 0
        self.words = 0
        self.ended = False
        self.error: str | None = None

    def __call__(self, event) -> None:
        with self._cond:
            self.frames = event.frames
            self.words += len(event.words)
            self.error = self.error or event.error
            self.ended = self.ended or event.ended
            self._cond.notify_all()

    def wait_for(self, frames: int | None, timeout: float) -> None:
        """Until `frames` audio frames were consumed (None: until the stream ended)."""
        def done() -> bool:
            return self.ended if frames is None else (self.frames >= frames or self.ended)

        with self._cond:
            if not self._cond.wait_for(done, timeout=max(0.0, timeout)):
                raise BenchError(f"the engine did not finish within {timeout:.0f} s")
            if self.error:
                raise BenchError(f"engine step failed: {self.error}")


def _share(part: float, whole: float) -> float:
    return round(part / whole, 4) if whole > 0 else 0.0


def bench_batched(model, clips: list[np.ndarray], timeout_s: float) -> dict:
    """All `len(clips)` streams in one engine with as many slots, every step a full batch."""
    from captions.stt.engine import SttEngine

    batch_size = len(clips)
    engine = SttEngine(_share_weights(model), batch_size, profile=True)
    _off_main_thread(engine.warm_up)
    steps: list[tuple[float, object]] = []
    engine.step_listeners.append(lambda timings: steps.append((time.perf_counter(), timings)))
    progress = [_Progress() for _ in clips]
    # Every stream's whole audio is queued before the loop starts: no step ever waits for audio,
    # so each step's time is the engine's own, and every slot is active in every step.
    for on_event, audio in zip(progress, clips):
        stream = engine.open_stream(on_event)
        stream.push(audio)
        stream.close()
    load_before, cpu_before, started = os.getloadavg()[0], time.process_time(), time.perf_counter()
    engine.start()
    try:
        for stream_progress in progress:
            stream_progress.wait_for(None, started + timeout_s - time.perf_counter())
    finally:
        engine.close()
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_before

    # A step's time is the loop's period: from the end of one step to the end of the next. What
    # Mimi and the LM did not take of it is host-side work (the engine's own host_s, plus picking
    # the frames under the lock).
    periods, encode, lm, engine_host = [], [], [], []
    for k in range(max(1, SKIPPED_STEPS), len(steps)):
        periods.append(steps[k][0] - steps[k - 1][0])
        encode.append(steps[k][1].encode_s)
        lm.append(steps[k][1].lm_s)
        engine_host.append(steps[k][1].host_s)
    if not periods:
        raise BenchError("too few steps to measure: raise --seconds")
    host = [max(0.0, p - e - m) for p, e, m in zip(periods, encode, lm)]
    step_s = float(np.mean(periods))
    audio_s = sum(clip.size for clip in clips) / model.sample_rate
    return {
        "streams": batch_size,
        "steps": len(steps),
        "steps_measured": len(periods),
        "audio_s": round(audio_s, 3),
        "wall_s": round(wall, 3),
        "rtf": round(audio_s / wall, 3),
        "step_ms": summarize_ms(periods),
        "encode_ms": summarize_ms(encode),
        "lm_ms": summarize_ms(lm),
        "host_ms": summarize_ms(host),
        "host_in_engine_step_ms": summarize_ms(engine_host),
        "encode_share": _share(float(np.mean(encode)), step_s),
        "lm_share": _share(float(np.mean(lm)), step_s),
        "host_share": _share(float(np.mean(host)), step_s),
        "host_per_stream_us": round(1e6 * float(np.mean(host)) / batch_size, 1),
        "streams_realtime": round(batch_size * FRAME_S / step_s, 3),
        "per_stream_speed": round(FRAME_S / step_s, 3),
        "keeps_up_live": bool(step_s <= FRAME_S),
        "words": sum(p.words for p in progress),
        "cpu_cores_used": round(cpu / wall, 2),
        "load_average_before": round(load_before, 2),
    }


def bench_baseline(model, clips: list[np.ndarray], budget_s: float, timeout_s: float) -> dict:
    """One batch-size-1 engine per stream, stepped stream after stream, one frame per round, for
    about `budget_s` seconds (at least BASELINE_MIN_ROUNDS rounds, at most the audio's length).
    The first round, which resets every state (and warms each engine up), is not measured."""
    from captions.stt.engine import SttEngine

    engines, streams, progress, step_totals = [], [], [], []
    try:
        for _ in clips:
            engine = SttEngine(_share_weights(model), 1, profile=True)
            engine.step_listeners.append(lambda timings: step_totals.append(timings.total_s))
            engines.append(engine)
            progress.append(_Progress())
            streams.append(engine.open_stream(progress[-1]))
            engine.start()
        rounds = []
        n_frames = min(clip.size for clip in clips) // 1920
        load_before, cpu_before, started = os.getloadavg()[0], time.process_time(), time.perf_counter()
        for t in range(n_frames):
            round_started = time.perf_counter()
            for stream, stream_progress, clip in zip(streams, progress, clips):
                stream.push(clip[t * 1920:(t + 1) * 1920])
                stream_progress.wait_for(t + 1, timeout_s)
            rounds.append(time.perf_counter() - round_started)
            if len(rounds) >= BASELINE_MIN_ROUNDS and time.perf_counter() - started >= budget_s:
                break
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu_before
    finally:
        for stream in streams:
            stream.abort()
        for engine in engines:
            engine.close()
    n = len(clips)
    measured = rounds[1:] if len(rounds) > 1 else rounds  # round 0 resets every stream's state
    steps = step_totals[n:] if len(rounds) > 1 else step_totals
    # Credited with its pure step time: the thread hand-off between our driver and each engine is
    # left out, so the baseline is not slowed by how we drive it (round_ms shows it included).
    step_s = float(np.mean(steps))
    return {
        "streams": n,
        "rounds": len(rounds),
        "audio_s": round(len(rounds) * n * FRAME_S, 3),
        "wall_s": round(wall, 3),
        "rtf": round(len(rounds) * n * FRAME_S / wall, 3),
        "step_ms": summarize_ms(steps),
        "round_ms": summarize_ms(measured),
        "streams_realtime": round(FRAME_S / step_s, 3),
        "streams_realtime_with_handoff": round(n * FRAME_S / float(np.mean(measured)), 3),
        "cpu_cores_used": round(cpu / wall, 2),
        "load_average_before": round(load_before, 2),
    }


def bench_checkpoint(name: str, directory: Path, device: str, batch_sizes: list[int],
                     clips: list[np.ndarray], budget_s: float, timeout_s: float) -> dict:
    from captions.stt.model import load_stt_model

    model = load_stt_model(str(directory), device)
    description = describe_checkpoint(name, directory, model)
    logger.info("%s: Mimi %.1f M params, LM %.1f M params", name, description["mimi_params"] / 1e6,
                description["lm_params"] / 1e6)
    runs = []
    for batch_size in batch_sizes:
        batched = bench_batched(model, clips[:batch_size], timeout_s)
        gc.collect()
        baseline = bench_baseline(model, clips[:batch_size], budget_s, timeout_s)
        gc.collect()
        ratio = round(batched["streams_realtime"] / baseline["streams_realtime"], 3)
        logger.info("%s B=%d: step %.1f ms (encode %.0f%%, LM %.0f%%, host %.1f%%), %.2f streams in "
                    "real time; baseline %.2f; ratio %.2f", name, batch_size, batched["step_ms"]["mean"],
                    100 * batched["encode_share"], 100 * batched["lm_share"], 100 * batched["host_share"],
                    batched["streams_realtime"], baseline["streams_realtime"], ratio)
        runs.append({"batch_size": batch_size, "batched": batched, "baseline": baseline, "ratio": ratio})
    return {"checkpoint": description, "runs": runs, "targets": _targets(runs)}


def _targets(runs: list[dict]) -> dict:
    """The issue's goals, checked against this run's figures (None when not measured)."""
    by_size = {run["batch_size"]: run for run in runs}
    ratio = by_size[32]["ratio"] if 32 in by_size else None
    host = by_size[64]["batched"]["host_share"] if 64 in by_size else None
    return {
        "ratio_at_b32": ratio, "ratio_at_b32_at_least_5": None if ratio is None else ratio >= 5,
        "host_share_at_b64": host, "host_share_at_b64_at_most_5pct": None if host is None else host <= 0.05,
    }


# ---- reporting ------------------------------------------------------------------------------------

def markdown_table(report: dict) -> str:
    """The README table, generated from the JSON (figures are never typed in by hand)."""
    lines = [
        ("| checkpoint | B | step mean / p50 / p95 (ms) | encode / LM / host | RTF | streams in real time "
         "(batched) | baseline (B=1 each) | ratio |"),
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for result in report["results"]:
        for run in result["runs"]:
            b, base = run["batched"], run["baseline"]
            lines.append(
                f"| {result['checkpoint']['name']} | {run['batch_size']} | {b['step_ms']['mean']:.1f} / "
                f"{b['step_ms']['p50']:.1f} / {b['step_ms']['p95']:.1f} | {100 * b['encode_share']:.0f} % / "
                f"{100 * b['lm_share']:.0f} % / {100 * b['host_share']:.1f} % | {b['rtf']:.2f} | "
                f"{b['streams_realtime']:.2f} | {base['streams_realtime']:.2f} | {run['ratio']:.2f}x |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Streams served in real time against batch size (batched and baseline), and each
    checkpoint's step time split into encode, LM and host work."""
    import warnings

    with warnings.catch_warnings():
        # numpy warns about float limits once denormals are flushed (load_stt_model does, on CPU).
        warnings.simplefilter("ignore", UserWarning)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker

    results = report["results"]
    fig, axes = plt.subplots(1, 1 + len(results), figsize=(5.5 * (1 + len(results)), 4.5), squeeze=False)
    ax = axes[0][0]
    for result, color in zip(results, ["tab:blue", "tab:orange", "tab:green", "tab:red"]):
        sizes = [run["batch_size"] for run in result["runs"]]
        name = result["checkpoint"]["name"]
        ax.plot(sizes, [run["batched"]["streams_realtime"] for run in result["runs"]], "o-", color=color,
                label=f"{name}: batched engine")
        ax.plot(sizes, [run["baseline"]["streams_realtime"] for run in result["runs"]], "s--", color=color,
                alpha=0.7, label=f"{name}: one state per stream")
    all_sizes = sorted({run["batch_size"] for result in results for run in result["runs"]})
    # A point below this line took more than 80 ms per step: the throughput is there, but the B
    # streams of that engine fall behind live audio.
    ax.plot(all_sizes, all_sizes, ":", color="gray", label="B (step = 80 ms: all B streams live)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(all_sizes, [str(size) for size in all_sizes])
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("batch size B (streams in flight)")
    ax.set_ylabel("streams served in real time")
    ax.set_title("Throughput: B x 80 ms / step time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    for ax, result in zip(axes[0][1:], results):
        sizes = [str(run["batch_size"]) for run in result["runs"]]
        positions = np.arange(len(sizes))
        bottom = np.zeros(len(sizes))
        for key, label in (("encode_ms", "Mimi encode"), ("lm_ms", "LM step"), ("host_ms", "host work")):
            values = np.array([run["batched"][key]["mean"] for run in result["runs"]])
            ax.bar(positions, values, bottom=bottom, label=label)
            bottom += values
        ax.set_xticks(positions, sizes)
        ax.set_xlabel("batch size B")
        ax.set_ylabel("mean step time (ms)")
        ax.set_title(f"{result['checkpoint']['name']}: where a step's time goes")
        ax.legend(fontsize=8)
    machine = report["machine"]
    fig.suptitle(f"captions bench engine - {machine['cpu_model']}, {machine['cpu_cores']} cores, "
                 f"{machine['device']}, {machine['date'][:10]}", fontsize=10)
    save_figure(fig, path)


# ---- command line ---------------------------------------------------------------------------------

def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0.4:
        raise argparse.ArgumentTypeError(f"need at least 0.4 s of audio per stream (5 steps), got {text}")
    return value


def _checkpoint_names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in BUILT_CHECKPOINTS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"known checkpoints: {', '.join(BUILT_CHECKPOINTS)}; got {text!r}")
    return names


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--model", env="CAPTIONS_BENCH_MODEL",
               help="checkpoint to measure (repo id or local directory); unset: build and measure "
                    "the checkpoints named by --checkpoints")
    add_option(parser, "--checkpoints", env="CAPTIONS_BENCH_CHECKPOINTS", type=_checkpoint_names,
               default=list(BUILT_CHECKPOINTS),
               help=f"built checkpoints to measure without --model ({', '.join(BUILT_CHECKPOINTS)})")
    add_option(parser, "--batch-sizes", env="CAPTIONS_BENCH_BATCH_SIZES", type=positive_ints("batch sizes"),
               default=[1, 8, 32, 64], help="batch sizes; each runs that many streams at once")
    add_option(parser, "--seconds", env="CAPTIONS_BENCH_SECONDS", type=_seconds, default=2.5,
               help="seconds of speech per stream")
    add_option(parser, "--baseline-budget", env="CAPTIONS_BENCH_BASELINE_BUDGET", type=float, default=10.0,
               help="seconds spent on the one-state-per-stream baseline at each batch size")
    add_option(parser, "--timeout", env="CAPTIONS_BENCH_TIMEOUT", type=float, default=900.0,
               help="give up on a run after this many seconds")
    add_option(parser, "--device", env="CAPTIONS_DEVICE", default="auto", type=device_name,
               help="auto, cpu, cuda or cuda:N")
    add_option(parser, "--cache-dir", env="CAPTIONS_BENCH_CACHE", type=Path, default=default_cache_dir(),
               help="where built checkpoints are kept")
    add_output_options(parser)
    add_option(parser, "--from-json", env="CAPTIONS_BENCH_FROM_JSON", type=Path,
               help="measure nothing: print the table (and --plot) of an earlier run's JSON")


def run(args: argparse.Namespace) -> int:
    from captions.stt.model import CheckpointError, pick_device, resolve_checkpoint_dir

    if args.from_json:
        return report_again("engine", args.from_json, args.plot, plot, markdown_table)
    try:
        device = pick_device(args.device)
        if args.model:
            checkpoints = [(Path(args.model).name or args.model, resolve_checkpoint_dir(args.model))]
        else:
            checkpoints = [(name, ensure_checkpoint(name, args.cache_dir)) for name in args.checkpoints]
        clips = speech_streams(max(args.batch_sizes), args.seconds)
        report = {
            "benchmark": "engine",
            "machine": machine_description(device),
            "settings": {"batch_sizes": args.batch_sizes, "seconds_per_stream": args.seconds,
                         "baseline_budget_s": args.baseline_budget, "skipped_steps": SKIPPED_STEPS},
            "results": [bench_checkpoint(name, directory, device, args.batch_sizes, clips,
                                         args.baseline_budget, args.timeout)
                        for name, directory in checkpoints],
        }
    except (BenchError, CheckpointError, subprocess.CalledProcessError) as e:
        print(f"captions bench engine: {e}", file=sys.stderr)
        return 1
    return finish_report(args, report, plot, markdown_table)

