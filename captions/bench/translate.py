"""`captions bench translate`: batched translation throughput, and the latency translation adds from
a final caption to its translation with 1, 8 and 32 speakers talking at once.

The model is production-shaped with random weights (as `captions bench engine` does for STT): the
shape and vocabulary size of Helsinki-NLP/opus-mt-en-de (6+6 layers, width 512, 58,101 tokens, tied
embeddings, about 74 M parameters), written in the real CTranslate2 format by
captions/translate/tiny.py and loaded through `load_translation_model` like a converted OPUS-MT
model. A random model never ends a sentence by itself, so </s> is made unreachable and every
translation decodes exactly `ceil(length ratio x source tokens)` tokens: a realistic length for a
translation into German (the ratio is in the JSON), rather than a random one.

Two measurements:

* **throughput**: the same 10-word finals translated one call per caption, then in batches of
  `--max-batch` (what the engine does when they pile up): segments per second;
* **live speakers**: S simulated speakers talk at once, all the time, at random phases. Each says a
  10-word sentence in 3 s (about 200 words a minute) and pauses 0.3 s; while it talks, an interim
  translation of the words so far is asked for every 0.75 s (the bounded rate the worker uses), and
  the final when the sentence ends. Requests go through the real `TranslationEngine` (finals first;
  a newer interim or the final replaces a queued interim of the same sentence; interims alone wait
  `--interim-linger` for others, finals never wait). The figure is the
  time from submitting a final to its translation, p50/p95 (the issue's target: 500 ms at 8
  speakers on this 2-core CPU).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from captions.bench.common import (
    BenchError,
    add_output_options,
    default_cache_dir,
    finish_report,
    machine_description,
    positive_ints,
    report_again,
    save_figure,
    summarize_ms,
)
from captions.config import add_option, device_name
from captions.log import logger
from captions.translate.engine import INTERIM_LINGER_S

TARGET_MS = 500.0
TARGET_SPEAKERS = 8
WORDS = 10
SENTENCE_S = 3.0
PAUSE_S = 0.3
INTERIM_EVERY_S = 0.75
LENGTH_RATIO = 1.2
"""Target tokens per source token (OPUS-MT en->de translations run about 10-30 % longer in pieces)."""
THROUGHPUT_CAPTIONS = 64
SHAPES = ("opus-mt-base", "tiny")


# ---- the model ------------------------------------------------------------------------------------

def _shape(name: str):
    from captions.translate import tiny

    return {"opus-mt-base": tiny.OPUS_MT_BASE, "tiny": tiny.TINY}[name]


def ensure_model(shape_name: str, cache_dir: Path) -> Path:
    """Builds the random en-de model of this shape once (int8 on disk, as `--quantization int8`
    converts); the directory name changes with the generator's source."""
    from captions.translate import tiny

    key = hashlib.sha256(Path(tiny.__file__).read_bytes() + shape_name.encode()).hexdigest()[:12]
    directory = cache_dir / f"translate-{shape_name}-{key}"
    if (directory / "en-de" / "model.bin").is_file():
        return directory
    logger.info("building the %s translation model into %s (once)", shape_name, directory)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".translate-{shape_name}-", dir=cache_dir))
    try:
        tiny.train_tokenizer(partial / "tokenizer.spm")
        tiny.write_marian_model(partial / "en-de", partial / "tokenizer.spm", _shape(shape_name), seed=0,
                                quantization="int8", realistic=True)
        partial.rename(directory)  # atomic: a crash mid-build never leaves a model that looks whole
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return directory


