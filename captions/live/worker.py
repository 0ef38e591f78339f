"""`captions worker [dev|start]`: the livekit-agents worker that captions every room it is given.

One process serves every room: livekit-agents' THREAD job executor runs each job (room) in a thread
of this process with its own event loop, so all rooms share the one engine (one model, one GPU)
loaded here before the worker registers with LiveKit; it is therefore never offered a room before
the model is ready. The load it reports is occupied engine slots / B, so that LiveKit offers new
rooms to the worker with room to spare. Speakers beyond B wait in one fair queue across all rooms.

`dev` logs more and never refuses rooms for load (livekit-agents' development defaults); `start`
(the default) is for deployments: it stops taking rooms above the load threshold.

An engine that fails for good (a broken GPU, captions/stt/engine.py) makes the worker unready at
once (/readyz answers 503 with the cause, `captions_engine_broken` is 1), then it stops and exits
with status `EXIT_ENGINE_FAILED`: an orchestrator starts a fresh one, and the other workers' recovery
(recovery.py) gives its rooms a captioner once its heartbeat stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from captions.config import (
    add_caption_secret_option,
    add_livekit_options,
    add_option,
    add_speaker_options,
    device_name,
    language_list,
    non_negative_float,
    non_negative_int,
)
from captions.host.receivers import add_receivers_option, resolve_receivers
from captions.live.metrics import METRICS, Readiness
from captions.log import logger
from captions.stt.model import AUTO_BATCH_SIZE, add_model_options, batch_size
from captions.translate.model import DEFAULT_TRANSLATION_MODEL

if TYPE_CHECKING:
    from captions.live.recovery import Reconciler
    from captions.live.room import RoomCaptioner, RoomOptions
    from captions.live.slots import SlotQueue
    from captions.live.translation import TranslationOptions
    from captions.protocol import CaptionSigner
    from captions.stt.engine import SttEngine
    from captions.translate.engine import TranslationEngine

READY_MESSAGE = "caption worker registered with LiveKit"
"""Logged once the worker can take rooms (`captions up` and the tests wait for it)."""
LOAD_WHEN_FULL = 0.6
"""The load reported with every slot taken. livekit-server (1.13.5) dispatches a new room only while
some worker's load is below its `agents.target_load` (default 0.7), and a room not dispatched when it
is created never gets the agent. So a full worker must still take rooms (their speakers wait in the
visible queue); with several workers, LiveKit picks one weighted by 1 - load, favouring free slots."""
LOAD_THRESHOLD = 0.95
"""livekit-agents' own "full" threshold in `start` mode (it must be below 1 there); never reached."""
EXIT_ENGINE_FAILED = 3
"""The worker's exit status when its engine failed for good (module notes)."""
ENGINE_FAILED_STOP_S = 30.0
"""How long a worker whose engine failed waits for its rooms to close before it exits anyway."""
ENGINE_FAILED_EXIT_S = ENGINE_FAILED_STOP_S + 10.0
"""And when it exits at the latest, whatever is stuck (`engine_failed`'s watchdog)."""


def add_captioning_options(parser: argparse.ArgumentParser) -> None:
    """What the worker captions with; `captions up` passes the same options on to its worker."""
    add_model_options(parser)
    add_option(parser, "--batch-size", env="CAPTIONS_BATCH_SIZE", default="auto", type=batch_size,
               help="engine slots: speakers talking at once across all rooms (more wait in a queue); "
                    f"auto: {AUTO_BATCH_SIZE['cuda']} on a GPU, {AUTO_BATCH_SIZE['cpu']} on a CPU")
    add_option(parser, "--data-dir", env="CAPTIONS_DATA_DIR", default="data", type=Path,
               help="where each room's transcript (<room>.jsonl) is written (the viewer server reads it too)")
    add_option(parser, "--record-dir", env="CAPTIONS_RECORD_DIR", default=None, type=Path,
               help="if set, save the 24 kHz audio each speaker's engine stream consumed (WAV)")
    add_option(parser, "--retention-days", env="CAPTIONS_RETENTION_DAYS", default=30, type=non_negative_int,
               help="delete transcripts (and recordings) not written for this many days; 0 keeps them forever")


