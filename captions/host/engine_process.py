"""`captions worker --receivers P` with P >= 2: this process loads the model once and owns the
engine and the one slot queue (so fairness across every room of every receiving process is the same
queue's); it registers nothing with LiveKit. It serves the engine over a Unix socket
(engine_server.py) and starts P receiving processes (receivers.py, receiver.py), each a
livekit-agents worker of its own: LiveKit's dispatch places rooms across them.

With --translate-to it also loads the one translation model of the host (before the speech model,
so that a wrong one is said in seconds) and runs the one `TranslationEngine`, which every receiving
process's rooms use over their connections (translation_server.py, translation_client.py): one copy
of the model, and batches of every room's captions.

It serves /metrics (the engine's and the queue's, the translation engine's, and its receiving
processes' rooms' metrics, summed: captions/host/metrics.py), /healthz and /readyz: ready once the
model is loaded, every receiving process says it is ready (registered with LiveKit), and the
translation engine (if any) still runs.

Failures: a receiving process that dies frees its slots at once (its connection drops), and a new
one is started; its rooms get a captioner again from the recovery every receiving process runs. An
engine that fails for good makes this process unready, tells every receiving process (they stop
as a worker whose engine failed does), and it exits with `EXIT_ENGINE_FAILED`. If this process
dies, every receiving process loses its connection and exits with that status too.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable

from captions.host.engine_server import EngineServer, Receiver
from captions.host.metrics import ReceiverMetrics
from captions.host.receivers import ReceiverPool
from captions.log import logger

SUPERVISE_EVERY_S = 0.5
STOP_TIMEOUT_S = 60.0
"""How long receiving processes asked to stop may take to flush their rooms' last words."""
ENGINE_FAILED_STOP_S = 40.0
"""How long receiving processes told that the engine failed may take to exit (their own bound is 30 s)."""


class _EngineProcess:
    def __init__(self, count: int):
        self.count = count
        self.stop = threading.Event()
        self.failure: str | None = None
        self.model_loaded = False
        self.server: EngineServer | None = None
        self.translation = None
        """The translation engine (captions/translate/engine.py), with --translate-to."""

    def engine_failed(self, cause: str) -> None:
        """An `engine.broken_listeners` callback (the engine's thread, or its watchdog's)."""
        from captions.live.metrics import TASK_METRICS

        self.failure = cause
        TASK_METRICS.engine_broken.set(1)
        if self.server is not None:
            self.server.broadcast({"op": "engine_failed", "cause": cause})
        self.stop.set()

    def ready_receivers(self) -> set[int]:
        return {r.index for r in self.server.receivers() if r.index is not None and not r.missing} \
            if self.server is not None else set()

    def not_ready(self) -> list[str]:
        """What /readyz reports as missing."""
        if not self.model_loaded:
            return ["model loading"]
        missing = [f"engine failed: {self.failure}"] if self.failure is not None else []
        if self.translation is not None and not self.translation.running:
            missing.append("the translation engine stopped")
        connected: dict[int, Receiver] = {r.index: r for r in self.server.receivers() if r.index is not None}
        for index in range(self.count):
            receiver = connected.get(index)
            if receiver is None:
                missing.append(f"receiving process {index}: not running")
            missing += [f"receiving process {index}: {m}" for m in (receiver.missing if receiver else [])]
        return missing


