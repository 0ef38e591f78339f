"""`captions speak` against the real stack: it is how a newcomer checks that captions flow."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from captions.dev.livekit_server import start_dev_server

pytestmark = pytest.mark.livekit


def speak(server, room: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "captions.cli", "speak", "--room", room, "--url", server.url,
               "--api-key", server.api_key, "--api-secret", server.api_secret, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)


def test_speak_prints_the_captions_the_agent_published(livekit_server, captions_worker):
    room = f"speak-{uuid.uuid4().hex[:8]}"
    result = speak(livekit_server, room, "Hello everyone, this is a short caption check.")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines and sum(len(line.split()) for line in lines) >= 3
    # The same words are in the room's transcript file, attributed to the bot.
    transcript = (captions_worker.data_dir / f"{room}.jsonl").read_text()
    assert '"participant_identity": "speaker-bot"' in transcript
    assert lines[0] in transcript


def test_speak_says_when_no_caption_agent_is_in_the_room(tmp_path):
    server = start_dev_server(tmp_path / "livekit.log")  # a server no caption worker serves
    try:
        result = speak(server, "empty-room", "--agent-timeout", "3", "Is anybody there?")
    finally:
        server.stop()
    assert result.returncode == 1
    assert "no captions agent in empty-room" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_speak_needs_text_or_a_wav(livekit_server):
    result = speak(livekit_server, "any")
    assert result.returncode == 2 and "give either TEXT or --wav FILE" in result.stderr
