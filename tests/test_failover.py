"""Rooms keep their captions through worker crashes, restarts and deploys.

Each test: a livekit-server of its own, real `captions worker` processes (tiny checkpoint, CPU) that
share one transcript directory (one host), a bot that keeps talking in a room, and a hidden viewer
bot collecting the captions. Each asserts that captions resume in the same room within the bound,
and that two captioners never captioned at once: the captions' agents never interleave, and no two
captioners' transcript segments of one speaker overlap in time (segment ids cannot show it: each
engine stream numbers its segments under a fresh prefix). The measured gaps go to
artifacts/failover-gaps.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from livekit import api

from captions.dev.bots import Caption, Publisher, Subscriber
from captions.dev.livekit_server import LiveKitServer, start_dev_server
from captions.dev.worker_process import CaptionsWorker, start_captions_worker
from captions.live.transcripts import read_transcript, transcript_path
from captions.live.worker import ENGINE_FAILED_STOP_S
from captions.protocol import ATTR_AGENT, FinalSegment
from tests.conftest import espeak_wav

pytestmark = [pytest.mark.livekit, pytest.mark.slow, pytest.mark.failover, pytest.mark.timeout(240),
              pytest.mark.asyncio(loop_scope="session")]

RESUME_BOUND_S = 10.0
"""Captions resume within this of a worker with free slots being registered (issue bound)."""
CRASH_BOUND_S = 15.0
"""With a worker already up: a crash is only visible once the dead captioner's heartbeat is stale."""
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
OVERLAP_TOLERANCE_S = 0.5
"""Two captioners' segments of one speaker may touch by this much (their clocks map audio to wall time
each on its own); two captioners transcribing the same speech overlap by whole segments."""
FLUSH_SLACK_S = 2.5
"""A captioner told to stop flushes what it heard: its last word ends at most this long before the
stop (the speaker talks with 0.6 s pauses; the tiny model's word times come out early by its 0.5 s
delay; WebRTC's latency). Without the flush, the open caption (up to 8 s of speech) is lost."""
SPEECH = ("The quick brown fox jumps over the lazy dog near the river bank. "
          "Streaming speech recognition turns every word into text as it is spoken.")


def record_gap(scenario: str, seconds: float) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "failover-gaps.json"
    gaps = json.loads(path.read_text()) if path.exists() else {}
    gaps.setdefault(scenario, []).append(round(seconds, 2))
    path.write_text(json.dumps(gaps, indent=2))


