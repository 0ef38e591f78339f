"""A broken GPU makes the worker unready and exit (captions/stt/engine.py, captions/live/worker.py):
an error that leaves CUDA unusable, or several failed steps in a row, break the engine; the worker
then answers 503 on /readyz with the cause and stops serving. A single failed step (a CUDA
out-of-memory) does not (tests/test_engine.py: the engine keeps serving)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest
from livekit import api

from captions.live import room as room_module
from captions.live import worker
from captions.live.metrics import TASK_METRICS, CaptionMetrics, start_observability_server
from captions.live.presence import HeartbeatWatch
from captions.live.recovery import MICROPHONE, RoomPlan, plan_room
from captions.live.room import RoomCaptioner, RoomOptions
from captions.live.segmenter import CaptionUpdate
from captions.protocol import ATTR_AGENT_ALIVE, ATTR_AGENT_SUPERSEDED, CaptionSigner
from captions.stt import engine as engine_module
from captions.stt.api import Word
from captions.stt.engine import EngineFull, SttEngine
from captions.stt.watchdog import StepWatchdog
from tests.engine_drive import FRAME, Collector, run_solo

pytestmark = [pytest.mark.timeout(120)]
STICKY = "CUDA error: an illegal memory access was encountered (injected)"


@pytest.fixture
def engine(tiny_checkpoint):
    engine = SttEngine.load(str(tiny_checkpoint), device="cpu", batch_size=2)
    engine.start()
    yield engine
    engine.close()


def failing_steps(engine: SttEngine, monkeypatch, message: str, times: int) -> dict:
    """The next `times` model steps raise `message`, later ones run."""
    real, calls = engine._run_model, {"failed": 0}

    def run_model(batch, reset):
        if calls["failed"] < times:
            calls["failed"] += 1
            raise RuntimeError(message)
        return real(batch, reset)

    monkeypatch.setattr(engine, "_run_model", run_model)
    return calls


def talk(engine: SttEngine) -> Collector:
    collector = Collector()
    stream = engine.open_stream(collector)
    stream.push(np.zeros(FRAME * 4, dtype=np.float32))
    assert collector.done.wait(20), "the failed step ended the stream"
    return collector


def test_a_sticky_cuda_error_breaks_the_engine_once_and_says_why(engine, monkeypatch, caplog):
    told = []
    engine.broken_listeners.append(told.append)
    failing_steps(engine, monkeypatch, STICKY, times=99)
    collector = talk(engine)
    assert "illegal memory access" in collector.events[-1].error
    deadline = time.monotonic() + 5  # the step's streams end first, then the engine breaks
    while not told and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.broken is not None and "illegal memory access" in engine.broken
    assert told == [engine.broken], "the worker is told, once"
    failures = [r.getMessage() for r in caplog.records if r.getMessage().startswith("engine failed:")]
    assert failures == [f"engine failed: RuntimeError: {STICKY}; exiting so the orchestrator replaces this worker"]
    with pytest.raises(EngineFull, match="engine failed"):
        engine.open_stream(Collector())  # speakers wait (in the queue) for the worker that replaces this one


def test_failed_steps_in_a_row_break_the_engine_and_a_success_between_starts_the_count_again(engine, monkeypatch):
    calls = failing_steps(engine, monkeypatch, "some step failure (injected)", times=engine_module.BROKEN_AFTER_FAILED_STEPS - 1)
    for _ in range(engine_module.BROKEN_AFTER_FAILED_STEPS - 1):
        talk(engine)
    assert calls["failed"] == engine_module.BROKEN_AFTER_FAILED_STEPS - 1
    assert engine.broken is None, "not yet"
    assert run_solo(engine, np.zeros(FRAME * 4, dtype=np.float32)).events[-1].error is None, "a step succeeds"
    failing_steps(engine, monkeypatch, "some step failure (injected)", times=99)
    for _ in range(engine_module.BROKEN_AFTER_FAILED_STEPS - 1):
        talk(engine)
    assert engine.broken is None, "the success started the count again"
    talk(engine)
    assert engine.broken is not None and "3 steps in a row failed" in engine.broken


def test_a_step_that_never_returns_breaks_the_engine_and_says_why(engine, monkeypatch, caplog):
    """A hung device raises nothing: the step blocks. The watchdog breaks the engine after
    `hung_s` (shortened here): the stream ends with the cause, the worker is told once, no new
    stream is taken; when the step returns at last, nothing else happens."""
    told, release, real = [], threading.Event(), engine._run_model
    engine.broken_listeners.append(told.append)
    engine.watchdog.hung_s = 0.5

    def hung(batch, reset):
        release.wait(30)
        return real(batch, reset)

    monkeypatch.setattr(engine, "_run_model", hung)
    collector = talk(engine)
    assert "has not returned" in collector.events[-1].error, collector.events[-1]
    assert engine.broken is not None and "hung device" in engine.broken
    assert told == [engine.broken], "the worker is told, once"
    with pytest.raises(EngineFull, match="engine failed"):
        engine.open_stream(Collector())
    release.set()
    deadline = time.monotonic() + 5
    while engine.watchdog.started is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert engine.watchdog.started is None, "the step returned"
    assert len(collector.events) == 1 and collector.events[0].ended, "nothing after the end"
    assert not [r for r in caplog.records if "crashed" in r.getMessage()], "the late step crashed nothing"


def test_the_watchdog_fires_once_for_a_step_still_running_and_not_for_one_that_returned():
    fired, done = [], threading.Event()
    watchdog = StepWatchdog(lambda cause, unless: (fired.append((cause, unless())), done.set(), True)[-1])
    watchdog.hung_s = 0.2
    watchdog.started = time.monotonic()
    watchdog.start()
    try:
        assert done.wait(5), "a step running past hung_s breaks the engine"
        (cause, still_running_when_fired), = fired
        assert re.fullmatch(r"an engine step has not returned in \d+ s \(a hung device or driver\)", cause)
        assert still_running_when_fired is False, "unless() says the step had not returned"
        time.sleep(0.5)
        assert len(fired) == 1, "once"
    finally:
        watchdog.close()
    quiet = StepWatchdog(lambda cause, unless: fired.append(cause) or True)
    quiet.hung_s = 0.2
    quiet.start()
    for _ in range(10):  # steps of 50 ms, each returning in time
        quiet.started = time.monotonic()
        time.sleep(0.05)
        quiet.started = None
        time.sleep(0.05)
    quiet.close()
    assert len(fired) == 1, "a step that returns in time is never taken for a hung one"
    refused, again = [], threading.Event()
    watchdog = StepWatchdog(lambda cause, unless: (refused.append(cause), len(refused) > 1 and again.set(), False)[-1])
    watchdog.hung_s = 0.2
    watchdog.started = time.monotonic()
    watchdog.start()
    try:
        assert again.wait(5), "a break refused (the step returned meanwhile) leaves the watchdog watching"
    finally:
        watchdog.close()


async def until(predicate, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class FakeServer:
    """livekit-agents' AgentServer as `worker._serve` drives it."""

    def __init__(self):
        self.closed = False

    async def run(self, devmode: bool) -> None:
        await asyncio.Event().wait()

    async def aclose(self) -> None:
        self.closed = True


