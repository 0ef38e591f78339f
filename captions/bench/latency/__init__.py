"""`captions bench latency`: how long a spoken word takes to reach a viewer, through a real server.

For each speaker count N: a livekit-server --dev on free loopback ports, the real worker as a
subprocess (`captions worker dev --batch-size N --timing-attributes`), N publisher bots speaking
espeak-ng speech in real time into one room, and one hidden subscriber collecting the
`lk.transcription` streams. Every clock is this machine's time.time().

Latency of a caption update that adds a word = its arrival at the subscriber minus the capture
time of the last audio frame the model had consumed when it emitted the update. The worker's
`captions.timing` attribute (captions/live/timing.py) splits it:

    transport   frame received by the agent (rtc.AudioStream)  - frame captured at the publisher
    queue       engine step started                             - frame received
    step        engine step ended (tokens decoded)              - step started
    agent       caption handed to LiveKit (stream_text)         - step ended
                (= event hop to the room's loop + waiting in the room's publish queue)
    delivery    caption read whole by the subscriber            - handed to LiveKit

Aligning the publisher's audio with the agent's stream: the bots send digital silence until the
agent has subscribed to every microphone, then a fixed lead-in, then speech. The speech starts at
clip sample s0 (first |sample| > ONSET_THRESHOLD) captured at known wall time; the agent's engine
stream starts with the speech gate's pre-roll before it (captions/live/speaker.py) and the agent
reports the index of its stream's first such sample (`onset_sample`), so stream sample p was captured at
T(s0) + (p - onset) / 24000. The sender or the receiver's jitter buffer may insert or drop samples
later on, so the worker's recording of each stream is cross-correlated with the clip every 0.5 s
and the shift measured there replaces the onset's (its error and drift are reported).

The bots (a child process) are microphones: the 20 ms holding timeline samples [480 j, 480 j + 480)
are complete (captured) at origin + (j + 1) * 20 ms and are handed to WebRTC then, with no queue in
between; the bots' lateness against that schedule is reported (it counts as transport, as a slow
sender would).

With `--translate de` (issue 26), each speaker count is measured twice in the same run, on the same
livekit-server: a worker without translation, then one with `--translate-to de` whose captioner is
told through the server API that the room reads German (``captions.reading``, as the viewer server's
hidden relay does), so every final and interims at their bounded rate are translated while the bots
speak. The originals' latency is compared between the two, and each translated final's arrival is
measured after its original's. With the tiny checkpoint, the tiny random translation models are used
(built once beside it), unless --translation-model says otherwise.

The model's own text delay (0.5 s for stt-1b-en_fr, learnt: the model waits that long before
writing a word) is not in these figures: it is reported beside them. The tiny test checkpoint
answers at once (see tiny_checkpoint.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from captions.bench.common import (
    BenchError,
    add_output_options,
    add_test_checkpoint_options,
    finish_report,
    frame_modes,
    machine_description,
    positive_ints,
    report_again,
    resolve_test_checkpoint,
)
from captions.bench.latency.alignment import alignment_summary, speaker_alignments
from captions.bench.latency.report import (
    latency_records,
    markdown_table,
    model_text_delay_s,
    plot,
    summarize_run,
    targets,
    translation_comparisons,
)
from captions.bench.latency.session import run_session
from captions.bench.latency.speakers import TICK_S, BotFailed, speech_clips
from captions.config import add_option, language_list, non_negative_int, positive_int
from captions.log import logger
from captions.stt.api import SAMPLE_RATE

RUN_ATTEMPTS = 2
MIN_SILENCE_BEFORE_ONSET_S = 0.1
"""The engine stream must hold some silence before the speech (the onset is found in it)."""


async def _measure_all(args: argparse.Namespace, checkpoint: Path, workdir: Path,
                       translation_model: Path | str | None, runs: list[dict]) -> None:
    """Every measurement, each appended to `runs` as it ends (a later failure keeps the earlier)."""
    from captions.dev.livekit_server import start_dev_server

    clips = speech_clips(max(args.speakers), args.seconds)
    server = await asyncio.to_thread(start_dev_server, workdir / "livekit-server.log")
    try:
        for n in args.speakers:
            for frames in args.frames:
                if not args.translate:
                    runs.append(await _measure(args, server, checkpoint, workdir, clips[:n], frames))
                    continue
                # Without and with translation, same clips, one right after the other; each round
                # swaps which goes first, so that a load changing meanwhile weighs on both alike.
                for index in range(args.rounds):
                    for translate in ((), args.translate) if index % 2 == 0 else (args.translate, ()):
                        run = await _measure(args, server, checkpoint, workdir, clips[:n], frames, translate,
                                             translation_model if translate else None, index + 1)
                        run["round"] = index + 1
                        runs.append(run)
    finally:
        await asyncio.to_thread(server.stop)


async def _measure(args: argparse.Namespace, server, checkpoint: Path, workdir: Path, clips: list[np.ndarray],
                   frames: str, translate: tuple[str, ...] = (), translation_model: Path | str | None = None,
                   round_: int = 1) -> dict:
    """One speaker count with one frame mode (translating into `translate`, or not): a fresh worker,
    the bots, the analysis."""
    from captions.dev.worker_process import start_captions_worker

    n = len(clips)
    worker_args = ("--timing-attributes", *(("--unaligned-frames",) if frames == "unaligned" else ()))
    if translate:
        worker_args += ("--translation-threads", str(args.translation_threads))
    mode = f"{frames} frames" + (f", translating into {','.join(translate)}" if translate else "")
    logger.info("latency with %d speakers (%s): starting a worker with %d slots", n, mode, n)
    for attempt in range(1, RUN_ATTEMPTS + 1):
        workdir_n = workdir / (f"worker-{n}-{frames}{'-' + '-'.join(translate) if translate else ''}"
                               f"{f'-round{round_}' if round_ > 1 else ''}-{attempt}")
        worker = await asyncio.to_thread(start_captions_worker, server, checkpoint, workdir_n, n, worker_args,
                                         translate_to=",".join(translate), translation_model=translation_model)
        try:
            session = await run_session(server, worker, clips, args.lead_in, args.tail, args.timeout, workdir_n,
                                        args.bots_per_process, translate)
            break
        except BotFailed as e:
            # A bot's WebRTC library crashed (seen once, under heavy load): say so, run again.
            if attempt == RUN_ATTEMPTS:
                raise
            logger.warning("%d speakers, attempt %d: %s; running again", n, attempt, e)
        finally:
            await asyncio.to_thread(worker.stop)
    alignments = speaker_alignments(session, worker.record_dir)
    records, skipped = latency_records(session, alignments)
    if not records:
        raise BenchError(f"no caption with timings arrived with {n} speakers; see {worker.log_path}")
    onsets = [r["onset_sample"] for r in records]
    if min(onsets) < MIN_SILENCE_BEFORE_ONSET_S * SAMPLE_RATE:
        raise BenchError("a speaker's engine stream began less than "
                         f"{MIN_SILENCE_BEFORE_ONSET_S} s before their speech (onset at sample {min(onsets)}): "
                         "the speech gate's pre-roll should cover that (see --pre-roll)")
    run = summarize_run(session, records, skipped, alignment_summary(alignments, n))
    run["frames"] = frames
    run["attempt"] = attempt
    logger.info("%d speakers, %s: %d word updates, total p50 %.1f / p95 %.1f / p99 %.1f ms, "
                "%.1f steps/s, load %s > %s", n, mode, run["word_updates"], run["latency_ms"]["total"]["p50"],
                run["latency_ms"]["total"]["p95"], run["latency_ms"]["total"]["p99"],
                run["engine"]["steps_per_s"] or 0.0, run["load_average_before"], run["load_average_after"])
    if translate:
        for language, stats in run["translation"]["per_language"].items():
            logger.info("%d speakers, into %s: %d of %d finals translated (%d untranslated), after their "
                        "originals p50 %s / p95 %s ms", n, language, stats["translated_finals"],
                        stats["original_finals"], stats["untranslated_finals"], stats["final_delay_ms"]["p50"],
                        stats["final_delay_ms"]["p95"])
    return run


def _translation_model(args: argparse.Namespace, checkpoint: Path) -> Path | str | None:
    """--translation-model; else the checkpoint's own translation/ (make-test-checkpoint writes one);
    else, with the tiny checkpoint, the tiny random translation models (built once); else the
    worker's default model."""
    from captions.dev.tiny_checkpoint import TRANSLATION_SUBDIR
    from captions.translate.model import DEFAULT_TRANSLATION_MODEL

    if not args.translate:
        return None
    if args.translation_model:
        return args.translation_model
    if (checkpoint / TRANSLATION_SUBDIR).is_dir():
        return checkpoint / TRANSLATION_SUBDIR
    if not args.model:
        return _tiny_translation_model(args.cache_dir)
    return DEFAULT_TRANSLATION_MODEL


