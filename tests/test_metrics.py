"""Observability of the real worker: Prometheus metrics after a short run in a real livekit-server room
with WebRTC publishers, and /healthz and /readyz changing state at the right moments (alive but not
ready while the model loads, still not ready until registered with LiveKit, then ready)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from livekit import api
from prometheus_client.parser import text_string_to_metric_families

from captions.dev.bots import Publisher, Subscriber
from captions.dev.processes import free_port
from captions.live.metrics import RTF_WINDOW_STEPS, CaptionMetrics
from tests.conftest import espeak_wav, start_captions_worker, start_livekit_server

pytestmark = [pytest.mark.livekit, pytest.mark.timeout(300)]

AGENT_NAME = "metrics-test"
"""Explicit dispatch: the worker joins the room only because the test asks it to."""


def http_get(url: str) -> tuple[int, str]:
    """(status, body); status 0 when nothing listens."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200, f"/metrics answered {status}"
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{name}{labels} not exported; have {sorted({k[0] for k in samples})}"
    return samples[key]


def step_time_range(samples: dict) -> tuple[float, float]:
    """Bounds on every step's total time read from the histogram's buckets: the lower edge of the
    first bucket that holds a step, the upper edge of the last one's."""
    edges = sorted((float(dict(labels)["le"]), count) for (name, labels), count in samples.items()
                   if name == "captions_engine_step_seconds_bucket" and dict(labels)["part"] == "total")
    lower = max((le for le, count in edges if count == 0), default=0.0)
    upper = min(le for le, count in edges if count == edges[-1][1])
    return lower, upper


async def dispatch(server, room: str) -> None:
    lkapi = api.LiveKitAPI(server.url, server.api_key, server.api_secret)
    try:
        await lkapi.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(agent_name=AGENT_NAME, room=room))
    finally:
        await lkapi.aclose()


async def wait_for_metrics(port: int, what: str, **expected: float) -> dict:
    """Scrapes until every named metric has its expected value (bounded); returns that scrape."""
    deadline = time.monotonic() + 30
    while True:
        samples = scrape(port)
        if all(samples.get((name, ())) == want for name, want in expected.items()):
            return samples
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {expected}"
        await asyncio.sleep(0.1)


