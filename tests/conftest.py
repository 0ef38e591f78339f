"""Shared fixtures: a real livekit-server (dev mode, loopback), speech audio from espeak-ng, and the
project's tiny random checkpoint in the real on-disk format."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from captions.dev.livekit_server import LiveKitServer, start_dev_server
from captions.dev.speech import espeak_wav  # noqa: F401 - used by the test modules

# The launchers live in the package (the latency benchmark uses them too); re-exported for tests.
from captions.dev.worker_process import CaptionsWorker, start_captions_worker

# The viewer tests' servers, browser and caption-agent bot.
pytest_plugins = ["tests.viewer_harness"]

# No test may reach the Hugging Face hub (no machine here can): a command that would download a model
# fails at once instead of depending on argument parsing failing first. Subprocesses inherit it; the
# captions modules import huggingface_hub only when they load a model.
os.environ["HF_HUB_OFFLINE"] = "1"

# Property tests: a few examples in the fast lane, many in CI (.ci/run sets HYPOTHESIS_PROFILE=ci).
settings.register_profile("fast", max_examples=10)
settings.register_profile("ci", max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))


def start_livekit_server(log_path: Path) -> LiveKitServer:
    """A livekit-server --dev on free loopback ports (see captions.dev.livekit_server.start_dev_server)."""
    return start_dev_server(log_path)


@pytest.fixture(scope="session")
def livekit_server(tmp_path_factory) -> LiveKitServer:
    """One real livekit-server --dev on loopback for the whole session (rooms keep tests apart)."""
    server = start_livekit_server(tmp_path_factory.mktemp("livekit") / "livekit-server.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def speech_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("speech")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The project's tiny random checkpoint (seed 0), in the real Kyutai on-disk layout."""
    from captions.dev.tiny_checkpoint import make_test_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "tiny-stt"
    make_test_checkpoint(out, seed=0)
    return out


@pytest.fixture(scope="session")
def captions_worker(livekit_server, tiny_checkpoint, tmp_path_factory) -> CaptionsWorker:
    """One real caption worker (3 engine slots, automatic dispatch) for the whole session, in the
    shape a GPU host runs (issue 24): an engine process and two receiving processes, between which
    LiveKit's dispatch places the rooms. The room, storage, viewer and browser tests run on it; the
    tests that start their own worker run the one-process shape."""
    worker = start_captions_worker(livekit_server, tiny_checkpoint, tmp_path_factory.mktemp("worker"), receivers=2)
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def tiny_translation_model(tmp_path_factory) -> Path:
    """Tiny random translation models (seed 0), one CTranslate2 OPUS-MT-style model per ordered pair
    of en, fr, de, es in `SRC-TGT/` subdirectories: what `captions make-test-checkpoint DIR` writes
    into DIR/translation/, and a spec `load_translation_model` reads."""
    from captions.translate.tiny import write_tiny_translation_model

    return write_tiny_translation_model(tmp_path_factory.mktemp("translation") / "translation", seed=0)
