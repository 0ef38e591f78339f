"""A receiving process of `captions worker --receivers P`: `python -m captions.host.receiver SOCKET
INDEX`, started by the engine process (receivers.py), never by hand.

It is today's worker (captions/live/worker.py: registration with LiveKit, every room's job, voice
detection, turns, publishing, recovery) with the engine process's slot queue and engine streams
(engine_client.py) in place of its own engine, and the engine process's translation engine
(translation_client.py) in place of its own: it loads no model at all. It tells the engine process
every second what keeps it from being ready, and its metrics (captions/host/metrics.py: the engine
process serves them, added to its own, on its /metrics). If the engine process goes away, or says its engine failed, it stops as a
worker whose engine failed does: its rooms are closed and it exits with `EXIT_ENGINE_FAILED`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from collections.abc import Callable

from captions.host.engine_client import EngineClient
from captions.host.metrics import snapshot
from captions.host.receivers import RECEIVER_ARGS_ENV, decode_args
from captions.log import logger

READY_REPORT_S = 1.0
"""How often the engine process is told what keeps this process from being ready, and its metrics."""


def main(argv: list[str]) -> int:
    from captions.live import worker
    from captions.live.metrics import METRICS
    from captions.live.sdk_fixes import start_livekit_runtime

    socket_path, index = argv[0], int(argv[1])
    args = decode_args(os.environ[RECEIVER_ARGS_ENV])
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s %(name)s [receiver {index}]: %(message)s")
    if args.api_secret == "secret":  # as captions/cli.py: livekit-server --dev's well-known secret
        warnings.filterwarnings("ignore", message="The HMAC key is")
    try:
        client = EngineClient(socket_path, index, on_lost=worker.engine_failed)
    except OSError as e:
        print(f"captions worker: receiving process {index}: cannot reach the engine process: {e}", file=sys.stderr)
        return worker.EXIT_ENGINE_FAILED
    start_livekit_runtime()
    service = _rooms_service(args, client, _translation_options(args, client))
    stop = threading.Event()
    client.metrics_source = lambda: snapshot(METRICS.registry)

    threading.Thread(target=report_forever, name="receiver-ready", daemon=True,
                     args=(client, worker.not_ready, lambda: snapshot(METRICS.registry), stop, index)).start()
    try:
        return worker.serve_rooms(args, service)
    finally:
        stop.set()


def report_forever(client: EngineClient, not_ready: Callable[[], list[str]], metrics: Callable[[], list],
                   stop: threading.Event, index: int) -> None:
    """Every READY_REPORT_S until `stop`: what keeps this process from being ready, and its metrics.
    A check that raises makes the process unready, saying so (the engine process would otherwise keep
    its last answer, ready, for good); a failed metrics snapshot is logged once."""
    failed: set[str] = set()
    while not stop.wait(READY_REPORT_S):
        try:
            missing = not_ready()
        except Exception as e:  # noqa: BLE001 - the reports go on, and say the check failed
            missing = [f"its readiness check failed: {type(e).__name__}: {e}"]
            if "ready" not in failed:
                logger.exception("receiving process %d: its readiness check failed", index)
            failed.add("ready")
        client.report_ready(missing)
        try:
            client.report_metrics(metrics())
        except Exception:  # noqa: BLE001 - metrics must not stop the readiness reports
            if "metrics" not in failed:
                logger.exception("receiving process %d: its metrics report failed", index)
            failed.add("metrics")


def _translation_options(args, client: EngineClient):
    """The rooms' translation options: the engine process's translation engine translates (it
    loaded the model, and refused a wrong one before the speech model loaded); this process only
    detects the languages of its rooms' captions."""
    from captions.live.translation import STT_LANGUAGES, TranslationOptions
    from captions.translate.language import warm_up_language_detection

    if client.translation is None:
        return TranslationOptions()
    warm_up_language_detection(STT_LANGUAGES)  # seconds once here, rather than on a room's loop
    return TranslationOptions(targets=args.translate_to, available=client.translation.available)


def _rooms_service(args, client: EngineClient, translation_options):
    """The worker's `CaptionService` (worker.py's `_load_service`, which the single process keeps as
    it is) with the engine process's engine and slot queue in place of its own."""
    from captions.live.presence import LiveKitCredentials
    from captions.live.room import RoomOptions
    from captions.live.worker import CaptionService, speaker_options
    from captions.protocol import CaptionSigner

    options = RoomOptions(args.data_dir, args.record_dir, speaker=speaker_options(args), timing_attributes=args.timing_attributes,
                          livekit=LiveKitCredentials(args.url, args.api_key, args.api_secret),
                          translation=translation_options)
    signer = CaptionSigner.for_deployment(args.caption_secret or args.api_secret, args.agent_name)
    return CaptionService(client.engine, client.slots, options, signer, client.translation)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
