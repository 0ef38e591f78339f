"""`captions server`: livekit-server in dev mode on loopback, installed project-locally if missing.

Dev mode uses the well-known key pair devkey/secret, fine for a laptop or tests and never for a
deployment (see the README's deployment section for real keys).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from captions import PROJECT_ROOT
from captions.dev.processes import free_port_triple, stop_on_signals, stop_process
from captions.log import logger

LIVEKIT_SERVER_MODULE = "github.com/livekit/livekit-server/cmd/server"
# A tag whose go.mod has no replace directives, so `go install module@tag` works.
LIVEKIT_SERVER_VERSION = "v1.13.5"
LOCAL_BIN = PROJECT_ROOT / ".local" / "bin"
DEV_API_KEY = "devkey"
DEV_API_SECRET = "secret"
PORT_ATTEMPTS = 3

INSTALL_HELP = f"""livekit-server is not installed and Go is not available to build it.
Install it one of these ways, then run this command again:
  * the official script:   curl -sSL https://get.livekit.io | bash
  * Homebrew (macOS):      brew install livekit
  * Docker:                docker run --rm -p 7880:7880 -p 7881:7881 -p 7882:7882/udp livekit/livekit-server --dev
  * with Go >= 1.26:       go install {LIVEKIT_SERVER_MODULE}@{LIVEKIT_SERVER_VERSION}"""


def find_livekit_server() -> Path | None:
    """The binary on PATH, or the project-local one `install_livekit_server` built."""
    local = LOCAL_BIN / "livekit-server"
    if local.is_file() and os.access(local, os.X_OK):
        return local
    found = shutil.which("livekit-server")
    return Path(found) if found else None


def install_livekit_server() -> Path:
    """Builds the pinned release with `go install` into .local/bin (a few minutes, once)."""
    go = shutil.which("go")
    if go is None:
        raise RuntimeError(INSTALL_HELP)
    LOCAL_BIN.mkdir(parents=True, exist_ok=True)
    logger.info("building livekit-server %s with go install (once; takes a few minutes)",
                LIVEKIT_SERVER_VERSION)
    env = dict(os.environ, GOBIN=str(LOCAL_BIN))
    subprocess.run([go, "install", f"{LIVEKIT_SERVER_MODULE}@{LIVEKIT_SERVER_VERSION}"], env=env, check=True)
    (LOCAL_BIN / "server").rename(LOCAL_BIN / "livekit-server")
    return LOCAL_BIN / "livekit-server"


def ensure_livekit_server() -> Path:
    return find_livekit_server() or install_livekit_server()


def dev_server_command(binary: Path, host: str = "127.0.0.1", port: int = 7880) -> list[str]:
    """Dev mode bound to `host`: port is the signal port, port+1 the TCP ICE port and port+2 the
    single UDP port. Loopback candidates are enabled so that clients on this machine connect."""
    config = (
        f"port: {port}\n"
        f"bind_addresses: [{host}]\n"
        f"rtc:\n  tcp_port: {port + 1}\n  udp_port: {port + 2}\n  node_ip: {host}\n"
        f"  use_external_ip: false\n  enable_loopback_candidate: true\n"
    )
    return [str(binary), "--dev", "--config-body", config]


@dataclass
class LiveKitServer:
    """A running livekit-server: where to reach it and with which keys."""

    url: str
    http_url: str
    api_key: str
    api_secret: str
    process: object
    """The subprocess.Popen of a server this process started."""

    def stop(self, timeout: float = 10) -> None:
        stop_process(self.process, signal.SIGTERM, timeout)


def start_dev_server(log_path: Path, host: str = "127.0.0.1", ready_timeout: float = 20,
                     port: int | None = None) -> LiveKitServer:
    """Starts livekit-server --dev on free ports of `host` (or on `port`, e.g. to restart one, see
    dev_server_command) logging to `log_path` (appended), and waits until its HTTP port answers.
    For tests and benchmarks: it never installs the binary."""
    binary = find_livekit_server()
    if binary is None:
        raise RuntimeError("livekit-server missing: run `captions server --install-only`")
    for _ in range(PORT_ATTEMPTS - 1 if port is None else 0):
        # Another process may take a port between the check and the server's bind: try others.
        with contextlib.suppress(PortTaken):
            return _start(binary, log_path, host, ready_timeout, free_port_triple(host))
    return _start(binary, log_path, host, ready_timeout, port or free_port_triple(host))


class PortTaken(RuntimeError):
    """livekit-server could not bind one of its ports."""


def _start(binary: Path, log_path: Path, host: str, ready_timeout: float, port: int) -> LiveKitServer:
    start = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as log:
        process = subprocess.Popen(dev_server_command(binary, host, port), stdout=log, stderr=subprocess.STDOUT)
    http_url = f"http://{host}:{port}"
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            with open(log_path, "rb") as log:
                log.seek(start)
                if b"address already in use" in log.read():
                    raise PortTaken(f"livekit-server could not bind its ports, see {log_path}")
            raise RuntimeError(f"livekit-server exited early, see {log_path}")
        try:
            urllib.request.urlopen(http_url, timeout=1).read()
            return LiveKitServer(f"ws://{host}:{port}", http_url, DEV_API_KEY, DEV_API_SECRET, process)
        except OSError:
            time.sleep(0.1)
    process.kill()
    process.wait()
    raise RuntimeError(f"livekit-server did not come up in {ready_timeout:g} s, see {log_path}")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int, default=7880, help="signal port (default 7880)")
    parser.add_argument("--install-only", action="store_true",
                        help="install livekit-server if missing, print its path and exit")


def run(args: argparse.Namespace) -> int:
    try:
        binary = ensure_livekit_server()
    except (RuntimeError, subprocess.CalledProcessError) as e:
        print(f"captions server: {e}", file=sys.stderr)
        return 1
    if args.install_only:
        print(binary)
        return 0
    print(f"LIVEKIT_URL=ws://{args.host}:{args.port}\nLIVEKIT_API_KEY={DEV_API_KEY}\n"
          f"LIVEKIT_API_SECRET={DEV_API_SECRET}", flush=True)
    stop_on_signals()
    server = subprocess.Popen(dev_server_command(binary, args.host, args.port))
    try:
        return server.wait()
    except KeyboardInterrupt:  # Ctrl-C (which the server got too) or SIGTERM: never leave it running
        return stop_process(server, signal.SIGTERM, timeout=10)