@pytest.mark.asyncio(loop_scope="session")
async def test_metrics_after_two_speakers_share_one_slot(tiny_checkpoint, tmp_path, speech_dir):
    """B=1 and two people talk at once: silent, they hold no slot; talking, one holds the slot and
    the other waits, then is captioned too (their audio was kept); afterwards steps, timings,
    real-time factor, slot waits and caption latency have the values the steps imply, no audio was
    dropped and no error was counted. The test has its own livekit-server, so no other worker can
    join its room or answer for this one."""
    server = await asyncio.to_thread(start_livekit_server, tmp_path / "livekit-server.log")
    port = free_port()
    try:
        worker = await asyncio.to_thread(
            start_captions_worker, server, tiny_checkpoint, tmp_path / "worker", batch_size=1,
            extra_args=("--metrics-port", str(port), "--agent-name", AGENT_NAME))
        try:
            before = scrape(port)
            assert value(before, "captions_ready") == 1
            assert value(before, "captions_engine_batch_size") == 1
            assert value(before, "captions_engine_slots_free") == 1
            assert value(before, "captions_rooms") == 0

            room = "metrics-room"
            await dispatch(server, room)
            sub = await Subscriber(server, room).connect()
            alice = await Publisher(server, room, "alice", auto_subscribe=False).connect()
            bob = await Publisher(server, room, "bob", auto_subscribe=False).connect()
            await sub.wait_for_agent()
            await asyncio.gather(alice.wait_subscribed(), bob.wait_subscribed())
            silent = await wait_for_metrics(port, "the agent in the room", captions_rooms=1)
            assert value(silent, "captions_streams") == 0, "a silent microphone holds an engine slot"
            assert value(silent, "captions_queued_speakers") == 0
            a = espeak_wav("The quick brown fox jumps over the lazy dog near the river bank.", speech_dir / "m-a.wav")
            b = espeak_wav("Streaming speech recognition turns every word into text.", speech_dir / "m-b.wav")
            talking = asyncio.gather(alice.play(a), bob.play(b))
            # Both talk: one holds the slot, the other waits for it.
            during = await wait_for_metrics(port, "one speaker captioned and one waiting", captions_streams=1,
                                            captions_queued_speakers=1)
            await talking
            assert value(during, "captions_rooms") == 1
            assert value(during, "captions_engine_slots_used") == 1
            assert value(during, "captions_engine_slots_free") == 0
            assert value(during, "captions_streams") == 1
            assert value(during, "captions_queued_speakers") == 1

            await alice.disconnect()
            await bob.disconnect()
            # The one who waited is captioned once the slot is free, though they have left.
            await sub.wait_until(lambda: sub.finals("alice") and sub.finals("bob"), 60, "final captions of both")
            await sub.disconnect()
            after = await wait_for_metrics(port, "the stream's end", captions_streams=0)
        finally:
            await asyncio.to_thread(worker.stop)
    finally:
        await asyncio.to_thread(server.stop)

    # Privacy: the worker's log (default INFO level) names speakers but never holds caption text.
    log = worker.log_path.read_text(errors="replace")
    assert "alice" in log or "bob" in log, "speaker lifecycle events are logged"
    for caption in sub.captions:
        if len(caption.text) >= 8:
            assert caption.text not in log, f"caption text in the worker log: {caption.text!r}"

    steps = value(after, "captions_engine_steps_total")
    assert steps >= 25, "2 s of speech is 25 frames, each stepped once"
    for part in ("host", "encode", "lm", "total"):
        assert value(after, "captions_engine_step_seconds_count", part=part) == steps
    mean_step = value(after, "captions_engine_step_seconds_sum", part="total") / steps
    assert 0 < mean_step < 5
    # The factor is 80 ms over the mean of the last RTF_WINDOW_STEPS steps: that mean lies between
    # the fastest and the slowest step, and is the mean of all steps when the window holds them all.
    window_mean = 0.08 / value(after, "captions_engine_realtime_factor")
    lower, upper = step_time_range(after)
    assert lower <= window_mean <= upper, (window_mean, lower, upper)
    if steps <= RTF_WINDOW_STEPS:
        assert window_mean == pytest.approx(mean_step, rel=1e-9)
    words = value(after, "captions_caption_latency_seconds_count")
    assert words >= 1, "no word latency recorded although a speaker was captioned"
    mean_latency = value(after, "captions_caption_latency_seconds_sum") / words
    assert 0 < mean_latency < 30, f"mean caption latency {mean_latency:.2f} s"
    assert value(after, "captions_slot_wait_seconds_count") >= 2, "both turns got the slot"
    assert value(after, "captions_slot_wait_seconds_sum") >= 1.0, "one waited for the other's speech"
    for reason in ("waiting_overflow", "shutdown"):
        assert value(after, "captions_frames_dropped_total", reason=reason) == 0, reason
    for kind in ("engine_step", "stream", "publish", "transcript", "room"):
        assert value(after, "captions_errors_total", kind=kind) == 0, kind


