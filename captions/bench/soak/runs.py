"""The parent: a worker, its bots as child processes, samples over the run, and the verdict."""


from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from captions.bench.common import (
    BenchError,
    resolve_test_checkpoint,
)
from captions.bench.soak.common import (
    CAPTION_TIMEOUT_S,
    ROOM_CLASSES,
    ROOM_SLOPE_TARGET_MB,
    SENTENCES,
    SETTLE_QUIET_S,
    SETTLE_TIMEOUT_S,
    UNITS,
    UNITS_PLURAL,
    WARMUP_UNITS,
    sample_from_report,
    slopes,
)

# ---- the parent ------------------------------------------------------------------------------------

class _Child:
    """A child process whose stdout is JSON lines, read on a thread with bounded waits."""

    def __init__(self, role: str, config: dict, workdir: Path):
        path = workdir / f"{role}.json"
        path.write_text(json.dumps(config))
        self.log = workdir / f"{role}.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "captions.bench.soak", role, str(path)],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        self.lines: list[dict] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                with self._cond:
                    self.lines.append(record)
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def units(self) -> list[dict]:
        with self._cond:
            return [line for line in self.lines if "unit" in line]

    def wait_for(self, predicate, timeout: float) -> bool:
        """True once `predicate(lines)` holds; False at the timeout or when the child ended first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.lines):
                left = deadline - time.monotonic()
                if left <= 0 or (self.process.poll() is not None and not self._reader.is_alive()):
                    return predicate(self.lines)
                self._cond.wait(timeout=min(left, 1.0))
        return True

    def go(self) -> None:
        """Lets the bots go on after the warm-up."""
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def finish(self, timeout: float) -> int:
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise BenchError(f"a child process did not finish: see {self.log}") from None
        self._reader.join(timeout=10)
        if code != 0:
            raise BenchError(f"a child process failed ({code}):\n{self.log.read_text(errors='replace')[-2000:]}")
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _speech(workdir: Path) -> list[str]:
    from captions.dev.speech import espeak_wav

    return [str(espeak_wav(text, workdir / f"sentence-{i}.wav")) for i, text in enumerate(SENTENCES)]


def _settled(worker, timeout: float) -> dict:
    """Waits until the worker holds no room objects and its thread count has stayed the same for
    SETTLE_QUIET_S (native libraries end idle threads after a while); returns its last report."""
    deadline = time.monotonic() + timeout
    report = worker.diagnostics()
    stable_since, threads = time.monotonic(), report["threads"]
    while time.monotonic() < deadline:
        time.sleep(2.0)
        report = worker.diagnostics()
        rooms = sum(report["objects"].get(name, 0) for name in ROOM_CLASSES)
        if rooms or report["threads"] != threads:
            stable_since, threads = time.monotonic(), report["threads"]
        elif time.monotonic() - stable_since >= SETTLE_QUIET_S:
            break
    return report


def _run_worker_scenario(name: str, args: argparse.Namespace, server, checkpoint: Path, workdir: Path,
                         wavs: list[str]) -> dict:
    from captions.dev.worker_process import start_captions_worker

    units = args.rooms if name == "rooms" else args.turns
    parallel = args.parallel if name == "rooms" else args.speakers
    warmup = min(WARMUP_UNITS[name], max(units - 2, 1))
    batch = parallel + 1
    env = {"PYTHONTRACEMALLOC": "1"} if args.tracemalloc else {}
    worker = start_captions_worker(server, checkpoint, workdir / "worker", batch_size=batch, env=env,
                                   diagnostics=True)
    child = None
    try:
        started = time.time()
        start_report = worker.diagnostics()
        base = {"url": server.url, "http_url": server.http_url, "api_key": server.api_key,
                "api_secret": server.api_secret, "wavs": wavs, "parallel": parallel,
                "prefix": f"soak-{name}", "max_seconds": args.max_minutes * 60, "units": units}
        child = _Child(name, {**base, "warmup": warmup}, workdir)
        unit_timeout = 60.0 + 3 * CAPTION_TIMEOUT_S
        if not child.wait_for(lambda lines: any("warmed_up" in line for line in lines), unit_timeout * (warmup + 1)):
            raise BenchError(f"the warm-up {UNITS_PLURAL[name]} did not finish: see {child.log}")
        idle_report = _settled(worker, SETTLE_TIMEOUT_S)
        idle_threads = idle_report["native_thread_names"]
        idle = sample_from_report(idle_report, warmup, started, worker.process_figures()["open_transcripts"])
        print(f"{name}: idle after {warmup} warm-up {UNITS_PLURAL[name]}: {idle['rss_mb']:.1f} MB, "
              f"{idle['threads']} threads, {idle['fds']} fds", flush=True)
        samples, done = [idle], warmup
        child.go()
        while done < units:
            target = min(units, done + args.sample_every)
            if not child.wait_for(lambda lines, target=target: sum("unit" in line for line in lines) >= target,
                                  unit_timeout * (target - done)):
                break  # the run's time is up, or the bots stopped: report what was measured
            done = target
            figures = worker.process_figures()
            point = sample_from_report(worker.diagnostics(), done, started, figures["open_transcripts"])
            samples.append(point)
            print(f"{name}: {done} {UNITS_PLURAL[name]}, RSS {point['rss_mb']:.1f} MB, heap in use "
                  f"{point['heap_in_use_mb']} MB, {point['threads']} threads, {point['fds']} fds", flush=True)
        child.finish(timeout=unit_timeout * parallel + 30)
        final = _settled(worker, SETTLE_TIMEOUT_S)
        after = sample_from_report(final, done, started, worker.process_figures()["open_transcripts"])
        trimmed = sample_from_report(worker.diagnostics(trim=True), done, started,
                                     worker.process_figures()["open_transcripts"])
    finally:
        if child is not None:
            child.stop()
        worker.stop()
    log = worker.log_path.read_text(errors="replace")
    results = child.units()
    return {"name": name, "unit": UNITS[name], "units": len(results), "parallel": parallel,
            "captioned": sum(1 for r in results if r["captioned"]), "warmup_units": warmup,
            "thread_names": {"idle": idle_threads, "after": final["native_thread_names"]},
            "start": sample_from_report(start_report, 0, started, 0), "idle": idle, "after": after,
            "after_trim": trimmed, "samples": samples, "slope_per_unit": slopes(samples),
            "unit_seconds_mean": round(float(np.mean([r["seconds"] for r in results])), 2) if results else None,
            "ffi_unknown_handle_warnings": log.count("Attempted to drop unknown FFI handle"),
            **_stream_ends(log), "room_start_s": room_start_times(log),
            "wall_seconds": round(time.time() - started, 1)}


def room_start_times(log: str) -> dict:
    """From a room's job starting to its captioner listening (the worker's INFO log), over the run."""
    times = [float(t) for t in re.findall(r": listening (\d+\.\d+) s after its job started", log)]
    if not times:
        return {"rooms": 0}
    return {"rooms": len(times), "p50": round(float(np.percentile(times, 50)), 3),
            "p99": round(float(np.percentile(times, 99)), 3), "max": round(max(times), 3)}


def _stream_ends(log: str) -> dict:
    """Engine streams the worker opened, and those whose end its room never handled (their last
    words never reached the transcript: the room's loop was gone), from the worker's INFO log."""
    opened = set(re.findall(r": captioning .* engine slot \d+, stream (\d+)$", log, re.MULTILINE))
    ended = set(re.findall(r"stream (\d+) (?:ended, slot|of .* failed)", log))
    return {"engine_streams": len(opened), "engine_stream_ends_lost": len(opened - ended)}


def _run_hour(args: argparse.Namespace, checkpoint: Path, workdir: Path) -> dict:
    from captions.bench.common import speech_streams

    clips = []
    for i, clip in enumerate(speech_streams(8, args.turn_seconds)):
        path = workdir / f"clip-{i}.npy"
        np.save(path, clip)
        clips.append(str(path))
    config = {"checkpoint": str(checkpoint), "clips": clips, "parallel": args.speakers, "units": args.minutes,
              "sample_every": max(1, args.minutes // 20), "workdir": str(workdir / "hour"),
              "max_seconds": args.max_minutes * 60}
    (workdir / "hour").mkdir(parents=True, exist_ok=True)
    started = time.time()
    child = _Child("hour", config, workdir)
    try:
        child.finish(timeout=args.max_minutes * 60 + 120)
    finally:
        child.stop()
    samples = [line["sample"] for line in child.lines if "sample" in line]
    if len(samples) < 2:
        raise BenchError(f"the hour scenario gave no samples: see {child.log}")
    measured = [s for s in samples if s["units"] >= WARMUP_UNITS["hour"]]
    return {"name": "hour", "unit": UNITS["hour"], "units": samples[-1]["units"], "parallel": args.speakers,
            "samples": samples, "slope_per_unit": slopes(measured), "finals": samples[-1]["finals"],
            "wall_seconds": round(time.time() - started, 1)}


def _verdict(result: dict) -> dict | None:
    """The `rooms` scenario's targets: RSS slope and everything back to idle."""
    if result["name"] != "rooms" or result["idle"] is None:
        return None
    idle, after = result["idle"], result["after"]
    slope = result["slope_per_unit"].get("rss_mb")
    return {
        "rss_slope_mb_per_room": slope, "rss_slope_target": ROOM_SLOPE_TARGET_MB,
        "rss_slope_met": slope is not None and slope <= ROOM_SLOPE_TARGET_MB and result["units"] >= 500,
        "rooms_at_least_500": result["units"] >= 500,
        "threads_back": after["threads"] <= idle["threads"], "fds_back": after["fds"] <= idle["fds"],
        "open_transcripts_back": after["open_transcripts"] <= idle["open_transcripts"],
        "ffi_handles_back": (after["ffi_handles"] or 0) <= (idle["ffi_handles"] or 0),
        "room_objects_back": after["room_objects"] == 0,
    }


def measure(args: argparse.Namespace, workdir: Path) -> list[dict]:
    from captions.dev.livekit_server import start_dev_server

    checkpoint = resolve_test_checkpoint(args)
    results = []
    live = [name for name in args.scenarios if name != "hour"]
    if live:
        wavs = _speech(workdir)
        server = start_dev_server(workdir / "livekit-server.log")
        try:
            for name in live:
                result = _run_worker_scenario(name, args, server, checkpoint, workdir / name, wavs)
                result["targets"] = _verdict(result)
                results.append(result)
        finally:
            server.stop()
    if "hour" in args.scenarios:
        results.append(_run_hour(args, checkpoint, workdir))
    return results
