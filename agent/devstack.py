"""The real caption worker as a subprocess of this process, for end-to-end tests and benchmarks.

`start_captions_worker` runs `captions worker dev` on a local checkpoint (CPU) against a running
livekit-server (agent.lkserver.start_dev_server) and returns once the worker has registered, so a
room created afterwards gets the agent.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .lkserver import LiveKitServer


@dataclass
class CaptionsWorker:
    """A `captions worker` subprocess (the real worker, real engine) and where it writes."""

    process: subprocess.Popen
    data_dir: Path
    record_dir: Path
    log_path: Path
    metrics_port: int
    """Where its /metrics, /healthz and /readyz answer (127.0.0.1)."""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30) -> int:
        """Ctrl-C, as a user would; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def captions_command() -> list[str]:
    """The `captions` entry point of this interpreter's environment."""
    script = Path(sys.executable).parent / "captions"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "agent.cli"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_captions_worker(server: LiveKitServer, checkpoint: Path, workdir: Path, batch_size: int = 3,
                          extra_args: tuple[str, ...] = (), ready_timeout: float = 180,
                          env: dict[str, str] | None = None) -> CaptionsWorker:
    """Starts `captions worker dev` on the checkpoint (CPU) and waits until it has registered.

    It writes transcripts to workdir/data, the audio of every engine stream to workdir/recordings
    and its log to workdir/worker.log."""
    from .worker import READY_MESSAGE

    workdir.mkdir(parents=True, exist_ok=True)
    data_dir, record_dir, log_path = workdir / "data", workdir / "recordings", workdir / "worker.log"
    metrics_port = _free_port()
    environment = dict(os.environ, LIVEKIT_URL=server.url, LIVEKIT_API_KEY=server.api_key,
                       LIVEKIT_API_SECRET=server.api_secret, NO_TORCH_COMPILE="1", **(env or {}))
    command = [*captions_command(), "worker", "dev", "--model", str(checkpoint), "--device", "cpu",
               "--batch-size", str(batch_size), "--data-dir", str(data_dir), "--record-dir", str(record_dir),
               "--health-port", "0", "--metrics-port", str(metrics_port), *extra_args]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT)
    worker = CaptionsWorker(process, data_dir, record_dir, log_path, metrics_port)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"captions worker exited early:\n{worker.log_tail()}")
        if READY_MESSAGE.encode() in log_path.read_bytes():
            return worker
        time.sleep(0.2)
    worker.stop()
    raise RuntimeError(f"captions worker did not register in {ready_timeout:g} s:\n{worker.log_tail()}")