def _start_worker(server, checkpoint: Path, workdir: Path, metrics_port: int) -> tuple[subprocess.Popen, Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "worker.log"
    env = dict(os.environ, LIVEKIT_URL=server.url, LIVEKIT_API_KEY=server.api_key,
               LIVEKIT_API_SECRET=server.api_secret, NO_TORCH_COMPILE="1")
    command = [str(Path(sys.executable).parent / "captions"), "worker", "dev", "--model", str(checkpoint),
               "--device", "cpu", "--batch-size", "1", "--data-dir", str(workdir / "data"),
               "--health-port", "0", "--metrics-port", str(metrics_port)]
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log_path


def _poll(predicate, timeout: float, what: str, process: subprocess.Popen, log_path: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        assert process.poll() is None, f"worker exited:\n{log_path.read_text(errors='replace')[-3000:]}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}:\n{log_path.read_text(errors='replace')[-3000:]}")


def test_health_and_readiness_follow_loading_then_registration(tiny_checkpoint, tmp_path):
    """A dedicated real livekit-server, frozen (SIGSTOP) once the worker has checked it: the worker is
    alive and "loading", then alive with the model loaded but not registered (LiveKit does not answer),
    and ready only once LiveKit, resumed, has registered it. After Ctrl-C nothing answers any more."""
    server = start_livekit_server(tmp_path / "livekit-server.log")
    port = free_port()
    worker, log_path = _start_worker(server, tiny_checkpoint, tmp_path / "worker", port)
    base = f"http://127.0.0.1:{port}"
    try:
        status, body = _poll(lambda: (r := http_get(base + "/readyz"))[0] and r, 120, "/readyz", worker, log_path)
        assert status == 503 and "model loading" in body, body
        server.process.send_signal(signal.SIGSTOP)  # registration can no longer happen
        assert http_get(base + "/healthz")[0] == 200, "alive while loading"

        def loaded_not_registered():
            status, body = http_get(base + "/readyz")
            return (status, body) if "model loading" not in body else None

        status, body = _poll(loaded_not_registered, 120, "the model to load", worker, log_path)
        assert status == 503 and "not registered with LiveKit" in body, body
        assert b"registered worker" not in log_path.read_bytes()
        assert http_get(base + "/healthz")[0] == 200

        server.process.send_signal(signal.SIGCONT)
        status, body = _poll(lambda: (r := http_get(base + "/readyz"))[0] == 200 and r, 60, "readiness",
                             worker, log_path)
        assert body.strip() == "ready"
        assert b"registered worker" in log_path.read_bytes(), "ready before LiveKit registered the worker"
        assert value(scrape(port), "captions_ready") == 1
    finally:
        server.process.send_signal(signal.SIGCONT)
        if worker.poll() is None:
            worker.send_signal(signal.SIGINT)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        server.process.terminate()
        server.process.wait(timeout=10)
    assert worker.returncode == 0, log_path.read_text(errors="replace")[-3000:]
    assert http_get(base + "/healthz")[0] == 0, "health endpoint still answering after the worker stopped"


class _Timings:
    def __init__(self, total_s: float):
        self.active, self.host_s, self.encode_s, self.lm_s, self.total_s = 2, 0.001, total_s / 2, total_s / 2, total_s


class _Engine:
    frame_size, sample_rate, batch_size, slots_in_use, steps, failed_steps = 1920, 24000, 4, 3, 0, 2

    def __init__(self):
        self.step_listeners = []


def test_realtime_factor_is_frame_time_over_mean_step_time_and_engine_failures_count_as_errors():
    metrics, engine = CaptionMetrics(), _Engine()
    metrics.attach_engine(engine, slots=[object()])
    assert metrics.realtime_factor() is None, "no step yet: no factor"
    for total in (0.02, 0.04):
        for listener in engine.step_listeners:
            listener(_Timings(total))
    assert metrics.realtime_factor() == pytest.approx(0.08 / 0.03)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}
    assert samples[("captions_engine_slots_free", ())] == 1
    assert samples[("captions_queued_speakers", ())] == 1
    assert samples[("captions_errors_total", (("kind", "engine_step"),))] == 2
    assert samples[("captions_engine_step_seconds_count", (("part", "lm"),))] == 2


# ---- translation (issue 26) ------------------------------------------------------------------------

def _samples(metrics: CaptionMetrics) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}


