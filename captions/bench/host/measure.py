"""`captions bench host`'s parent: the livekit-server, the bots, and per configuration its listener
processes (and, over the socket, its engine process), started and synchronised; their figures
combined into one run."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np

from captions.bench.common import (
    BenchError,
    listener_result,
    spawn_role,
    speech_streams,
    stop_processes,
    summarize_ms,
)
from captions.bench.host.listener import BASELINE_S, PATH_ENV, SAMPLE_S, SUBSCRIBE_TIMEOUT_S, WARMUP_S
from captions.bench.host.report import kept_up, shape
from captions.stt.api import SAMPLE_RATE

MODULE = "captions.bench.host.listener"
NOISE_STD = 30.0
"""The silent microphones' noise, in int16 units (about -60 dBFS): a quiet room, not digital zero."""
SPEECH_SECONDS = 24.0
ENGINE_READY_TIMEOUT_S = 60.0


def _spawn(role: str, config: dict, workdir: Path, name: str, env: dict | None = None) -> subprocess.Popen:
    return spawn_role(MODULE, role, config, workdir, name, env)


def _silero_share(results: list[dict]) -> float | None:
    """Silero calls per window of the speech gate while measured (its warm-up calls on waking
    included, so it can pass 1; the windows it skipped by energy count in the windows)."""
    silero = sum(r["silero_windows"] for r in results)
    windows = silero + sum(r["skipped_windows"] for r in results)
    return round(silero / windows, 3) if windows else None


def _signals(args: argparse.Namespace, workdir: Path) -> list[tuple[str, str]]:
    """(identity, .npy of int16 samples) of every bot microphone: talkers first, then silent ones."""
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


def configurations(args: argparse.Namespace) -> list[dict]:
    """Per repeat and kind: with P = 1, each path in-process (today's shape); each P >= 2 over the
    socket, on the new path, and with both, one receiving process over the socket too (the wire's
    own cost)."""
    over_socket = [p for p in args.receivers if p > 1]
    if over_socket and 1 in args.receivers:
        over_socket.insert(0, 1)
    chunks = args.live_chunk_ms
    runs = []
    for _ in range(args.repeats):
        for kind, tracks, k in (("talkers", args.talkers, args.talker_k), ("silent", args.silent, args.silent_k)):
            if tracks:
                base = {"kind": kind, "tracks": tracks, "streams_per_track": k}
                # Today's path is the baseline, in 10 ms chunks; the new one in each chunk asked for.
                variants = [(path, chunk) for path in args.paths for chunk in (chunks if path == "new" else [10])]
                publish = getattr(args, "publish", [False]) if kind == "talkers" else [False]
                if 1 in args.receivers:
                    runs += [{**base, "path": path, "live_chunk_ms": chunk, "receivers": 1, "engine": "in-process",
                              "publish": published} for path, chunk in variants for published in publish]
                runs += [{**base, "path": "new", "live_chunk_ms": chunk, "receivers": p, "engine": "socket",
                          "publish": published} for p in over_socket for chunk in chunks for published in publish]
    return runs


