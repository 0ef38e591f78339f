"""The captions protocol: what the agent publishes over LiveKit and what viewers read. The spec is
docs/protocol.md, which this module and web/protocol.js both follow; the notes below are its summary.

Captions follow LiveKit's own transcription protocol so that LiveKit's front-end components show
them too:

* a text stream on topic ``lk.transcription``, sent with ``sender_identity`` = the speaker, and
  ``captions.speaker`` = the speaker too. Once the speaker has left the room, their last captions are
  sent under the agent's own identity instead (LiveKit clients drop or abort the streams of a sender
  who is gone); a viewer takes the speaker from ``captions.speaker`` only from a stream whose sender
  is the agent it names, and the signature covers the speaker either way;
* attributes ``lk.segment_id`` (new per utterance), ``lk.transcribed_track_id`` (the speaker's
  microphone track sid) and ``lk.transcription_final`` ("false" for interim updates, "true" once);
* every interim update is a new stream carrying the *full* text of the open segment so far, so a
  viewer replaces the segment's text in place;
* the final stream also carries ``captions.words``: a JSON array of ``[word, start, end]`` with
  times in Unix epoch seconds (wall clock of the moment the audio was captured), for export.

Every caption is signed, so that a viewer shows only what this deployment's caption agents
transcribed, for the speaker it names, at the time it was said. LiveKit lets only agents send a
stream under another participant's identity, but the receiving SDKs do not say whether a stream
named "alice" came from an agent or from alice, anyone who received a stream's header can send
chunks into it (livekit-server 1.13.5, livekit-client 2.23), and every participant sets its own
attributes. So nothing a participant says about itself is trusted:

* **one trust root**: the caption key is an Ed25519 key derived from the LiveKit API secret and the
  worker pool's agent name (`CaptionSigner.for_deployment`); every worker of the pool holds the same
  key, and the viewer server, which holds the secret too, hands its public half to viewers with their
  token. Another agent of the deployment (a voice assistant, a second caption pool with another agent
  name) has another key, or none, and its captions and claims do not verify.
* **a captioner proves it is one**: its participant attribute ``captions.claim`` is a signature of
  `claim_message` (the room and its own identity, which the server sets from its token). A claim
  copied to another participant names the wrong identity.
* **the room's captioner is elected from server facts**: among the participants with a valid claim
  that are not superseded (``captions.superseded``, set through the server API by the recovery on a
  captioner whose heartbeat stopped; a participant can set it only on itself, withdrawing itself, as
  a captioner whose engine failed does),
  the one the server says joined first (whole seconds, the smaller identity on a tie:
  `elected_captioner`). Workers and viewers apply the same rule to the same facts.
* **no replay**: each caption stream carries ``captions.agent`` (the identity of the agent that made
  it), ``captions.seq`` (its update number within the segment; the final has the highest),
  ``captions.sent`` (the agent's clock when it signed, Unix ms) and ``captions.sig``, an Ed25519
  signature of `caption_message` over all of these and everything shown. A viewer drops a caption
  signed more than `REPLAY_WINDOW_S` from its estimate of the server's clock, an update not newer
  than one it has shown, and any update of a segment it already has final (backlog included).

**Translations** (issue 26) are captions too: a text stream on ``lk.transcription`` under the same
sender as the segment they translate, with LiveKit's example attributes ``language`` (the target
language, BCP-47 primary code such as ``de``) and ``translated`` = ``"true"``, plus
``captions.source_segment`` (the ``lk.segment_id`` of the original), ``captions.source_language``
(the original's detected or configured language) and ``captions.untranslated`` (non-empty, with the
reason, when the translation failed or was too slow and the text is the original's). Their own
``lk.segment_id`` is `translation_segment_id` (the original's id and the language), so a component that
merges by segment id keeps each language apart. Their signature covers all of these
(`translation_message`); a translation's ``captions.seq`` is that of the original update it
translates (interims are translated at a bounded rate, so some numbers are skipped).

The agent's participant attributes: ``captions.status`` (one of `AgentStatus`), ``captions.queued``
(JSON array of identities of speakers waiting for a free engine slot), ``captions.claim`` and
``captions.alive`` (a counter it advances every couple of seconds while it runs).

The transcript file (``<data-dir>/<room>.jsonl``) holds the room's `FinalSegment` records; the
viewer server serves the recent ones to late viewers over HTTP (captions/viewer/server.py).
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field
from enum import Enum, unique

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from captions.stt.api import Word

TOPIC_TRANSCRIPTION = "lk.transcription"
ATTR_SEGMENT_ID = "lk.segment_id"
ATTR_TRANSCRIBED_TRACK_ID = "lk.transcribed_track_id"
ATTR_TRANSCRIPTION_FINAL = "lk.transcription_final"
ATTR_WORDS = "captions.words"

ATTR_AGENT = "captions.agent"
ATTR_SPEAKER = "captions.speaker"
ATTR_SEQ = "captions.seq"
ATTR_SENT = "captions.sent"
ATTR_SIGNATURE = "captions.sig"

ATTR_LANGUAGE = "language"
"""A translation's language (un-prefixed, as LiveKit's own translation example publishes it)."""
ATTR_TRANSLATED = "translated"
ATTR_SOURCE_SEGMENT = "captions.source_segment"
ATTR_SOURCE_LANGUAGE = "captions.source_language"
ATTR_UNTRANSLATED = "captions.untranslated"
ATTR_READING = "captions.reading"
"""A participant attribute: comma-separated languages its readers want (a visible relay sets it on
itself); the worker translates into those of its configured targets only."""
ATTR_READING_FROM = "captions.reading."
"""Prefix of the captioner's attributes ``captions.reading.<relay identity>`` = `reading_value`: what
each viewer server's readers want, set on the captioner through the server API (a hidden relay's own
attributes reach nobody). One key per relay, so that several viewer servers do not overwrite each
other; each entry expires, so that a viewer server that died stops costing translations."""
READING_TTL_S = 90
"""A ``captions.reading.<relay>`` entry holds this long; its relay renews it well before."""


def reading_value(languages: str, expires_s: int) -> str:
    """A ``captions.reading.<relay>`` value: the languages, ``@`` and when it expires (Unix seconds)."""
    return f"{languages}@{expires_s}"


def parse_reading_value(value: str) -> tuple[str, float]:
    """(languages, expiry in Unix seconds) of a `reading_value`; expired (0) when malformed."""
    languages, _, expires = value.rpartition("@")
    try:
        return languages, float(int(expires[:12]))
    except ValueError:
        return "", 0.0

ATTR_AGENT_STATUS = "captions.status"
ATTR_AGENT_QUEUED = "captions.queued"
ATTR_AGENT_CLAIM = "captions.claim"
ATTR_AGENT_SUPERSEDED = "captions.superseded"
ATTR_AGENT_ALIVE = "captions.alive"
ATTR_AGENT_PROBLEM = "captions.problem"

SIGNATURE_CONTEXT = "lk-captions-v2"
"""First field of every signed message, so a signature can never be taken for another protocol's
(v1 had per-worker keys and no time)."""
REPLAY_WINDOW_S = 6.0
"""A caption signed this long before (or after) the viewer's estimate of the server's clock is not
shown: a replay. Live captions arrive well within it; clocks of the workers and the viewer server
must agree to about a second (NTP)."""


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
    language: str = ""
    """A translation's language; "" for an original (whose language is not recorded)."""
    translation_of: str = ""
    """A translation's source segment id; "" for an original."""
    untranslated: str = ""
    """Why a translation's text is the original's (its ``captions.untranslated``); "" otherwise."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @staticmethod
    def from_json(line: str) -> FinalSegment:
        return FinalSegment(**json.loads(line))


def words_attribute(words: list[Word]) -> str:
    """The ``captions.words`` attribute: compact JSON, times rounded to milliseconds."""
    return json.dumps([[w.text, round(w.start, 3), round(w.end, 3)] for w in words], ensure_ascii=False)


def _length_prefixed(*fields: str) -> bytes:
    """Each field prefixed with its length in UTF-8 bytes, so that no field can spill into the next
    (web/protocol.js builds the same bytes)."""
    out = bytearray()
    for value in fields:
        data = value.encode("utf-8")
        out += f"{len(data)}:".encode() + data
    return bytes(out)


def caption_message(*, room: str, agent: str, speaker: str, track_sid: str, segment_id: str, seq: int,
                    final: bool, sent_ms: int, words: str, text: str) -> bytes:
    """The bytes a caption's signature covers: every field a viewer shows or relies on."""
    return _length_prefixed(SIGNATURE_CONTEXT, "caption", room, agent, speaker, track_sid, segment_id, str(seq),
                            "final" if final else "interim", str(sent_ms), words, text)


