"""`captions up`: everything for a local try-out in one command, stopped cleanly by one Ctrl-C.

Starts, as child processes, livekit-server in dev mode (loopback, key devkey/secret), the caption
worker, and the viewer server; prints the viewer link to open. Each child runs in its own process
group so that the terminal's Ctrl-C reaches only this process, which then stops the children one at
a time and in order: the worker first (it flushes every open caption to the transcript while
LiveKit is still up), then the viewer, then livekit-server.

With ``--translate-to de`` (issue 26), the worker translates into those languages and the viewer
offers them in its language picker. The translation model is ``--translation-model``; unset, a local
``--model`` made by ``captions make-test-checkpoint DIR`` brings its own tiny one (DIR/translation/),
so ``captions make-test-checkpoint ckpt/tiny && captions up --model ckpt/tiny --translate-to de`` runs
offline; otherwise the worker's default model (from the hub, once).

``--receivers`` (issue 24) is passed on to the worker as given: auto (the default) lets the worker
choose from the cores it may use (captions/host/receivers.py).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from captions.config import add_option, device_name, language_list, non_negative_int
from captions.dev.livekit_server import DEV_API_KEY, DEV_API_SECRET, dev_server_command, ensure_livekit_server
from captions.dev.processes import stop_on_signals, stop_process
from captions.host.receivers import add_receivers_option
from captions.live.worker import READY_MESSAGE, add_captioning_options
from captions.log import logger
from captions.translate.model import DEFAULT_TRANSLATION_MODEL

STOP_TIMEOUT_S = 30.0
LINK_TTL_S = 7 * 24 * 3600
WORKER_READY_TIMEOUT_S = 30 * 60
"""Generous: the first run downloads the model (a few GB)."""
STOP_ORDER = ["caption worker", "viewer", "livekit-server"]
"""The worker first: it flushes open captions while LiveKit is still up."""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_captioning_options(parser)
    add_option(parser, "--translate-to", env="CAPTIONS_TRANSLATE_TO", default=(), type=language_list,
               help="languages captions may be translated into, comma-separated (e.g. de,es): the worker "
                    "translates into each while someone reads it, and the viewer offers them; empty: none")
    add_option(parser, "--translation-model", env="CAPTIONS_TRANSLATION_MODEL", default=None,
               help="the worker's translation model (a Hugging Face repo id or local directory); unset: the "
                    "translation/ folder of a local --model made by `captions make-test-checkpoint`, else "
                    f"{DEFAULT_TRANSLATION_MODEL}")
    add_option(parser, "--translation-device", env="CAPTIONS_TRANSLATION_DEVICE", default="auto", type=device_name,
               help="the worker's translation device: auto (the speech model's --device), cpu, cuda or cuda:N")
    add_option(parser, "--translation-threads", env="CAPTIONS_TRANSLATION_THREADS", default=0,
               type=non_negative_int, help="the worker's CPU threads per translation batch (0: CTranslate2's default)")
    add_receivers_option(parser)
    add_option(parser, "--room", env="CAPTIONS_UP_ROOM", default="demo", help="room of the printed viewer link")
    parser.add_argument("--host", default="127.0.0.1", help="address for livekit-server and the viewer")
    parser.add_argument("--livekit-port", type=int, default=7880, help="livekit-server signal port")
    parser.add_argument("--web-port", type=int, default=8080, help="viewer server port")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    ready: threading.Event = field(default_factory=threading.Event)

    def stop(self) -> int:
        """One SIGINT (a second would make the worker skip its flush), then a bounded wait."""
        return stop_process(self.process, signal.SIGINT, STOP_TIMEOUT_S)


def _spawn(name: str, command: list[str], watch_for: str | None = None) -> Child:
    """Starts a child in its own process group. With `watch_for`, its output is relayed through a
    pipe and `child.ready` is set when a line contains that text."""
    logger.info("starting %s", name)
    if watch_for is None:
        return Child(name, subprocess.Popen(command, start_new_session=True))
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    child = Child(name, process)
    threading.Thread(target=_relay, args=(process, watch_for, child.ready), daemon=True).start()
    return child


def _relay(process: subprocess.Popen, watch_for: str, ready: threading.Event) -> None:
    assert process.stdout is not None
    for line in iter(process.stdout.readline, b""):
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
        if watch_for.encode() in line:
            ready.set()


def _wait_until_ready(child: Child, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not child.ready.wait(0.5):
        if child.process.poll() is not None:
            raise RuntimeError(f"{child.name} exited with status {child.process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{child.name} was not ready after {timeout:.0f} s")


def _captions_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "captions.cli", *args]


def translation_model(args: argparse.Namespace) -> str | None:
    """The worker's --translation-model: the one given; else a local checkpoint's own tiny models
    (make-test-checkpoint's DIR/translation/); else None (the worker's default). None without
    --translate-to."""
    from captions.dev.tiny_checkpoint import TRANSLATION_SUBDIR

    if not args.translate_to:
        return None
    if args.translation_model:
        return args.translation_model
    bundled = Path(args.model).expanduser() / TRANSLATION_SUBDIR
    return str(bundled) if bundled.is_dir() else None


def translation_args(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The translation options of (the worker, the viewer): both get the same --translate-to (the
    viewer offers exactly what the worker translates into)."""
    languages = ",".join(args.translate_to)
    if not languages:
        return ["--translate-to", ""], ["--translate-to", ""]
    worker = ["--translate-to", languages, "--translation-device", args.translation_device,
              "--translation-threads", str(args.translation_threads)]
    model = translation_model(args)
    if model is not None:
        worker += ["--translation-model", model]
    return worker, ["--translate-to", languages]