def add_translation_options(parser: argparse.ArgumentParser) -> None:
    """Live translation of the captions (captions/live/translation.py, captions/translate/)."""
    add_option(parser, "--translate-to", env="CAPTIONS_TRANSLATE_TO", default="", type=language_list,
               help="languages captions may be translated into, comma-separated (e.g. de,es), each while "
                    "someone in the room reads it; a room's metadata {\"captions\": {\"translate_to\": [...]}} "
                    "picks among them; empty: no translation (no model is loaded)")
    add_option(parser, "--translation-model", env="CAPTIONS_TRANSLATION_MODEL", default=DEFAULT_TRANSLATION_MODEL,
               help="translation model (CTranslate2): a Hugging Face repo id or local directory, a directory of "
                    "one directory per language pair, or a repo id template with {source} and {target}")
    add_option(parser, "--translation-device", env="CAPTIONS_TRANSLATION_DEVICE", default="auto", type=device_name,
               help="device of the translation model: auto (the speech model's --device), cpu, cuda or cuda:N")
    add_option(parser, "--translation-threads", env="CAPTIONS_TRANSLATION_THREADS", default=0, type=non_negative_int,
               help="CPU threads of one translation batch (CTranslate2's intra_threads; 0: the usable cores, "
                    "at most 4); on a CPU shared with the speech model, fewer leave it more")


def speaker_options(args: argparse.Namespace):
    """The speakers' options from the worker's (a receiving process's are the same)."""
    from captions.live.speaker import SpeakerOptions

    return SpeakerOptions(pre_roll_s=args.pre_roll, release_after_s=args.release_after, max_wait_s=args.max_wait,
                          max_turn_hold_s=args.max_turn_hold, live_chunk_ms=args.live_chunk_ms)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mode", nargs="?", choices=["start", "dev"], default="start",
                        help="start (deployments, default) or dev (verbose, never refuses rooms)")
    add_captioning_options(parser)
    add_speaker_options(parser)
    add_receivers_option(parser)
    add_option(parser, "--agent-name", env="CAPTIONS_AGENT_NAME", default="",
               help="explicit dispatch under this name (default: automatic dispatch to every room)")
    add_caption_secret_option(parser)
    add_translation_options(parser)
    add_option(parser, "--reconcile-interval", env="CAPTIONS_RECONCILE_INTERVAL", default=1.5,
               type=non_negative_float, help="seconds between this worker's checks that every room with a "
               "speaker has a live captioner (recovery after crashes and restarts); 0 turns them off")
    add_option(parser, "--health-port", env="CAPTIONS_HEALTH_PORT", default=None, type=int,
               help="worker health-check HTTP port (0: any free port; default 8081 for start, 0 for dev)")
    # Observability (captions/live/metrics.py): Prometheus /metrics, /healthz, /readyz.
    add_option(parser, "--metrics-port", env="CAPTIONS_METRICS_PORT", default=9100, type=int,
               help="port of /metrics, /healthz and /readyz (0 disables them)")
    add_option(parser, "--metrics-host", env="CAPTIONS_METRICS_HOST", default="127.0.0.1",
               help="address of the metrics server (0.0.0.0 in a container)")
    # Diagnostics: per-caption timings for `captions bench latency` (captions/live/timing.py).
    parser.add_argument("--timing-attributes", action="store_true",
                        default=_env_flag("CAPTIONS_TIMING_ATTRIBUTES"),
                        help="diagnostics: attach a captions.timing attribute (receive/step/publish "
                             "times) to every caption stream [env CAPTIONS_TIMING_ATTRIBUTES, default off]")
    parser.add_argument("--unaligned-frames", action="store_true",
                        default=_env_flag("CAPTIONS_UNALIGNED_FRAMES"),
                        help="diagnostics: give up the shared frame clock (each speaker's 80 ms frames "
                             "keep their own phase, up to one step per speaker per 80 ms), for "
                             "comparison benchmarks [env CAPTIONS_UNALIGNED_FRAMES, default off]")
    add_option(parser, "--diagnostics-file", env="CAPTIONS_DIAGNOSTICS_FILE", default=None, type=Path,
               help="diagnostics: on SIGUSR1, append the worker's memory, threads, file descriptors, "
                    "live room objects and livekit FFI handles to this file as a JSON line "
                    "(captions/live/diagnostics.py)")
    add_livekit_options(parser)
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


