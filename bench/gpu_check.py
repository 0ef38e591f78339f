"""GPU check of the engine on CUDA (bf16 LM, CUDA graphs), for a GPU machine without the hub or
espeak-ng: run bench/gpu_check_prepare.py first where both are, carry `.device/` over, then from
the repo root: `pip install .device/whl/*.whl; OUT=dir python3 bench/gpu_check.py` (writes
OUT/gpu_check.json). GPU_CHECK_PARTS (correctness,throughput) and GPU_CHECK_SIZES (batch sizes)
choose what runs; GPU_CHECK_DEVICE=cpu GPU_CHECK_SMALL=1 tries the script itself on a CPU.

1. correctness: tiny checkpoint, B=4 on CUDA, turns at random phases and with kept audio (as the
   spurt property test), each compared with its solo run on the same engine; CUDA B=1 vs CPU fp32.
2. throughput and memory: a random-weight checkpoint of production shape (full Mimi, 1B-shaped LM:
   dim 2048, 16 layers, 16 heads, VAD heads; text_card 256 for the tiny tokenizer), written in the
   real layout and loaded by load_stt_model; bench_batched at several B.
"""
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
OUT = Path(os.environ.get("OUT", "/tmp/out"))
DEV = os.environ.get("GPU_CHECK_DEVICE", "cuda")
SMALL = bool(os.environ.get("GPU_CHECK_SMALL"))
report: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu"}


def save():
    (OUT / "gpu_check.json").write_text(json.dumps(report, indent=1))


from captions.stt.engine import SttEngine  # noqa: E402
from tests.engine_drive import FRAME, TICK_SAMPLES, drive_spurts, run_solo  # noqa: E402

audio = np.load(".device/audio.npz")
clips = [audio[f"clip{i}"] for i in range(3)]


def correctness():
    t0 = time.perf_counter()
    e4 = SttEngine.load(".device/tiny-stt", device=DEV, batch_size=4)
    e4.start()
    e1 = SttEngine.load(".device/tiny-stt", device=DEV, batch_size=1)
    e1.start()
    cpu = json.loads(Path(".device/cpu_fp32_b1_tokens.json").read_text())
    cuda_b1 = [run_solo(e1, c).tokens for c in clips]
    same = sum(a == b for x, y in zip(cpu, cuda_b1) for a, b in zip(x, y))
    total = sum(len(x) for x in cpu)
    result = {"cuda_b1_vs_cpu_fp32_tokens_equal": f"{same}/{total}", "load_s": round(time.perf_counter() - t0, 1)}
    speech = np.concatenate([clips[0], clips[2]])[: FRAME * 30]
    rng = np.random.default_rng(0)
    turns = mismatched = b1_differs = 0
    examples = 0
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and examples < (2 if SMALL else 60):
        cuts = sorted({int(c) for c in rng.integers(TICK_SAMPLES, FRAME * 30 - TICK_SAMPLES, int(rng.integers(1, 4)))})
        starts = [int(x) for x in rng.integers(0, 31, 4)]
        backlogs = [int(x) for x in rng.integers(0, 61, 4)]
        spurts = [s for s in np.split(speech, cuts) if s.size]
        cols = drive_spurts(e4, spurts, starts[:len(spurts)], backlogs[:len(spurts)])
        examples += 1
        for spurt, c in zip(spurts, cols):
            lead = c.events[-1].lead_samples
            x = np.concatenate([np.zeros(lead, np.float32), spurt])
            x = np.concatenate([x, np.zeros(-x.size % FRAME, np.float32)])
            turns += 1
            solo = run_solo(e4, x).tokens
            if c.tokens != solo:
                mismatched += 1
                result.setdefault("mismatches", []).append({"cuts": cuts, "starts": starts, "backlogs": backlogs,
                                                            "lead": lead, "batched": c.tokens, "solo": solo})
            b1_differs += run_solo(e1, x).tokens != solo
    result.update(examples=examples, turns=turns, turns_differing_from_solo_same_engine=mismatched,
                  turns_where_b1_differs_from_b4=b1_differs, steps_b4=e4.steps, failed_steps=e4.failed_steps)
    e4.close()
    e1.close()
    return result