def translation_message(*, room: str, agent: str, speaker: str, track_sid: str, segment_id: str, seq: int,
                        final: bool, sent_ms: int, source_segment: str, source_language: str, language: str,
                        untranslated: str, text: str) -> bytes:
    """The bytes a translation's signature covers. Its own kind ("translation"), so that no original
    caption's signature can pass for a translation's, nor the reverse."""
    return _length_prefixed(SIGNATURE_CONTEXT, "translation", room, agent, speaker, track_sid, segment_id, str(seq),
                            "final" if final else "interim", str(sent_ms), source_segment, source_language,
                            language, untranslated, text)


def translation_segment_id(source_segment: str, language: str) -> str:
    """The ``lk.segment_id`` of `source_segment`'s translation into `language`."""
    return f"{source_segment}~{language}"


def claim_message(*, room: str, identity: str) -> bytes:
    """The bytes a captioner's ``captions.claim`` signs: this participant captions this room."""
    return _length_prefixed(SIGNATURE_CONTEXT, "claim", room, identity)


def _deployment_seed(api_secret: str, agent_name: str) -> bytes:
    """HKDF-SHA256 of the API secret, bound to the pool's agent name (32 bytes: an Ed25519 seed)."""
    info = _length_prefixed(SIGNATURE_CONTEXT, "caption-key", agent_name)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"lk-captions", info=info).derive(api_secret.encode())


