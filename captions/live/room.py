"""One LiveKit room: every speaker's microphone -> an engine stream -> captions on `lk.transcription`.

Threads: this room's event loop owns everything here. Audio goes to the engine with the thread-safe
`stream.push`; engine events arrive on the engine's thread and hop to this loop with
`call_soon_threadsafe`; slots granted by the shared `SlotQueue` arrive on its dispatcher thread and
hop the same way. Room event handlers only schedule work.

Per speaker (one microphone track while it is unmuted and subscribed): a `Speaker` reads 24 kHz mono
audio, pushes it into its engine stream (once the slot queue gives it one; audio that arrives while
it waits is not captioned, and the wait is shown in the agent's attributes), and feeds the engine's
events to a `Segmenter`. A final segment is appended to the transcript file before it is published
(publisher.py). Leave, mute and unpublish close the stream: the engine flushes the last words, the
final caption goes out, then the slot is free for the next speaker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from livekit import rtc

from captions.live.metrics import METRICS
from captions.live.publisher import CaptionPublisher, OutgoingCaption
from captions.live.recorder import StreamRecorder
from captions.live.sdk_fixes import open_audio_stream, register_rpc_method
from captions.live.segmenter import CaptionUpdate, Segmenter, SegmenterOptions
from captions.live.slots import SlotQueue, Waiter
from captions.live.timing import StreamTiming
from captions.live.transcripts import TranscriptStore, backlog_payload, transcript_path
from captions.log import logger
from captions.protocol import (
    ATTR_AGENT_QUEUED,
    ATTR_AGENT_STATUS,
    RPC_BACKLOG,
    TOPIC_BACKLOG,
    AgentStatus,
    FinalSegment,
    words_attribute,
)
from captions.stt.api import SAMPLE_RATE, EngineStream, StreamEvent, Word

AUDIO_CHUNK_MS = 10
"""Audio read from each track at a time. 10 ms (WebRTC's own tick) lets the engine put every
speaker's frames on one clock (captions/stt/engine.py); 80 ms frames keep each speaker's phase."""
FLUSH_TIMEOUT_S = 10.0


@dataclass
class RoomOptions:
    data_dir: Path
    record_dir: Path | None = None
    segmenter: SegmenterOptions = field(default_factory=SegmenterOptions)
    timing_attributes: bool = False
    """Attach the captions.timing attribute to every caption (diagnostics; costs a little per chunk)."""
    audio_chunk_ms: int = AUDIO_CHUNK_MS


class _Session:
    """One engine stream of a speaker: its segmenter, wall-clock origin and recording."""

    def __init__(self, stream: EngineStream, recorder: StreamRecorder | None, options: SegmenterOptions,
                 timing: StreamTiming | None = None):
        self.stream = stream
        self.segmenter = Segmenter(options=options)
        self.recorder = recorder
        self.timing = timing
        self.origin: float | None = None
        """Unix time at which the first sample pushed into the stream was captured."""
        self.closing = False


class Speaker:
    """One remote microphone track while it is live (subscribed and unmuted)."""

    def __init__(self, captioner: RoomCaptioner, participant: rtc.RemoteParticipant,
                 publication: rtc.RemoteTrackPublication, track: rtc.Track):
        self._captioner = captioner
        self._loop = asyncio.get_running_loop()
        self.identity = participant.identity
        self.name = participant.name
        self.track_sid = publication.sid
        self._track = track
        self._session: _Session | None = None
        self._waiter: Waiter | None = None
        self._stopped = False
        self.ended = asyncio.Event()
        """Set once the speaker stopped and its last engine stream ended (finals are out)."""
        self._audio_task = asyncio.create_task(self._read_audio(), name=f"audio-{self.track_sid}")

    @property
    def waiting(self) -> bool:
        return self._waiter is not None

    def start(self) -> None:
        self._request_slot()

    def stop(self) -> None:
        """End of speech (leave, mute, unpublish): flush the engine stream, or leave the queue."""
        if self._stopped:
            return
        self._stopped = True
        self._audio_task.cancel()
        if self._waiter is not None:
            self._captioner.slots.cancel(self._waiter)
            self._waiter = None
            self._captioner.status_changed()
        if self._session is not None:
            self._session.closing = True
            self._session.stream.close()
        else:
            self.ended.set()

    # Slots --------------------------------------------------------------------------------------

    def _request_slot(self) -> None:
        waiter = Waiter(f"{self._captioner.room_name}/{self.identity}", on_event=self._on_engine_event_threadsafe,
                        on_granted=self._on_granted_threadsafe)
        stream = self._captioner.slots.request(waiter)
        if stream is not None:
            self._begin(stream)
        else:
            self._waiter = waiter
            self._captioner.status_changed()

    def _on_granted_threadsafe(self, stream: EngineStream) -> None:
        # From the slot queue's thread. A closed loop raises, and the queue then frees the slot.
        self._loop.call_soon_threadsafe(self._on_granted, stream)

    def _on_granted(self, stream: EngineStream) -> None:
        self._waiter = None
        self._captioner.status_changed()
        if self._stopped:
            stream.abort()
            return
        self._begin(stream)

    def _begin(self, stream: EngineStream) -> None:
        recorder = None
        if self._captioner.options.record_dir is not None:
            recorder = StreamRecorder(self._captioner.options.record_dir, self._captioner.room_name,
                                 self.identity, stream.id)
        timing = None
        if self._captioner.options.timing_attributes:
            timing = StreamTiming()
        self._session = _Session(stream, recorder, self._captioner.options.segmenter, timing)
        logger.info("room %s: captioning %s (track %s) in engine slot %d, stream %d", self._captioner.room_name,
                    self.identity, self.track_sid, stream.slot_index, stream.id)

    # Audio --------------------------------------------------------------------------------------

    async def _read_audio(self) -> None:
        audio = open_audio_stream(self._track, sample_rate=SAMPLE_RATE,
                                  frame_size_ms=self._captioner.options.audio_chunk_ms)
        try:
            async for event in audio:
                self._push(event.frame)
        finally:
            await audio.aclose()
        # The track ended by itself (e.g. the publisher went away): same as a stop.
        self._loop.call_soon(self.stop)

    def _push(self, frame: rtc.AudioFrame) -> None:
        received_at = time.time()
        session = self._session
        if session is None or session.closing:
            # Metrics: audio that will never be captioned.
            METRICS.frame_dropped("closing" if session is not None else "waiting_for_slot")
            return  # waiting for a slot: not captioned, and viewers see the wait
        pcm16 = np.frombuffer(frame.data, dtype=np.int16)
        if session.origin is None:
            session.origin = time.time() - frame.duration
        session.stream.push(pcm16.astype(np.float32) / 32768.0)
        if session.recorder is not None:
            session.recorder.write(pcm16, session.stream.lead_samples)
        if session.timing is not None:
            session.timing.record(pcm16, received_at)

    # Engine events ------------------------------------------------------------------------------

    def _on_engine_event_threadsafe(self, event: StreamEvent) -> None:
        # From the engine's thread: never block it, never raise into it.
        with contextlib.suppress(RuntimeError):  # this room's loop is gone
            self._loop.call_soon_threadsafe(self._on_engine_event, event)

    def _on_engine_event(self, event: StreamEvent) -> None:
        session = self._session
        if session is None or session.stream.id != event.stream_id:
            return
        if session.origin is not None:  # Metrics: end of each new word's audio -> its caption now
            for word in event.words:
                METRICS.observe_caption_latency(time.time() - (session.origin + word.end))
        timing = session.timing.for_event(event) if session.timing is not None else None
        for update in session.segmenter.feed(event):
            self._captioner.caption(self, session.origin or time.time(), update, timing)
        if event.ended:
            self._end_session(session, event.error)

    def _end_session(self, session: _Session, error: str | None) -> None:
        if session.recorder is not None:
            session.recorder.close()
        self._session = None
        if error:
            METRICS.error("stream")
            logger.warning("room %s: engine stream %d of %s failed: %s", self._captioner.room_name,
                           session.stream.id, self.identity, error)
        else:
            logger.info("room %s: %s's stream %d ended, slot %d free", self._captioner.room_name,
                        self.identity, session.stream.id, session.stream.slot_index)
        if self._stopped:
            self.ended.set()
        elif not session.closing:
            # The engine ended the stream on its own (an error): the speaker still talks, so ask again.
            self._request_slot()


class RoomCaptioner:
    """Captions every speaker of one connected `rtc.Room` with the shared engine."""

    def __init__(self, room: rtc.Room, slots: SlotQueue, options: RoomOptions):
        self.room = room
        self.slots = slots
        self.options = options
        self.room_name = room.name
        self.transcript = TranscriptStore(transcript_path(options.data_dir, room.name))
        self._speakers: dict[str, Speaker] = {}
        self._stopping: set[Speaker] = set()
        """Speakers who stopped and whose last words are still being flushed."""
        self._publisher = CaptionPublisher(room.local_participant)
        self._tasks: set[asyncio.Task[None]] = set()
        self._status_dirty = asyncio.Event()
        self._closed = False

    async def start(self) -> None:
        """Call once the room is connected."""
        self.room.on("track_subscribed", self._on_track_subscribed)
        self.room.on("track_unsubscribed", self._on_track_gone)
        self.room.on("track_unpublished", self._on_track_unpublished)
        self.room.on("track_muted", self._on_track_muted)
        self.room.on("track_unmuted", self._on_track_unmuted)
        self.room.on("participant_disconnected", self._on_participant_disconnected)
        register_rpc_method(self.room, RPC_BACKLOG, self._on_backlog_rpc)
        self._spawn(self._publisher.run(), "publisher")
        self._spawn(self._update_status_forever(), "status")
        self.status_changed()
        for participant in self.room.remote_participants.values():
            for publication in participant.track_publications.values():
                if publication.track is not None and publication.subscribed:
                    self._on_track_subscribed(publication.track, publication, participant)

    async def aclose(self) -> None:
        """Flush every speaker (finals reach the transcript file even if the room is gone)."""
        self._closed = True
        # Those who left just before the room ended are still flushing: their finals count too.
        speakers = [*self._speakers.values(), *self._stopping]
        for speaker in speakers:
            speaker.stop()
        if speakers:
            waits = [asyncio.create_task(s.ended.wait()) for s in speakers]
            _, pending = await asyncio.wait(waits, timeout=FLUSH_TIMEOUT_S)
            for task in pending:
                task.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.transcript.close()

    # Room events (only schedule work) -----------------------------------------------------------

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
        speaker = Speaker(self, participant, publication, track)
        self._speakers[publication.sid] = speaker
        speaker.start()

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
        for sid, speaker in list(self._speakers.items()):
            if speaker.identity == participant.identity:
                self._stop_speaker(sid)

    def _stop_speaker(self, track_sid: str) -> None:
        speaker = self._speakers.pop(track_sid, None)
        if speaker is not None:
            logger.info("room %s: %s stopped speaking (track %s): flushing", self.room_name, speaker.identity,
                        track_sid)
            speaker.stop()
            self._stopping = {s for s in self._stopping if not s.ended.is_set()}
            if not speaker.ended.is_set():
                self._stopping.add(speaker)

    # Captions -----------------------------------------------------------------------------------

    def caption(self, speaker: Speaker, origin: float, update: CaptionUpdate, timing: dict | None = None) -> None:
        """Queues `update` for publishing; a final one is written to the transcript first. `timing`:
        the ATTR_TIMING fields of the step that produced it (with --timing-attributes)."""
        words_attr = None
        if update.final and update.text:
            words = [Word(w.text, origin + w.start, origin + w.end) for w in update.words]
            segment = FinalSegment(
                segment_id=update.segment_id, participant_identity=speaker.identity,
                participant_name=speaker.name, track_id=speaker.track_sid, text=update.text,
                start=words[0].start if words else origin, end=words[-1].end if words else origin,
                words=[[w.text, round(w.start, 3), round(w.end, 3)] for w in words],
            )
            try:
                self.transcript.append(segment)
            except OSError:
                METRICS.error("transcript")
                logger.exception("could not write the transcript of %s; publishing anyway", self.room_name)
            words_attr = words_attribute(words)
        self._publisher.put(OutgoingCaption(speaker.identity, speaker.track_sid, update, words_attr, timing))

    # Status and backlog -------------------------------------------------------------------------

    def status_changed(self) -> None:
        self._status_dirty.set()

    def _status_attributes(self) -> dict[str, str]:
        queued = [s.identity for s in self._speakers.values() if s.waiting]
        status = AgentStatus.WAITING if queued else AgentStatus.LIVE
        return {ATTR_AGENT_STATUS: status.value, ATTR_AGENT_QUEUED: json.dumps(queued)}

    async def _update_status_forever(self) -> None:
        sent: dict[str, str] = {}
        while True:
            await self._status_dirty.wait()
            self._status_dirty.clear()
            attributes = self._status_attributes()
            if attributes == sent:
                continue
            try:
                await self.room.local_participant.set_attributes(attributes)
                sent = attributes
            except Exception as e:  # noqa: BLE001 - retried on the next change or below
                logger.warning("could not update the agent's status attributes: %s", e)
                await asyncio.sleep(1.0)
                self._status_dirty.set()

    async def _on_backlog_rpc(self, data: rtc.RpcInvocationData) -> str:
        segments = self.transcript.backlog()
        caller = data.caller_identity or _identity_from_payload(data.payload)
        await self.room.local_participant.send_text(
            backlog_payload(segments), topic=TOPIC_BACKLOG, destination_identities=[caller])
        logger.info("room %s: sent a backlog of %d segments to %r", self.room_name, len(segments), caller)
        return json.dumps({"segments": len(segments)})

    def _spawn(self, coro: Coroutine[None, None, None], name: str) -> None:
        task = asyncio.create_task(coro, name=f"{name}-{self.room_name}")
        self._tasks.add(task)
        task.add_done_callback(self._on_task_done)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            METRICS.error("room")
            logger.error("room %s: task %s failed", self.room_name, task.get_name(), exc_info=exc)


def _identity_from_payload(payload: str) -> str:
    """LiveKit does not tell a hidden participant's identity to the RPC handler (caller_identity is
    empty, and the RPC's own response cannot reach such a caller), so a hidden viewer names itself
    in the payload, `{"reply_to": "<its identity>"}`, and the backlog stream is addressed to it."""
    try:
        identity = json.loads(payload).get("reply_to", "") if payload else ""
    except (ValueError, AttributeError):
        identity = ""
    if not isinstance(identity, str) or not identity:
        raise rtc.RpcError(rtc.RpcError.ErrorCode.APPLICATION_ERROR,
                           'hidden callers must send {"reply_to": "<their identity>"} as the payload')
    return identity
