"""The receiving processes of `captions worker --receivers P`, started and kept running by the engine
process (engine_process.py).

Each is `python -m captions.host.receiver SOCKET INDEX`, in a session of its own (a Ctrl-C in a
terminal reaches only the engine process, which passes it on once). Its options are the worker's,
as JSON in the environment variable `RECEIVER_ARGS_ENV` (not on the command line, where other users
could read the secrets): every worker option means the same in a receiving process, except that the
engine process alone serves /metrics and /readyz (and answers the diagnostics signal), and
livekit-agents' health port is any free port.

A receiving process that exits while the worker runs is started again after a bounded backoff
(its rooms meanwhile get a captioner from any process's recovery: captions/live/recovery.py). One
that exits with a failure before it was ever ready (bad options, a translation model that does not
load) stops the worker: restarting it would only fail again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from captions.config import add_option
from captions.log import logger

AUTO = "auto"
CORES_KEPT = 2
"""Cores `--receivers auto` leaves to the engine process (its engine thread's host work, the socket
readers: about 0.001 cores per live talker) and to the rest of the machine (the OS, livekit-server
when it runs on the same host)."""
MAX_AUTO_RECEIVERS = 8
"""`--receivers auto` never starts more. A talker costs 0.020-0.038 cores, most of it in the SDK's
native threads, so one process uses several cores, and its busiest thread (the decoder, or the
interpreter) fills near 140-210 talkers (docs/benchmarks/host.md, computed): 8 carry the 400 that
one GPU steps in real time (Kyutai publishes 400 streams on an H100), bound by the host's cores
rather than by their number. More would cost memory (each is a livekit-agents
worker with its own translation model) for talkers the one engine cannot step."""
RECEIVER_ARGS_ENV = "CAPTIONS_RECEIVER_ARGS"
RESTART_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
"""Backoff before starting a receiving process again, by how many times in a row it died early."""
STABLE_AFTER_S = 60.0
"""A receiving process that ran this long before it died starts the backoff afresh."""


def receivers_option(text: str) -> int | str:
    """argparse type for --receivers: a positive integer, or auto (`resolve_receivers`)."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or auto, got {text}")
    return value