async def test_a_broken_engine_makes_the_worker_unready_and_stop_serving(monkeypatch):
    monkeypatch.setattr(worker, "_engine_failure", None)
    monkeypatch.setattr(worker, "_stop_serving", None)
    monkeypatch.setattr(worker.READINESS, "model_loaded", True)
    monkeypatch.setattr(worker.READINESS, "registered", True)
    monkeypatch.setattr(worker.READINESS, "connected", None)
    metrics = CaptionMetrics()
    server = start_observability_server("127.0.0.1", 0, worker.not_ready, metrics=metrics)
    fake = FakeServer()
    try:
        assert get(server.port, "/readyz") == (200, "ready\n")
        serving = asyncio.create_task(worker._serve(fake, dev=True, reconciler=None))
        await asyncio.sleep(0.05)
        assert not serving.done()
        # The engine thread reports it.
        thread = threading.Thread(target=worker.engine_failed, args=(f"RuntimeError: {STICKY}",))
        thread.start()
        thread.join()
        await asyncio.wait_for(serving, 10)
        assert fake.closed, "the rooms were closed: the worker stops"
        status, text = get(server.port, "/readyz")
        assert status == 503 and "engine failed: RuntimeError: CUDA error: an illegal memory access" in text
        assert TASK_METRICS.engine_broken._value.get() == 1
    finally:
        TASK_METRICS.engine_broken.set(0)
        server.close()


