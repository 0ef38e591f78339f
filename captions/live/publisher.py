"""Publishing one room's captions on `lk.transcription` (LiveKit's transcription protocol).

Each speaker has a lane: their captions are sent in the order they were made, one stream each; an
interim update carries the segment's full text so far, and is skipped when a newer text of the same
segment is already waiting (publishing fell behind); a final one is retried, e.g. across a
reconnection. Lanes run side by side, so a final being retried, or a stream the server is slow to
take, holds back only its own speaker. Every call into the SDK has a timeout (`SEND_TIMEOUT_S`).
Every caption is signed with the pool's caption key (captions/protocol.py), numbered within its
segment and stamped with the moment it is sent.

Translations (translation.py) are captions too, in lanes of their own (one per speaker and
language), so that they never hold back an original; they carry the number of the original update
they translate, and `on_numbered` hears of every original update as it is numbered, just before it
is sent.

Threads: everything here runs on the room's event loop.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from livekit import rtc

from captions.live.metrics import METRICS
from captions.live.sdk_fixes import send_text_as
from captions.live.segmenter import CaptionUpdate
from captions.live.timing import ATTR_TIMING
from captions.log import logger
from captions.protocol import (
    ATTR_AGENT,
    ATTR_LANGUAGE,
    ATTR_SEGMENT_ID,
    ATTR_SENT,
    ATTR_SEQ,
    ATTR_SIGNATURE,
    ATTR_SOURCE_LANGUAGE,
    ATTR_SOURCE_SEGMENT,
    ATTR_SPEAKER,
    ATTR_TRANSCRIBED_TRACK_ID,
    ATTR_TRANSCRIPTION_FINAL,
    ATTR_TRANSLATED,
    ATTR_UNTRANSLATED,
    ATTR_WORDS,
    TOPIC_TRANSCRIPTION,
    CaptionSigner,
    FinalSegment,
    caption_message,
    translation_message,
)

FINAL_PUBLISH_ATTEMPTS = 5
"""A final caption is retried (e.g. across a reconnection); an interim one is superseded anyway."""
RESEND_WINDOW_S = 3.0
"""A final sent this recently when its speaker leaves is sent again in the agent's own name: clients
abort the streams of a sender who disconnects, even one that was nearly through."""
SEND_TIMEOUT_S = 5.0
"""One caption's stream (one `send_text` request) that takes longer is given up, and a final retried.
The native send may still complete: receivers drop a copy of an update they have (its seq)."""


@dataclass(frozen=True)
class Translation:
    """What makes an `OutgoingCaption` a translation (captions/protocol.py); its `update` then holds
    the translated segment (`translation_segment_id`) and text."""

    source_segment: str
    source_language: str
    language: str
    seq: int
    """The number of the original update it translates (its own `captions.seq`)."""
    untranslated: str = ""
    """Why the text is the original's (translation failed or too slow); "" when translated."""


@dataclass
class OutgoingCaption:
    identity: str
    """The speaker: the stream is sent with this `sender_identity`."""
    track_sid: str
    update: CaptionUpdate
    words_attr: str | None = None
    """The final caption's `captions.words` attribute."""
    timing: dict | None = None
    """`captions.timing` fields (diagnostics), completed with the publish time."""
    resend_seq: int | None = None
    """Set on a final sent again in the agent's own name, with its first sending's number: its
    speaker left while (or just after) it went out (`speaker_left`)."""
    translation: Translation | None = None
    """Set on a translated caption."""
    segment: FinalSegment | None = None
    """An original final's transcript record (its translations are recorded after it)."""

    @property
    def lane(self) -> tuple[str, str]:
        """The lane it is sent in: its speaker's (language ""), or its speaker's in its language."""
        return self.identity, "" if self.translation is None else self.translation.language


class _Lane:
    """One speaker's captions in order, and how many updates of each segment are waiting."""

    def __init__(self) -> None:
        self.queue: collections.deque[OutgoingCaption] = collections.deque()
        self.waiting: collections.Counter[str] = collections.Counter()
        self.task: asyncio.Task[None] | None = None


