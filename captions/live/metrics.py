"""Prometheus metrics, health and readiness of the caption worker.

The worker owns one `CaptionMetrics` (module-level `METRICS`, because rooms run as threads of the one
worker process and all report into it) and serves it with `start_observability_server` on its own
thread, started before the model loads so that probes get answers during a long load:

- ``/metrics``: Prometheus text format, every metric named ``captions_*``.
- ``/healthz``: 200 while the process is alive and serving HTTP (liveness).
- ``/readyz``: 200 once the model is loaded AND the worker is registered with LiveKit, else 503 with
  what is missing (readiness).

What is measured where:
- engine state (slots used/free, batch size, open streams, queued speakers, failed steps) is read
  from the engine and the slot queue at scrape time (`attach_engine`), so it is never stale;
- step timings come from `engine.step_listeners` (`StepTimings`: host / encode / LM / total); on a GPU,
  encode and LM are only separated when the engine runs with ``profile=True``, otherwise the LM part
  also holds the encode's asynchronous GPU work;
- the room code reports rooms, caption latency, dropped frames and errors through small methods;
- translation (issue 26): each room's translator (captions/live/translation.py) reports what it
  published, the finals that went out untranslated and each translated final's delay after its
  original; the worker's translation engine (captions/translate/engine.py) is read at scrape time
  (`attach_translation`). Language labels are the operator's --translate-to languages only (a room's
  metadata may pick another language the model has: it is counted as ``other``), so a room cannot
  add series.

Nothing here ever sees audio or caption text.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from captions.log import logger
from captions.stt.api import StepTimings

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from captions.live.slots import SlotQueue
    from captions.stt.engine import SttEngine

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.12, 0.16, 0.25, 0.5, 1.0, 2.5)
"""Seconds; 0.08 is one frame: a total step time above it means the engine falls behind real time."""
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
RTF_WINDOW_STEPS = 100
"""The real-time factor is computed over this many recent steps."""
ERROR_KINDS = ("engine_step", "stream", "publish", "transcript", "room")
"""Error counters that exist (at 0) from the start, so that rate() and alerts work before the first."""
DROP_REASONS = ("waiting_overflow", "shutdown")
RECOVERY_ACTIONS = ("dispatch", "supersede_stale", "remove_stale", "remove_duplicate", "failed_round")
STEP_PARTS = ("host", "encode", "lm", "total")
TRANSLATION_KINDS = ("final", "interim")
UNTRANSLATED_REASONS = ("timeout", "error")
"""Why a final went out with its original text (captions/live/translation.py's UNTRANSLATED_*)."""
OTHER_LANGUAGE = "other"
"""The language label of a translation into a language not in the operator's list."""
TRANSLATION_DELAY_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
"""Seconds; issue 26's target is 0.5 at 8 speakers, and a final is given up at 3 (FINAL_TIMEOUT_S)."""


class CaptionMetrics:
    """Every metric of one worker process, in its own registry (livekit-agents has its own)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rooms = Gauge("captions_rooms", "Rooms this worker is captioning", registry=r)
        self.microphones = Gauge("captions_microphones", "Microphones this worker reads, talking or not "
                                 "(only talkers hold an engine slot)", registry=r)
        self.step_seconds = Histogram(
            "captions_engine_step_seconds", "Time of one batched engine step, by part (host = CPU-side "
            "preparation and decoding, encode = Mimi, lm = language model, total)", ["part"],
            buckets=STEP_BUCKETS, registry=r)
        for part in STEP_PARTS:
            self.step_seconds.labels(part)
        self.step_streams = Histogram(
            "captions_engine_step_active_streams", "Streams advanced by one engine step",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.caption_latency = Histogram(
            "captions_caption_latency_seconds", "From the end of a spoken word (capture time) to its "
            "caption being queued for publishing; includes the model's text delay", buckets=LATENCY_BUCKETS,
            registry=r)
        self.slot_wait = Histogram(
            "captions_slot_wait_seconds", "From the start of a speaker's turn (the pre-roll before they "
            "started talking) to its engine slot; their audio is kept meanwhile", buckets=LATENCY_BUCKETS,
            registry=r)
        self.room_start_seconds = Histogram(
            "captions_room_start_seconds", "From a room's job starting to its captioner listening (connected, "
            "microphones subscribed); the claim against another captioner comes after", buckets=LATENCY_BUCKETS,
            registry=r)
        self.frames_dropped = Counter(
            "captions_frames_dropped", "Audio received but never captioned, in 80 ms frames, by reason: "
            "waiting_overflow (a speaker waited longer than the audio kept for them), shutdown (the worker "
            "stopped while they waited)", ["reason"],
            registry=r)
        for reason in DROP_REASONS:
            self.frames_dropped.labels(reason)
        self.recovery_actions = Counter(
            "captions_recovery_actions", "What this worker's recovery did: dispatched a captioner to a room "
            "without one, removed a captioner whose heartbeat stopped, or removed a second captioner",
            ["action"], registry=r)
        for action in RECOVERY_ACTIONS:
            self.recovery_actions.labels(action)
        self.translations = Counter(
            "captions_translations_published", "Translated captions published, by kind (final, interim) and "
            "target language (the operator's --translate-to; other: a language a room's metadata picked); "
            "finals that went out untranslated are in captions_translation_untranslated_finals instead",
            ["kind", "language"], registry=r)
        self.untranslated_finals = Counter(
            "captions_translation_untranslated_finals", "Finals published in a translation's place with the "
            "original text, by reason: timeout (the translation took too long), error (the model failed, "
            "or the engine was closed)", ["reason"], registry=r)
        for reason in UNTRANSLATED_REASONS:
            self.untranslated_finals.labels(reason)
        self.translation_delay = Histogram(
            "captions_translation_final_delay_seconds", "From an original final handed to the publisher to "
            "its translated final handed to the publisher (finals the model translated; untranslated ones "
            "are counted apart)", buckets=TRANSLATION_DELAY_BUCKETS, registry=r)
        self._translation_engine: object | None = None
        self._translation_languages: frozenset[str] = frozenset()
        self.ready_check: Callable[[], list[str]] | None = None
        """What /readyz asks; also exported as captions_ready."""
        self.merge: Callable[[list[Metric]], Iterable[Metric]] | None = None
        """The engine process of `--receivers P`: adds its receiving processes' metrics to these at
        render time (captions/host/metrics.py)."""
        self._errors: dict[str, int] = dict.fromkeys(ERROR_KINDS, 0)
        self._lock = threading.Lock()
        self._recent_steps: collections.deque[float] = collections.deque(maxlen=RTF_WINDOW_STEPS)
        self._frame_s = 0.08
        self._engine: SttEngine | None = None
        self._slots: SlotQueue | None = None
        r.register(_EngineCollector(self))

    # ---- wiring -------------------------------------------------------------------------------

    def attach_engine(self, engine: SttEngine, slots: SlotQueue | None = None) -> None:
        """Reads `engine` (and the `SlotQueue` `slots`) at scrape time and records its step timings."""
        self._engine, self._slots = engine, slots
        self._frame_s = engine.frame_size / engine.sample_rate
        engine.step_listeners.append(self.observe_step)

    def attach_translation(self, engine: object, languages: Iterable[str]) -> None:
        """The worker's translation engine (read at scrape time: its queue and counters) and the
        operator's target languages (the only language labels; their series start at 0). Called by
        every room's translator with the same engine and list; idempotent."""
        languages = frozenset(languages)
        with self._lock:
            self._translation_engine = engine
            new = languages - self._translation_languages
            self._translation_languages |= languages
        for language in sorted(new):
            for kind in TRANSLATION_KINDS:
                self.translations.labels(kind, language)

    # ---- what the engine and the rooms report -----------------------------------------------

    def observe_step(self, timings: StepTimings) -> None:
        """An `engine.step_listeners` callback (engine thread): one step's `StepTimings`."""
        self.step_seconds.labels("host").observe(timings.host_s)
        self.step_seconds.labels("encode").observe(timings.encode_s)
        self.step_seconds.labels("lm").observe(timings.lm_s)
        self.step_seconds.labels("total").observe(timings.total_s)
        self.step_streams.observe(timings.active)
        with self._lock:
            self._recent_steps.append(timings.total_s)

    def room_started(self) -> None:
        self.rooms.inc()

    def room_ended(self) -> None:
        self.rooms.dec()

    def observe_caption_latency(self, seconds: float) -> None:
        """Wall-clock time from the end of a word's audio to its caption; negative clocks skew ignored."""
        if seconds >= 0:
            self.caption_latency.observe(seconds)

    def frame_dropped(self, reason: str, frames: int = 1) -> None:
        """Audio that will never be captioned, in 80 ms frames (`DROP_REASONS`)."""
        self.frames_dropped.labels(reason).inc(frames)

    def observe_slot_wait(self, seconds: float) -> None:
        """From the start of a turn (when the speaker started talking) to its engine slot."""
        self.slot_wait.observe(max(0.0, seconds))

    def recovery(self, action: str) -> None:
        """One recovery action (`RECOVERY_ACTIONS`)."""
        self.recovery_actions.labels(action).inc()

    def translation_published(self, language: str, final: bool) -> None:
        """A translated caption (not an untranslated final) handed to the publisher."""
        label = language if language in self._translation_languages else OTHER_LANGUAGE
        self.translations.labels("final" if final else "interim", label).inc()

    def final_untranslated(self, reason: str) -> None:
        """A final published with its original text; `reason` as in ``captions.untranslated``
        ("timeout", or "error" followed by what failed)."""
        kind = reason.split(":", 1)[0].strip()
        self.untranslated_finals.labels(kind if kind in UNTRANSLATED_REASONS else "error").inc()

    def observe_translation_delay(self, seconds: float) -> None:
        """From an original final to its translated final (both handed to the publisher)."""
        self.translation_delay.observe(max(0.0, seconds))

    def error(self, kind: str) -> None:
        """Counts one error of `kind` (`ERROR_KINDS`; others are accepted and appear when first used)."""
        with self._lock:
            self._errors[kind] = self._errors.get(kind, 0) + 1

    # ---- derived values -----------------------------------------------------------------------

    def realtime_factor(self) -> float | None:
        """How many times faster than real time the engine steps: one frame of audio (80 ms) per
        slot over the mean step time of recent steps. Above 1 the engine keeps up with every slot
        it steps; None before the first step."""
        with self._lock:
            steps = list(self._recent_steps)
        mean = sum(steps) / len(steps) if steps else 0.0
        return self._frame_s / mean if mean > 0 else None

    def errors(self) -> dict[str, int]:
        with self._lock:
            errors = dict(self._errors)
        if self._engine is not None:
            errors["engine_step"] += int(getattr(self._engine, "failed_steps", 0))
        return errors

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (and of the receiving processes', see `merge`)."""
        if self.merge is None:
            return generate_latest(self.registry)
        families = list(self.merge(list(self.registry.collect())))
        return generate_latest(SimpleNamespace(collect=lambda: families))


class _EngineCollector:
    """Values read from the engine, the slot queue and the error counts at scrape time."""

    def __init__(self, metrics: CaptionMetrics):
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        m = self._metrics
        errors = CounterMetricFamily("captions_errors", "Errors by kind: engine_step (a failed batched "
                                     "step), stream (an engine stream ended by an error), publish (a "
                                     "caption that could not be sent), transcript (a write failed), room",
                                     labels=["kind"])
        for kind, count in sorted(m.errors().items()):
            errors.add_metric([kind], count)
        yield errors
        rtf = m.realtime_factor()
        if rtf is not None:
            yield GaugeMetricFamily("captions_engine_realtime_factor", "Audio time per step time over "
                                    f"the last {RTF_WINDOW_STEPS} steps (above 1: faster than real time)",
                                    value=rtf)
        yield from _translation_engine_metrics(m._translation_engine)
        if m.ready_check is not None:
            yield GaugeMetricFamily("captions_ready", "1 when the model is loaded and the worker is "
                                    "registered with LiveKit", value=0 if m.ready_check() else 1)
        engine = m._engine
        if engine is None:
            return
        used, size = engine.slots_in_use, engine.batch_size
        yield GaugeMetricFamily("captions_engine_batch_size", "Engine slots (B)", value=size)
        yield GaugeMetricFamily("captions_engine_slots_used", "Engine slots holding a stream", value=used)
        yield GaugeMetricFamily("captions_engine_slots_free", "Engine slots free", value=size - used)
        yield GaugeMetricFamily("captions_streams", "Open engine streams (speakers being captioned)",
                                value=used)
        yield CounterMetricFamily("captions_engine_steps", "Batched engine steps run",
                                  value=int(getattr(engine, "steps", 0)))
        if m._slots is not None:
            yield GaugeMetricFamily("captions_queued_speakers", "Speakers waiting for a free slot",
                                    value=len(m._slots))


def _translation_engine_metrics(engine: object | None) -> Iterable[Metric]:
    """The translation engine's queue and counters (captions/translate/engine.py's `queued` and
    `EngineCounters`), when it has them."""
    if engine is None:
        return
    counters = getattr(engine, "counters", None)
    queued = getattr(engine, "queued", None)
    if isinstance(queued, int):
        yield GaugeMetricFamily("captions_translation_queued", "Translations waiting for the translation "
                                "engine (finals and interims, every room)", value=queued)
    if counters is None:
        return
    for name, help_text, field_name in (
            ("captions_translation_engine_submitted", "Translations submitted to the engine", "submitted"),
            ("captions_translation_engine_translated", "Translations the engine's model returned", "translated"),
            ("captions_translation_engine_dropped", ("Translations the engine dropped before they ran: "
             "interims when its queue of interims was full (oldest first) or a newer one of the segment "
             "came, and any a room gave up on (too slow)"), "dropped"),
            ("captions_translation_engine_failed", ("Translations failed by the model, an unsupported "
             "language pair or the engine closing"), "failed"),
            ("captions_translation_engine_batches", "Batched model calls", "batches")):
        yield CounterMetricFamily(name, help_text, value=int(getattr(counters, field_name, 0)))
    yield CounterMetricFamily("captions_translation_engine_busy_seconds", "Time the engine spent in the "
                              "model", value=float(getattr(counters, "busy_s", 0.0)))


METRICS = CaptionMetrics()
"""The worker process's metrics; rooms (threads of the worker) report into it."""


# ---- a worker that never stops silently (issue 23): supervised tasks, a broken engine -------------

TASK_KINDS = ("track_reader", "live_feed", "speaker_watch")
"""Supervised tasks whose failure counters exist (at 0) from the start."""


class TaskMetrics:
    """Failures of long-lived tasks (captions/live/supervise.py) and of the engine, in the worker's
    registry."""

    def __init__(self, registry: CollectorRegistry):
        self.failures = Counter(
            "captions_task_failures", "Long-lived tasks that raised (each logged with its traceback, then "
            "restarted or what it served ended): track_reader (a microphone's audio), live_feed (its live "
            "stream to the engine), speaker_watch", ["task"], registry=registry)
        for task in TASK_KINDS:
            self.failures.labels(task)
        self.engine_broken = Gauge(
            "captions_engine_broken", "1 once the engine failed for good (a broken GPU: failed steps in a "
            "row or a sticky CUDA error); the worker is then unready and exits", registry=registry)

    def failed(self, task: str) -> None:
        self.failures.labels(task).inc()


TASK_METRICS = TaskMetrics(METRICS.registry)


# ---- health and readiness -------------------------------------------------------------------------


@dataclass
class Readiness:
    """Ready = the model is loaded and the worker is registered with LiveKit, over a live connection."""

    model_loaded: bool = False
    registered: bool = False
    """Registered at least once."""
    connected: Callable[[], bool] | None = None
    """Whether the registration still holds (the connection to LiveKit may drop and come back)."""

    def missing(self) -> list[str]:
        """What keeps the worker from being ready; empty when it is ready."""
        missing = []
        if not self.model_loaded:
            missing.append("model loading")
        if not self.registered:
            missing.append("not registered with LiveKit")
        elif self.connected is not None and not self.connected():
            missing.append("lost its connection to LiveKit (reconnecting)")
        return missing


class ObservabilityServer:
    """/metrics, /healthz and /readyz on a thread of their own (the worker's main thread is busy
    loading the model, then runs livekit-agents' loop)."""

    def __init__(self, host: str, port: int, metrics: CaptionMetrics, ready_check: Callable[[], list[str]]):
        self.host, self.port = host, port
        self._metrics, self._ready_check = metrics, ready_check
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._run, name="observability", daemon=True)

    def start(self) -> ObservabilityServer:
        self._thread.start()
        self._started.wait(timeout=10)
        if self._error is not None:
            raise self._error
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as e:  # noqa: BLE001 - reported to start() (e.g. the port is taken)
            self._error = e
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._on_metrics)
        app.router.add_get("/healthz", self._on_health)
        app.router.add_get("/readyz", self._on_ready)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # the real port when 0 was asked

    async def _on_metrics(self, request: web.Request) -> web.Response:
        body = self._metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _on_health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _on_ready(self, request: web.Request) -> web.Response:
        missing = self._ready_check()
        if missing:
            return web.Response(status=503, text="not ready: " + ", ".join(missing) + "\n")
        return web.Response(text="ready\n")


