"""`captions worker [dev|start]`: the livekit-agents worker that captions every room it is given.

One process serves every room: livekit-agents' THREAD job executor runs each job (room) in a thread
of this process with its own event loop, so all rooms share the one engine (one model, one GPU)
loaded here before the worker registers with LiveKit; it is therefore never offered a room before
the model is ready. The load it reports is occupied engine slots / B, so that LiveKit offers new
rooms to the worker with room to spare. Speakers beyond B wait in one fair queue across all rooms.

`dev` logs more and never refuses rooms for load (livekit-agents' development defaults); `start`
(the default) is for deployments: it stops taking rooms above the load threshold.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from captions.config import add_livekit_options, add_option, positive_int
from captions.live.metrics import METRICS, Readiness
from captions.log import logger
from captions.stt.model import add_model_options

if TYPE_CHECKING:
    from captions.live.room import RoomOptions
    from captions.live.slots import SlotQueue
    from captions.stt.engine import SttEngine

READY_MESSAGE = "caption worker registered with LiveKit"
"""Logged once the worker can take rooms (`captions up` and the tests wait for it)."""
LOAD_WHEN_FULL = 0.6
"""The load reported with every slot taken. livekit-server (1.13.5) dispatches a new room only while
some worker's load is below its `agents.target_load` (default 0.7), and a room not dispatched when it
is created never gets the agent. So a full worker must still take rooms (their speakers wait in the
visible queue); with several workers, LiveKit picks one weighted by 1 - load, favouring free slots."""
LOAD_THRESHOLD = 0.95
"""livekit-agents' own "full" threshold in `start` mode (it must be below 1 there); never reached."""


def add_captioning_options(parser: argparse.ArgumentParser) -> None:
    """What the worker captions with; `captions up` passes the same options on to its worker."""
    add_model_options(parser)
    add_option(parser, "--batch-size", env="CAPTIONS_BATCH_SIZE", default=8, type=positive_int,
               help="engine slots: speakers captioned at once across all rooms (more wait in a queue)")
    add_option(parser, "--data-dir", env="CAPTIONS_DATA_DIR", default="data", type=Path,
               help="where each room's transcript (<room>.jsonl) is written")
    add_option(parser, "--record-dir", env="CAPTIONS_RECORD_DIR", default=None, type=Path,
               help="if set, save the 24 kHz audio each speaker's engine stream consumed (WAV)")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mode", nargs="?", choices=["start", "dev"], default="start",
                        help="start (deployments, default) or dev (verbose, never refuses rooms)")
    add_captioning_options(parser)
    add_option(parser, "--agent-name", env="CAPTIONS_AGENT_NAME", default="",
               help="explicit dispatch under this name (default: automatic dispatch to every room)")
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

    def load(self) -> float:
        """The load livekit-agents reports to LiveKit: occupied slots / B, scaled to LOAD_WHEN_FULL."""
        return LOAD_WHEN_FULL * self.engine.slots_in_use / self.engine.batch_size


_service: CaptionService | None = None
"""Process-wide, set before the worker registers; jobs run as threads of this process."""
READINESS = Readiness()
"""What /readyz reports: model loaded, then registered with LiveKit."""


async def _caption_room(ctx) -> None:
    """A job's entrypoint (in the job's own thread and event loop)."""
    from livekit.agents import AutoSubscribe

    from captions.live.room import RoomCaptioner

    assert _service is not None, "the engine is loaded before the worker registers"
    await ctx.connect(auto_subscribe=AutoSubscribe.AUDIO_ONLY)
    captioner = RoomCaptioner(ctx.room, _service.slots, _service.room_options)
    ctx.add_shutdown_callback(captioner.aclose)
    await captioner.start()
    # Metrics: count the room until its job shuts down.
    METRICS.room_started()

    async def _room_ended() -> None:
        METRICS.room_ended()

    ctx.add_shutdown_callback(_room_ended)
    logger.info("captioning room %s", ctx.room.name)


def _load_service(args: argparse.Namespace) -> CaptionService:
    from captions.live.room import AUDIO_CHUNK_MS, RoomOptions
    from captions.live.sdk_fixes import start_livekit_runtime
    from captions.live.slots import SlotQueue
    from captions.stt.api import FRAME_S
    from captions.stt.engine import SttEngine

    start_livekit_runtime()
    engine = SttEngine.load(args.model, device=args.device, batch_size=args.batch_size,
                            align_frames=not args.unaligned_frames)
    engine.start()
    slots = SlotQueue(engine)
    METRICS.attach_engine(engine, slots)  # metrics read slots/queue at scrape time, step timings live
    args.data_dir.mkdir(parents=True, exist_ok=True)
    if args.record_dir is not None:
        args.record_dir.mkdir(parents=True, exist_ok=True)
    options = RoomOptions(args.data_dir, args.record_dir, timing_attributes=args.timing_attributes,
                          audio_chunk_ms=round(FRAME_S * 1000) if args.unaligned_frames else AUDIO_CHUNK_MS)
    return CaptionService(engine, slots, options)


def _build_server(args: argparse.Namespace, service: CaptionService):
    from livekit import agents
    from livekit.agents.worker import ServerEnvOption

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
    server.rtc_session(_caption_room, agent_name=args.agent_name)
    # Readiness: registered with LiveKit (the model is loaded before the server is built).
    server.on("worker_registered", lambda *_: setattr(READINESS, "registered", True))
    server.on("worker_registered", lambda worker_id, _info: logger.info("%s (%s)", READY_MESSAGE, worker_id))
    return server


async def _serve(server, dev: bool) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    run = asyncio.create_task(server.run(devmode=dev))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({run, stopped}, return_when=asyncio.FIRST_COMPLETED)
    for sig in (signal.SIGINT, signal.SIGTERM):
        # A second Ctrl-C while rooms flush means "now".
        loop.add_signal_handler(sig, lambda: os._exit(130))
    logger.info("stopping: flushing every room's open captions")
    await server.aclose()
    if run.done() and not run.cancelled() and run.exception() is not None:
        raise run.exception()
    stopped.cancel()


def _start_observability(args: argparse.Namespace):
    """/metrics, /healthz, /readyz before the model loads, so probes see "alive, not ready"."""
    if args.metrics_port == 0:
        return None
    from captions.live.metrics import start_observability_server

    return start_observability_server(args.metrics_host, args.metrics_port, READINESS.missing)


def run(args: argparse.Namespace) -> int:
    global _service
    from captions.config import ConfigError, check_livekit
    from captions.stt.model import CheckpointError

    try:
        # Fail fast, before minutes of model loading: LiveKit must answer with these keys.
        check_livekit(args.url, args.api_key, args.api_secret)
    except ConfigError as e:
        print(f"captions worker: {e}", file=sys.stderr)
        return 2
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
    except CheckpointError as e:
        print(f"captions worker: {e}", file=sys.stderr)
        return 1
    READINESS.model_loaded = True
    mode = "explicit dispatch as " + repr(args.agent_name) if args.agent_name else "automatic dispatch"
    logger.info("worker ready: %d slots, %s, LiveKit at %s", _service.engine.batch_size, mode, args.url)
    try:
        asyncio.run(_serve(_build_server(args, _service), dev=args.mode == "dev"))
    except Exception as e:  # noqa: BLE001 - e.g. LiveKit unreachable after retries: say so, exit 1
        logger.error("worker failed: %s", e)
        return 1
    finally:
        _service.slots.close()
        _service.engine.close()
        if observability is not None:
            observability.close()
    return 0
