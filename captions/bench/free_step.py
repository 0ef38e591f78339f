"""`--engine-step free`: the real engine with a model step that costs no CPU.

The tiny test checkpoint's step at B = 64 takes tens of ms of this CPU, which starves what a
benchmark means to measure (the host path, the frame clock). With `free`, the real `SttEngine`
(slots, frame clock, word decoder, events) runs as always and the model's compute is replaced by a
fixed token pattern after a wait that holds no CPU and no interpreter lock, as the engine thread
sees a GPU's step. The GPU's own cost is `captions bench engine`'s.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from captions.config import add_option

ENGINE_STEPS = ("model", "free")
"""`--engine-step`: the checkpoint's model runs each step, or a fixed token pattern stands in for it."""
FREE_STEP_MS = 12.5
"""With `--engine-step free`, each step's wait by default: one H200's step at B=64 with the production
shape (bench/gpu-h200-2026-12-04.json). While the GPU steps, frames of the next tick complete and
join the next step; a step that took no time at all would step every group apart."""
FREE_WORD_STEPS = 5
"""With `--engine-step free`, each stream starts a word every this many frames of its audio."""


def add_engine_step_options(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--engine-step", env="CAPTIONS_BENCH_ENGINE_STEP", choices=ENGINE_STEPS, default="model",
               help="model: the checkpoint's Mimi and LM run each step (on this CPU); free: the real engine "
                    "(slots, frame clock, word decoder, events) with the model's compute replaced by a fixed "
                    "token pattern and a wait of --free-step-ms without CPU (a GPU's step, as the engine thread "
                    "sees it), so that a CPU-only machine measures at batch sizes whose model step it could "
                    "not afford (the GPU's own cost: bench engine)")
    add_option(parser, "--free-step-ms", env="CAPTIONS_BENCH_FREE_STEP_MS", type=float, default=FREE_STEP_MS,
               help="with --engine-step free, how long each step waits (default: one H200's B=64 step, "
                    "bench/gpu-h200-2026-12-04.json)")


def make_step_free(engine, step_ms: float = FREE_STEP_MS) -> None:
    """Replaces `engine`'s model step by a pattern (an end of padding, a word piece, then padding,
    every FREE_WORD_STEPS frames of each stream's audio) after a wait of `step_ms` that costs no CPU
    (the GIL let go, as while a GPU steps); everything around the step is unchanged."""
    from captions.stt.api import StepTimings

    padding, tokenizer = engine.model.padding_id, engine.model.tokenizer
    word = next(i for i in range(tokenizer.get_piece_size())  # the first piece that starts a word
                if tokenizer.id_to_piece(i).startswith("\u2581") and len(tokenizer.id_to_piece(i)) > 1)
    wait_s = step_ms / 1000

    def free_step(batch, reset):
        time.sleep(wait_s)
        tokens = np.full(engine.batch_size, padding, dtype=np.int64)
        for slot, _ in batch:
            phase = slot.audio_frames % FREE_WORD_STEPS
            tokens[slot.index] = 0 if phase == 0 else word if phase == 1 else padding
        return tokens, np.zeros(engine.batch_size, dtype=np.float32), StepTimings(len(batch), 0.0, 0.0, 0.0, 0.0)

    engine._run_model = free_step  # the one private hook: the step's compute, nothing around it