def start_observability_server(host: str, port: int, ready_check: Callable[[], list[str]],
                               metrics: CaptionMetrics = METRICS) -> ObservabilityServer:
    """Serves /metrics, /healthz and /readyz on `host:port` (0: any free port, see `.port`).
    `ready_check()` returns what is missing for readiness (empty list: ready)."""
    metrics.ready_check = ready_check
    server = ObservabilityServer(host, port, metrics, ready_check).start()
    logger.info("metrics and health at http://%s:%d (/metrics, /healthz, /readyz)", host, server.port)
    return server


# ---- transcript storage (issue 23): a room whose transcript cannot be written stays live -----------

TRANSCRIPT_ERROR_REASONS = ("no_space", "permission", "read_only", "name_too_long", "io", "backlog", "other")
"""`backlog`: a final not handed to the writer because too many wait for a stalled disk."""
_ERRNO_REASONS = {errno.ENOSPC: "no_space", errno.EDQUOT: "no_space", errno.EACCES: "permission",
                  errno.EPERM: "permission", errno.EROFS: "read_only", errno.ENAMETOOLONG: "name_too_long",
                  errno.EIO: "io"}


class TranscriptMetrics:
    """The transcript files' health, in the worker's registry (captions/live/transcripts.py)."""

    def __init__(self, registry: CollectorRegistry):
        self.errors = Counter(
            "captions_transcript_errors", "Failed attempts to open or write a room's transcript file, by "
            "reason (live captions go on meanwhile)", ["reason"], registry=registry)
        for reason in TRANSCRIPT_ERROR_REASONS:
            self.errors.labels(reason)
        self.unsaved = Counter(
            "captions_transcript_unsaved_segments", "Final captions published live but not saved to the "
            "transcript file (each one is logged with its segment id)", registry=registry)
        self.unavailable = Gauge(
            "captions_transcript_unavailable", "Rooms whose transcript file cannot be written now "
            "(alert on > 0)", registry=registry)

    @staticmethod
    def reason(error: OSError) -> str:
        """The `reason` label of an OSError."""
        return _ERRNO_REASONS.get(error.errno, "other")


TRANSCRIPT_METRICS = TranscriptMetrics(METRICS.registry)