class Stage:
    """A server, workers on one host, a talking bot and a viewer bot in one room."""

    def __init__(self, checkpoint: Path, tmp: Path, server: LiveKitServer, room: str):
        self.checkpoint, self.tmp, self.server, self.room = checkpoint, tmp, server, room
        self.data_dir = tmp / "data"
        self.workers: list[CaptionsWorker] = []
        self.viewer: Subscriber | None = None
        self.speaker: Publisher | None = None
        self._talking: asyncio.Task | None = None

    async def start_worker(self, *extra: str) -> CaptionsWorker:
        worker = await asyncio.to_thread(start_captions_worker, self.server, self.checkpoint,
                                         self.tmp / f"worker-{len(self.workers)}", 3, extra, 180, None,
                                         self.data_dir)
        self.workers.append(worker)
        return worker

    async def talk(self, speech_dir: Path) -> None:
        """The viewer joins, then a speaker who talks until the test ends (a sentence, a pause, ...)."""
        self.viewer = await Subscriber(self.server, self.room, identity="viewer").connect()
        self.speaker = await Publisher(self.server, self.room, "alice").connect()
        wav = speech_dir / "failover.wav"
        if not wav.exists():
            espeak_wav(SPEECH, wav)

        async def forever() -> None:
            while True:
                await self.speaker.play(wav)
                await self.speaker.silence(0.6)

        self._talking = asyncio.create_task(forever())

    def agents(self) -> list[str]:
        """The caption agents, in the order their captions first arrived."""
        order: list[str] = []
        for caption in self.viewer.captions:
            agent = caption.attributes.get(ATTR_AGENT, "")
            if agent not in order:
                order.append(agent)
        return order

    async def caption_from_a_new_agent(self, old: set[str], timeout: float) -> tuple[str, float]:
        """Waits for the first caption from an agent not in `old`: (agent, arrival time)."""
        def fresh() -> list[Caption]:
            return [c for c in self.viewer.captions if c.attributes.get(ATTR_AGENT, "") not in old]

        await self.viewer.wait_until(fresh, timeout, f"captions from a new captioner (not {old})")
        first = min(fresh(), key=lambda c: c.received_at)
        return first.attributes[ATTR_AGENT], first.received_at

    def worker_of(self, agent: str) -> CaptionsWorker:
        """The worker whose log shows it captioning as `agent`."""
        for worker in self.workers:
            if f"captioning room {self.room} as {agent}" in worker.log_path.read_text(errors="replace"):
                return worker
        raise AssertionError(f"no worker ran {agent}")

    def transcript(self) -> list[tuple[str, FinalSegment]]:
        """The room's transcript segments, each with the agent that wrote it: an engine stream's
        segments share their id's prefix, and the viewer saw that agent's captions under it
        ("?" for a stream the viewer saw nothing of)."""
        agent_of = {prefix(c.segment_id): c.attributes.get(ATTR_AGENT, "?") for c in self.viewer.captions}
        return [(agent_of.get(prefix(s.segment_id), "?"), s)
                for s in read_transcript(transcript_path(self.data_dir, self.room))]

    def assert_clean(self) -> None:
        """No duplicate segment in the transcript, never two captioners at once (in the captions'
        arrival, and in the transcript's times of each speaker), every segment that a viewer saw
        growing ended final."""
        transcript = self.transcript()
        ids = [s.segment_id for _, s in transcript]
        assert len(ids) == len(set(ids)), "a segment was written twice"
        doubled = overlapping_captioners(transcript)
        assert not doubled, f"two captioners captioned the same speech: {doubled}"
        arrival = sorted(self.viewer.captions, key=lambda c: c.received_at)
        runs = [c.attributes.get(ATTR_AGENT) for i, c in enumerate(arrival)
                if i == 0 or c.attributes.get(ATTR_AGENT) != arrival[i - 1].attributes.get(ATTR_AGENT)]
        assert len(runs) == len(set(runs)), f"two captioners captioned at once: {runs}"

    async def aclose(self) -> None:
        if self._talking is not None:
            self._talking.cancel()
            with contextlib.suppress(BaseException):
                await self._talking
        for bot in (self.speaker, self.viewer):
            if bot is not None:
                with contextlib.suppress(Exception):
                    await bot.disconnect()
        for worker in self.workers:
            await asyncio.to_thread(worker.stop, 20)


def prefix(segment_id: str) -> str:
    """The engine stream's part of a segment id (captions/live/segmenter.py: `SG_<uuid>_<n>`)."""
    return segment_id.rsplit("_", 1)[0]


def overlapping_captioners(transcript: list[tuple[str, FinalSegment]]) -> list[str]:
    """Segments of one speaker from two different agents whose times overlap by more than
    OVERLAP_TOLERANCE_S: the same speech captioned twice."""
    found = []
    for (agent_a, a), (agent_b, b) in itertools.combinations(transcript, 2):
        if agent_a == agent_b or a.participant_identity != b.participant_identity:
            continue
        overlap = min(a.end, b.end) - max(a.start, b.start)
        if overlap > OVERLAP_TOLERANCE_S:
            found.append(f"{agent_a} {a.segment_id} {a.text!r} and {agent_b} {b.segment_id} {b.text!r} "
                         f"overlap by {overlap:.2f} s")
    return found


@contextlib.asynccontextmanager
async def stage(tiny_checkpoint: Path, tmp_path: Path):
    server = await asyncio.to_thread(start_dev_server, tmp_path / "livekit-server.log")
    scene = Stage(tiny_checkpoint, tmp_path, server, f"failover-{uuid.uuid4().hex[:6]}")
    try:
        yield scene
    except BaseException:
        print_worker_logs(scene)
        raise
    finally:
        await scene.aclose()
        await asyncio.to_thread(scene.server.stop)


def print_worker_logs(scene: Stage) -> None:
    """Shown with a failure (captured output): what each worker did, without the SDK's per-caption
    noise."""
    for worker in scene.workers:
        print(f"===== {worker.log_path}")
        print("\n".join(line for line in worker.log_path.read_text(errors="replace").splitlines()
                        if "ignoring text stream" not in line))


def kill_9(worker: CaptionsWorker) -> None:
    worker.process.kill()  # SIGKILL: no flush, no leave, as an OOM kill or a crash
    worker.process.wait()


def readyz(worker: CaptionsWorker) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/readyz", timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