def _machine_ticks() -> tuple[int, int, int]:
    """(busy, steal, all) jiffies of every CPU since boot (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    steal = fields[7] if len(fields) > 7 else 0
    total = sum(fields[:8])
    return total - idle - steal, steal, total


def _wait_for(files: list[Path], processes: list[tuple[subprocess.Popen, Path, str]], deadline: float,
              workdir: Path, bots: list[subprocess.Popen]) -> None:
    """Until every file exists; a BenchError if a process ended meanwhile (naming its log) or time ran out."""
    while not all(f.exists() for f in files):
        for process, out, name in processes:
            if process.poll() is not None:
                listener_result(process, 0, out, workdir, name, bots)
                raise BenchError(f"{name} ended early: see {workdir}/{name}.log")
        if time.monotonic() > deadline:
            missing = ", ".join(f.name for f in files if not f.exists())
            raise BenchError(f"the listeners did not get there in time ({missing}): see {workdir}")
        time.sleep(0.05)


def _go(sync: Path, phase: str, lead_s: float = 0.3) -> float:
    at = time.time() + lead_s
    (sync / f"{phase}.tmp").write_text(repr(at))
    (sync / f"{phase}.tmp").rename(sync / f"{phase}.go")
    return at


def run_configuration(args: argparse.Namespace, configuration: dict, n: int, identities: list[str], base: dict,
                      workdir: Path, checkpoint: Path, bots: list[subprocess.Popen]) -> dict:
    """One configuration's processes, synchronised through their phases; their figures combined."""
    kind, p = configuration["kind"], configuration["receivers"]
    participants = len(identities) * configuration["streams_per_track"]
    sync = workdir / f"sync-{n}"
    sync.mkdir()
    per_run_s = args.seconds + BASELINE_S + WARMUP_S + 15.0 + 5.0 * p
    deadline = time.monotonic() + per_run_s + 2 * SUBSCRIBE_TIMEOUT_S
    common = {**base, **configuration, "seconds": args.seconds, "sync_dir": str(sync), "model": str(checkpoint),
              "talking": kind == "talkers", "batch_size": participants if kind == "talkers" else 1,
              "engine_step": args.engine_step, "free_step_ms": args.free_step_ms}
    env = {PATH_ENV: configuration["path"]}
    started: list[tuple[subprocess.Popen, Path, str]] = []
    engine_out = None
    load_before = [round(x, 2) for x in os.getloadavg()]
    try:
        if configuration["engine"] == "socket":
            engine_out, ready = workdir / f"engine-{n}.out.json", workdir / f"engine-{n}.ready.json"
            engine = _spawn("engine", {**common, "index": "engine", "out": str(engine_out), "ready": str(ready)},
                            workdir, f"engine-{n}", env)
            started.append((engine, engine_out, f"engine-{n}"))
            _wait_for([ready], started, time.monotonic() + ENGINE_READY_TIMEOUT_S, workdir, bots)
            common.update(json.loads(ready.read_text()))
        outs = []
        for i in range(p):
            name, out = f"listener-{n}-{i}", workdir / f"listener-{n}-{i}.out.json"
            profile = str(args.profile / f"{n}-{kind}-{configuration['path']}-{shape(configuration)}-{i}.prof"
                          ) if args.profile else None
            config = {**common, "index": i, "identities": identities[i::p], "out": str(out), "profile": profile}
            started.append((_spawn("listen", config, workdir, name, env), out, name))
            outs.append((started[-1][0], out, name))
        names = [str(i) for i in range(p)] + (["engine"] if engine_out else [])
        _wait_for([sync / f"baseline-{x}" for x in names], started, deadline, workdir, bots)
        _go(sync, "baseline")
        _wait_for([sync / f"measure-{x}" for x in names], started, deadline, workdir, bots)
        at = _go(sync, "measure")
        time.sleep(max(0.0, at - time.time()))
        ticks0, wall0 = _machine_ticks(), time.monotonic()
        time.sleep(args.seconds)
        ticks1, wall1 = _machine_ticks(), time.monotonic()
        results = [listener_result(process, max(1.0, deadline - time.monotonic()), out, workdir, name, bots)
                   for process, out, name in outs]
        engine_result = None
        if engine_out is not None:
            _wait_for([engine_out], started, time.monotonic() + 10.0, workdir, bots)
            engine_result = json.loads(engine_out.read_text())
    finally:
        for process, _, _ in started:
            if process.poll() is None:
                process.terminate()
        for process, _, _ in started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
    jiffies = os.sysconf("SC_CLK_TCK") * (wall1 - wall0)
    machine = {"cores": len(os.sched_getaffinity(0)), "busy": (ticks1[0] - ticks0[0]) / jiffies,
               "steal": (ticks1[1] - ticks0[1]) / jiffies}
    run = combine(configuration, results, engine_result, machine)
    run["load_before"] = load_before
    run["load_after"] = [round(x, 2) for x in os.getloadavg()]
    run["kept_up"] = kept_up(run)
    return run