def _captions(tokenizer_path: Path, count: int, seed: int = 0) -> list[str]:
    """`count` different 10-word captions of words that are one piece each, with a comma and a full
    stop: 13 source tokens with </s>, about what OPUS-MT's 58k-piece tokenizer makes of a 10-word
    English sentence (our tokenizer, trained on a page of text, splits most words into letters)."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    words = sorted({p[1:] for p in (processor.id_to_piece(i) for i in range(processor.get_piece_size()))
                    if p.startswith("▁") and len(p) >= 4 and p[1:].isalpha() and p[1:].islower()})
    if len(words) < WORDS:
        raise BenchError(f"the tokenizer has only {len(words)} whole words")
    rng = np.random.default_rng(seed)
    captions = []
    for _ in range(count):
        chosen = list(rng.choice(words, WORDS, replace=False))
        chosen[4] += ","
        captions.append(" ".join(chosen) + ".")
    return captions


# ---- throughput -----------------------------------------------------------------------------------

def measure_throughput(model, captions: list[str], max_batch: int) -> dict:
    from captions.translate import TranslationRequest

    requests = [TranslationRequest(text, "en", "de") for text in captions]
    model.translate_batch(requests[:2])  # warm-up
    start = time.perf_counter()
    for request in requests:
        model.translate_batch([request])
    single_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(0, len(requests), max_batch):
        model.translate_batch(requests[i:i + max_batch])
    batched_s = time.perf_counter() - start
    return {
        "captions": len(requests),
        "one_at_a_time_per_s": round(len(requests) / single_s, 2),
        "one_at_a_time_ms_each": round(1000 * single_s / len(requests), 2),
        "batched_per_s": round(len(requests) / batched_s, 2),
        "batch_size": max_batch,
        "speedup": round(single_s / batched_s, 2),
    }


# ---- live speakers --------------------------------------------------------------------------------

def _schedule(speakers: int, seconds: float, captions: list[str], rng,
              interim_every: float) -> list[tuple[float, int, int, str, bool]]:
    """(time, speaker, sentence, text, final) for every request, in time order; no interims when
    `interim_every` is 0."""
    events = []
    cycle = SENTENCE_S + PAUSE_S
    for speaker in range(speakers):
        t, sentence = float(rng.uniform(0, max(0.0, min(cycle, seconds - SENTENCE_S)))), 0
        while t + SENTENCE_S <= seconds:
            words = captions[(speaker * 7 + sentence) % len(captions)].split()
            for k in range(1, math.ceil(SENTENCE_S / interim_every) if interim_every > 0 else 1):
                heard = max(1, round(WORDS * k * interim_every / SENTENCE_S))
                events.append((t + k * interim_every, speaker, sentence, " ".join(words[:heard]), False))
            events.append((t + SENTENCE_S, speaker, sentence, " ".join(words), True))
            t += cycle
            sentence += 1
    return sorted(events)


def run_speakers(model, speakers: int, seconds: float, captions: list[str], max_batch: int,
                 interim_every: float, interim_linger: float = INTERIM_LINGER_S) -> dict:
    """Drives S speakers' requests into one TranslationEngine in real time; latencies from submit to
    the future's completion (stamped on the engine thread, as the worker's callback would be)."""
    from captions.translate import TranslationEngine

    engine = TranslationEngine(model, max_batch=max_batch, interim_linger_s=interim_linger)
    lock = threading.Lock()
    latencies: dict[bool, list[float]] = {True: [], False: []}
    cancelled = 0

    def on_done(future, submitted: float, final: bool) -> None:
        nonlocal cancelled
        done = time.perf_counter()
        with lock:
            if future.cancelled():
                cancelled += 1
            elif future.exception() is None:
                latencies[final].append(done - submitted)

    events = _schedule(speakers, seconds, captions, np.random.default_rng(speakers), interim_every)
    futures = []
    start = time.perf_counter()
    for at, speaker, sentence, text, final in events:
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        submitted = time.perf_counter()
        future = engine.submit(text, "en", "de", final=final, key=(speaker, sentence))
        future.add_done_callback(lambda f, s=submitted, fin=final: on_done(f, s, fin))
        futures.append(future)
    for future in futures:
        if not future.cancelled():
            future.exception(timeout=120)
    wall_s = time.perf_counter() - start
    counters = engine.counters
    engine.close()
    finals = sum(1 for e in events if e[4])
    if len(latencies[True]) != finals:
        raise BenchError(f"{finals - len(latencies[True])} of {finals} finals were not translated")
    return {
        "speakers": speakers,
        "interim_every_s": interim_every or None,
        "seconds": seconds,
        "finals": finals,
        "interims_asked": len(events) - finals,
        "interims_translated": len(latencies[False]),
        "interims_replaced": cancelled,
        "final_ms": summarize_ms(latencies[True]),
        "interim_ms": summarize_ms(latencies[False]),
        "batches": counters.batches,
        "mean_batch": round((counters.translated + counters.failed) / max(counters.batches, 1), 2),
        "largest_batch": counters.largest_batch,
        "busy_share": round(counters.busy_s / wall_s, 3),
    }


# ---- the command ----------------------------------------------------------------------------------

def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--shape", env="CAPTIONS_BENCH_TRANSLATE_SHAPE", default="opus-mt-base",
               choices=SHAPES, help="model shape: opus-mt-base (production) or tiny (a quick check)")
    add_option(parser, "--model", env="CAPTIONS_BENCH_TRANSLATE_MODEL",
               help="a real en-de translation model to measure instead (directory or repo id)")
    add_option(parser, "--speakers", env="CAPTIONS_BENCH_SPEAKERS", type=positive_ints("speaker counts"),
               default=[1, 8, 32], help="concurrent speakers to simulate, one run each")
    add_option(parser, "--seconds", env="CAPTIONS_BENCH_SECONDS", type=float, default=15.0,
               help="seconds each speaker run lasts")
    add_option(parser, "--interim-every", env="CAPTIONS_BENCH_INTERIM_EVERY", type=float,
               default=INTERIM_EVERY_S, help="seconds between a speaker's interim translations")
    add_option(parser, "--interim-linger", env="CAPTIONS_BENCH_INTERIM_LINGER", type=float,
               default=INTERIM_LINGER_S, help="the engine's interim_linger_s")
    parser.add_argument("--no-finals-only", dest="finals_only", action="store_false",
                        help="skip the second run of each speaker count with finals only (no interims)")
    add_option(parser, "--max-batch", env="CAPTIONS_BENCH_MAX_BATCH", type=int, default=32,
               help="the engine's largest batch")
    add_option(parser, "--compute-type", env="CAPTIONS_TRANSLATION_COMPUTE_TYPE", default="int8",
               help="CTranslate2 compute type (int8, int8_float16, float16, float32, auto)")
    add_option(parser, "--threads", env="CAPTIONS_BENCH_THREADS", type=int, default=0,
               help="CTranslate2 intra_threads (0: the usable cores, at most 4, as the worker)")
    add_option(parser, "--device", env="CAPTIONS_DEVICE", default="cpu", type=device_name,
               help="cpu, cuda, cuda:N or auto")
    add_option(parser, "--cache-dir", env="CAPTIONS_BENCH_CACHE", type=Path, default=default_cache_dir(),
               help="where the built model is kept")
    add_option(parser, "--note", env="CAPTIONS_BENCH_NOTE", default="",
               help="a remark stored in the JSON (for example what else ran on the machine)")
    add_output_options(parser)
    parser.add_argument("--out", dest="json", type=Path, help="the same as --json")
    add_option(parser, "--from-json", env="CAPTIONS_BENCH_FROM_JSON", type=Path,
               help="measure nothing: print the table (and --plot) of an earlier run's JSON")


def run(args: argparse.Namespace) -> int:
    import ctranslate2

    from captions.translate import TranslationModelError, TranslationRequest, load_translation_model
    from captions.translate.model import default_threads

    if args.from_json:
        return report_again("translate", args.from_json, args.plot, plot, markdown_table)
    device = args.device
    if device == "auto":
        device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    try:
        spec = args.model or str(ensure_model(args.shape, args.cache_dir) / "en-de")
        model = load_translation_model(spec, device=device, compute_type=args.compute_type,
                                       pairs=[("en", "de")], threads=args.threads)
    except TranslationModelError as e:
        print(f"captions bench translate: {e}")
        return 1
    model.max_length_ratio, model.max_length_extra = LENGTH_RATIO, 0
    if args.model:  # a real model: real sentences
        from captions.translate.tiny import SENTENCES

        captions = [SENTENCES["en"][i % len(SENTENCES["en"])] for i in range(THROUGHPUT_CAPTIONS)]
    else:
        captions = _captions(Path(spec) / "source.spm", THROUGHPUT_CAPTIONS)
    tokens = float(np.mean([len(model.source_tokens(TranslationRequest(c, "en", "de"))) for c in captions]))
    report = {
        "benchmark": "translate",
        "machine": machine_description(device) | {"ctranslate2": ctranslate2.__version__,
                                                  "cpu_cores_total": os.cpu_count()},
        "note": args.note,
        "model": _describe_model(args, spec, tokens),
        "settings": {
            "compute_type": args.compute_type, "threads": args.threads or default_threads(),
            "max_batch": args.max_batch, "interim_linger_s": args.interim_linger,
            "beam_size": model.beam_size, "words_per_caption": WORDS, "sentence_s": SENTENCE_S,
            "pause_s": PAUSE_S, "interim_every_s": args.interim_every, "seconds_per_run": args.seconds,
            "target": f"final p95 <= {TARGET_MS:.0f} ms at {TARGET_SPEAKERS} speakers",
        },
    }
    logger.info("throughput: %d captions one at a time, then in batches of %d", len(captions), args.max_batch)
    report["throughput"] = measure_throughput(model, captions, args.max_batch)
    report["runs"] = []
    for interim_every in [args.interim_every] + ([0.0] if args.finals_only and args.interim_every else []):
        for speakers in args.speakers:
            logger.info("%d speakers for %.0f s, %s", speakers, args.seconds,
                        f"interims every {interim_every} s" if interim_every else "finals only")
            run_report = run_speakers(model, speakers, args.seconds, captions, args.max_batch, interim_every,
                                      args.interim_linger)
            run_report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
            report["runs"].append(run_report)
    at_target = [r for r in report["runs"] if r["speakers"] == TARGET_SPEAKERS]
    report["target_met"] = at_target[0]["final_ms"]["p95"] <= TARGET_MS if at_target else None
    model.close()
    return finish_report(args, report, plot, markdown_table)


def _describe_model(args: argparse.Namespace, spec: str, source_tokens: float) -> dict:
    from captions.translate import tiny

    if args.model:
        return {"name": args.model, "random_weights": False, "mean_source_tokens": round(source_tokens, 1)}
    shape = _shape(args.shape)
    vocabulary = json.loads((Path(spec) / "shared_vocabulary.json").read_text())
    return {
        "name": args.shape, "family": "opus-mt (Marian)", "random_weights": True,
        "shape_of": "Helsinki-NLP/opus-mt-en-de" if args.shape == "opus-mt-base" else None,
        "d_model": shape.d_model, "layers": shape.layers, "heads": shape.heads, "ffn": shape.ffn,
        "vocab_size": len(vocabulary), "parameters": tiny.parameter_count(shape, len(vocabulary)),
        "stored_as": "int8", "mean_source_tokens": round(source_tokens, 1),
        "decoded_tokens": f"ceil({LENGTH_RATIO} x source tokens of the longest in its batch)",
    }


# ---- reporting ------------------------------------------------------------------------------------

def _p50_p95(summary: dict) -> str:
    return f"{summary['p50']:.0f} / {summary['p95']:.0f}" if summary["count"] else "-"


def markdown_table(report: dict) -> str:
    """The docs' table, generated from the JSON."""
    t = report["throughput"]
    lines = [
        (f"Throughput ({report['model']['name']}, {report['settings']['compute_type']}, "
        f"{report['machine']['device']}): {t['one_at_a_time_per_s']:.1f} captions/s one at a time, "
        f"{t['batched_per_s']:.1f} captions/s in batches of {t['batch_size']} ({t['speedup']:.1f}x)"),
        "",
        ("| speakers | interims | final p50 / p95 (ms) | interim p50 / p95 (ms) | interims translated / "
         "asked | mean batch | engine busy | load after |"),
        "|---:|---|---|---|---|---:|---:|---:|",
    ]
    for r in report["runs"]:
        every = f"every {r['interim_every_s']} s" if r["interim_every_s"] else "none"
        lines.append(f"| {r['speakers']} | {every} | {_p50_p95(r['final_ms'])} | {_p50_p95(r['interim_ms'])} | "
                     f"{r['interims_translated']} / {r['interims_asked']} | {r['mean_batch']:.1f} | "
                     f"{100 * r['busy_share']:.0f} % | {r['load_average_after'][0]:.1f} |")
    if report.get("target_met") is not None:
        lines += ["", f"Target ({report['settings']['target']}): {'met' if report['target_met'] else 'NOT met'}"]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Throughput one at a time vs batched; final (and interim) latency against speakers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    t = report["throughput"]
    left.bar(["one at a time", f"batches of {t['batch_size']}"], [t["one_at_a_time_per_s"], t["batched_per_s"]],
             color=["tab:gray", "tab:blue"])
    left.set_ylabel("10-word captions translated per second")
    left.set_title("Throughput")
    variants = [
        ("final_ms", "final", "tab:blue", lambda r: bool(r["interim_every_s"])),
        ("interim_ms", "interim", "tab:orange", lambda r: bool(r["interim_every_s"])),
        ("final_ms", "final, no interims", "tab:green", lambda r: not r["interim_every_s"]),
    ]
    speakers = sorted({r["speakers"] for r in report["runs"]})
    for key, label, color, chosen in variants:
        runs = [r for r in report["runs"] if chosen(r) and r[key]["count"]]
        if runs:
            xs = [r["speakers"] for r in runs]
            right.plot(xs, [r[key]["p50"] for r in runs], "o-", color=color, label=f"{label} p50")
            right.plot(xs, [r[key]["p95"] for r in runs], "s--", color=color, label=f"{label} p95")
    right.axhline(TARGET_MS, color="tab:red", linestyle=":", label=f"target {TARGET_MS:.0f} ms")
    right.set_xscale("log", base=2)
    right.set_xticks(speakers, [str(s) for s in speakers])
    right.set_xlabel("speakers talking at once")
    right.set_ylabel("submit to translation (ms)")
    right.set_title("Added latency")
    right.legend(fontsize=8)
    machine = report["machine"]
    fig.suptitle(f"captions bench translate: {report['model']['name']} ({report['settings']['compute_type']}) on "
                 f"{machine.get('gpu') or machine['cpu_model']}, {machine['cpu_cores']} cores, load "
                 f"{machine['load_average_at_start'][0]:.1f}", fontsize=9)
    save_figure(fig, path)