async def test_kill_9_of_the_only_worker_then_a_new_one_resumes_the_room(tiny_checkpoint, tmp_path, speech_dir):
    async with stage(tiny_checkpoint, tmp_path) as scene:
        first = await scene.start_worker()
        await scene.talk(speech_dir)
        old, _ = await scene.caption_from_a_new_agent(set(), 60)
        kill_9(first)
        await asyncio.sleep(2.0)
        second = await scene.start_worker()
        _, at = await scene.caption_from_a_new_agent({old}, 60)
        gap = at - second.registered_at
        record_gap("kill -9, new worker: registered -> captions", gap)
        assert gap <= RESUME_BOUND_S, f"captions resumed {gap:.1f} s after the new worker registered"
        scene.assert_clean()


@pytest.mark.parametrize("receivers", [1, 2], ids=["one-process", "engine-and-2-receivers"])
async def test_kill_9_of_one_of_two_workers_the_other_takes_the_room(tiny_checkpoint, tmp_path, speech_dir, receivers):
    """With receiving processes (issue 24), the kill takes the worker's engine process: its receiving
    processes lose the engine and stop, and the other worker's recovery takes the room."""
    async with stage(tiny_checkpoint, tmp_path) as scene:
        await scene.start_worker("--receivers", str(receivers))
        await scene.start_worker("--receivers", str(receivers))
        await scene.talk(speech_dir)
        old, _ = await scene.caption_from_a_new_agent(set(), 60)
        killed = scene.worker_of(old)
        receiving = process_tree(killed.process.pid)[1:]
        assert len(receiving) == (receivers if receivers > 1 else 0), receiving  # the engine process's children
        killed_at = time.time()
        kill_9(killed)
        _, at = await scene.caption_from_a_new_agent({old}, 60)
        record_gap("kill -9 of one of two workers: crash -> captions", at - killed_at)
        assert at - killed_at <= CRASH_BOUND_S
        scene.assert_clean()
        # Its receiving processes stepped down and exit by themselves: none stays in a room.
        deadline = time.monotonic() + ENGINE_FAILED_STOP_S + 15
        while [pid for pid in receiving if running(pid)] and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        assert not [pid for pid in receiving if running(pid)], "a receiving process outlived its engine process"


async def test_a_rolling_restart_hands_the_room_over_in_seconds_and_loses_no_final(
        tiny_checkpoint, tmp_path, speech_dir):
    async with stage(tiny_checkpoint, tmp_path) as scene:
        await scene.start_worker()
        await scene.start_worker()
        await scene.talk(speech_dir)
        old, _ = await scene.caption_from_a_new_agent(set(), 60)
        leaving = scene.worker_of(old)
        stopped_at = time.time()
        leaving.process.terminate()  # SIGTERM, as `docker compose` or systemd stop a service
        new, at = await scene.caption_from_a_new_agent({old}, 60)
        assert await asyncio.to_thread(leaving.process.wait, 30) == 0
        record_gap("rolling restart (SIGTERM): stop -> captions", at - stopped_at)
        assert at - stopped_at <= RESUME_BOUND_S
        # The leaving captioner flushed: each segment it showed ended final.
        theirs = [c for c in scene.viewer.captions if c.attributes.get(ATTR_AGENT) == old]
        open_segments = {c.segment_id for c in theirs} - {c.segment_id for c in theirs if c.final}
        assert not open_segments, f"segments left without a final: {open_segments}"
        # The speech said across the handover: the leaving captioner's words run up to its stop,
        # the new one's follow within the bound, and the transcript's words of the speaker (who
        # talks all along) leave no longer gap anywhere.
        await scene.viewer.wait_until(
            lambda: any(c.final and c.text and c.attributes.get(ATTR_AGENT) == new for c in scene.viewer.captions),
            60, "a final caption from the new captioner")
        await asyncio.sleep(1.0)  # its transcript line is written before it is sent; let the next ones land too
        words = sorted((w[1], w[2], agent) for agent, s in scene.transcript() for w in s.words)
        last_old = max((end for _, end, agent in words if agent == old), default=None)
        assert last_old is not None, "the leaving captioner's words are not in the transcript: its open caption was lost"
        assert last_old >= stopped_at - FLUSH_SLACK_S, (
            f"the leaving captioner's last word ended {stopped_at - last_old:.1f} s before its stop: the words "
            "said just before it were lost")
        first_new = min(start for start, _, agent in words if agent == new)
        assert first_new - last_old <= RESUME_BOUND_S, (
            f"{first_new - last_old:.1f} s of speech without a word across the handover")
        gaps = [(b[0] - a[1], a[1]) for a, b in itertools.pairwise(words)]
        widest, at_time = max(gaps)
        assert widest <= RESUME_BOUND_S, f"no word for {widest:.1f} s from {at_time - stopped_at:+.1f} s of the stop"
        assert {agent for *_, agent in words} == {old, new}, "every transcript segment is the old or new captioner's"
        scene.assert_clean()


