"""`captions transcribe AUDIO`: a file through the same batched engine the live agent uses.

The stream is exactly Kyutai's reference loop: the checkpoint's silence prefix, the audio padded
to whole frames, then the model's delay worth of silence, decoded greedily.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading

import numpy as np

from captions.stt.api import Engine, StreamEvent, Word
from captions.stt.audio import AudioError, read_audio_file
from captions.stt.model import CheckpointError, add_model_options


def transcribe_audio(engine: Engine, audio: np.ndarray) -> list[Word]:
    """Runs one stream through a started engine; returns every word with its times."""
    words: list[Word] = []
    done = threading.Event()
    errors: list[str] = []

    def on_event(event: StreamEvent) -> None:
        words.extend(event.words)
        if event.error:
            errors.append(event.error)
        if event.ended:
            done.set()

    stream = engine.open_stream(on_event)
    stream.push(audio)
    stream.close()
    done.wait()
    if errors:
        raise RuntimeError(errors[0])
    return words


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("audio", help="audio file: wav, mp3, ogg/opus or flac, any rate and channels")
    add_model_options(parser)
    parser.add_argument("--json", action="store_true", help="print words with start/end times as JSON")


def run(args: argparse.Namespace) -> int:
    from captions.stt.engine import SttEngine

    try:
        audio = read_audio_file(args.audio)
        engine = SttEngine.load(args.model, device=args.device, batch_size=1)
    except (AudioError, CheckpointError) as e:
        print(f"captions transcribe: {e}", file=sys.stderr)
        return 1
    engine.start()
    try:
        words = transcribe_audio(engine, audio)
    finally:
        engine.close()
    if args.json:
        print(json.dumps({"text": " ".join(w.text for w in words),
                          "words": [{"text": w.text, "start": round(w.start, 3), "end": round(w.end, 3)}
                                    for w in words]}, ensure_ascii=False, indent=2))
    else:
        print(" ".join(w.text for w in words))
    return 0
