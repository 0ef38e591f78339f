"""The captions protocol: what the agent publishes over LiveKit and what viewers read.

Captions follow LiveKit's own transcription protocol so that LiveKit's front-end components show
them too:

* a text stream on topic ``lk.transcription``, sent with ``sender_identity`` = the speaker;
* attributes ``lk.segment_id`` (new per utterance), ``lk.transcribed_track_id`` (the speaker's
  microphone track sid) and ``lk.transcription_final`` ("false" for interim updates, "true" once);
* every interim update is a new stream carrying the *full* text of the open segment so far, so a
  viewer replaces the segment's text in place;
* the final stream also carries ``captions.words``: a JSON array of ``[word, start, end]`` with
  times in Unix epoch seconds (wall clock of the moment the audio was captured), for export.

Every caption is signed, so that a viewer shows only what the caption agent transcribed, for the
speaker it names. LiveKit lets only agents send a stream under another participant's identity, but
the receiving SDKs do not say whether a stream named "alice" came from an agent or from alice, and
anyone who received a stream's header can send chunks into it (livekit-server 1.13.5, livekit-client
2.23). So each stream also carries ``captions.agent`` (the identity of the agent that made it),
``captions.seq`` (its update number within the segment; the final has the highest) and
``captions.sig``: an Ed25519 signature of `caption_message` by a key the agent generates at start
and publishes as its own participant attribute ``captions.key`` (only the agent can set its own
attributes, and only agent tokens make a participant of kind AGENT). A viewer verifies each caption
against that key and drops what does not verify.

The agent's participant attributes: ``captions.status`` (one of `AgentStatus`), ``captions.queued``
(JSON array of identities of speakers waiting for a free engine slot), ``captions.key``,
``captions.since`` (when it joined the room, in Unix milliseconds, as the server says) and
``captions.alive`` (a counter it advances every couple of seconds while it runs).

A room has one captioner: when a race puts two in a room, the one that joined first stays (the
smaller identity on a tie), by `elected_captioner`; every captioner, worker and viewer applies the
same rule, so they agree without talking to each other (captions/live/presence.py).

The transcript file (``<data-dir>/<room>.jsonl``) holds the room's `FinalSegment` records; the
viewer server serves the recent ones to late viewers over HTTP (captions/viewer/server.py).
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field
from enum import Enum, unique

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from captions.stt.api import Word

TOPIC_TRANSCRIPTION = "lk.transcription"
ATTR_SEGMENT_ID = "lk.segment_id"
ATTR_TRANSCRIBED_TRACK_ID = "lk.transcribed_track_id"
ATTR_TRANSCRIPTION_FINAL = "lk.transcription_final"
ATTR_WORDS = "captions.words"

ATTR_AGENT = "captions.agent"
ATTR_SEQ = "captions.seq"
ATTR_SIGNATURE = "captions.sig"

ATTR_AGENT_STATUS = "captions.status"
ATTR_AGENT_QUEUED = "captions.queued"
ATTR_AGENT_KEY = "captions.key"
ATTR_AGENT_SINCE = "captions.since"
ATTR_AGENT_ALIVE = "captions.alive"

SIGNATURE_CONTEXT = "lk-captions-v1"
"""First field of every signed message, so a signature can never be taken for another protocol's."""


@unique
class AgentStatus(str, Enum):
    LOADING = "loading"
    """The model is loading or warming up; captions start shortly."""
    LIVE = "live"
    """Every speaker is being captioned."""
    WAITING = "waiting"
    """Some speakers wait for engine capacity (see ``captions.queued``)."""


@dataclass
class FinalSegment:
    """One closed caption: a line of the transcript file and of the backlog."""

    segment_id: str
    participant_identity: str
    participant_name: str
    track_id: str
    text: str
    start: float
    """Unix epoch seconds of the first word's start."""
    end: float
    words: list[list] = field(default_factory=list)
    """``[word, start, end]`` triples, Unix epoch seconds."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @staticmethod
    def from_json(line: str) -> FinalSegment:
        return FinalSegment(**json.loads(line))


def words_attribute(words: list[Word]) -> str:
    """The ``captions.words`` attribute: compact JSON, times rounded to milliseconds."""
    return json.dumps([[w.text, round(w.start, 3), round(w.end, 3)] for w in words], ensure_ascii=False)


def caption_message(*, room: str, agent: str, speaker: str, track_sid: str, segment_id: str, seq: int,
                    final: bool, words: str, text: str) -> bytes:
    """The bytes a caption's signature covers: every field a viewer shows or relies on, each prefixed
    with its length in UTF-8 bytes, so that no field can spill into the next (web/protocol.js builds
    the same bytes)."""
    fields = (SIGNATURE_CONTEXT, room, agent, speaker, track_sid, segment_id, str(seq),
              "final" if final else "interim", words, text)
    out = bytearray()
    for value in fields:
        data = value.encode("utf-8")
        out += f"{len(data)}:".encode() + data
    return bytes(out)


class CaptionSigner:
    """The agent's signing key: generated when the worker starts, never stored; its public half is
    the agent's ``captions.key`` attribute."""

    def __init__(self) -> None:
        self._key = Ed25519PrivateKey.generate()
        raw = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.public_key = base64.b64encode(raw).decode()
        """Base64 of the raw 32-byte Ed25519 public key."""

    def sign(self, message: bytes) -> str:
        """Base64 of the 64-byte Ed25519 signature of `message`."""
        return base64.b64encode(self._key.sign(message)).decode()


@dataclass(frozen=True)
class CaptionerInfo:
    """A caption agent as a room shows it: its identity and when it joined (Unix ms)."""

    identity: str
    since_ms: int


def elected_captioner(captioners: list[CaptionerInfo]) -> CaptionerInfo | None:
    """The room's captioner among several: the one that joined first, the smaller identity on a tie
    (web/session.js applies the same rule)."""
    return min(captioners, key=lambda c: (c.since_ms, c.identity), default=None)