INJECTION = '''
"""Test-only (tests/test_supervision_engine.py): once the worker registered, one stream's first
engine step fails with a sticky CUDA error, or never returns (HANG)."""
import time

import numpy as np

from captions.live import worker
from captions.stt import engine

STICKY = %r
HANG = %r


def _broken_model(*args, **kwargs):
    if HANG:
        time.sleep(3600)
    raise RuntimeError(STICKY)


_build_server = worker._build_server


def _build_server_then_break(args, service):
    server = _build_server(args, service)

    def registered(*_):
        service.engine._run_model = _broken_model
        service.engine.watchdog.hung_s = 1.0
        service.engine.open_stream(lambda event: None).push(np.zeros(1920 * 2, dtype=np.float32))

    server.on("worker_registered", registered)
    return server


worker._build_server = _build_server_then_break
'''


@pytest.mark.parametrize("hang", [False, True], ids=["sticky error", "hung step"])
def test_a_worker_whose_gpu_breaks_exits_non_zero_with_the_cause(livekit_server, tiny_checkpoint, tmp_path, hang):
    """The real worker process: its engine's first step fails with a sticky CUDA error, or never
    returns (injected through a test-only sitecustomize module, nothing in the worker; the watchdog's
    20 s shortened to 1 s), and it exits on its own, saying why."""
    import os

    from captions.dev.worker_process import start_captions_worker

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(INJECTION % (STICKY, hang))
    path = os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])
    process = start_captions_worker(livekit_server, tiny_checkpoint, tmp_path / "worker", batch_size=1,
                                    env={"PYTHONPATH": path})
    try:
        status = process.process.wait(timeout=90)
    finally:
        if process.process.poll() is None:
            process.stop()
    log = process.log_path.read_text(errors="replace")
    assert status == worker.EXIT_ENGINE_FAILED, log[-3000:]
    cause = r"an engine step has not returned in \d+ s \(a hung device or driver\)" if hang else re.escape(f"RuntimeError: {STICKY}")
    assert re.search(f"engine failed: {cause}; exiting so the orchestrator replaces this worker", log), log[-3000:]


class AgentRoom:
    """Enough of a connected rtc.Room for a captioner's heartbeat: its own attributes, as sent."""

    name = "engine-lost"

    def __init__(self):
        self.local_participant = SimpleNamespace(identity="agent-1", attributes={}, set_attributes=self._set)

    async def _set(self, changed: dict[str, str]) -> None:
        self.local_participant.attributes.update(changed)