class _Model:
    def translate_batch(self, requests):
        return [f"<{r.target}> {r.text}" for r in requests]


def test_translation_series_are_the_operators_languages_and_the_engine_is_read_at_scrape_time():
    from captions.translate.engine import TranslationEngine

    metrics, engine = CaptionMetrics(), TranslationEngine(_Model())
    try:
        metrics.attach_translation(engine, ("de", "es"))
        metrics.attach_translation(engine, ("de", "es"))  # every room attaches: idempotent
        before = _samples(metrics)
        for kind in ("final", "interim"):
            for language in ("de", "es"):  # from the start, at 0 (rate() and alerts work)
                assert before[("captions_translations_published_total", (("kind", kind), ("language", language)))] == 0
        assert before[("captions_translation_untranslated_finals_total", (("reason", "timeout"),))] == 0
        assert before[("captions_translation_queued", ())] == 0
        futures = [engine.submit(f"hello {n}", "en", "de", final=True) for n in range(3)]
        assert [f.result(timeout=10) for f in futures] == [f"<de> hello {n}" for n in range(3)]
        metrics.translation_published("de", final=True)
        metrics.translation_published("xx", final=False)  # a room's metadata picked it: no series of its own
        metrics.final_untranslated("error: RuntimeError")
        metrics.final_untranslated("timeout")
        metrics.observe_translation_delay(0.2)
        after = _samples(metrics)
        assert after[("captions_translations_published_total", (("kind", "final"), ("language", "de")))] == 1
        assert after[("captions_translations_published_total", (("kind", "interim"), ("language", "other")))] == 1
        assert not any(dict(labels).get("language") == "xx" for _, labels in after)
        assert after[("captions_translation_untranslated_finals_total", (("reason", "error"),))] == 1
        assert after[("captions_translation_untranslated_finals_total", (("reason", "timeout"),))] == 1
        assert after[("captions_translation_final_delay_seconds_count", ())] == 1
        assert after[("captions_translation_engine_submitted_total", ())] == 3
        assert after[("captions_translation_engine_translated_total", ())] == 3
        assert after[("captions_translation_engine_batches_total", ())] >= 1
        assert after[("captions_translation_engine_dropped_total", ())] == 0
        assert after[("captions_translation_engine_busy_seconds_total", ())] > 0
    finally:
        engine.close()


@pytest.mark.asyncio(loop_scope="function")
async def test_a_rooms_translator_counts_what_it_publishes_into_the_workers_metrics():
    """Through the room's real translator and publisher (fake room and engine, tests/test_translation_lane.py):
    a translated final counts with its delay, a failed one as untranslated, by reason."""
    from captions.live.metrics import METRICS
    from tests.test_translation_lane import FakeEngine, FakeRoom, Lane

    def count(name: str, **labels: str) -> float:
        return _samples(METRICS).get((name, tuple(sorted(labels.items()))), 0.0)

    published = ("captions_translations_published_total", {"kind": "final", "language": "de"})
    before = (count(published[0], **published[1]), count("captions_translation_final_delay_seconds_count"),
              count("captions_translation_untranslated_finals_total", reason="error"))
    lane = Lane(FakeRoom({"relay": "de"}), FakeEngine(delay=lambda text: 0.05), targets=("de",))
    try:
        lane.say("alice", "SG_a1", "hello there", final=True)
        await lane.settle()
    finally:
        lane.close()
    failing = Lane(FakeRoom({"relay": "de"}), FakeEngine("fail"), targets=("de",))
    try:
        failing.say("alice", "SG_a2", "hello again", final=True)
        await failing.settle()
    finally:
        failing.close()
    assert count(published[0], **published[1]) == before[0] + 1
    assert count("captions_translation_final_delay_seconds_count") == before[1] + 1
    assert count("captions_translation_final_delay_seconds_sum") >= 0.05
    assert count("captions_translation_untranslated_finals_total", reason="error") == before[2] + 1