def usable_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may run on: its affinity mask (a container's cpuset), else every CPU of
    the machine, and no more than its CPU quota (a container's `--cpus`, Kubernetes' `limits.cpu`),
    rounded up: a quota of 2 CPUs on a 64-core node must not start 8 receiving processes."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = cpu_quota(cgroup_root)
    return max(1, min(cores, math.ceil(quota))) if quota is not None else cores


def cpu_quota(cgroup_root: Path) -> float | None:
    """CPUs' worth of this process's cgroup quota (v2 `cpu.max`, or v1 `cpu.cfs_quota_us` over
    `cpu.cfs_period_us`); None without one or where it cannot be read."""
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def resolve_receivers(value: int | str, cores: int | None = None) -> tuple[int, str]:
    """P for --receivers `value` ("auto": the usable cores less CORES_KEPT, between 1 and
    MAX_AUTO_RECEIVERS) and how it was chosen, for the start-up log."""
    if value != AUTO:
        return int(value), "set by --receivers or CAPTIONS_RECEIVERS"
    cores = usable_cores() if cores is None else cores
    return max(1, min(cores - CORES_KEPT, MAX_AUTO_RECEIVERS)), f"auto: {cores} usable cores, {CORES_KEPT} kept"


def add_receivers_option(parser: argparse.ArgumentParser) -> None:
    """--receivers, for `captions worker` and `captions up` (which passes it on)."""
    add_option(parser, "--receivers", env="CAPTIONS_RECEIVERS", default=AUTO, type=receivers_option,
               help="processes that take rooms (receive audio, detect voice, publish captions); 1: the worker "
                    "process does everything; 2 or more: it runs only the engine and the slot queue, and starts "
                    "that many receiving processes that feed it (captions/host/); auto: the usable cores (affinity and "
                    f"CPU quota) less {CORES_KEPT}, at least 1 and at most {MAX_AUTO_RECEIVERS}")


def encode_args(args: argparse.Namespace) -> str:
    """The worker's options for its receiving processes (module notes), as JSON."""
    values = dict(vars(args), health_port=0, metrics_port=0, diagnostics_file=None, receivers=1)

    def encode(value):
        if isinstance(value, Path):
            return {"__path__": str(value)}
        if isinstance(value, tuple):
            return {"__tuple__": list(value)}
        raise TypeError(f"cannot pass {type(value).__name__} to a receiving process")

    return json.dumps(values, default=encode)


def decode_args(text: str) -> argparse.Namespace:
    def decode(value: dict):
        if "__path__" in value:
            return Path(value["__path__"])
        if "__tuple__" in value:
            return tuple(value["__tuple__"])
        return value

    return argparse.Namespace(**json.loads(text, object_hook=decode))


@dataclass(eq=False)
class _Process:
    index: int
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    failures: int = 0
    """Deaths in a row, each within STABLE_AFTER_S of its start (the first death counts as one)."""
    restart_at: float | None = None
    ever_ready: bool = False


class ReceiverPool:
    """`count` receiving processes feeding the engine server at `socket_path`."""

    def __init__(self, count: int, socket_path: str, args: argparse.Namespace):
        self._socket_path = socket_path
        self._environment = dict(os.environ, **{RECEIVER_ARGS_ENV: encode_args(args)})
        self._processes = [_Process(i) for i in range(count)]
        self._stopping = False
        self.started = 0
        """Receiving processes started so far (restarts included)."""

    @property
    def restarts(self) -> int:
        """Receiving processes started again after one exited."""
        return max(0, self.started - len(self._processes))

    def start(self) -> None:
        for entry in self._processes:
            self._spawn(entry)

    def pids(self) -> dict[int, int]:
        """The running receiving processes' pids, by index."""
        return {e.index: e.process.pid for e in self._processes if e.process is not None and e.process.poll() is None}

    def supervise(self, ready: set[int]) -> int | None:
        """Called every half second or so: notes which are `ready` (indexes), starts again those that
        died (after their backoff). Returns an exit status when the worker must stop (module notes)."""
        now = time.monotonic()
        for entry in self._processes:
            if entry.index in ready:
                entry.ever_ready = True
            if entry.process is not None and (status := entry.process.poll()) is not None:
                if not entry.ever_ready and status in (1, 2):
                    logger.error("receiving process %d exited with status %d before it was ever ready: the "
                                 "worker stops", entry.index, status)
                    return status
                ran = now - entry.started_at
                entry.failures = 1 if ran >= STABLE_AFTER_S else entry.failures + 1
                delay = RESTART_DELAYS_S[min(entry.failures, len(RESTART_DELAYS_S)) - 1]
                logger.warning("receiving process %d (pid %d) exited with %s after %.0f s: a new one starts in "
                               "%.0f s; its rooms go to the recovery", entry.index, entry.process.pid,
                               _status(status), ran, delay)
                entry.process, entry.restart_at = None, now + delay
            if entry.process is None and entry.restart_at is not None and now >= entry.restart_at:
                self._spawn(entry)
        return None

    def stop(self, sig: int | None, timeout: float) -> None:
        """Sends `sig` to each (None: none; they stop by themselves), waits up to `timeout` seconds in
        all, then kills those still running."""
        self._stopping = True
        running = [e.process for e in self._processes if e.process is not None and e.process.poll() is None]
        if sig is not None:
            for process in running:
                process.send_signal(sig)
        deadline = time.monotonic() + timeout
        for process in running:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("receiving process (pid %d) did not stop in %.0f s: killed", process.pid, timeout)
                process.kill()
                process.wait()

    def _spawn(self, entry: _Process) -> None:
        if self._stopping:
            return
        command = [sys.executable, "-m", "captions.host.receiver", self._socket_path, str(entry.index)]
        entry.process = subprocess.Popen(command, env=self._environment, start_new_session=True)
        entry.started_at, entry.restart_at = time.monotonic(), None
        self.started += 1
        logger.info("started receiving process %d (pid %d)", entry.index, entry.process.pid)


def _status(returncode: int) -> str:
    if returncode < 0:
        return f"signal {signal.Signals(-returncode).name}"
    return f"status {returncode}"