async def test_a_room_created_before_any_worker_is_captioned_once_one_registers(
        tiny_checkpoint, tmp_path, speech_dir):
    async with stage(tiny_checkpoint, tmp_path) as scene:
        await scene.talk(speech_dir)
        await asyncio.sleep(3.0)  # LiveKit's own dispatch, at the room's creation, found no worker
        worker = await scene.start_worker()
        _, at = await scene.caption_from_a_new_agent(set(), 60)
        gap = at - worker.registered_at
        record_gap("room created before any worker: registered -> captions", gap)
        assert gap <= RESUME_BOUND_S
        scene.assert_clean()


def running(pid: int) -> bool:
    """Not exited (an orphan's exit leaves a zombie that nobody here reaps)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def send_signal(pids: list[int], sig: int) -> list[int]:
    """Signals each process still there (a short-lived child may have exited since it was listed):
    those it reached."""
    reached = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            reached.append(pid)
    return reached


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (the worker's job processes), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


async def microphone_published(lk: api.LiveKitAPI, room: str, identity: str) -> bool:
    try:
        participants = (await lk.room.list_participants(api.ListParticipantsRequest(room=room))).participants
    except api.TwirpError:  # the room is not there yet
        return False
    return any(p.identity == identity and p.tracks for p in participants)


async def test_captions_resume_after_livekit_server_restarts_under_a_live_room(
        tiny_checkpoint, tmp_path, speech_dir):
    """The server is killed and started again on the same ports: the bots and the worker reconnect;
    /readyz says the worker lost LiveKit meanwhile, and is ready again once it registered again.
    The worker is held (SIGSTOP) until the speaker has published her microphone on the new server,
    so that the captioner rejoins a room where the microphone already is: that order, seen once in
    CI, left the captioner in the room and deaf (its subscription never reached the new server)."""
    async with stage(tiny_checkpoint, tmp_path) as scene:
        worker = await scene.start_worker()
        await scene.talk(speech_dir)
        await scene.caption_from_a_new_agent(set(), 60)
        port = int(scene.server.url.rsplit(":", 1)[1])
        scene.server.process.kill()
        scene.server.process.wait()
        deadline = time.monotonic() + 20
        while readyz(worker) == 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert readyz(worker) == 503, "/readyz still says ready without LiveKit"
        held = send_signal(process_tree(worker.process.pid), signal.SIGSTOP)
        try:
            restarted_at = time.time()
            scene.server = await asyncio.to_thread(start_dev_server, scene.tmp / "livekit-server.log", port=port)
            async with api.LiveKitAPI(scene.server.url, scene.server.api_key, scene.server.api_secret) as lk:
                deadline = time.monotonic() + 30
                while not await microphone_published(lk, scene.room, "alice"):
                    assert time.monotonic() < deadline, "the speaker never published again"
                    await asyncio.sleep(0.1)
        finally:
            send_signal(held, signal.SIGCONT)
        deadline = time.monotonic() + 60
        while readyz(worker) != 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert readyz(worker) == 200, "the worker never registered again"
        before = len(scene.viewer.captions)
        await scene.viewer.wait_until(lambda: len(scene.viewer.captions) > before, 60, "captions after the restart")
        at = min(c.received_at for c in scene.viewer.captions[before:])
        record_gap("livekit-server restart: server up -> captions", at - restarted_at)
        assert at - restarted_at <= 30
        scene.assert_clean()


async def test_two_captioners_forced_into_one_room_leave_exactly_one(tiny_checkpoint, tmp_path, speech_dir):
    """Explicit dispatch: two dispatches at once put two captioners in the room (as a recovery racing
    LiveKit's own dispatch would): one stays, and nobody sees a caption twice."""
    async with stage(tiny_checkpoint, tmp_path) as scene:
        worker = await scene.start_worker("--agent-name", "captioner")
        await scene.talk(speech_dir)
        async with api.LiveKitAPI(scene.server.url, scene.server.api_key, scene.server.api_secret) as lk:
            together: list[list[str]] = []  # the agents in the room, polled every 0.1 s (a claim settles in 0.5 s)

            async def watch() -> None:
                while True:
                    with contextlib.suppress(api.TwirpError):
                        listed = (await lk.room.list_participants(api.ListParticipantsRequest(room=scene.room)))
                        together.append(sorted(p.identity for p in listed.participants
                                               if p.kind == api.ParticipantInfo.Kind.AGENT))
                    await asyncio.sleep(0.1)

            watching = asyncio.create_task(watch())
            try:
                await asyncio.gather(*(lk.agent_dispatch.create_dispatch(
                    api.CreateAgentDispatchRequest(room=scene.room, agent_name="captioner")) for _ in range(2)))
                agent, _ = await scene.caption_from_a_new_agent(set(), 60)
                await asyncio.sleep(6.0)  # a claim, a recovery round, a heartbeat's staleness: all settled
            finally:
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
            listed = (await lk.room.list_participants(api.ListParticipantsRequest(room=scene.room))).participants
        captioners = [p.identity for p in listed if p.kind == api.ParticipantInfo.Kind.AGENT]
        assert captioners == [agent], captioners
        # Both dispatches did put a captioner in the room (else there was nothing to resolve)...
        assert max(map(len, together)) == 2, f"never two captioners in the room at once: {sorted(set(map(tuple, together)))}"
        [other] = {identity for seen in together for identity in seen} - {agent}
        # ...and the other one went: it left by its claim, or a recovery round removed it.
        log = worker.log_path.read_text(errors="replace")
        assert (f"{agent} already captions it; {other} leaves" in log
                or f"removing duplicate captioner {other} from room {scene.room}" in log), (
            f"{other} left the room, but neither by its claim nor by the recovery")
        assert scene.agents() == [agent], "a second captioner published captions"
        scene.assert_clean()


async def test_explicit_dispatch_recovers_after_kill_9(tiny_checkpoint, tmp_path, speech_dir):
    async with stage(tiny_checkpoint, tmp_path) as scene:
        first = await scene.start_worker("--agent-name", "captioner")
        await scene.talk(speech_dir)
        async with api.LiveKitAPI(scene.server.url, scene.server.api_key, scene.server.api_secret) as lk:
            await lk.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(room=scene.room, agent_name="captioner"))
        old, _ = await scene.caption_from_a_new_agent(set(), 60)
        kill_9(first)
        second = await scene.start_worker("--agent-name", "captioner")
        _, at = await scene.caption_from_a_new_agent({old}, 60)
        gap = at - second.registered_at
        record_gap("explicit dispatch, kill -9, new worker: registered -> captions", gap)
        assert gap <= RESUME_BOUND_S
        scene.assert_clean()



