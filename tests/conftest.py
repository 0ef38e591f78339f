"""Shared fixtures: a real livekit-server (dev mode, loopback), speech audio from espeak-ng, and the
project's tiny random checkpoint in the real on-disk format."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.lkserver import DEV_API_KEY, DEV_API_SECRET, dev_server_command, find_livekit_server


def _ports_free(base: int) -> bool:
    for port, kind in ((base, socket.SOCK_STREAM), (base + 1, socket.SOCK_STREAM), (base + 2, socket.SOCK_DGRAM)):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def free_port_triple() -> int:
    """A base port with base, base+1 (TCP) and base+2 (UDP) free on loopback."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + 2 < 65535 and _ports_free(base):
            return base
    raise RuntimeError("no free port triple on loopback")


@dataclass
class LiveKitServer:
    url: str
    http_url: str
    api_key: str
    api_secret: str
    process: subprocess.Popen


def start_livekit_server(log_path: Path) -> LiveKitServer:
    binary = find_livekit_server()
    assert binary is not None, "livekit-server missing: run `uv run captions server --install-only`"
    port = free_port_triple()
    log = open(log_path, "wb")
    proc = subprocess.Popen(dev_server_command(binary, "127.0.0.1", port), stdout=log, stderr=subprocess.STDOUT)
    http_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"livekit-server exited early, see {log_path}")
        try:
            urllib.request.urlopen(http_url, timeout=1).read()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError(f"livekit-server did not come up, see {log_path}")
    return LiveKitServer(f"ws://127.0.0.1:{port}", http_url, DEV_API_KEY, DEV_API_SECRET, proc)


@pytest.fixture(scope="session")
def livekit_server(tmp_path_factory) -> LiveKitServer:
    """One real livekit-server --dev on loopback for the whole session (rooms keep tests apart)."""
    server = start_livekit_server(tmp_path_factory.mktemp("livekit") / "livekit-server.log")
    yield server
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()


def espeak_wav(text: str, path: Path, rate: int = 24000, channels: int = 1, voice: str = "en") -> Path:
    """Real synthetic speech: espeak-ng writes a WAV, sox converts it to the wanted rate/channels."""
    raw = path.with_suffix(".espeak.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w", str(raw), text], check=True)
    subprocess.run(["sox", str(raw), "-r", str(rate), "-c", str(channels), "-b", "16", str(path)], check=True)
    raw.unlink()
    return path


@pytest.fixture(scope="session")
def speech_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("speech")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The project's tiny random checkpoint (seed 0), in the real Kyutai on-disk layout."""
    from agent.tiny_checkpoint import make_test_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "tiny-stt"
    make_test_checkpoint(out, seed=0)
    return out


@dataclass
class CaptionsWorker:
    """A `captions worker` subprocess (the real worker, real engine) and where it writes."""

    process: subprocess.Popen
    data_dir: Path
    record_dir: Path
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30) -> int:
        """Ctrl-C, as a user would; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(2)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_captions_worker(server: LiveKitServer, checkpoint: Path, workdir: Path, batch_size: int = 3,
                          extra_args: tuple[str, ...] = (), ready_timeout: float = 180) -> CaptionsWorker:
    """Starts `captions worker dev` on the checkpoint (CPU) and waits until it has registered."""
    import os
    import sys

    from agent.worker import READY_MESSAGE

    workdir.mkdir(parents=True, exist_ok=True)
    data_dir, record_dir, log_path = workdir / "data", workdir / "recordings", workdir / "worker.log"
    env = dict(os.environ, LIVEKIT_URL=server.url, LIVEKIT_API_KEY=server.api_key,
               LIVEKIT_API_SECRET=server.api_secret, NO_TORCH_COMPILE="1")
    captions = Path(sys.executable).parent / "captions"
    command = [str(captions), "worker", "dev", "--model", str(checkpoint), "--device", "cpu",
               "--batch-size", str(batch_size), "--data-dir", str(data_dir), "--record-dir", str(record_dir),
               "--health-port", "0", "--metrics-port", "0", *extra_args]
    log = open(log_path, "wb")  # noqa: SIM115 - the subprocess writes to it for its lifetime
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    worker = CaptionsWorker(process, data_dir, record_dir, log_path)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"captions worker exited early:\n{worker.log_tail()}")
        if READY_MESSAGE.encode() in log_path.read_bytes():
            return worker
        time.sleep(0.2)
    worker.stop()
    raise RuntimeError(f"captions worker did not register in {ready_timeout} s:\n{worker.log_tail()}")


@pytest.fixture(scope="session")
def captions_worker(livekit_server, tiny_checkpoint, tmp_path_factory) -> CaptionsWorker:
    """One real caption worker (3 engine slots, automatic dispatch) for the whole session."""
    worker = start_captions_worker(livekit_server, tiny_checkpoint, tmp_path_factory.mktemp("worker"))
    yield worker
    worker.stop()
