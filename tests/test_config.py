"""Bad configuration stops `captions worker` at start-up with one clear message (no traceback), before
the model is loaded; as a flag or as its environment variable alike. LiveKit checks run against the
real livekit-server fixture (wrong keys) and a loopback port where nothing listens (unreachable)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from captions.config import ConfigError, check_livekit
from captions.dev.processes import free_port

CAPTIONS = str(Path(sys.executable).parent / "captions")


def worker(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """`captions worker ARGS` with a clean CAPTIONS_*/LIVEKIT_* environment (one process) plus `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CAPTIONS_", "LIVEKIT_"))}
    base["NO_TORCH_COMPILE"] = "1"
    # One process whatever the cores (--receivers auto): these are the single worker's start-up checks.
    base["CAPTIONS_RECEIVERS"] = "1"
    return subprocess.run([CAPTIONS, "worker", *args], env={**base, **(env or {})}, capture_output=True, check=False,
                          text=True, timeout=timeout)


def closed_port() -> int:
    """A loopback port nothing listens on (bound then released)."""
    return free_port()


def the_error(result: subprocess.CompletedProcess) -> str:
    """The one message the user gets: stderr's last line, with no traceback anywhere."""
    assert result.returncode != 0, f"started anyway:\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, "failed without saying why"
    return lines[-1]


@pytest.mark.parametrize(("flag", "env", "bad", "expected"), [
    pytest.param("--device", "CAPTIONS_DEVICE", "tpu", "unknown device 'tpu': use auto, cpu, cuda or cuda:N",
                 id="unknown-device"),
    pytest.param("--device", "CAPTIONS_DEVICE", "cuda:x", "unknown device 'cuda:x'", id="malformed-cuda-index"),
    pytest.param("--batch-size", "CAPTIONS_BATCH_SIZE", "0", "must be a positive integer or auto, got 0", id="batch-size-0"),
    pytest.param("--batch-size", "CAPTIONS_BATCH_SIZE", "-3", "must be a positive integer or auto, got -3",
                 id="negative-batch-size"),
    pytest.param("--translate-to", "CAPTIONS_TRANSLATE_TO", "de,<b>", "'<b>' is not a language code",
                 id="translate-to-junk"),
    pytest.param("--translation-device", "CAPTIONS_TRANSLATION_DEVICE", "tpu", "unknown device 'tpu'",
                 id="translation-device"),
    pytest.param("--live-chunk-ms", "CAPTIONS_LIVE_CHUNK_MS", "30", "must be one of 10, 20, 40, got 30",
                 id="live-chunk-not-a-divisor"),
    pytest.param("--live-chunk-ms", "CAPTIONS_LIVE_CHUNK_MS", "80", "must be one of 10, 20, 40, got 80",
                 id="live-chunk-a-whole-frame"),
])
@pytest.mark.parametrize("via", ["flag", "env"])
def test_invalid_values_are_rejected_with_the_option_named(flag, env, bad, expected, via):
    result = worker(f"{flag}={bad}") if via == "flag" else worker(env={env: bad})
    message = the_error(result)
    assert expected in message
    assert (flag if via == "flag" else env) in message, f"the message does not name the setting: {message}"


def test_unreachable_livekit_url_stops_before_loading_the_model(tmp_path):
    """The checkpoint does not exist either: the LiveKit error comes first (checked before the load)."""
    url = f"ws://127.0.0.1:{closed_port()}"
    result = worker("--url", url, "--model", str(tmp_path / "missing"))
    assert result.returncode == 2
    message = the_error(result)
    assert message.startswith(f"captions worker: cannot reach LiveKit at {url}")
    assert "LIVEKIT_URL" in message
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("url", ["localhost:7880", "ftp://example.org", "ws://"])
def test_a_url_that_is_not_a_livekit_url_is_rejected(url):
    result = worker(env={"LIVEKIT_URL": url})
    assert result.returncode == 2
    assert the_error(result) == (f"captions worker: LIVEKIT_URL {url!r} is not a LiveKit URL: "
                                 "use ws://host:7880 or wss://host")


@pytest.mark.livekit
@pytest.mark.parametrize(("key", "secret"), [("devkey", "wrong-3f9a1c"), ("unknown-key", None)],
                         ids=["wrong-secret", "unknown-key"])
def test_wrong_keys_are_rejected_by_the_real_server(livekit_server, tmp_path, key, secret):
    secret = secret or livekit_server.api_secret
    result = worker("--model", str(tmp_path / "missing"),
                    env={"LIVEKIT_URL": livekit_server.url, "LIVEKIT_API_KEY": key, "LIVEKIT_API_SECRET": secret})
    assert result.returncode == 2
    assert the_error(result) == (f"captions worker: LiveKit at {livekit_server.url} rejected the API key "
                                 f"{key!r} or its secret (check LIVEKIT_API_KEY and LIVEKIT_API_SECRET)")
    if secret != livekit_server.api_secret:  # the dev secret is the word "secret", found in any message
        assert secret not in result.stderr, "a secret must never be printed"


@pytest.mark.livekit
def test_missing_checkpoint_dir_is_one_line_once_livekit_is_fine(livekit_server, tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    result = worker("--model", str(missing), "--metrics-port", "0",
                    env={"LIVEKIT_URL": livekit_server.url, "LIVEKIT_API_KEY": livekit_server.api_key,
                         "LIVEKIT_API_SECRET": livekit_server.api_secret})
    assert result.returncode == 1
    assert the_error(result) == f"captions worker: checkpoint directory {missing} does not exist"


@pytest.mark.livekit
def test_metrics_port_taken_stops_a_deployment_worker(livekit_server, tmp_path):
    """`start` mode (deployments): probes that cannot be served are a start-up error, not a surprise."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = worker("start", "--model", str(tmp_path / "missing"), "--metrics-port", str(port),
                        env={"LIVEKIT_URL": livekit_server.url, "LIVEKIT_API_KEY": livekit_server.api_key,
                             "LIVEKIT_API_SECRET": livekit_server.api_secret})
    assert result.returncode == 2
    message = the_error(result)
    assert message.startswith(f"captions worker: cannot serve metrics on 127.0.0.1:{port}")
    assert "CAPTIONS_METRICS_PORT" in message


@pytest.mark.livekit
def test_check_livekit_accepts_the_real_server_and_rejects_a_wrong_secret(livekit_server):
    check_livekit(livekit_server.url, livekit_server.api_key, livekit_server.api_secret)
    with pytest.raises(ConfigError, match="rejected the API key"):
        check_livekit(livekit_server.url, livekit_server.api_key, "wrong")


@pytest.mark.livekit
@pytest.mark.parametrize("receivers", ["1", "2"], ids=["one-process", "engine-process"])
def test_a_translation_model_that_cannot_be_found_is_one_line_before_the_speech_model_loads(livekit_server, tmp_path,
                                                                                           receivers):
    """With --receivers 2 the engine process loads the host's one translation model, as the one
    process does: before the speech model, and no receiving process is started."""
    missing = tmp_path / "no-such-translation-model"
    result = worker("--model", str(tmp_path / "no-such-checkpoint"), "--metrics-port", "0", "--translate-to", "de",
                    "--translation-model", str(missing), "--receivers", receivers,
                    env={"LIVEKIT_URL": livekit_server.url, "LIVEKIT_API_KEY": livekit_server.api_key,
                         "LIVEKIT_API_SECRET": livekit_server.api_secret})
    assert result.returncode == 1
    message = the_error(result)
    assert message == f"captions worker: translation model directory {missing} does not exist"