async def test_an_agent_that_claims_to_be_the_captioner_displaces_nobody(tiny_checkpoint, tmp_path, speech_dir):
    """Another agent of the deployment (its own key, a `captions.since` of 0, a claim copied from the
    real captioner) in a captioned room: the workers keep the real captioner and leave the other
    agent alone; captions keep coming from the real one (issue 22)."""
    from captions.dev.bots import make_token
    from captions.protocol import ATTR_AGENT_ALIVE, ATTR_AGENT_CLAIM, CaptionSigner

    async with stage(tiny_checkpoint, tmp_path) as scene:
        await scene.start_worker()
        await scene.talk(speech_dir)
        real, _ = await scene.caption_from_a_new_agent(set(), 60)
        from livekit import rtc

        rogue = rtc.Room()
        await rogue.connect(scene.server.url, make_token(scene.server, scene.room, "agent-rogue", agent=True))
        listing = api.LiveKitAPI(scene.server.http_url, scene.server.api_key, scene.server.api_secret)
        try:
            participants = (await listing.room.list_participants(api.ListParticipantsRequest(room=scene.room))).participants
            real_claim = next(p for p in participants if p.identity == real).attributes[ATTR_AGENT_CLAIM]
            for beat in range(8):  # a heartbeat that moves, an early start, claims that are not its own
                await rogue.local_participant.set_attributes({
                    ATTR_AGENT_CLAIM: CaptionSigner().claim(scene.room, "agent-rogue") if beat % 2 else real_claim,
                    "captions.key": CaptionSigner().public_key,  # what workers trusted before the claim
                    "captions.since": "0", ATTR_AGENT_ALIVE: str(beat), "captions.status": "live"})
                await asyncio.sleep(1.0)
            present = {p.identity for p in (await listing.room.list_participants(
                api.ListParticipantsRequest(room=scene.room))).participants}
            assert {real, "agent-rogue"} <= present, f"an agent was removed: {present}"
            since = time.time()
            await scene.viewer.wait_until(
                lambda: [c for c in scene.viewer.captions if c.received_at > since], 30, "captions after the rogue")
            assert scene.agents() == [real], "captions came from another captioner"
        finally:
            await listing.aclose()
            await rogue.disconnect()