def run_engine_process(args: argparse.Namespace, exit_engine_failed: int, load_translation: Callable) -> int:
    """`captions worker` as the engine process (module notes); the exit status. `load_translation(args,
    detect_here)`: worker.py's `_load_translation` (the one-process worker's own, given here so that
    this module does not import the worker that imports it)."""
    from captions.live.diagnostics import start_diagnostics
    from captions.live.metrics import METRICS, start_observability_server
    from captions.live.slots import SlotQueue
    from captions.live.transcripts import start_retention
    from captions.stt.engine import SttEngine
    from captions.stt.frame_clock import SEVERAL_PHASES_GATHER_WAIT_S
    from captions.stt.model import CheckpointError
    from captions.translate.model import TranslationModelError

    process = _EngineProcess(args.receivers)
    observability = None
    if args.metrics_port != 0:
        try:
            observability = start_observability_server(args.metrics_host, args.metrics_port, process.not_ready)
        except OSError as e:
            problem = (f"cannot serve metrics on {args.metrics_host}:{args.metrics_port}: {e} "
                       "(set --metrics-port/CAPTIONS_METRICS_PORT, 0 disables)")
            if args.mode != "dev":
                print(f"captions worker: {problem}", file=sys.stderr)
                return 2
            logger.warning("%s; going on without them (dev mode)", problem)
    start_diagnostics(args.diagnostics_file)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: process.stop.set())
    try:
        # The translation model first: a wrong spec is said in seconds, not after the speech model's load.
        translation, translation_options = load_translation(args, detect_here=False)
    except TranslationModelError as e:
        print(f"captions worker: {e}", file=sys.stderr)
        return 1
    try:
        engine = SttEngine.load(args.model, device=args.device, batch_size=args.batch_size,
                                align_frames=not args.unaligned_frames)
    except CheckpointError as e:
        print(f"captions worker: {e}", file=sys.stderr)
        if translation is not None:
            translation.close()
        return 1
    engine.broken_listeners.append(process.engine_failed)
    # Receiving processes tick at their own phases: a step waits for the later one (engine.py).
    engine.clock.gather_wait_s = SEVERAL_PHASES_GATHER_WAIT_S
    engine.start()
    slots = SlotQueue(engine)
    METRICS.attach_engine(engine, slots)
    if translation is not None:
        # One queue for every receiving process's rooms: the bounds of one process's queue, times P,
        # so that a host of P processes keeps as many interims and finals waiting as P workers would.
        translation.max_interims *= args.receivers
        translation.max_finals *= args.receivers
        # Its metrics are this process's only: receiving processes have none.
        METRICS.attach_translation(translation, translation_options.targets)
        process.translation = translation
    args.data_dir.mkdir(parents=True, exist_ok=True)
    if args.record_dir is not None:
        args.record_dir.mkdir(parents=True, exist_ok=True)
    if args.retention_days > 0:
        start_retention([d for d in (args.data_dir, args.record_dir) if d is not None], args.retention_days * 86400)
    pool = None
    receiver_metrics = ReceiverMetrics(restarts=lambda: pool.restarts if pool is not None else 0)
    process.server = server = EngineServer(
        engine, slots, on_disconnect=lambda receiver: receiver_metrics.retire(receiver.number),
        on_metrics=lambda receiver, families: receiver_metrics.update(receiver.number, families),
        translation=translation, translation_available=translation_options.available)
    METRICS.merge = receiver_metrics.merge
    pool = ReceiverPool(args.receivers, server.path, args)
    process.model_loaded = True
    logger.info("engine process ready: %d slots; starting %d receiving processes", engine.batch_size, args.receivers)
    pool.start()
    status = None
    try:
        while not process.stop.wait(SUPERVISE_EVERY_S):
            status = pool.supervise(process.ready_receivers())
            if status is not None:
                break
        # Receiving processes flush their rooms' last words through the engine: it serves until they exit.
        if process.failure is not None:
            pool.stop(None, ENGINE_FAILED_STOP_S)
        else:
            logger.info("stopping: the receiving processes flush every room's open captions")
            pool.stop(signal.SIGINT, STOP_TIMEOUT_S)
    finally:
        server.close()
        if translation is not None:
            translation.close()
        slots.close()
        engine.close()
        if observability is not None:
            observability.close()
    if process.failure is not None:
        print(f"captions worker: engine failed: {process.failure}", file=sys.stderr)
        return exit_engine_failed
    return status or 0