def combine(configuration: dict, results: list[dict], engine: dict | None, machine: dict) -> dict:
    """One run's figures from its listeners' (and engine process's): sums over the processes, shares
    weighted by participants, the listeners' parallelism, and what the machine's cores did."""
    n = sum(r["participants"] for r in results)

    def weighted(key: str) -> float | None:
        if any(r[key] is None for r in results):
            return None
        return round(sum(r[key] * r["participants"] for r in results) / n, 3)

    host, baseline = sum(r["host_cores"] for r in results), sum(r["baseline_cores"] for r in results)
    latencies = [x / 1000 for r in results for x in r.pop("latencies_ms")]
    run = {**configuration, "participants": n, "baseline_cores": round(baseline, 4),
           "process_cores": round(sum(r["process_cores"] for r in results), 4),
           "engine_cores": engine["engine_cores"] if engine else results[0]["engine_cores"],
           "host_cores": round(host, 4), "cores_per_participant": round((host - baseline) / n, 5),
           "delivered": weighted("delivered"), "pushed": weighted("pushed"),
           "steps_per_frame": engine["steps_per_frame"] if engine else results[0]["steps_per_frame"],
           "captions": sum(r["captions"] for r in results), "live_turns": sum(r["live_turns"] for r in results),
           "silero_share": _silero_share(results),
           "publish_errors": sum(r.get("publish_errors") or 0 for r in results) if configuration.get("publish") else None,
           "seconds": max(r["seconds"] for r in results),
           "latency_beyond_delay_ms": summarize_ms(latencies) if latencies else None}
    if engine is None:
        run["thread_cores"] = results[0]["thread_cores"]
    run["processes"] = results
    run["engine_process"] = engine
    samples = [r["cpu_samples"] for r in results]
    intervals = min(len(s) for s in samples)
    sums = [sum(s[t] for s in samples) for t in range(intervals)]
    # In how many intervals every listener did at least half its own average work: coarse-grained
    # alternation (one process working while the other waits) would show here.
    means = [max(1e-9, float(np.mean(s[:intervals]))) for s in samples]
    together = sum(all(s[t] >= 0.5 * m for s, m in zip(samples, means)) for t in range(intervals))
    listeners = sum(r["host_cores"] for r in results)  # in-process: less the engine thread
    worker = sum(r["process_cores"] for r in results) + (engine["process_cores"] if engine else 0.0)
    run["parallel"] = {"interval_s": SAMPLE_S, "listeners_cores": round(listeners, 4),
                       "peak_interval_cores": round(max(sums), 3) if sums else None,
                       "intervals_all_busy": round(together / intervals, 3) if intervals else None,
                       "over_one_core": listeners > 1.0,
                       "waited_for_cpu_cores": round(sum(r["waited_for_cpu_cores"] for r in results), 4)}
    others = machine["busy"] - worker
    run["machine_cores"] = {"cores": machine["cores"], "busy": round(machine["busy"], 3),
                            "steal": round(machine["steal"], 3), "worker": round(worker, 3),
                            "others": round(others, 3),
                            "left_to_worker": round(machine["cores"] - max(0.0, others) - machine["steal"], 3)}
    return run


def measure(args: argparse.Namespace, workdir: Path, checkpoint: Path) -> list[dict]:
    from captions.dev.livekit_server import start_dev_server

    configs = configurations(args)
    signals = _signals(args, workdir)
    per_run_s = args.seconds + BASELINE_S + WARMUP_S + 25.0
    server = start_dev_server(workdir / "livekit-server.log")
    bots: list[subprocess.Popen] = []
    try:
        base = {"url": server.url, "api_key": server.api_key, "api_secret": server.api_secret, "room": "bench-host"}
        until = time.time() + 10.0 + sum(per_run_s + 5.0 * c["receivers"] + 10 for c in configs)
        for n, start in enumerate(range(0, len(signals), args.bots_per_process)):
            bots.append(_spawn("bots", {**base, "tracks": signals[start:start + args.bots_per_process],
                                        "until": until}, workdir, f"bots-{n}"))
        time.sleep(3.0)
        runs = []
        for n, configuration in enumerate(configs):
            kind = configuration["kind"]
            identities = [identity for identity, _ in signals if identity.startswith(kind[:6])]
            run = run_configuration(args, configuration, n, identities, base, workdir, checkpoint, bots)
            runs.append(run)
            each = ", ".join(f"{1000 * p['cores_per_participant']:.2f}" for p in run["processes"])
            print(f"{kind} {run['participants']} ({configuration['tracks']} x {configuration['streams_per_track']}), "
                  f"{configuration['path']}, {shape(run)}: {each} millicores each, "
                  f"{100 * run['delivered']:.0f} % delivered, load {run['load_before'][0]}", flush=True)
        return runs
    finally:
        stop_processes(bots, server)