def write_production_shaped(out: Path):
    from moshi.models.loaders import _mimi_config, get_mimi, get_moshi_lm
    from safetensors.torch import save_file

    from captions.dev.tiny_checkpoint import _lm_config, lm_kwargs

    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(Path(".device/tiny-stt/tokenizer.model").read_bytes())
    config = _lm_config(256, 2048, 32, 64 if SMALL else 2048, 2 if SMALL else 16, 4 if SMALL else 16, 0.5, 0.0, True)
    config["hidden_scale"] = 4.125  # stt-1b-en_fr's feed-forward width (990 M parameters with n_q 32)
    mimi = get_mimi(None, device=DEV, num_codebooks=32)
    save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, str(out / "mimi.safetensors"))
    (out / "mimi_config.json").write_text(json.dumps(_mimi_config))
    torch.manual_seed(0)
    lm = get_moshi_lm(None, lm_kwargs(config), device=DEV, dtype=torch.bfloat16 if DEV == "cuda" else torch.float32)
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config))
    del mimi, lm
    if DEV == "cuda":
        torch.cuda.empty_cache()


def throughput(sizes):
    from captions.bench.engine import _share_weights, bench_batched, describe_checkpoint
    from captions.stt.model import load_stt_model

    cuda = DEV == "cuda"

    directory = Path("/tmp/prod-shaped")
    t0 = time.perf_counter()
    write_production_shaped(directory)
    model = load_stt_model(str(directory), DEV)
    result = {"write_and_load_s": round(time.perf_counter() - t0, 1),
              "checkpoint": describe_checkpoint("production-shaped-random", directory, model),
              "weights_gib": round(torch.cuda.memory_allocated() / 2**30, 3) if cuda else None, "runs": []}
    streams = [audio["streams"][i % len(audio["streams"])] for i in range(max(sizes))]
    engine = SttEngine(_share_weights(model), 8)
    engine.warm_up()
    state = engine.model.mimi._streaming_state
    result["cuda_graphs"] = {"mimi_encoder_disabled": state.graphed_encoder.disable,
                             "mimi_encoder_captured": state.graphed_encoder._graph is not None,
                             "lm_disabled": engine._lm_gen._streaming_state.graphed_main.disable,
                             "lm_captured": engine._lm_gen._streaming_state.graphed_main._graph is not None,
                             "mimi_dtype": str(next(engine.model.mimi.parameters()).dtype),
                             "lm_dtype": str(next(model.lm.parameters()).dtype)}
    print(result["cuda_graphs"], flush=True)
    del engine
    for b in sizes:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else 0
        t = time.perf_counter()
        run = bench_batched(model, streams[:b], timeout_s=120)
        run["peak_extra_gib"] = round((torch.cuda.max_memory_allocated() - before) / 2**30, 3) if cuda else None
        run["run_s"] = round(time.perf_counter() - t, 1)
        result["runs"].append({"batch_size": b, "batched": run})
        print(f"B={b}: step {run['step_ms']['mean']:.2f} ms (p95 {run['step_ms']['p95']:.2f}), encode "
              f"{100 * run['encode_share']:.0f}% LM {100 * run['lm_share']:.0f}% host {100 * run['host_share']:.1f}%,"
              f" {run['streams_realtime']:.1f} streams in real time, peak extra {run['peak_extra_gib']} GiB", flush=True)
        report["throughput"] = result
        save()
    return result


SIZES = [int(x) for x in os.environ.get("GPU_CHECK_SIZES", "1,8,32,64").split(",")]
PARTS = os.environ.get("GPU_CHECK_PARTS", "correctness,throughput").split(",")
for name, part in (("correctness", correctness), ("throughput", lambda: throughput(SIZES))):
    if name not in PARTS:
        continue
    t = time.perf_counter()
    try:
        report[name] = part()
    except Exception:  # noqa: BLE001 - report it in the JSON and go on to the next part
        report[name + "_error"] = traceback.format_exc()
        print(traceback.format_exc(), flush=True)
    report[name + "_s"] = round(time.perf_counter() - t, 1)
    print(name, json.dumps({k: v for k, v in report.items() if k != "throughput"}, default=str)[:3000], flush=True)
    save()