def _tiny_translation_model(cache_dir: Path) -> Path:
    """The tiny random translation models (seed 0), built once into the cache; the directory name
    changes with their generator's source."""
    import hashlib

    from captions.translate import tiny

    key = hashlib.sha256(Path(tiny.__file__).read_bytes()).hexdigest()[:12]
    directory = cache_dir / f"tiny-translation-{key}"
    if (directory / "languages.json").is_file():
        return directory
    logger.info("building the tiny translation models into %s (once)", directory)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".tiny-translation-", dir=cache_dir))
    tiny.write_tiny_translation_model(partial, seed=0)
    partial.rename(directory)  # atomic: a crash mid-build never leaves models that look whole
    return directory


# ---- command line ---------------------------------------------------------------------------------

def _seconds(text: str) -> float:
    value = float(text)
    if not 1.0 <= value <= 600:
        raise argparse.ArgumentTypeError(f"seconds of speech must be between 1 and 600, got {text}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--speakers", env="CAPTIONS_BENCH_SPEAKERS", type=positive_ints("speaker counts"), default=[1, 8, 32],
               help="speaker counts; each runs that many bots at once, with as many engine slots")
    add_option(parser, "--frames", env="CAPTIONS_BENCH_FRAMES", type=frame_modes, default=["shared"],
               help="frame clocks to measure, comma-separated: shared (the worker's default: every "
                    "speaker's frames on one clock) and/or unaligned (each speaker its own phase, as before)")
    add_option(parser, "--bots-per-process", env="CAPTIONS_BENCH_BOTS_PER_PROCESS", type=positive_int,
               default=2, help="speaker bots sharing one process (and one WebRTC stack)")
    add_option(parser, "--seconds", env="CAPTIONS_BENCH_SECONDS", type=_seconds, default=20.0,
               help="seconds of speech per speaker")
    add_test_checkpoint_options(parser, "local checkpoint directory for the worker")
    add_option(parser, "--translate", env="CAPTIONS_BENCH_TRANSLATE", type=language_list, default=(),
               help="languages (e.g. de): measure each speaker count twice in one run, without translation "
                    "and then with the worker translating into these for a reader in the room, and compare "
                    "the original captions' latency; default: no translation")
    add_option(parser, "--rounds", env="CAPTIONS_BENCH_ROUNDS", type=positive_int, default=1,
               help="with --translate: measure without and with translation this many times, each round "
                    "swapping which goes first (a load that changes during the run then weighs on both alike)")
    add_option(parser, "--translation-model", env="CAPTIONS_BENCH_TRANSLATION_MODEL", default=None,
               help="the worker's --translation-model with --translate (default: the checkpoint's "
                    "translation/ directory, or with the tiny checkpoint the tiny random models)")
    add_option(parser, "--translation-threads", env="CAPTIONS_BENCH_TRANSLATION_THREADS", type=non_negative_int,
               default=0, help="the translating worker's --translation-threads (0: CTranslate2's default)")
    add_option(parser, "--lead-in", env="CAPTIONS_BENCH_LEAD_IN", type=float, default=1.0,
               help="seconds of silence between the agent's subscription and the speech")
    add_option(parser, "--tail", env="CAPTIONS_BENCH_TAIL", type=float, default=1.5,
               help="seconds of silence after the speech, before the bots leave")
    add_option(parser, "--timeout", env="CAPTIONS_BENCH_TIMEOUT", type=float, default=300.0,
               help="give up on one speaker count after this many seconds")
    add_option(parser, "--workdir", env="CAPTIONS_BENCH_WORKDIR", type=Path, default=None,
               help="keep the server and worker logs and recordings here (default: a temporary directory)")
    add_output_options(parser)
    add_option(parser, "--from-json", env="CAPTIONS_BENCH_FROM_JSON", type=Path,
               help="measure nothing: print the tables (and --plot) of an earlier run's JSON")


