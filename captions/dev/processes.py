"""Child processes and ports for the dev tools, tests and benchmarks."""

from __future__ import annotations

import signal
import socket
import subprocess


def stop_process(process: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
    """Asks `process` to stop with `sig` (SIGINT: as Ctrl-C, so it can flush), waits up to `timeout`
    seconds, then kills it. Returns its exit status."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _ports_free(host: str, base: int) -> bool:
    """livekit-server binds its ICE ports (base+1 TCP, base+2 UDP) on every interface, whatever
    `host` is: check them on every address, where other WebRTC clients' ephemeral ports live."""
    ports = ((host, base, socket.AF_INET, socket.SOCK_STREAM),
             *((address, port, family, kind)
               for port, kind in ((base + 1, socket.SOCK_STREAM), (base + 2, socket.SOCK_DGRAM))
               for address, family in (("0.0.0.0", socket.AF_INET), ("::", socket.AF_INET6))))
    for address, port, family, kind in ports:
        with socket.socket(family, kind) as s:
            try:
                s.bind((address, port))
            except OSError:
                return False
    return True


def free_port_triple(host: str = "127.0.0.1") -> int:
    """A base port with base, base+1 (TCP) and base+2 (UDP) free on `host`: livekit-server's signal,
    ICE/TCP and media ports (see captions.dev.livekit_server.dev_server_command)."""
    for _ in range(50):
        base = free_port(host)
        if base + 2 < 65535 and _ports_free(host, base):
            return base
    raise RuntimeError(f"no free port triple on {host}")


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def stop_on_signals() -> None:
    """SIGTERM (a service manager, `timeout`, `kill`) stops this command as Ctrl-C does, so that its
    `finally` blocks stop the children it started instead of leaving them running. SIGINT is set too:
    Python leaves it ignored when the process started with it ignored (a background job of a
    non-interactive shell), and Ctrl-C or `kill -INT` would then do nothing."""
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    signal.signal(signal.SIGINT, _raise_keyboard_interrupt)
