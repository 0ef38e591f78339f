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

Every loop is bounded in count and time (`--max-minutes`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from captions.bench.common import (
    BenchError,
    add_output_options,
    add_test_checkpoint_options,
    finish_report,
    machine_description,
    report_again,
    resolve_test_checkpoint,
    run_child_process,
    save_figure,
)
from captions.config import add_option, positive_int

SCENARIOS = ("rooms", "long-room", "hour")
UNITS = {"rooms": "room", "long-room": "speaker turn", "hour": "minute of speech"}
UNITS_PLURAL = {"rooms": "rooms", "long-room": "speaker turns", "hour": "minutes of speech"}
SENTENCES = ("Hello, this is a caption test.", "The meeting starts in five minutes.")
ROOM_SLOPE_TARGET_MB = 0.05
"""Issue 16's target: RSS slope per room at most this, over 500 rooms."""
WARMUP_UNITS = {"rooms": 5, "long-room": 2, "hour": 1}
CAPTION_TIMEOUT_S = 15.0
SUBSCRIBE_TIMEOUT_S = 30.0
SETTLE_TIMEOUT_S = 120.0
"""After the warm-up and after the last unit: how long the worker may take to end its rooms' jobs
and their threads."""
SETTLE_QUIET_S = 10.0
"""Native pools end idle threads after about 10 s (tokio): a count that held this long has settled."""
ROOM_CLASSES = ("RoomCaptioner", "Speaker", "Turn", "TrackAudio", "SpeechGate", "Segmenter", "TranscriptStore",
                "CaptionPublisher",
                "Room", "AudioStream", "JobContext")
"""Per-room objects summed into `room_objects` (captions/live/diagnostics.py counts them)."""
METRICS = ("rss_mb", "heap_in_use_mb", "heap_free_mb", "python_objects", "fds", "threads", "open_transcripts",
           "ffi_handles", "room_objects")


def scenarios(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values or set(values) - set(SCENARIOS):
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(SCENARIOS)}, got {text!r}")
    return list(dict.fromkeys(values))


# ---- samples and slopes ---------------------------------------------------------------------------

def sample_from_report(report: dict, units: int, started: float, open_transcripts: int) -> dict:
    """One point of the curves, from a diagnostics report (captions/live/diagnostics.py)."""
    malloc = report.get("malloc") or {}
    ffi = report.get("ffi") or {}
    return {
        "units": units, "seconds": round(report["time"] - started, 1), "rss_mb": report["rss_mb"],
        "heap_in_use_mb": malloc.get("in_use_mb"), "heap_free_mb": malloc.get("free_mb"),
        "python_objects": report["gc_objects"], "fds": report["fds"], "threads": report["threads"],
        "open_transcripts": open_transcripts, "ffi_handles": ffi.get("handles"),
        "ffi_subscribers": ffi.get("subscribers"),
        "room_objects": sum(report["objects"].get(name, 0) for name in ROOM_CLASSES),
        "tracemalloc_mb": (report.get("tracemalloc") or {}).get("current_mb"),
    }


def slopes(samples: list[dict]) -> dict:
    """Least-squares slope per unit of every metric over the second half of the samples."""
    half = samples[len(samples) // 2:]
    if len(half) < 2 or half[-1]["units"] == half[0]["units"]:
        return {}
    x = np.array([s["units"] for s in half], dtype=float)
    result = {}
    for metric in METRICS:
        y = [s.get(metric) for s in half]
        if any(v is None for v in y):
            continue
        result[metric] = round(float(np.polyfit(x, np.array(y, dtype=float), 1)[0]), 5)
    result["from_unit"], result["to_unit"] = int(x[0]), int(x[-1])
    return result


# ---- child processes: the bots ----------------------------------------------------------------------

def _emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


async def _wait_final(listener, identity: str, count: int) -> bool:
    with contextlib.suppress(TimeoutError):
        await listener.wait_until(lambda: len(listener.finals(identity)) >= count, CAPTION_TIMEOUT_S,
                                  f"a final caption of {identity}")
        return True
    return False


async def _speaker(server, room: str, identity: str):
    """A speaker bot, connected once the agent has subscribed to its microphone: speech before that
    is not captioned, and a loaded machine delays the subscription by seconds."""
    from captions.dev.bots import Publisher

    speaker = Publisher(server, room, identity, auto_subscribe=False)
    subscribed = asyncio.Event()
    speaker.room.on("local_track_subscribed", lambda _track: subscribed.set())
    await speaker.connect()
    try:
        await asyncio.wait_for(subscribed.wait(), SUBSCRIBE_TIMEOUT_S)
    except asyncio.TimeoutError:
        await speaker.disconnect()
        raise BenchError(f"the agent did not subscribe to {identity} in {room} in {SUBSCRIBE_TIMEOUT_S:g} s") from None
    await speaker.silence(0.3)
    return speaker


async def _in_lanes(config: dict, unit) -> None:
    """Runs `unit(index)` for every index, `parallel` at a time: first the warm-up units, then, once
    the parent has measured the idle worker (a line on stdin), the others until the time is up."""
    deadline = time.time() + config["max_seconds"]

    async def lanes(indices) -> None:
        async def lane() -> None:
            for index in indices:
                if time.time() > deadline:
                    return
                await unit(index)

        await asyncio.gather(*(lane() for _ in range(config["parallel"])))

    await lanes(iter(range(config["warmup"])))
    _emit({"warmed_up": config["warmup"]})
    if not await asyncio.to_thread(sys.stdin.readline):
        return  # the parent is gone
    await lanes(iter(range(config["warmup"], config["units"])))


async def _rooms_bots(config: dict) -> None:
    """Rooms one after another, `parallel` at a time; one JSON line per finished room on stdout."""
    from livekit import api

    from captions.dev.bots import Subscriber, server_from_config

    server = server_from_config(config)
    wav = Path(config["wavs"][0])

    async def one(lkapi, index: int) -> None:
        name = f"{config['prefix']}-{index}"
        started = time.time()
        listener = await Subscriber(server, name, identity="listener").connect()
        speaker = await _speaker(server, name, "speaker")
        try:
            await speaker.play(wav)
            await speaker.disconnect()  # leaving flushes the speaker's last words
            captioned = await _wait_final(listener, "speaker", 1)
        finally:
            await speaker.disconnect()
            await listener.disconnect()
            await lkapi.room.delete_room(api.DeleteRoomRequest(room=name))
        _emit({"unit": index, "captioned": captioned, "seconds": round(time.time() - started, 2)})

    async with api.LiveKitAPI(config["http_url"], config["api_key"], config["api_secret"]) as lkapi:
        await _in_lanes(config, lambda index: one(lkapi, index))


async def _long_room_bots(config: dict) -> None:
    """One room; speakers join, speak, mute, unmute, speak and leave, `parallel` at a time."""
    from livekit import api

    from captions.dev.bots import Subscriber, server_from_config

    server = server_from_config(config)
    wavs = [Path(w) for w in config["wavs"]]
    name = config["prefix"]
    listener = await Subscriber(server, name, identity="listener").connect()
    await listener.wait_for_agent()

    async def turn(index: int) -> None:
        identity = f"speaker-{index}"
        started = time.time()
        speaker = await _speaker(server, name, identity)
        try:
            await speaker.play(wavs[0])
            await speaker.silence(0.3)
            speaker.mute()  # muting ends the speaker's engine stream: its final caption comes out
            got_first = await _wait_final(listener, identity, 1)
            speaker.unmute()
            await speaker.silence(0.5)
            await speaker.play(wavs[1])
        finally:
            await speaker.disconnect()
        captioned = got_first and await _wait_final(listener, identity, 2)
        _emit({"unit": index, "captioned": captioned, "seconds": round(time.time() - started, 2)})

    try:
        await _in_lanes(config, turn)
    finally:
        await listener.disconnect()
        async with api.LiveKitAPI(config["http_url"], config["api_key"], config["api_secret"]) as lkapi:
            await lkapi.room.delete_room(api.DeleteRoomRequest(room=name))


# ---- child process: an hour of speech in process -------------------------------------------------

class _HourRoom:
    """What the worker keeps for one room's speakers and captions, without LiveKit: per engine
    stream a segmenter, timing diagnostics and a recording; per final caption a transcript line.
    Engine events are handled on the engine's thread, one stream at a time."""

    def __init__(self, engine, data_dir: Path, record_dir: Path):
        from captions.live.transcripts import TranscriptStore, transcript_path

        self.engine = engine
        self.record_dir = record_dir
        self.transcript = TranscriptStore(transcript_path(data_dir, "hour"))
        self.finals = 0
        self._lock = threading.Lock()

    def speak(self, identity: str, audio: np.ndarray, origin: float, chunk: int) -> None:
        """One speaker's turn: the clip in 10 ms chunks as fast as the engine takes them, then the
        close that flushes the last words; returns once the stream has ended."""
        from captions.live.recorder import StreamRecorder
        from captions.live.segmenter import Segmenter
        from captions.live.timing import StreamTiming

        ended = threading.Event()
        segmenter, timing = Segmenter(), StreamTiming()
        state: dict = {}

        def on_event(event) -> None:
            timing.for_event(event)
            for update in segmenter.feed(event):
                if update.final and update.text:
                    self._append(identity, origin, update)
            if event.ended:
                ended.set()

        stream = self.engine.open_stream(on_event)
        state["recorder"] = recorder = StreamRecorder(self.record_dir, "hour", identity, stream.id)
        pcm16 = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
        for start in range(0, pcm16.size, chunk):
            piece = pcm16[start:start + chunk]
            stream.push(piece.astype(np.float32) / 32768.0)
            recorder.write(piece, stream.lead_samples)
            timing.record(piece, time.time())
        stream.close()
        if not ended.wait(timeout=len(audio) / 24000 * 4 + 30):
            raise BenchError(f"the engine did not end {identity}'s stream")
        recorder.close()

    def _append(self, identity: str, origin: float, update) -> None:
        from captions.protocol import FinalSegment

        words = [[w.text, round(origin + w.start, 3), round(origin + w.end, 3)] for w in update.words]
        segment = FinalSegment(segment_id=update.segment_id, participant_identity=identity,
                               participant_name=identity, track_id="TR_hour", text=update.text,
                               start=words[0][1] if words else origin, end=words[-1][2] if words else origin,
                               words=words)
        with self._lock:
            self.transcript.append(segment)
            self.finals += 1


def _hour(config: dict) -> None:
    """The `hour` scenario in this process; one JSON line per sample on stdout."""
    from captions.live.diagnostics import Diagnostics, proc_figures
    from captions.stt.api import SAMPLE_RATE
    from captions.stt.engine import SttEngine

    workdir = Path(config["workdir"])
    data_dir, record_dir = workdir / "data", workdir / "recordings"
    engine = SttEngine.load(config["checkpoint"], device="cpu", batch_size=config["parallel"])
    engine.start()
    clips = [np.load(path) for path in config["clips"]]
    total_s, deadline = config["units"] * 60.0, time.time() + config["max_seconds"]
    # The room's clock: the speakers' turns follow one another on it (while the engine runs them
    # side by side, faster than real time); captions are stamped on it.
    state = {"cursor": 0.0, "turns": 0, "next_sample": 0.0}
    lock = threading.Lock()
    started = time.time()

    room = _HourRoom(engine, data_dir, record_dir)
    diagnostics = Diagnostics(workdir / "unused.jsonl")

    def sample() -> None:
        report = diagnostics.report()
        figures = proc_figures(under=data_dir)
        point = sample_from_report(report, round(state["cursor"] / 60.0), started, figures["open_files_under"])
        point["finals"] = room.finals
        _emit({"sample": point})

    def next_turn() -> tuple[int, float] | None:
        with lock:
            if state["cursor"] >= total_s or time.time() > deadline:
                return None
            turn, offset = state["turns"], state["cursor"]
            state["turns"] += 1
            state["cursor"] += clips[turn % len(clips)].size / SAMPLE_RATE
            return turn, offset

    def lane() -> None:
        while (turn := next_turn()) is not None:
            index, offset = turn
            origin = started + offset
            room.speak(f"speaker-{index % 8}", clips[index % len(clips)], origin, SAMPLE_RATE // 100)
            with lock:
                due = state["cursor"] >= state["next_sample"]
                if due:
                    state["next_sample"] += config["sample_every"] * 60.0
            if due:
                sample()

    sample()
    lanes = [threading.Thread(target=lane, name=f"speaker-lane-{i}") for i in range(config["parallel"])]
    for thread in lanes:
        thread.start()
    for thread in lanes:
        thread.join()
    sample()
    room.transcript.close()
    engine.close()


def _child_main(role: str, config_path: str) -> int:
    if role == "hour":
        return run_child_process(_async_hour, config_path, "bench soak hour", bots=False)
    main = _rooms_bots if role == "rooms" else _long_room_bots
    return run_child_process(main, config_path, f"bench soak {role} bots")


async def _async_hour(config: dict) -> None:
    await asyncio.to_thread(_hour, config)


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


# ---- report ------------------------------------------------------------------------------------------

def markdown_table(report: dict) -> str:
    lines = [("| scenario | units | captioned | RSS start / idle / end (MB) | RSS slope per unit (MB) "
              "| C heap in use slope (MB) | Python objects slope | threads idle / end | fds idle / end "
              "| open transcripts idle / end | FFI handles idle / end |"),
             "|---|---:|---:|---|---:|---:|---:|---|---|---|---|"]
    for r in report["scenarios"]:
        slope = r["slope_per_unit"]
        first, last = r["samples"][0], r.get("after") or r["samples"][-1]
        idle = r.get("idle") or first
        start = r.get("start") or first

        def pair(metric: str, idle: dict = idle, last: dict = last) -> str:
            return f"{idle.get(metric)} / {last.get(metric)}"

        captioned = f"{r['captioned']}" if "captioned" in r else f"{r.get('finals', 0)} finals"
        lines.append(
            f"| {r['name']} | {r['units']} {UNITS_PLURAL[r['name']]} | {captioned} | {start['rss_mb']:.0f} / {idle['rss_mb']:.0f} / "
            f"{last['rss_mb']:.0f} | {_fmt(slope.get('rss_mb'))} | {_fmt(slope.get('heap_in_use_mb'))} "
            f"| {_fmt(slope.get('python_objects'), 1)} | {pair('threads')} | {pair('fds')} | {pair('open_transcripts')} "
            f"| {pair('ffi_handles')} |")
    starts = [(r["name"], r["room_start_s"]) for r in report["scenarios"] if r.get("room_start_s", {}).get("rooms")]
    if starts:
        lines += ["", "| scenario | rooms started | job start to listening p50 / p99 / max (s) |", "|---|---:|---|"]
        lines += [f"| {name} | {s['rooms']} | {s['p50']} / {s['p99']} / {s['max']} |" for name, s in starts]
    return "\n".join(lines)


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["scenarios"]
    fig, axes = plt.subplots(len(results), 3, figsize=(14, 3.6 * len(results)), squeeze=False)
    for row, r in zip(axes, results):
        samples, units = r["samples"], UNITS_PLURAL[r["name"]]
        x = [s["units"] for s in samples]
        # Growth since the first sample (the idle worker after the warm-up), where a leak shows.
        for metric, label in (("rss_mb", "RSS"), ("heap_in_use_mb", "C heap in use")):
            if all(s.get(metric) is not None for s in samples):
                row[0].plot(x, [s[metric] - samples[0][metric] for s in samples], marker=".", label=label)
        row[0].axhline(0, color="grey", linewidth=0.5)
        row[0].set(xlabel=units, ylabel="MB since the first sample",
                   title=f"{r['name']}: RSS {_fmt(r['slope_per_unit'].get('rss_mb'))} MB per {r['unit']}")
        row[0].legend(fontsize=8)
        after = r.get("after")
        for metric, color in (("threads", "tab:blue"), ("fds", "tab:orange"), ("open_transcripts", "tab:green"),
                              ("ffi_handles", "tab:red")):
            if all(s.get(metric) is not None for s in samples):
                row[1].plot(x, [s[metric] for s in samples], marker=".", color=color, label=metric)
                if after is not None:
                    row[1].plot([x[-1]], [after[metric]], marker="*", markersize=12, color=color, linestyle="")
        row[1].set(xlabel=units, title="threads, descriptors, transcripts, FFI handles"
                   + (" (*: settled after the last)" if after is not None else ""))
        row[1].legend(fontsize=8)
        row[2].plot(x, [s["python_objects"] for s in samples], marker=".", label="Python objects (gc)")
        row[2].set(xlabel=units, title="Python objects tracked by gc")
        row[2].legend(fontsize=8, loc="upper left")
    machine = report["machine"]
    fig.suptitle(f"captions bench soak, {machine['cpu_model']}, {machine['cpu_cores']} cores, "
                 f"{machine['date'][:10]}; slopes: least squares over the second half", fontsize=9)
    save_figure(fig, path)


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


if __name__ == "__main__":
    raise SystemExit(_child_main(sys.argv[1], sys.argv[2]))
