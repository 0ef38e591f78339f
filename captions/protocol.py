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

Beyond captions, the agent exposes:

* participant attributes on the agent: ``captions.status`` (one of `AgentStatus`) and
  ``captions.queued`` (JSON array of identities of speakers waiting for a free engine slot);
* the room's backlog for late joiners: a viewer calls the RPC method ``captions.backlog`` on the
  agent; the agent answers by sending one text stream on topic ``captions.backlog`` to that viewer,
  whose content is JSON Lines of `FinalSegment` records (oldest first), and the RPC's response is
  ``{"segments": N}``.

The transcript file (``<data-dir>/<room>.jsonl``) holds the same `FinalSegment` records.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import Enum, unique

from captions.stt.api import Word

TOPIC_TRANSCRIPTION = "lk.transcription"
ATTR_SEGMENT_ID = "lk.segment_id"
ATTR_TRANSCRIBED_TRACK_ID = "lk.transcribed_track_id"
ATTR_TRANSCRIPTION_FINAL = "lk.transcription_final"
ATTR_WORDS = "captions.words"

ATTR_AGENT_STATUS = "captions.status"
ATTR_AGENT_QUEUED = "captions.queued"

RPC_BACKLOG = "captions.backlog"
TOPIC_BACKLOG = "captions.backlog"


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