def _wait_for_http(url: str, child: Child, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise RuntimeError(f"{child.name} exited with status {child.process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{child.name} did not answer at {url} within {timeout:.0f} s")


def worker_args(args: argparse.Namespace, translation: list[str], livekit: list[str]) -> list[str]:
    """`captions worker ...` as `captions up` runs it: its captioning options and --receivers passed on."""
    worker = ["worker", "start", "--model", args.model, "--device", args.device,
              "--batch-size", str(args.batch_size), "--data-dir", str(args.data_dir), "--health-port", "0",
              "--receivers", str(args.receivers),
              # A local try-out needs no Prometheus endpoint, and must not fail over a busy port.
              "--metrics-port", "0", *translation, *livekit]
    if args.record_dir is not None:
        worker += ["--record-dir", str(args.record_dir)]
    return worker


def _start_children(args: argparse.Namespace, children: list[Child]) -> str:
    """Starts everything (appending to `children` as it goes); returns the viewer link."""
    binary = ensure_livekit_server()
    livekit_url = f"ws://{args.host}:{args.livekit_port}"
    server = _spawn("livekit-server", dev_server_command(binary, args.host, args.livekit_port))
    children.append(server)
    _wait_for_http(f"http://{args.host}:{args.livekit_port}", server)
    lk = ["--url", livekit_url, "--api-key", DEV_API_KEY, "--api-secret", DEV_API_SECRET]
    worker_translation, web_translation = translation_args(args)
    if args.translate_to:
        logger.info("translating into %s with %s", ",".join(args.translate_to),
                    translation_model(args) or DEFAULT_TRANSLATION_MODEL)
    worker_child = _spawn("caption worker", _captions_command(*worker_args(args, worker_translation, lk)),
                          watch_for=READY_MESSAGE)
    children.append(worker_child)
    from captions.viewer.links import viewer_link
    from captions.viewer.server import LIVEKIT_CLIENT_PATH, WEB_DIR

    if not (WEB_DIR / LIVEKIT_CLIENT_PATH).is_file() and shutil.which("npm"):
        # First run: fetch the viewer's JavaScript from the npm lock file (once; served locally).
        logger.info("installing the viewer's JavaScript (npm ci in %s)", WEB_DIR)
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=WEB_DIR, check=True)
    # The viewer signs links with CAPTIONS_VIEWER_SECRET when set: give this run its own, so that the
    # printed link is signed with exactly the key the viewer child checks.
    viewer_secret = os.environ.setdefault("CAPTIONS_VIEWER_SECRET", secrets.token_urlsafe(32))
    web = _spawn("viewer", _captions_command("web", "--host", args.host, "--port", str(args.web_port),
                                             "--data-dir", str(args.data_dir), *web_translation, *lk))
    children.append(web)
    base_url = f"http://{args.host}:{args.web_port}"
    _wait_for_http(f"{base_url}/healthz", web)
    # A room created before the worker registers gets no agent: say "up" only once it can caption.
    logger.info("waiting for the caption worker (loading the model; the first run downloads it)")
    _wait_until_ready(worker_child, WORKER_READY_TIMEOUT_S)
    return viewer_link(base_url, viewer_secret, args.room, LINK_TTL_S)


def _banner(args: argparse.Namespace, link: str) -> str:
    lines = ["", "Live captions are up.",
             (f"  LiveKit:  ws://{args.host}:{args.livekit_port}  (API key {DEV_API_KEY}, secret "
              f"{DEV_API_SECRET}; dev keys, loopback only)"),
             f"  Open the captions of room '{args.room}':  {link}",
             *([f"  Translated into {', '.join(args.translate_to)} for whoever reads it: pick the language in "
                "the viewer (or add &lang=" + args.translate_to[0] + " to the link)"] if args.translate_to else []),
             "  Speak in that room from any LiveKit client (every microphone is captioned), or let a bot:",
              (f"    uv run captions speak --room {args.room} --url ws://{args.host}:{args.livekit_port} "
               '"Hello, this is a caption test."'),
              "Press Ctrl-C to stop.", ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    children: list[Child] = []
    status = 0
    # The children run in their own sessions: dying without stopping them would leave them running.
    stop_on_signals()
    try:
        link = _start_children(args, children)
        print(_banner(args, link), flush=True)
        while all(c.process.poll() is None for c in children):
            time.sleep(0.5)
        failed = next(c for c in children if c.process.poll() is not None)
        logger.error("%s exited with status %s: stopping everything", failed.name, failed.process.returncode)
        status = 1
    except KeyboardInterrupt:
        logger.info("Ctrl-C: stopping")
    except (RuntimeError, subprocess.CalledProcessError) as e:
        print(f"captions up: {e}", file=sys.stderr)
        status = 1
    finally:
        # Ignore further Ctrl-C while stopping, so that the worker's flush is not cut short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for child in sorted(children, key=lambda c: STOP_ORDER.index(c.name)):
            child.stop()
    return status
