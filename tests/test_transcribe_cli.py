"""`captions transcribe` as a user runs it: formats, output modes, and one clear line on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import wave

import pytest

from tests.conftest import espeak_wav

pytestmark = pytest.mark.slow


def captions(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "captions.cli", *args], check=False, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def speech_24k(speech_dir):
    return espeak_wav("Welcome to the captions demo, thanks for joining us today.", speech_dir / "cli.wav")


def test_plain_text_and_json_agree(tiny_checkpoint, speech_24k):
    plain = captions("transcribe", str(speech_24k), "--model", str(tiny_checkpoint), "--device", "cpu")
    assert plain.returncode == 0, plain.stderr
    text = plain.stdout.strip()
    assert len(text.split()) >= 3
    assert "INFO" not in plain.stdout, "logs belong on stderr"
    as_json = captions("transcribe", str(speech_24k), "--model", str(tiny_checkpoint), "--json")
    result = json.loads(as_json.stdout)
    assert result["text"] == text
    assert " ".join(w["text"] for w in result["words"]) == text
    assert all(w["start"] <= w["end"] for w in result["words"])


@pytest.mark.parametrize("suffix,sox_args", [
    pytest.param(".flac", ["-r", "48000", "-c", "2"], id="flac-48k-stereo"),
    pytest.param(".ogg", ["-r", "16000", "-c", "1"], id="ogg-16k"),
    pytest.param(".mp3", ["-r", "44100", "-c", "2"], id="mp3-44k-stereo"),
])
def test_common_formats_any_rate_and_channels(tiny_checkpoint, speech_24k, tmp_path, suffix, sox_args):
    converted = tmp_path / f"speech{suffix}"
    subprocess.run(["sox", str(speech_24k), *sox_args, str(converted)], check=True)
    result = captions("transcribe", str(converted), "--model", str(tiny_checkpoint))
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) >= 3


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_missing_file(tiny_checkpoint, tmp_path):
    line = _one_error_line(captions("transcribe", str(tmp_path / "nope.wav"), "--model", str(tiny_checkpoint)))
    assert "nope.wav: no such file" in line


def test_not_audio(tiny_checkpoint, tmp_path):
    bogus = tmp_path / "notes.wav"
    bogus.write_text("this is not audio")
    assert "not a readable audio file" in _one_error_line(
        captions("transcribe", str(bogus), "--model", str(tiny_checkpoint)))


def test_empty_audio(tiny_checkpoint, tmp_path):
    empty = tmp_path / "empty.wav"
    with wave.open(str(empty), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(24000)
    line = _one_error_line(captions("transcribe", str(empty), "--model", str(tiny_checkpoint)))
    assert "no audio" in line or "not a readable audio file" in line


def test_unreadable_checkpoint(tmp_path, speech_24k):
    broken = tmp_path / "broken-ckpt"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert "cannot read" in _one_error_line(captions("transcribe", str(speech_24k), "--model", str(broken)))
    (broken / "config.json").write_text(json.dumps({"moshi_name": "model.safetensors"}))
    assert "incomplete, missing" in _one_error_line(
        captions("transcribe", str(speech_24k), "--model", str(broken)))
    missing = _one_error_line(captions("transcribe", str(speech_24k), "--model", str(tmp_path / "nowhere")))
    assert "does not exist" in missing
