"""Prepares `.device/` (git-ignored) for bench/gpu_check.py, on a machine with espeak-ng and the
project's venv: the tiny checkpoint, speech (the engine tests' three clips, 64 bench streams of
2.5 s), CPU fp32 batch-1 tokens of the clips, and the moshi wheel for the GPU machine's Python.

    uv run python bench/gpu_check_prepare.py && python3 -m pip download --no-deps --only-binary=:all: \\
        --python-version 3.12 --platform manylinux_2_17_x86_64 -d .device/whl moshi==0.2.13
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captions.bench.common import speech_streams
from captions.dev.tiny_checkpoint import make_test_checkpoint
from captions.stt.audio import read_audio_file
from captions.stt.engine import SttEngine
from tests.test_engine import SENTENCES, run_solo

out = Path(".device")
checkpoint = make_test_checkpoint(out / "tiny-stt", seed=0)
with tempfile.TemporaryDirectory() as tmp:
    clips = []
    for i, (text, voice) in enumerate(zip(SENTENCES, ["en", "en-us", "fr"])):
        subprocess.run(["espeak-ng", "-v", voice, "-w", f"{tmp}/{i}.wav", text], check=True)
        clips.append(read_audio_file(f"{tmp}/{i}.wav"))
np.savez_compressed(out / "audio.npz", **{f"clip{i}": c for i, c in enumerate(clips)},
                    streams=np.stack(speech_streams(64, 2.5)))
engine = SttEngine.load(str(checkpoint), device="cpu", batch_size=1)
engine.start()
(out / "cpu_fp32_b1_tokens.json").write_text(json.dumps([run_solo(engine, c).tokens for c in clips]))
engine.close()
