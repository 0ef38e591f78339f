"""One LiveKit room: every speaker's microphone -> an engine stream while they talk -> captions on
`lk.transcription`.

Threads: this room's event loop owns everything here. Room event handlers only schedule work.

Per microphone track (while it is unmuted and subscribed), a `Speaker` (speaker.py) takes an engine
slot while its speaker talks and gives it back after a pause, keeping their audio while they wait
for one. Its captions come back here: a final segment is handed to the transcript's writer thread
and published once it is written, or after WRITE_WAIT_S if the disk is slow (publisher.py). Leave,
mute and unpublish end the speaker: the engine flushes the last words and the final caption goes
out. With a translation engine, a `RoomTranslator` (translation.py) translates what is published
into the languages the room's readers want, after the originals."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import json
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path

from livekit import rtc

from captions.live.metrics import METRICS
from captions.live.presence import HEARTBEAT_S, LiveKitCredentials, claim_room
from captions.live.publisher import CaptionPublisher, OutgoingCaption
from captions.live.segmenter import CaptionUpdate, SegmenterOptions
from captions.live.slots import SlotQueue
from captions.live.speaker import Speaker, SpeakerOptions
from captions.live.track_audio import RtcTrackSource
from captions.live.transcripts import PROBLEM_TRANSCRIPT_UNAVAILABLE, TranscriptStore, transcript_path
from captions.live.translation import RoomTranslator, TranslationEngine, TranslationOptions
from captions.log import logger
from captions.protocol import (
    ATTR_AGENT_ALIVE,
    ATTR_AGENT_CLAIM,
    ATTR_AGENT_PROBLEM,
    ATTR_AGENT_QUEUED,
    ATTR_AGENT_STATUS,
    ATTR_AGENT_SUPERSEDED,
    AgentStatus,
    CaptionSigner,
    FinalSegment,
    words_attribute,
)
from captions.stt.api import Word

STEP_DOWN_SETTLE_S = 0.3
"""A captioner stepping down lets the failure's last events reach its loop before it waits for the
finals they make to be published..."""
STEP_DOWN_FLUSH_S = 2.0
"""...and marks itself superseded by then (before `STALE_S`, when the recovery would)."""
FLUSH_TIMEOUT_S = 10.0
WRITE_WAIT_S = 1.0
"""A final waits at most this long (from when it was made) for its transcript write before it is
published anyway: a slow disk must not hold live captions. Its write goes on, and a final that is
never written is logged and counted (transcripts.py)."""


@dataclass
class RoomOptions:
    data_dir: Path
    record_dir: Path | None = None
    segmenter: SegmenterOptions = field(default_factory=SegmenterOptions)
    speaker: SpeakerOptions = field(default_factory=SpeakerOptions)
    timing_attributes: bool = False
    """Attach the captions.timing attribute to every caption (diagnostics; costs a little per chunk)."""
    livekit: LiveKitCredentials | None = None
    """The server API, to claim the room against another captioner (presence.py); None: no claim."""
    translation: TranslationOptions = field(default_factory=TranslationOptions)
    """Into which languages captions may be translated, and how (with a translation engine)."""


class RoomCaptioner:
    """Captions every speaker of one connected `rtc.Room` with the shared engine."""

    def __init__(self, room: rtc.Room, slots: SlotQueue, options: RoomOptions, signer: CaptionSigner | None = None,
                 on_superseded: Callable[[], None] | None = None, translation_engine: TranslationEngine | None = None):
        """`signer`: the worker's key (one per process); a room made without one gets its own.
        `on_superseded()`: the recovery replaced this captioner (its heartbeat was late): end the
        job, which flushes and publishes its open captions (`aclose`) before leaving.
        `translation_engine`: the worker's (one per process); None: no translation."""
        self.on_superseded = on_superseded
        self.room = room
        self.slots = slots
        self.options = options
        self.room_name = room.name
        # What each Speaker reads of its host (speaker.SpeakerHost).
        self.segmenter_options, self.speaker_options = options.segmenter, options.speaker
        self.record_dir, self.timing_attributes = options.record_dir, options.timing_attributes
        self._loop: asyncio.AbstractEventLoop | None = None
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()
        self._held: collections.deque[tuple[OutgoingCaption, concurrent.futures.Future[bool] | None, float]] = \
            collections.deque()
        """Captions waiting, in order, for a final's transcript write (WRITE_WAIT_S at most)."""
        self._held_changed = asyncio.Event()
        self._held_idle = asyncio.Event()
        self._held_idle.set()
        # Never raises: a transcript that cannot be written says so (`_status_attributes`), captions go on.
        self.transcript = TranscriptStore(transcript_path(options.data_dir, room.name),
                                          on_problem=self._on_transcript_problem)
        self._speakers: dict[str, Speaker] = {}
        self._stopping: set[Speaker] = set()
        """Speakers who stopped and whose last words are still being flushed."""
        self._signer = signer or CaptionSigner()
        self._publisher = CaptionPublisher(room, self._signer)
        self._translator: RoomTranslator | None = None
        if translation_engine is not None:
            self._translator = RoomTranslator(room, translation_engine, self._publisher, options.translation,
                                              write=self.transcript.submit)
            self._publisher.on_numbered = self._translator.on_numbered
        self._tasks: set[asyncio.Task[None]] = set()
        self._status_dirty = asyncio.Event()
        self._closed = False
        self._superseded = False
        """Removed from the room (another captioner stays): nothing more is written or published."""
        self._alive = 0
        """The heartbeat (presence.py), advanced every HEARTBEAT_S while this captioner runs."""
        self._unclaimed: list[tuple] | None = None
        """Captions made while `claim` is asking, in order (`start(claiming=True)`); None otherwise."""
        self._withdrawing = False
        """Superseded by the recovery, or stepping down (`engine_lost`): leaving, no more heartbeats."""
        self._claimed_as: tuple[str, str] | None = None
        """(identity, its captions.claim), computed once connected."""
        self._status_sent: dict[str, str] = {}
        """The attributes the server has; a full reconnection starts a new session without them."""

    async def claim(self) -> bool:
        """Announces this captioner and asks whether it is the room's one (presence.py). Call it once
        `start` has started listening: a slow server API must not cost the room its first words.
        Until it answers, captions wait here; True: they go out (and to the transcript) in order;
        False: another captioner has the room, nothing of this one was published or written: leave."""
        won = True
        try:
            if self.options.livekit is not None:
                await self.room.local_participant.set_attributes(self._status_attributes())
                client = self.options.livekit.client()
                try:
                    won = await claim_room(self.room_name, self.room.local_participant.identity, client,
                                           self._signer.public_key)
                finally:
                    await client.aclose()
        except Exception:  # noqa: BLE001 - better captioned twice for a moment than not at all
            logger.exception("room %s: the claim failed; captioning (the recovery removes a duplicate)",
                             self.room_name)
        pending, self._unclaimed = self._unclaimed, None
        if not won:
            self._superseded = True
            return False
        for speaker, update, wall_time, timing in pending or ():
            self.caption(speaker, update, wall_time, timing)
        return True

    async def start(self, claiming: bool = False) -> None:
        """Call once the room is connected: listening starts now. `claiming`: captions wait for `claim`."""
        if claiming:
            self._unclaimed = []
        self.room.on("disconnected", self._on_disconnected)
        self.room.on("reconnected", self._on_reconnected)
        self.room.on("track_subscribed", self._on_track_subscribed)
        self.room.on("track_unsubscribed", self._on_track_gone)
        self.room.on("track_unpublished", self._on_track_unpublished)
        self.room.on("track_muted", self._on_track_muted)
        self.room.on("track_unmuted", self._on_track_unmuted)
        self.room.on("participant_disconnected", self._on_participant_disconnected)
        self.room.on("participant_attributes_changed", self._on_attributes_changed)
        self._spawn(self._publisher.run(), "publisher")
        if self._translator is not None:
            self._translator.start()
        self._spawn(self._release_held_forever(), "transcript-wait")
        self._spawn(self._update_status_forever(), "status")
        self.status_changed()
        for participant in self.room.remote_participants.values():
            for publication in participant.track_publications.values():
                if publication.track is not None and publication.subscribed:
                    self._on_track_subscribed(publication.track, publication, participant)

    async def aclose(self) -> None:
        """Flush every speaker (finals reach the transcript file even if the room is gone), unless
        this captioner was removed for another one, which captions the same audio."""
        if self._closed:
            return
        self._closed = True
        # Those who left just before the room ended are still flushing: their finals count too.
        speakers = [*self._speakers.values(), *self._stopping]
        METRICS.microphones.dec(len(self._speakers))
        self._speakers.clear()
        for speaker in speakers:
            speaker.stop(flush=not self._superseded, wait_for_slot=False)
        deadline = asyncio.get_running_loop().time() + FLUSH_TIMEOUT_S
        if speakers:
            waits = [asyncio.create_task(s.ended.wait()) for s in speakers]
            _, pending = await asyncio.wait(waits, timeout=FLUSH_TIMEOUT_S)
            for task in pending:
                task.cancel()
        with contextlib.suppress(asyncio.TimeoutError):  # the last finals, through their transcript writes
            await asyncio.wait_for(self._held_idle.wait(), max(0.1, deadline - asyncio.get_running_loop().time()))
        if self.room.isconnected() and not await self._drain_captions(deadline):
            logger.warning("room %s: leaving with captions not yet published", self.room_name)
        if self._translator is not None:
            self._translator.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self.transcript.close)  # waits for the disk: not on this loop

    async def _drain_captions(self, deadline: float) -> bool:
        """Publishes what is queued by loop time `deadline`: the originals, then their translations
        (which come once the originals are out). False if something was left."""
        loop = asyncio.get_running_loop()
        if not await self._publisher.drain(max(0.1, deadline - loop.time())):
            return False
        if self._translator is None:
            return True
        return (await self._translator.drain(max(0.1, deadline - loop.time()))
                and await self._publisher.drain(max(0.1, deadline - loop.time())))

    def speakers(self) -> list[Speaker]:
        """The microphones being captioned (or waiting), in the order they were subscribed."""
        return list(self._speakers.values())

    # Room events (only schedule work) -----------------------------------------------------------

    def _on_reconnected(self) -> None:
        self._status_sent.clear()
        self.status_changed()
        self._ask_again_for_microphones()

    def _ask_again_for_microphones(self) -> None:
        """After a full reconnection (a livekit-server restart) the SDK rebuilds the room from the
        new server's join response. A microphone republished before this agent rejoined comes in
        that response, and its subscription (requested by livekit-agents when a track is published)
        did not reach the new server: seen once in CI, the agent back in the room and deaf. So ask
        again for every captioned microphone whose audio is not coming (a repeat request is
        harmless)."""
        for participant in self.room.remote_participants.values():
            for publication in participant.track_publications.values():
                if self._is_captioned(participant, publication) and publication.track is None:
                    logger.info("room %s: reconnected; subscribing again to %s's microphone (track %s)",
                                self.room_name, participant.identity, publication.sid)
                    publication.set_subscribed(True)

    def _on_attributes_changed(self, changed: dict[str, str], participant: rtc.Participant) -> None:
        if participant.identity == self.room.local_participant.identity:
            self._withdraw_if_superseded(participant)

    def _withdraw_if_superseded(self, participant: rtc.Participant) -> None:
        if not participant.attributes.get(ATTR_AGENT_SUPERSEDED) or self._withdrawing or self._closed:
            return
        self._withdrawing = True
        logger.warning("room %s: superseded by the recovery (this captioner's heartbeat was late): flushing "
                       "its open captions and leaving", self.room_name)
        if self.on_superseded is not None:
            self.on_superseded()

    def engine_lost(self) -> None:
        """Thread-safe: the engine this captioner feeds is gone (its worker stops), so it captions
        nothing more. It steps down at once: no more heartbeats, and it marks itself superseded, which
        the recovery reads as "not this room's captioner" on its next round and dispatches another,
        rather than after `STALE_S`, and whatever becomes of this worker's shutdown (a job thread that
        does not end keeps this participant in the room, heartbeating, for as long as it runs)."""
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the room's loop is closed: it left already
                self._loop.call_soon_threadsafe(self._step_down, "its engine failed")

    def _step_down(self, why: str) -> None:
        if self._withdrawing or self._closed:
            return
        self._withdrawing = True
        logger.warning("room %s: %s: stepping down so that another captioner takes the room", self.room_name, why)
        self._spawn(self._mark_superseded(why), "step-down")

    async def _mark_superseded(self, why: str) -> None:
        # Live viewers show only the elected captioner: the open captions' last words go out first
        # (the failed streams turn them into finals just after the failure is reported).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STEP_DOWN_FLUSH_S
        await asyncio.sleep(STEP_DOWN_SETTLE_S)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._held_idle.wait(), max(0.1, deadline - loop.time()))
        await self._publisher.drain(max(0.1, deadline - loop.time()))
        try:
            await self.room.local_participant.set_attributes({ATTR_AGENT_SUPERSEDED: why})
        except Exception as e:  # noqa: BLE001 - its heartbeat stopped: the recovery sees it within STALE_S
            logger.warning("room %s: could not mark this captioner superseded (%s); its heartbeat stopped, "
                           "so the recovery replaces it once that is stale", self.room_name, e)

    def _on_disconnected(self, reason: int) -> None:
        if reason == rtc.DisconnectReason.PARTICIPANT_REMOVED:
            # The recovery removes the captioners that are not the room's one (and dead ones).
            logger.info("room %s: removed from the room (another captioner has it): stopping without "
                        "writing", self.room_name)
            self._superseded = True

    def _is_captioned(self, participant: rtc.Participant, publication: rtc.TrackPublication) -> bool:
        return (
            not self._closed
            and publication.source == rtc.TrackSource.SOURCE_MICROPHONE
            and publication.kind == rtc.TrackKind.KIND_AUDIO
            and participant.kind != rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
            and participant.identity != self.room.local_participant.identity
        )

    def _on_track_subscribed(self, track: rtc.Track, publication: rtc.RemoteTrackPublication,
                             participant: rtc.RemoteParticipant) -> None:
        if not self._is_captioned(participant, publication) or publication.muted:
            return
        self._stop_speaker(publication.sid)  # a re-subscription (e.g. after a reconnection) starts afresh
        self._speakers[publication.sid] = Speaker(self, participant.identity, participant.name, publication.sid,
                                                  RtcTrackSource(track))
        METRICS.microphones.inc()

    def _on_track_gone(self, track: rtc.Track, publication: rtc.RemoteTrackPublication,
                       participant: rtc.RemoteParticipant) -> None:
        self._stop_speaker(publication.sid)

    def _on_track_unpublished(self, publication: rtc.RemoteTrackPublication,
                              participant: rtc.RemoteParticipant) -> None:
        self._stop_speaker(publication.sid)

    def _on_track_muted(self, participant: rtc.Participant, publication: rtc.TrackPublication) -> None:
        self._stop_speaker(publication.sid)

    def _on_track_unmuted(self, participant: rtc.Participant, publication: rtc.TrackPublication) -> None:
        if isinstance(participant, rtc.RemoteParticipant) and publication.track is not None:
            self._on_track_subscribed(publication.track, publication, participant)

    def _on_participant_disconnected(self, participant: rtc.RemoteParticipant) -> None:
        self._publisher.speaker_left(participant.identity)
        for sid, speaker in list(self._speakers.items()):
            if speaker.identity == participant.identity:
                self._stop_speaker(sid)

    def _stop_speaker(self, track_sid: str) -> None:
        speaker = self._speakers.pop(track_sid, None)
        if speaker is not None:
            METRICS.microphones.dec()
            logger.info("room %s: %s stopped speaking (track %s): flushing", self.room_name, speaker.identity,
                        track_sid)
            speaker.stop()
            self._stopping = {s for s in self._stopping if not s.ended.is_set()}
            if not speaker.ended.is_set():
                self._stopping.add(speaker)

    # Captions -----------------------------------------------------------------------------------

    def caption(self, speaker: Speaker, update: CaptionUpdate, wall_time: Callable[[float], float],
                timing: dict | None = None) -> None:
        """Queues `update` for publishing; a final one is written to the transcript first (off this
        loop, waiting WRITE_WAIT_S at most). `timing`: the ATTR_TIMING fields of the step that produced
        it (with --timing-attributes)."""
        if self._superseded:
            return
        if self._unclaimed is not None:
            self._unclaimed.append((speaker, update, wall_time, timing))
            return
        words_attr, written, segment = None, None, None
        if update.final and update.text:
            words = [Word(w.text, wall_time(w.start), wall_time(w.end)) for w in update.words]
            segment = FinalSegment(
                segment_id=update.segment_id, participant_identity=speaker.identity,
                participant_name=speaker.name, track_id=speaker.track_sid, text=update.text,
                start=words[0].start if words else time.time(), end=words[-1].end if words else time.time(),
                words=[[w.text, round(w.start, 3), round(w.end, 3)] for w in words],
            )
            written = self.transcript.submit(segment)  # a failure is logged and counted there
            words_attr = words_attribute(words)
        caption = OutgoingCaption(speaker.identity, speaker.track_sid, update, words_attr, timing,
                                  segment=segment)
        if not self._held and (written is None or written.done()):
            self._publisher.put(caption)
            return
        self._held.append((caption, written, asyncio.get_running_loop().time() + WRITE_WAIT_S))
        self._held_idle.clear()
        self._held_changed.set()

    async def _release_held_forever(self) -> None:
        """Publishes the held captions in order, each final once written or at its deadline."""
        loop = asyncio.get_running_loop()
        while True:
            await self._held_changed.wait()
            self._held_changed.clear()
            while self._held:
                caption, written, deadline = self._held[0]
                if written is not None and not written.done():
                    try:
                        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(written)),
                                               max(0.0, deadline - loop.time()))
                    except asyncio.TimeoutError:
                        METRICS.error("transcript")
                        logger.warning("room %s: final %s published before its transcript write finished "
                                       "(the disk is slow)", self.room_name, caption.update.segment_id)
                self._held.popleft()
                self._publisher.put(caption)
            self._held_idle.set()

    def _on_transcript_problem(self) -> None:
        """The transcript became unwritable, or writable again (from its writer thread)."""
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the room's loop is closed: nothing to tell
                self._loop.call_soon_threadsafe(self.status_changed)

    # Status -------------------------------------------------------------------------------------

    def status_changed(self) -> None:
        self._status_dirty.set()

    def _status_attributes(self) -> dict[str, str]:
        queued = [s.identity for s in self._speakers.values() if s.waiting]
        status = AgentStatus.WAITING if queued else AgentStatus.LIVE
        return {ATTR_AGENT_STATUS: status.value, ATTR_AGENT_QUEUED: json.dumps(queued),
                ATTR_AGENT_CLAIM: self._claim(), ATTR_AGENT_ALIVE: str(self._alive),
                ATTR_AGENT_PROBLEM: PROBLEM_TRANSCRIPT_UNAVAILABLE if self.transcript.problem else ""}

    def _claim(self) -> str:
        """This captioner's proof that the pool's key vouches for it in this room (presence.py)."""
        identity = self.room.local_participant.identity
        if self._claimed_as is None or self._claimed_as[0] != identity:
            self._claimed_as = (identity, self._signer.claim(self.room_name, identity))
        return self._claimed_as[1]

    async def _update_status_forever(self) -> None:
        """Sends the attributes that changed, and the heartbeat every HEARTBEAT_S."""
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + HEARTBEAT_S
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._status_dirty.wait(), max(0.0, next_beat - loop.time()))
            self._status_dirty.clear()
            if loop.time() >= next_beat:
                next_beat = loop.time() + HEARTBEAT_S
                if not self._withdrawing:
                    self._alive += 1
                # The mark may have come while this loop was stalled, or with a reconnection's join
                # rather than as a change: look at it on every beat.
                self._withdraw_if_superseded(self.room.local_participant)
            attributes = self._status_attributes()
            changed = {key: value for key, value in attributes.items() if self._status_sent.get(key) != value}
            if not changed:
                continue
            try:
                await self.room.local_participant.set_attributes(changed)
                self._status_sent.update(changed)
            except Exception as e:  # noqa: BLE001 - retried on the next change or beat
                logger.warning("could not update the agent's status attributes: %s", e)

    def _spawn(self, coro: Coroutine[None, None, None], name: str) -> None:
        task = asyncio.create_task(coro, name=f"{name}-{self.room_name}")
        self._tasks.add(task)
        task.add_done_callback(self._on_task_done)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            METRICS.error("room")
            logger.error("room %s: task %s failed", self.room_name, task.get_name(), exc_info=exc)