async def test_a_broken_engine_makes_its_rooms_captioners_step_down_at_once(tmp_path, monkeypatch):
    """The engine (or, with receiving processes, the engine process) is gone: each captioner marks
    itself superseded and its heartbeat stops, so the recovery dispatches another captioner on its
    next round, whatever becomes of this worker's shutdown (seen in CI: a receiving process whose
    engine process was killed went on heartbeating, and no other captioner came for 60 s)."""
    signer = CaptionSigner.for_deployment("secret", "")
    room = AgentRoom()
    captioner = RoomCaptioner(room, slots=None, options=RoomOptions(data_dir=tmp_path), signer=signer)
    monkeypatch.setattr(room_module, "HEARTBEAT_S", 0.02)
    monkeypatch.setattr(worker, "_engine_failure", None)
    monkeypatch.setattr(worker, "_stop_serving", None)
    monkeypatch.setattr(worker, "_captioners", {"job-1": captioner})
    monkeypatch.setattr(worker, "_engine_failed_event", threading.Event())  # no watchdog here; keep it unset
    captioner._spawn(captioner._update_status_forever(), "status")
    captioner._spawn(captioner._release_held_forever(), "transcript-wait")
    sent = room.local_participant.attributes
    published: list[tuple[str, bool]] = []
    captioner._publisher.put = lambda c: published.append((c.update.segment_id, bool(sent.get(ATTR_AGENT_SUPERSEDED))))

    def plan() -> RoomPlan:
        """The recovery's reading of the room now (a speaker, and this captioner as it presents itself)."""
        me = api.ParticipantInfo(identity="agent-1", kind=api.ParticipantInfo.Kind.AGENT, attributes=dict(sent),
                                 joined_at_ms=int(time.time() * 1000) - 60_000)
        alice = api.ParticipantInfo(identity="alice", tracks=[api.TrackInfo(sid="TR_1", source=MICROPHONE)])
        return plan_room(room.name, [alice, me], HeartbeatWatch(), int(time.time() * 1000), signer.public_key)

    try:
        await until(lambda: int(sent.get(ATTR_AGENT_ALIVE, 0)) >= 2)
        assert not plan().needs_captioner, "a captioner that presents itself (not superseded) has the room"
        thread = threading.Thread(target=worker.engine_failed, args=("the engine process is gone",))
        thread.start()
        thread.join()
        # The failed stream's open words come as a final just after the failure is reported: live
        # viewers show only the elected captioner, so it goes out before the mark.
        await asyncio.sleep(0.05)
        captioner.caption(SimpleNamespace(identity="alice", name="Alice", track_sid="TR_1"),
                          CaptionUpdate("SG_1", "last words", True, [Word("last", 0.0, 0.3), Word("words", 0.4, 0.8)]),
                          wall_time=lambda t: 1000 + t)
        await until(lambda: sent.get(ATTR_AGENT_SUPERSEDED))
        assert published == [("SG_1", False)], "the last final went out before the captioner stepped down"
        assert plan().needs_captioner, "the recovery dispatches another captioner without waiting for STALE_S"
        beat = sent[ATTR_AGENT_ALIVE]
        await asyncio.sleep(0.2)  # ten beats
        assert sent[ATTR_AGENT_ALIVE] == beat, "its heartbeat stopped"
    finally:
        for task in list(captioner._tasks):
            task.cancel()
        await asyncio.gather(*captioner._tasks, return_exceptions=True)
        await asyncio.to_thread(captioner.transcript.close)
        TASK_METRICS.engine_broken.set(0)


def test_a_worker_whose_engine_failed_exits_even_if_a_room_thread_never_ends():
    """`serve_rooms`' watchdog, in a real process: a job thread that never ends (as livekit-agents'
    are: not daemon threads) would hold the process at the interpreter's exit, heartbeating."""
    script = ("import threading, time\n"
              "from captions.live import worker\n"
              "threading.Thread(target=time.sleep, args=(120,), name='job_thread_runner').start()\n"
              "threading.Thread(target=worker._exit_once_engine_failed, args=(0.5,), daemon=True).start()\n"
              "worker.engine_failed('the engine process is gone')\n"
              "print('returned', flush=True)\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == worker.EXIT_ENGINE_FAILED and "returned" in done.stdout, done.stderr
    assert "exiting now" in done.stderr
    assert time.monotonic() - started < 30, "it did not wait for the room's thread"