class CaptionSigner:
    """A caption key: the deployment's (`for_deployment`), or a random one (tests, tools)."""

    def __init__(self, seed: bytes | None = None) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(seed) if seed else Ed25519PrivateKey.generate()
        raw = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.public_key = base64.b64encode(raw).decode()
        """Base64 of the raw 32-byte Ed25519 public key."""

    @classmethod
    def for_deployment(cls, api_secret: str, agent_name: str = "") -> CaptionSigner:
        """The key of every caption worker of pool `agent_name` that holds `api_secret`, and the key
        the viewer server vouches for; rotating the secret rotates it."""
        return cls(_deployment_seed(api_secret, agent_name))

    def sign(self, message: bytes) -> str:
        """Base64 of the 64-byte Ed25519 signature of `message`."""
        return base64.b64encode(self._key.sign(message)).decode()

    def claim(self, room: str, identity: str) -> str:
        """The ``captions.claim`` attribute of captioner `identity` in `room`."""
        return self.sign(claim_message(room=room, identity=identity))


def verify(public_key: str, message: bytes, signature: str) -> bool:
    """Whether `signature` (base64) is `public_key`'s (base64, raw Ed25519) signature of `message`."""
    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key, validate=True))
        key.verify(base64.b64decode(signature, validate=True), message)
    except (InvalidSignature, ValueError):
        return False
    return True


CAPTION_ATTRIBUTES = (ATTR_SEGMENT_ID, ATTR_TRANSCRIBED_TRACK_ID, ATTR_TRANSCRIPTION_FINAL, ATTR_WORDS, ATTR_AGENT,
                      ATTR_SPEAKER, ATTR_SEQ, ATTR_SENT, ATTR_SIGNATURE, ATTR_LANGUAGE, ATTR_TRANSLATED,
                      ATTR_SOURCE_SEGMENT, ATTR_SOURCE_LANGUAGE, ATTR_UNTRANSLATED)
"""The stream attributes a caption is made of (anything else a sender adds is not part of it)."""


def verify_caption(public_key: str, room: str, sender: str, attributes: dict[str, str], text: str) -> bool:
    """Whether a caption stream (`sender`: the identity it came under) is signed with `public_key`
    for this room: the viewer's check (web/session.js, authenticity.js), in Python."""
    speaker = attributes.get(ATTR_SPEAKER, sender) if sender == attributes.get(ATTR_AGENT) else sender
    try:
        if attributes.get(ATTR_TRANSLATED) == "true":
            message = translation_message(
                room=room, agent=attributes[ATTR_AGENT], speaker=speaker,
                track_sid=attributes.get(ATTR_TRANSCRIBED_TRACK_ID, ""), segment_id=attributes[ATTR_SEGMENT_ID],
                seq=int(attributes[ATTR_SEQ]), final=attributes.get(ATTR_TRANSCRIPTION_FINAL) == "true",
                sent_ms=int(attributes[ATTR_SENT]), source_segment=attributes[ATTR_SOURCE_SEGMENT],
                source_language=attributes.get(ATTR_SOURCE_LANGUAGE, ""), language=attributes[ATTR_LANGUAGE],
                untranslated=attributes.get(ATTR_UNTRANSLATED, ""), text=text)
            return verify(public_key, message, attributes.get(ATTR_SIGNATURE, ""))
        message = caption_message(
            room=room, agent=attributes[ATTR_AGENT], speaker=speaker,
            track_sid=attributes.get(ATTR_TRANSCRIBED_TRACK_ID, ""), segment_id=attributes[ATTR_SEGMENT_ID],
            seq=int(attributes[ATTR_SEQ]), final=attributes.get(ATTR_TRANSCRIPTION_FINAL) == "true",
            sent_ms=int(attributes[ATTR_SENT]), words=attributes.get(ATTR_WORDS, ""), text=text)
    except (KeyError, ValueError):
        return False
    return verify(public_key, message, attributes.get(ATTR_SIGNATURE, ""))


@dataclass(frozen=True)
class CaptionerInfo:
    """A caption agent as the server reports it: its identity and when it joined (Unix seconds)."""

    identity: str
    joined_s: int


def elected_captioner(captioners: list[CaptionerInfo]) -> CaptionerInfo | None:
    """The room's captioner among several with a valid claim: the one that joined first by the
    server's clock in whole seconds (what every client SDK reports), the smaller identity on a tie
    (web/protocol.js applies the same rule)."""
    return min(captioners, key=lambda c: (c.joined_s, c.identity), default=None)