def _env_flag(env: str) -> bool:
    """An on/off option's default from its environment variable (1/true/yes/on, 0/false/no/off)."""
    value = os.environ.get(env, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise SystemExit(f"error: invalid value for {env}={value!r}: expected true or false")


@dataclass
class CaptionService:
    """What every room's job shares: the engine, the slot queue and the room options."""

    engine: SttEngine
    slots: SlotQueue
    room_options: RoomOptions
    signer: CaptionSigner
    """The worker's caption-signing key, shared by its rooms (captions/protocol.py)."""
    translation: TranslationEngine | None = None
    """The translation engine every room shares (one model); None: no translation."""

    def load(self) -> float:
        """The load livekit-agents reports to LiveKit: occupied slots / B, scaled to LOAD_WHEN_FULL."""
        return LOAD_WHEN_FULL * self.engine.slots_in_use / self.engine.batch_size


_service: CaptionService | None = None
"""Process-wide, set before the worker registers; jobs run as threads of this process."""
READINESS = Readiness()
"""What /readyz reports: model loaded, then registered with LiveKit."""
_engine_failure: str | None = None
"""Why the engine failed for good (module notes); None while it serves."""
_stop_serving: Callable[[], None] | None = None
"""Ends `_serve` from any thread (set while it runs)."""


def not_ready() -> list[str]:
    """What /readyz reports as missing: READINESS's, and a failed engine."""
    missing = READINESS.missing()
    if _engine_failure is not None:
        missing.append(f"engine failed: {_engine_failure}")
    return missing


_engine_failed_event = threading.Event()


def engine_failed(cause: str) -> None:
    """An `engine.broken_listeners` callback (the engine's thread, or its watchdog's): unready now,
    then stop and exit."""
    global _engine_failure
    from captions.live.metrics import TASK_METRICS

    _engine_failure = cause
    TASK_METRICS.engine_broken.set(1)
    _engine_failed_event.set()
    try:
        for captioner in list(_captioners.values()):
            _step_down(captioner)
    finally:
        if _stop_serving is not None:
            _stop_serving()


def _exit_once_engine_failed(delay_s: float) -> None:
    """`serve_rooms`' watchdog (a daemon thread): once the engine failed, the process ends within
    `delay_s` whatever is stuck (a room's job thread that does not end would hold it at the
    interpreter's exit, and keep its participant in the room)."""
    _engine_failed_event.wait()
    time.sleep(delay_s)
    logger.error("the worker did not exit %.0f s after its engine failed: exiting now", delay_s)
    exit_now(EXIT_ENGINE_FAILED)


def _step_down(captioner: RoomCaptioner) -> None:
    """Each captioner steps down at once (`RoomCaptioner.engine_lost`): the recovery need not wait
    for its heartbeat to go stale."""
    try:
        captioner.engine_lost()
    except Exception:  # noqa: BLE001 - the others step down, and the worker stops, regardless
        logger.exception("room %s: could not step down", captioner.room_name)


_captioners: dict[str, RoomCaptioner] = {}
"""The captioner of each running job (by job id), for `_end_room`."""


async def _end_room(ctx) -> None:
    """livekit-agents' session end, while the room is still connected (its shutdown callbacks run
    after it disconnected): the speakers' last words are flushed and published."""
    captioner = _captioners.pop(ctx.job.id, None)
    if captioner is not None:
        await captioner.aclose()


async def _caption_room(ctx) -> None:
    """A job's entrypoint (in the job's own thread and event loop)."""
    from livekit.agents import AutoSubscribe

    from captions.live.room import RoomCaptioner

    assert _service is not None, "the engine is loaded before the worker registers"
    if _engine_failure is not None:  # a job taken as the worker stops: leave it to another worker
        ctx.shutdown(reason=f"engine failed: {_engine_failure}")
        return
    job_started = time.monotonic()
    await ctx.connect(auto_subscribe=AutoSubscribe.AUDIO_ONLY)
    captioner = RoomCaptioner(ctx.room, _service.slots, _service.room_options, _service.signer,
                              on_superseded=lambda: ctx.shutdown(reason="superseded: its heartbeat was late"),
                              translation_engine=_service.translation)
    _captioners[ctx.job.id] = captioner
    if _engine_failure is not None:  # it failed as this job started (engine_failed set it first)
        _step_down(captioner)
    ctx.add_shutdown_callback(captioner.aclose)  # after the room is gone: a safety net
    # Listen first, then ask whether this room is ours: nothing slow (server API calls, attribute
    # updates) stands between joining and receiving audio; what is said meanwhile waits in the room.
    await captioner.start(claiming=True)
    listening_after = time.monotonic() - job_started
    METRICS.room_start_seconds.observe(listening_after)
    logger.info("room %s: listening %.3f s after its job started", ctx.room.name, listening_after)
    if not await captioner.claim():
        # Another captioner has the room (a race between LiveKit's dispatch and a recovery): leave,
        # having published and written nothing.
        _captioners.pop(ctx.job.id, None)
        await captioner.aclose()
        ctx.shutdown(reason="another captioner has this room")
        return
    # Metrics: count the room until its job shuts down.
    METRICS.room_started()

    async def _room_ended() -> None:
        METRICS.room_ended()

    ctx.add_shutdown_callback(_room_ended)
    logger.info("captioning room %s as %s", ctx.room.name, ctx.room.local_participant.identity)


def _load_service(args: argparse.Namespace) -> CaptionService:
    from captions.live.presence import LiveKitCredentials
    from captions.live.room import RoomOptions
    from captions.live.sdk_fixes import start_livekit_runtime
    from captions.live.slots import SlotQueue
    from captions.live.transcripts import start_retention
    from captions.protocol import CaptionSigner
    from captions.stt.engine import SttEngine

    start_livekit_runtime()
    # The translation model first: a wrong spec is said in seconds, not after the speech model's load.
    translation, translation_options = _load_translation(args)
    engine = SttEngine.load(args.model, device=args.device, batch_size=args.batch_size,
                            align_frames=not args.unaligned_frames)
    engine.broken_listeners.append(engine_failed)
    engine.start()
    slots = SlotQueue(engine)
    METRICS.attach_engine(engine, slots)  # metrics read slots/queue at scrape time, step timings live
    args.data_dir.mkdir(parents=True, exist_ok=True)
    if args.record_dir is not None:
        args.record_dir.mkdir(parents=True, exist_ok=True)
    if args.retention_days > 0:
        start_retention([d for d in (args.data_dir, args.record_dir) if d is not None], args.retention_days * 86400)
    options = RoomOptions(args.data_dir, args.record_dir, speaker=speaker_options(args), timing_attributes=args.timing_attributes,
                          livekit=LiveKitCredentials(args.url, args.api_key, args.api_secret),
                          translation=translation_options)
    # The pool's one caption key, the one the viewer server vouches for (captions/protocol.py).
    return CaptionService(engine, slots, options, CaptionSigner.for_deployment(args.caption_secret or args.api_secret,
                                                                                 args.agent_name), translation)


def _load_translation(args: argparse.Namespace, detect_here: bool = True,
                      ) -> tuple[TranslationEngine | None, TranslationOptions]:
    """The translation engine (one model for every room of this worker) and the rooms' options;
    no engine without --translate-to. Raises TranslationModelError (one line) if the model cannot load.
    `detect_here`: this process's rooms detect languages (not so in --receivers' engine process)."""
    from captions.live.translation import STT_LANGUAGES, TranslationOptions

    if not args.translate_to:
        return None, TranslationOptions()
    from captions.translate.engine import TranslationEngine
    from captions.translate.language import warm_up_language_detection
    from captions.translate.model import load_translation_model

    if detect_here:
        warm_up_language_detection(STT_LANGUAGES)  # seconds once here, rather than on a room's loop
    device = args.device if args.translation_device == "auto" else args.translation_device
    pairs = [(source, target) for source in STT_LANGUAGES for target in args.translate_to if source != target]
    model = load_translation_model(args.translation_model, device=device, pairs=pairs,
                                   threads=args.translation_threads)
    engine = TranslationEngine(model)
    # What the model translates into: a room's metadata picks among these.
    available = tuple(sorted({target for _, target in model.pairs}))
    logger.info("translation: %s into %s on %s", args.translation_model, ", ".join(args.translate_to), device)
    return engine, TranslationOptions(targets=args.translate_to, available=available)


def _build_server(args: argparse.Namespace, service: CaptionService):
    from livekit import agents
    from livekit.agents.worker import ServerEnvOption

    from captions.live.sdk_fixes import worker_connected

    dev = args.mode == "dev"
    port = args.health_port if args.health_port is not None else (0 if dev else 8081)
    server = agents.AgentServer(
        job_executor_type=agents.JobExecutorType.THREAD,
        load_fnc=service.load,
        load_threshold=ServerEnvOption(dev_default=float("inf"), prod_default=LOAD_THRESHOLD),
        num_idle_processes=0,
        ws_url=args.url, api_key=args.api_key, api_secret=args.api_secret,
        port=port,
        permissions=agents.WorkerPermissions(can_publish=False, can_subscribe=True, can_publish_data=True,
                                             can_update_metadata=True),
        log_level="DEBUG" if dev else "INFO",
    )
    server.rtc_session(_caption_room, agent_name=args.agent_name, on_session_end=_end_room)
    # Readiness: registered with LiveKit (the model is loaded before the server is built), and still
    # connected (livekit-agents reconnects on its own, then registers again).
    server.on("worker_registered", lambda *_: setattr(READINESS, "registered", True))
    READINESS.connected = lambda: worker_connected(server)
    server.on("worker_registered", lambda worker_id, _info: logger.info("%s (%s)", READY_MESSAGE, worker_id))
    return server


async def _serve(server, dev: bool, reconciler: Reconciler | None) -> None:
    global _stop_serving
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    _stop_serving = functools.partial(loop.call_soon_threadsafe, stop.set)
    if _engine_failure is not None:  # it broke before the loop ran
        stop.set()
    run = asyncio.create_task(server.run(devmode=dev))
    recovery = asyncio.create_task(reconciler.run()) if reconciler is not None else None
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({run, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if recovery is not None:
        recovery.cancel()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # A second Ctrl-C while rooms flush means "now".
        loop.add_signal_handler(sig, lambda: os._exit(130))
    logger.info("stopping: flushing every room's open captions")
    if _engine_failure is None:
        await server.aclose()
    else:
        try:
            await asyncio.wait_for(server.aclose(), ENGINE_FAILED_STOP_S)
        except asyncio.TimeoutError:
            logger.warning("the rooms did not close in %.0f s; exiting anyway", ENGINE_FAILED_STOP_S)
    if run.done() and not run.cancelled() and run.exception() is not None:
        raise run.exception()
    stopped.cancel()


def _start_observability(args: argparse.Namespace):
    """/metrics, /healthz, /readyz before the model loads, so probes see "alive, not ready"."""
    if args.metrics_port == 0:
        return None
    from captions.live.metrics import start_observability_server

    return start_observability_server(args.metrics_host, args.metrics_port, not_ready)


def run(args: argparse.Namespace) -> int:
    global _service
    from captions.config import ConfigError, check_livekit
    from captions.stt.model import CheckpointError
    from captions.translate.model import TranslationModelError

    try:
        # Fail fast, before minutes of model loading: LiveKit must answer with these keys.
        check_livekit(args.url, args.api_key, args.api_secret)
    except ConfigError as e:
        print(f"captions worker: {e}", file=sys.stderr)
        return 2
    args.receivers, chosen = resolve_receivers(args.receivers)
    logger.info("captions worker starting: --receivers %d (%s): %s", args.receivers, chosen,
                "this process takes every room" if args.receivers == 1
                else f"an engine process and {args.receivers} receiving processes")
    if args.receivers > 1:  # this process: the engine only; receiving processes take the rooms
        from captions.host.engine_process import run_engine_process

        status = run_engine_process(args, EXIT_ENGINE_FAILED, _load_translation)
        if status == EXIT_ENGINE_FAILED:
            exit_now(status)  # a hung device's CUDA teardown could hold the interpreter's exit
        return status
    try:
        observability = _start_observability(args)
    except OSError as e:
        problem = (f"cannot serve metrics on {args.metrics_host}:{args.metrics_port}: {e} "
                   "(set --metrics-port/CAPTIONS_METRICS_PORT, 0 disables)")
        if args.mode != "dev":  # a deployment asked for probes: without them it must not start
            print(f"captions worker: {problem}", file=sys.stderr)
            return 2
        logger.warning("%s; going on without them (dev mode)", problem)
        observability = None
    from captions.live.diagnostics import start_diagnostics

    start_diagnostics(args.diagnostics_file)
    try:
        _service = _load_service(args)
    except (CheckpointError, TranslationModelError) as e:
        print(f"captions worker: {e}", file=sys.stderr)
        return 1
    return serve_rooms(args, _service, observability)


def serve_rooms(args: argparse.Namespace, service: CaptionService, observability=None) -> int:
    """Registers with LiveKit and captions the rooms it is given until stopped; the exit status.
    Closes the service (and `observability`) at the end."""
    global _service
    _service = service
    READINESS.model_loaded = True
    mode = "explicit dispatch as " + repr(args.agent_name) if args.agent_name else "automatic dispatch"
    logger.info("worker ready: %d slots, %s, LiveKit at %s", _service.engine.batch_size, mode, args.url)
    threading.Thread(target=_exit_once_engine_failed, args=(ENGINE_FAILED_EXIT_S,), name="engine-failed-exit",
                     daemon=True).start()
    reconciler = None
    if args.reconcile_interval > 0:
        from captions.live.recovery import Reconciler

        reconciler = Reconciler(_service.room_options.livekit, args.agent_name, args.reconcile_interval,
                                active=lambda: not not_ready(), caption_key=_service.signer.public_key)
    try:
        asyncio.run(_serve(_build_server(args, _service), dev=args.mode == "dev", reconciler=reconciler))
    except Exception as e:  # noqa: BLE001 - e.g. LiveKit unreachable after retries: say so, exit 1
        logger.error("worker failed: %s", e)
        return 1
    finally:
        _service.slots.close()
        _service.engine.close()
        if _service.translation is not None:
            _service.translation.close()
        if observability is not None:
            observability.close()
    if _engine_failure is not None:
        print(f"captions worker: engine failed: {_engine_failure}", file=sys.stderr)
        return EXIT_ENGINE_FAILED
    return 0


def exit_now(status: int) -> None:
    """Exits at once: a room's job thread that did not end would otherwise hold the process at the
    interpreter's exit (it joins every thread), and keep its participant in the room, forever. No
    logging.shutdown(): a stuck thread may hold a handler's lock (log records are flushed as written)."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(status)
