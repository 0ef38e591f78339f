"""Publishing one room's captions on `lk.transcription` (LiveKit's transcription protocol).

One task per room sends the captions in the order they were made, one stream each: an interim
update carries the segment's full text so far, and is skipped when a newer text of the same segment
is already waiting (publishing fell behind); a final one is retried, e.g. across a reconnection.
Every caption is signed with the pool's caption key (captions/protocol.py), numbered within its
segment and stamped with the moment it is sent.

Threads: everything here runs on the room's event loop.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from livekit import rtc

from captions.live.metrics import METRICS
from captions.live.segmenter import CaptionUpdate
from captions.live.timing import ATTR_TIMING
from captions.log import logger
from captions.protocol import (
    ATTR_AGENT,
    ATTR_SEGMENT_ID,
    ATTR_SENT,
    ATTR_SEQ,
    ATTR_SIGNATURE,
    ATTR_TRANSCRIBED_TRACK_ID,
    ATTR_TRANSCRIPTION_FINAL,
    ATTR_WORDS,
    TOPIC_TRANSCRIPTION,
    CaptionSigner,
    caption_message,
)

FINAL_PUBLISH_ATTEMPTS = 5
"""A final caption is retried (e.g. across a reconnection); an interim one is superseded anyway."""


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


class CaptionPublisher:
    """The room's publish queue, drained by `run()`."""

    def __init__(self, room: rtc.Room, signer: CaptionSigner):
        self._room = room
        self._signer = signer
        self._outbox: list[OutgoingCaption] = []
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._next_seq: dict[str, int] = {}
        """Per open segment, the number of its next update (a segment's entry goes with its final)."""

    def put(self, caption: OutgoingCaption) -> None:
        self._outbox.append(caption)
        self._idle.clear()
        self._ready.set()

    async def drain(self, timeout: float) -> bool:
        """Waits until everything queued is published (or given up); False after `timeout`."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def run(self) -> None:
        """Publishes forever (cancel to stop)."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._outbox:
                item = self._outbox.pop(0)
                if not item.update.final and any(o.update.segment_id == item.update.segment_id
                                                 for o in self._outbox):
                    continue  # a newer text of this segment is already queued: publishing is behind
                await self._publish(item)
            if not self._outbox:
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
        message = caption_message(room=self._room.name, agent=agent, speaker=item.identity,
                                  track_sid=item.track_sid, segment_id=update.segment_id, seq=seq,
                                  final=update.final, sent_ms=sent_ms, words=item.words_attr or "",
                                  text=update.text)
        attributes = {
            ATTR_SEGMENT_ID: update.segment_id,
            ATTR_TRANSCRIBED_TRACK_ID: item.track_sid,
            ATTR_TRANSCRIPTION_FINAL: "true" if update.final else "false",
            ATTR_AGENT: agent,
            ATTR_SEQ: str(seq),
            ATTR_SENT: str(sent_ms),
            ATTR_SIGNATURE: self._signer.sign(message),
        }
        if item.words_attr is not None:
            attributes[ATTR_WORDS] = item.words_attr
        if item.timing is not None:
            attributes[ATTR_TIMING] = json.dumps({**item.timing, "published": time.time()})
        return attributes

    async def _publish(self, item: OutgoingCaption) -> None:
        seq = self._next_seq_of(item.update)
        attempts = FINAL_PUBLISH_ATTEMPTS if item.update.final else 1
        for attempt in range(attempts):
            try:
                writer = await self._room.local_participant.stream_text(
                    topic=TOPIC_TRANSCRIPTION, sender_identity=item.identity,
                    attributes=self._signed_attributes(item, seq))
                if item.update.text:
                    await writer.write(item.update.text)
                await writer.aclose()
                return
            except Exception as e:  # noqa: BLE001 - a failed publish must not stop the publisher
                logger.warning("publishing a caption failed (attempt %d/%d): %s", attempt + 1, attempts, e)
                if attempt + 1 < attempts:
                    await asyncio.sleep(0.5 * 2**attempt)
        METRICS.error("publish")  # every attempt failed: this caption never reached the room
