"""The real caption worker as a subprocess of this process, for end-to-end tests and benchmarks.

`start_captions_worker` runs `captions worker dev` on a local checkpoint (CPU) against a running
livekit-server (captions.dev.livekit_server.start_dev_server) and returns once the worker has registered, so a
room created afterwards gets the agent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from captions.dev.livekit_server import LiveKitServer
from captions.dev.processes import free_port, stop_process


@dataclass
class CaptionsWorker:
    """A `captions worker` subprocess (the real worker, real engine) and where it writes."""

    process: subprocess.Popen
    data_dir: Path
    record_dir: Path
    log_path: Path
    metrics_port: int
    """Where its /metrics, /healthz and /readyz answer (127.0.0.1)."""
    registered_at: float = 0.0
    """Unix time at which it logged its registration with LiveKit."""
    diagnostics_path: Path | None = None
    """Its --diagnostics-file, when started with `diagnostics=True`."""

    def process_figures(self) -> dict:
        """Its RSS (MiB), threads, open file descriptors and open transcript files, from /proc."""
        from captions.live.diagnostics import proc_figures

        figures = proc_figures(self.process.pid, under=self.data_dir)
        figures["open_transcripts"] = figures.pop("open_files_under")
        return figures

    def diagnostics(self, timeout: float = 120, trim: bool = False) -> dict:
        """Asks the worker for a diagnostics report (SIGUSR1; SIGUSR2 trims the C heap first) and
        returns it (see captions/live/diagnostics.py)."""
        if self.diagnostics_path is None:
            raise RuntimeError("the worker was started without diagnostics")
        before = _count_lines(self.diagnostics_path)
        self.process.send_signal(signal.SIGUSR2 if trim else signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"captions worker exited:\n{self.log_tail()}")
            if _count_lines(self.diagnostics_path) > before:
                return json.loads(self.diagnostics_path.read_text().splitlines()[before])
            time.sleep(0.05)
        raise RuntimeError(f"no diagnostics report from the worker in {timeout:g} s")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30) -> int:
        """Ctrl-C, as a user would; returns the exit status."""
        return stop_process(self.process, signal.SIGINT, timeout)


def _count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def captions_command() -> list[str]:
    """The `captions` entry point of this interpreter's environment."""
    script = Path(sys.executable).parent / "captions"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "captions.cli"]


def start_captions_worker(server: LiveKitServer, checkpoint: Path, workdir: Path, batch_size: int = 3,
                          extra_args: tuple[str, ...] = (), ready_timeout: float = 180,
                          env: dict[str, str] | None = None, data_dir: Path | None = None,
                          diagnostics: bool = False, translate_to: str = "",
                          translation_model: Path | None = None, receivers: int = 1) -> CaptionsWorker:
    """Starts `captions worker dev` on the checkpoint (CPU) and waits until it has registered.

    It writes transcripts to `data_dir` (default workdir/data; workers on one host share theirs), the
    audio of every engine stream to workdir/recordings and its log to workdir/worker.log; with
    `diagnostics`, its reports to workdir/diagnostics.jsonl. `translate_to` (e.g. "de,es") with a
    local `translation_model` (e.g. the tiny one): it translates too (CPU); else it does not,
    whatever this process's environment says. `receivers`: `--receivers` (1: one process, the
    engine and the rooms; 2 or more: an engine process and that many receiving processes)."""
    from captions.live.worker import READY_MESSAGE

    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = data_dir or workdir / "data"
    record_dir, log_path = workdir / "recordings", workdir / "worker.log"
    metrics_port = free_port()
    diagnostics_path = workdir / "diagnostics.jsonl" if diagnostics else None
    if diagnostics:
        extra_args = ("--diagnostics-file", str(diagnostics_path), *extra_args)
    translation = ["--translate-to", translate_to]
    if translate_to:
        assert translation_model is not None, "a worker that translates needs a local translation model"
        translation += ["--translation-model", str(translation_model), "--translation-device", "cpu"]
    environment = dict(os.environ, LIVEKIT_URL=server.url, LIVEKIT_API_KEY=server.api_key,
                       LIVEKIT_API_SECRET=server.api_secret, NO_TORCH_COMPILE="1", **(env or {}))
    command = [*captions_command(), "worker", "dev", "--model", str(checkpoint), "--device", "cpu",
               "--batch-size", str(batch_size), "--data-dir", str(data_dir), "--record-dir", str(record_dir),
               "--health-port", "0", "--metrics-port", str(metrics_port), *translation,
               # One process unless the caller asks for receiving processes (a later --receivers wins):
               # `auto` would give each test a shape that depends on the machine's cores.
               "--receivers", str(receivers), *extra_args]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT)
    worker = CaptionsWorker(process, data_dir, record_dir, log_path, metrics_port, diagnostics_path=diagnostics_path)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"captions worker exited early:\n{worker.log_tail()}")
        if READY_MESSAGE.encode() in log_path.read_bytes():
            worker.registered_at = time.time()
            return worker
        time.sleep(0.2)
    worker.stop()
    raise RuntimeError(f"captions worker did not register in {ready_timeout:g} s:\n{worker.log_tail()}")


def metric_values(port: int) -> dict[str, float]:
    """Every sample of the worker's /metrics, keyed as written there (`name` or `name{labels}`)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name and not line.startswith("#"):
            values[name] = float(value)
    return values


RECEIVER_REPORT_S = 1.0
"""How often a receiving process's metrics reach the engine process's /metrics (captions/host/metrics.py)."""


def settled_metric(port: int, name: str, timeout_s: float = 10.0) -> float:
    """A gauge of the worker's /metrics once it no longer changes over a receiving process's report
    interval: with receiving processes, a room that just ended may still count for about a second,
    and a count taken then as "before" would never be exceeded. Blocking (a second or more)."""
    deadline = time.monotonic() + timeout_s
    value = metric_values(port)[name]
    while True:
        time.sleep(RECEIVER_REPORT_S + 0.2)
        again = metric_values(port)[name]
        if again == value or time.monotonic() > deadline:
            return again
        value = again


def engine_counters(port: int) -> tuple[float, float]:
    """(engine steps so far, sum over them of the streams each carried), from the worker's /metrics."""
    values = metric_values(port)
    return values.get("captions_engine_step_active_streams_count", 0.0), values.get(
        "captions_engine_step_active_streams_sum", 0.0)


def engine_activity(before: tuple[float, float], after: tuple[float, float], seconds: float) -> dict:
    """Steps per second and streams per step while the bots played: with every speaker's frames
    on one clock, about 12.5 steps/s each carrying every speaker."""
    steps, streams = after[0] - before[0], after[1] - before[1]
    return {"steps": int(steps), "seconds": round(seconds, 2),
            "steps_per_s": round(steps / seconds, 2) if seconds > 0 else None,
            "streams_per_step": round(streams / steps, 2) if steps else None}
