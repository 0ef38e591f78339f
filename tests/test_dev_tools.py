"""A newcomer's first commands: they stop cleanly when a process manager stops them, and they say in
one line what is missing before they spend minutes on work that would fail."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from captions.dev.processes import free_port, free_port_triple

CAPTIONS = str(Path(sys.executable).parent / "captions")


def _answers(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}", timeout=1).read()
        return True
    except OSError:
        return False


def _livekit_servers_on(port: int) -> list[int]:
    """Pids of livekit-server processes started for `port` (their --config-body names it)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"livekit-server") and f"port: {port}\n".encode() in b"\0".join(args):
            found.append(int(cmdline.parent.name))
    return found


@pytest.mark.livekit
def test_captions_server_stopped_with_sigterm_leaves_no_livekit_server_running(tmp_path):
    port = free_port_triple()
    server = subprocess.Popen([CAPTIONS, "server", "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not _answers(port):
            assert server.poll() is None and time.monotonic() < deadline, "livekit-server did not start"
            time.sleep(0.2)
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=20)
        deadline = time.monotonic() + 10
        while _answers(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _answers(port), "livekit-server still answers after `captions server` was stopped"
        assert not _livekit_servers_on(port), "a livekit-server process outlived `captions server`"
    finally:
        if server.poll() is None:
            server.kill()


def test_a_plot_without_matplotlib_is_refused_before_measuring(tmp_path):
    hide_matplotlib = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "matplotlib":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Hide())
from captions.cli import main
sys.exit(main(sys.argv[1:]))
"""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", hide_matplotlib, "bench", "latency", "--speakers", "1",
                             "--plot", str(tmp_path / "p.png")], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        ("captions bench latency: --plot needs matplotlib, from the bench dependency group: "
        "uv sync --all-groups (or drop --plot)")]
    assert time.monotonic() - started < 30, "it measured before refusing"


def test_an_unreachable_hub_fails_fast_with_one_line_that_says_what_to_do(tmp_path, speech_dir):
    from tests.conftest import espeak_wav

    wav = espeak_wav("Hello there.", speech_dir / "hub.wav")
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_OFFLINE", None)
    started = time.monotonic()
    result = subprocess.run([CAPTIONS, "transcribe", "--model", "kyutai/stt-1b-en_fr", "--device", "cpu",
                             str(wav)], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "cannot reach http://127.0.0.1:" in lines[0] and "captions make-test-checkpoint" in lines[0]
    assert time.monotonic() - started < 20, "the hub client retried instead of failing fast"


def test_captions_up_gives_the_worker_and_the_viewer_the_same_languages_and_a_local_checkpoints_translation(
        tmp_path, monkeypatch):
    """`captions up --translate-to de`: the worker translates into what the viewer offers, with the
    tiny models a local make-test-checkpoint directory brings (DIR/translation/), so it runs offline;
    a given --translation-model wins; without --translate-to, neither translates whatever the
    environment says. (The real run: tests/test_room_e2e.py starts `captions up`.)"""
    import argparse

    from captions.dev import up

    for name in ("CAPTIONS_TRANSLATE_TO", "CAPTIONS_TRANSLATION_MODEL", "CAPTIONS_TRANSLATION_DEVICE",
                 "CAPTIONS_TRANSLATION_THREADS"):
        monkeypatch.delenv(name, raising=False)

    def parse(*argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        up.configure_parser(parser)
        return parser.parse_args(list(argv))

    checkpoint = tmp_path / "tiny"
    (checkpoint / "translation").mkdir(parents=True)
    worker, web = up.translation_args(parse("--model", str(checkpoint), "--translate-to", "de,ES"))
    assert web == ["--translate-to", "de,es"]
    assert worker[worker.index("--translate-to") + 1] == "de,es"
    assert worker[worker.index("--translation-model") + 1] == str(checkpoint / "translation")
    worker, _ = up.translation_args(parse("--model", str(checkpoint), "--translate-to", "de",
                                          "--translation-model", "Helsinki-NLP/opus-mt-{source}-{target}"))
    assert worker[worker.index("--translation-model") + 1] == "Helsinki-NLP/opus-mt-{source}-{target}"
    worker, _ = up.translation_args(parse("--model", "kyutai/stt-1b-en_fr", "--translate-to", "de"))
    assert "--translation-model" not in worker, "the worker's own default serves a hub model"
    monkeypatch.setenv("CAPTIONS_TRANSLATE_TO", "fr")
    assert up.translation_args(parse("--model", str(checkpoint), "--translate-to", "")) == \
        (["--translate-to", ""], ["--translate-to", ""])