class CaptionPublisher:
    """The room's publish lanes (one per speaker, and one per speaker and language of its
    translations), started by `put` once `run()` is running. `on_numbered(caption, seq)`: an original
    update got its number and is about to be sent (translation.py feeds on it; it must not block)."""

    def __init__(self, room: rtc.Room, signer: CaptionSigner,
                 on_numbered: Callable[[OutgoingCaption, int], None] | None = None,
                 send: Callable[..., Awaitable[None]] = send_text_as):
        """`send(local_participant, text, topic=, sender_identity=, attributes=)`: how one caption
        goes out (`sdk_fixes.send_text_as`; tests give a fake room's)."""
        self._room = room
        self._signer = signer
        self._send_text = send
        self.on_numbered = on_numbered
        self._lanes: dict[tuple[str, str], _Lane] = {}
        self._running = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._next_seq: dict[str, int] = {}
        """Per open segment, the number of its next update (a segment's entry goes with its final)."""
        self._recent_finals: dict[str, collections.deque[tuple[float, OutgoingCaption, int]]] = {}
        """Per speaker, the finals being sent or sent in the last RESEND_WINDOW_S (`speaker_left`)."""

    def put(self, caption: OutgoingCaption) -> None:
        lane = self._lanes.setdefault(caption.lane, _Lane())
        lane.queue.append(caption)
        lane.waiting[caption.update.segment_id] += 1
        self._idle.clear()
        if self._running:
            self._start(caption.lane, lane)

    def speaker_left(self, identity: str) -> None:
        """`identity` left the room: its finals of the last moments go out again, in the agent's own
        name and with their numbers, so that viewers who lost them with the speaker's streams get them
        (viewers who already have them drop the copy: it is no newer)."""
        now = asyncio.get_running_loop().time()
        for sent_at, item, seq in self._recent_finals.pop(identity, ()):
            if now - sent_at <= RESEND_WINDOW_S:
                self.put(dataclasses.replace(item, resend_seq=seq))

    async def drain(self, timeout: float) -> bool:
        """Waits until everything queued is published (or given up); False after `timeout`."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def run(self) -> None:
        """Publishes until cancelled (the lanes are cancelled with it)."""
        self._running = True
        for key, lane in self._lanes.items():
            if lane.queue:
                self._start(key, lane)
        try:
            await asyncio.Event().wait()
        finally:
            self._running = False
            for lane in self._lanes.values():
                if lane.task is not None:
                    lane.task.cancel()

    def _start(self, key: tuple[str, str], lane: _Lane) -> None:
        if lane.task is None or lane.task.done():
            name = "-".join(filter(None, ("publish", key[0][:40], key[1])))
            lane.task = asyncio.create_task(self._drain_lane(key, lane), name=name)

    async def _drain_lane(self, key: tuple[str, str], lane: _Lane) -> None:
        try:
            while lane.queue:
                item = lane.queue.popleft()
                segment = item.update.segment_id
                lane.waiting[segment] -= 1
                newer_waiting = lane.waiting[segment] > 0
                if not lane.waiting[segment]:
                    del lane.waiting[segment]
                if item.update.final or not newer_waiting:
                    await self._publish(item)
                # else: a newer text of this segment is already queued (publishing is behind)
        except Exception:  # noqa: BLE001 - _publish handles its own failures; anything else is a bug
            METRICS.error("publish")
            logger.exception("the caption lane %r failed; its queued captions are dropped", key)
            lane.queue.clear()
            lane.waiting.clear()
        finally:
            if not lane.queue:
                self._lanes.pop(key, None)
            if not self._lanes:
                self._idle.set()

    def _next_seq_of(self, update: CaptionUpdate) -> int:
        seq = self._next_seq.pop(update.segment_id, 0)
        if not update.final:
            self._next_seq[update.segment_id] = seq + 1
        return seq

    def _signed_attributes(self, item: OutgoingCaption, seq: int) -> dict[str, str]:
        """The stream's attributes, signed now: `captions.sent` is the moment of sending, so that a
        retry is not taken for a replay, and a replay is (captions/protocol.py)."""
        update, agent = item.update, self._room.local_participant.identity
        sent_ms = int(time.time() * 1000)
        if item.translation is not None:
            return self._translation_attributes(item, seq, agent, sent_ms)
        message = caption_message(room=self._room.name, agent=agent, speaker=item.identity,
                                  track_sid=item.track_sid, segment_id=update.segment_id, seq=seq,
                                  final=update.final, sent_ms=sent_ms, words=item.words_attr or "",
                                  text=update.text)
        attributes = {
            ATTR_SEGMENT_ID: update.segment_id,
            ATTR_TRANSCRIBED_TRACK_ID: item.track_sid,
            ATTR_TRANSCRIPTION_FINAL: "true" if update.final else "false",
            ATTR_AGENT: agent,
            ATTR_SPEAKER: item.identity,
            ATTR_SEQ: str(seq),
            ATTR_SENT: str(sent_ms),
            ATTR_SIGNATURE: self._signer.sign(message),
        }
        if item.words_attr is not None:
            attributes[ATTR_WORDS] = item.words_attr
        if item.timing is not None:
            attributes[ATTR_TIMING] = json.dumps({**item.timing, "published": time.time()})
        return attributes

    def _translation_attributes(self, item: OutgoingCaption, seq: int, agent: str, sent_ms: int) -> dict[str, str]:
        update, translation = item.update, item.translation
        assert translation is not None
        message = translation_message(room=self._room.name, agent=agent, speaker=item.identity,
                                      track_sid=item.track_sid, segment_id=update.segment_id, seq=seq,
                                      final=update.final, sent_ms=sent_ms,
                                      source_segment=translation.source_segment,
                                      source_language=translation.source_language, language=translation.language,
                                      untranslated=translation.untranslated, text=update.text)
        return {
            ATTR_SEGMENT_ID: update.segment_id,
            ATTR_TRANSCRIBED_TRACK_ID: item.track_sid,
            ATTR_TRANSCRIPTION_FINAL: "true" if update.final else "false",
            ATTR_AGENT: agent,
            ATTR_SPEAKER: item.identity,
            ATTR_SEQ: str(seq),
            ATTR_SENT: str(sent_ms),
            ATTR_LANGUAGE: translation.language,
            ATTR_TRANSLATED: "true",
            ATTR_SOURCE_SEGMENT: translation.source_segment,
            ATTR_SOURCE_LANGUAGE: translation.source_language,
            ATTR_UNTRANSLATED: translation.untranslated,
            ATTR_SIGNATURE: self._signer.sign(message),
        }

    def _number(self, item: OutgoingCaption) -> int:
        """Its `captions.seq`: a resent final's first number, a translation's original's, or the next
        of its segment (then `on_numbered` hears of it)."""
        if item.resend_seq is not None:
            return item.resend_seq
        if item.translation is not None:
            return item.translation.seq
        seq = self._next_seq_of(item.update)
        if self.on_numbered is not None:
            try:
                self.on_numbered(item, seq)
            except Exception:  # noqa: BLE001 - translation must never cost an original caption
                METRICS.error("translation")
                logger.exception("feeding caption %s to the translator failed", item.update.segment_id)
        return seq

    async def _publish(self, item: OutgoingCaption) -> None:
        seq = self._number(item)
        if item.update.final and item.resend_seq is None:
            recent = self._recent_finals.setdefault(item.identity, collections.deque())
            now = asyncio.get_running_loop().time()
            while recent and now - recent[0][0] > RESEND_WINDOW_S:
                recent.popleft()
            recent.append((now, item, seq))
        attempts = FINAL_PUBLISH_ATTEMPTS if item.update.final else 1
        for attempt in range(attempts):
            try:
                await asyncio.wait_for(self._send(item, seq), SEND_TIMEOUT_S)
                return
            except Exception as e:  # noqa: BLE001 - a failed publish must not stop the publisher
                logger.warning("publishing a caption failed (attempt %d/%d): %s", attempt + 1, attempts, e)
                if attempt + 1 < attempts:
                    await asyncio.sleep(0.5 * 2**attempt)
        METRICS.error("publish")  # every attempt failed: this caption never reached the room
        logger.error("a %s caption of %s (segment %s) could not be published after %d attempts",
                     "final" if item.update.final else "interim", item.identity, item.update.segment_id, attempts)

    async def _send(self, item: OutgoingCaption, seq: int) -> None:
        # A speaker who already left: clients drop or abort the streams of a sender who is gone, so
        # their last words go out under the agent's own identity (captions.speaker names them).
        present = item.identity in self._room.remote_participants and item.resend_seq is None
        sender = item.identity if present else self._room.local_participant.identity
        # The whole stream in one request (one packet where the recipients support it: sdk_fixes.py).
        await self._send_text(self._room.local_participant, item.update.text, topic=TOPIC_TRANSCRIPTION,
                              sender_identity=sender, attributes=self._signed_attributes(item, seq))