def run(args: argparse.Namespace) -> int:
    from captions.dev.livekit_server import find_livekit_server
    from captions.stt.model import CheckpointError

    if args.from_json:
        return report_again("latency", args.from_json, args.plot, plot, markdown_table)
    runs: list[dict] = []
    try:
        if find_livekit_server() is None:
            raise BenchError("livekit-server is missing: run `captions server --install-only`")
        checkpoint = resolve_test_checkpoint(args)
        translation_model = _translation_model(args, checkpoint)
        with contextlib.ExitStack() as stack:
            workdir = args.workdir
            if workdir is None:
                workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-latency-")))
            workdir.mkdir(parents=True, exist_ok=True)
            machine = machine_description("cpu")
            asyncio.run(_measure_all(args, checkpoint, workdir, translation_model, runs))
    except (BenchError, CheckpointError, RuntimeError, subprocess.CalledProcessError) as e:
        print(f"captions bench latency: {e}", file=sys.stderr)
        if runs:  # what was measured before the failure is kept, marked incomplete
            report = _report(args, machine, checkpoint, translation_model, runs)
            report["incomplete"] = str(e)
            finish_report(args, report, plot, markdown_table)
        return 1
    return finish_report(args, _report(args, machine, checkpoint, translation_model, runs), plot, markdown_table)


def _report(args: argparse.Namespace, machine: dict, checkpoint: Path, translation_model: Path | str | None,
            runs: list[dict]) -> dict:
    report = {"benchmark": "latency", "machine": machine}
    report.update({
        "settings": {"speakers": args.speakers, "frames": args.frames, "seconds_per_speaker": args.seconds,
                     "lead_in_s": args.lead_in, "tail_s": args.tail, "publisher_frame_ms": TICK_S * 1000,
                     "checkpoint": str(checkpoint),
                     "translate": list(args.translate),
                     "rounds": args.rounds if args.translate else None,
                     "translation_model": str(translation_model) if translation_model else None,
                     "translation_threads": args.translation_threads if args.translate else None,
                     "worker": "captions worker dev --device cpu --batch-size <speakers> "
                               "--timing-attributes [--unaligned-frames]"
                               + (" [--translate-to <translate> --translation-model <translation_model> "
                                  "--translation-device cpu --translation-threads <translation_threads>]"
                                  if args.translate else "")},
        "model_text_delay_s": model_text_delay_s(checkpoint),
        "model_text_delay_note": (
            "the model's learnt wait before writing a word; not included in the figures (each is measured "
            "from the last frame the model consumed). The tiny test checkpoint does not actually wait; "
            "stt-1b-en_fr adds 0.5 s per word."),
        "definitions": {
            "total": "caption read whole at the subscriber - capture of the end of the last audio frame the "
                     "engine consumed before emitting it (word-adding updates only)",
            "transport": "frame received from rtc.AudioStream by the agent - its capture at the publisher",
            "queue": "engine step start - frame received", "step": "engine step end - start",
            "agent": "caption handed to LiveKit - step end (agent_hop: to the room's loop; "
                     "agent_publish_queue: the rest)",
            "delivery": "caption read whole by the subscriber - handed to LiveKit",
        },
        "runs": runs,
        "targets": targets(runs),
    })
    if args.translate:
        report["definitions"]["translated_final_delay"] = (
            "a translated final's arrival at the subscriber - its original final's arrival (both read whole)")
        report["translation_comparisons"] = translation_comparisons(runs)
    return report


