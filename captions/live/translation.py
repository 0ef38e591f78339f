"""Translating one room's captions (issue 26): every final, and interims at a bounded rate, into each
language someone in the room reads.

The room's publisher tells its `RoomTranslator` of every original update as it numbers it (just
before sending it). For each wanted language other than the segment's source language, the text
goes to the worker's one translation engine (its own thread, batched across every room), and the
result comes back to this room's loop, where it is published in a lane of its own (one per speaker
and language), signed as a translation (captions/protocol.py): an original never waits for one.

* **Which languages**: the configured targets (`--translate-to`, or the room metadata's
  ``{"captions": {"translate_to": [...]}}``, which only the server API sets, among the languages the
  model translates into) that some participant's ``captions.reading`` attribute names, this
  captioner's own included (the server API sets it there for the readers behind the viewer server's
  hidden relay: livekit-server shows a hidden participant to nobody). A participant only picks among
  the configured targets, so no one makes the worker do more than its operator allowed. A language
  nobody reads any more is dropped, except for the segments already being translated into it, which
  get their final.
* **Rate**: interims at most one in flight and one every `interim_interval_s` per segment and
  language, the latest text winning; every final, within `final_timeout_s`, or the final goes out
  with the original text and ``captions.untranslated`` saying why (logged and counted).
* **Order**: per speaker and language, translations go out in the order of their originals, so a
  segment's updates go out in seq order and its final is never followed by one of its interims.
* **Source language**: the room's configured one (``{"captions": {"source_language": "fr"}}``),
  else detected per update among the STT's languages (the speaker's last detected one when unsure).
  A segment whose source is the target is not translated: the original serves (a segment that
  already has translated interims gets its final, with the original text).
* **Transcript**: every translated final is written to the room's transcript (a `FinalSegment` with
  ``language``, ``translation_of`` and ``untranslated``), after its original.

Threads: everything here runs on the room's event loop, except the engine's work, whose results come
back with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from livekit import rtc

from captions.live.metrics import METRICS
from captions.live.publisher import CaptionPublisher, OutgoingCaption, Translation
from captions.live.reading import languages_asked, room_settings
from captions.live.segmenter import CaptionUpdate
from captions.log import logger
from captions.protocol import ATTR_READING, ATTR_READING_FROM, FinalSegment, translation_segment_id
from captions.translate.language import detect_language

STT_LANGUAGES = ("en", "fr")
"""What Kyutai's stt-1b-en_fr transcribes: the candidates of source-language detection."""
INTERIM_INTERVAL_S = 0.7
FINAL_TIMEOUT_S = 3.0
INTERIM_TIMEOUT_S = 3.0
"""An interim's translation that takes longer is dropped (the next one, or the final, replaces it)."""
UNTRANSLATED_TIMEOUT = "timeout"
UNTRANSLATED_ERROR = "error"
"""``captions.untranslated`` reasons: too slow, the model failed (followed by what failed)."""
LOG_WANTED_FREELY = 20
LOG_WANTED_S = 10.0
"""A room logs each change of its translated languages, past its first `LOG_WANTED_FREELY` changes at
most one per `LOG_WANTED_S` (a participant may flip its own attribute)."""


class TranslationEngine(Protocol):
    """What a room needs of the worker's engine (captions/translate/engine.py)."""

    def submit(self, text: str, source: str, target: str, *, final: bool,
               key: Hashable | None = None) -> concurrent.futures.Future[str]: ...


@dataclass(frozen=True)
class TranslationOptions:
    targets: tuple[str, ...] = ()
    """Languages captions may be translated into (--translate-to); a room's metadata may replace them.
    Empty: translation is off (unless a room's metadata names some and the worker has an engine)."""
    source_languages: tuple[str, ...] = STT_LANGUAGES
    """The candidates of source-language detection."""
    interim_interval_s: float = INTERIM_INTERVAL_S
    final_timeout_s: float = FINAL_TIMEOUT_S
    interim_timeout_s: float = INTERIM_TIMEOUT_S
    available: tuple[str, ...] | None = None
    """The languages the worker's model translates into (a room's metadata picks among them); None:
    any."""


@dataclass(eq=False)
class _Pending:
    """One original update being translated into one language."""

    original: OutgoingCaption
    seq: int
    language: str
    source: str
    line: _Line | None = None
    future: concurrent.futures.Future[str] | None = None
    timer: asyncio.TimerHandle | None = None
    text: str | None = None
    untranslated: str = ""
    resolved: bool = False
    dropped: bool = False
    """Not published (a failed or superseded interim)."""
    taken_at: float = field(default_factory=time.monotonic)
    """When its original was taken (just after the publisher numbered it): the translation's delay
    is measured from here (metrics)."""


@dataclass(eq=False)
class _Line:
    """One open segment in one language: the interims' rate."""

    language: str
    in_flight: _Pending | None = None
    next_at: float = 0.0
    """Loop time before which no other interim is submitted."""
    latest: tuple[OutgoingCaption, int, str] | None = None
    """The newest interim waiting for its turn: (original, seq, source language)."""
    timer: asyncio.TimerHandle | None = None
    started: bool = False
    """An interim was submitted: the segment's final is translated too, whatever happens."""
    closed: bool = False


@dataclass
class TranslationCounts:
    translated: int = 0
    """Translated finals published."""
    untranslated: int = 0
    """Finals published with the original text (failed, too slow)."""
    interims: int = 0
    """Translated interims published."""
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)


class RoomTranslator:
    """Translates one room's captions; `on_numbered` is its publisher's hook."""

    def __init__(self, room: rtc.Room, engine: TranslationEngine, publisher: CaptionPublisher,
                 options: TranslationOptions, write: Callable[[FinalSegment], object] | None = None,
                 detect: Callable[[str, Sequence[str]], str | None] | None = None):
        """`write(segment)`: saves a translated final (the room's transcript); `detect(text,
        candidates)`: the source language detector (default: captions.translate.language's)."""
        self._room = room
        self._engine = engine
        self._publisher = publisher
        self.options = options
        self._write = write
        self._detect = detect or detect_language
        self._loop: asyncio.AbstractEventLoop | None = None
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()
        self._reading: dict[str, tuple[str, ...]] = {}
        """Per participant, the languages its ``captions.reading`` names."""
        self._targets, self._room_source = options.targets, None
        self.wanted: frozenset[str] = frozenset()
        """The languages being translated into now."""
        self._lines: dict[str, dict[str, _Line]] = {}
        """Per open segment, its lines by language."""
        self._outputs: dict[tuple[str, str], collections.deque[_Pending]] = {}
        """Per (speaker, language), the translations in the order of their originals."""
        self._speaker_language: dict[str, str] = {}
        self._wanted_logged_at = -LOG_WANTED_S
        self._wanted_changes = 0
        self._unresolved = 0
        self._settled = asyncio.Event()
        self._settled.set()
        self._closed = False
        self.counts = TranslationCounts()
        METRICS.attach_translation(engine, options.targets)

    # Which languages ------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts following the room's readers and settings (call once connected, on its loop)."""
        self._loop = asyncio.get_running_loop()
        self._room.on("participant_connected", self._on_participant)
        self._room.on("participant_attributes_changed", self._on_attributes)
        self._room.on("participant_disconnected", self._on_participant_left)
        self._room.on("room_metadata_changed", self._on_metadata)
        for participant in (*self._room.remote_participants.values(), self._room.local_participant):
            self._note_reader(participant)
        self._on_metadata()

    def _on_participant(self, participant: rtc.RemoteParticipant) -> None:
        self._note_reader(participant)
        self._update_wanted()

    def _on_attributes(self, changed: dict[str, str], participant: rtc.Participant) -> None:
        if any(key == ATTR_READING or key.startswith(ATTR_READING_FROM) for key in changed):
            self._note_reader(participant)
            self._update_wanted()

    def _on_participant_left(self, participant: rtc.RemoteParticipant) -> None:
        if self._reading.pop(participant.identity, None) is not None:
            self._update_wanted()

    def _on_metadata(self, *_: object) -> None:
        targets, self._room_source = room_settings(self._room.metadata, self.options.targets)
        available = self.options.available
        self._targets = targets if available is None else tuple(t for t in targets if t in available)
        self._update_wanted()

    def _note_reader(self, participant: rtc.Participant) -> None:
        """What `participant` asks for: its own ``captions.reading``, and, on this captioner, what each
        viewer server's relay told it (``captions.reading.<relay>``, until that entry expires)."""
        now = time.time()
        asked, renew_by = languages_asked(getattr(participant, "attributes", None) or {}, now)
        if asked:
            self._reading[participant.identity] = tuple(asked)
        else:
            self._reading.pop(participant.identity, None)
        if renew_by is not None and self._loop is not None:  # look again once the first entry expires
            self._loop.call_later(renew_by - now + 0.1, self._expire, participant)

    def _expire(self, participant: rtc.Participant) -> None:
        if not self._closed:
            self._note_reader(participant)
            self._update_wanted()

    def _update_wanted(self) -> None:
        read = {language for languages in self._reading.values() for language in languages}
        wanted = frozenset(language for language in self._targets if language in read)
        if wanted != self.wanted:
            # Readers come and go (and a participant may flip its own attribute): a log line when the
            # set changes, past the room's first LOG_WANTED_FREELY changes at most one per LOG_WANTED_S.
            now = time.monotonic()
            self._wanted_changes += 1
            if self._wanted_changes <= LOG_WANTED_FREELY or now - self._wanted_logged_at >= LOG_WANTED_S:
                self._wanted_logged_at = now
                logger.info("room %s: translating captions into %s", self._room.name,
                            ", ".join(sorted(wanted)) or "no language")
            self.wanted = wanted

    # Captions in ---------------------------------------------------------------------------------

    def on_numbered(self, original: OutgoingCaption, seq: int) -> None:
        """The publisher numbered `original` and is about to send it: taken once it has started."""
        if not self._closed and self._loop is not None and original.translation is None \
                and original.resend_seq is None:
            self._loop.call_soon(self._take, original, seq)

    def _take(self, original: OutgoingCaption, seq: int) -> None:
        if self._closed:
            return
        update = original.update
        lines = self._lines.pop(update.segment_id, {}) if update.final else self._lines.get(update.segment_id, {})
        languages = set(self.wanted) | (set(lines) if update.final else set())
        if not languages:
            return
        source = self._source_language(original)
        for language in sorted(languages):
            if update.final:
                self._take_final(original, seq, language, source, lines.get(language))
            elif update.text and source != language:
                line = self._lines.setdefault(update.segment_id, {}).setdefault(language, _Line(language))
                line.latest = (original, seq, source)
                self._pump(line)

    def _source_language(self, original: OutgoingCaption) -> str:
        if self._room_source is not None:
            return self._room_source
        candidates = self.options.source_languages
        detected = None
        if original.update.text:
            try:
                detected = self._detect(original.update.text, candidates)
            except Exception:  # noqa: BLE001 - an unsure detection is not a reason to stop
                logger.exception("room %s: language detection failed", self._room.name)
        if detected:
            self._speaker_language[original.identity] = detected
            return detected
        return self._speaker_language.get(original.identity, candidates[0] if candidates else "")

    def _take_final(self, original: OutgoingCaption, seq: int, language: str, source: str, line: _Line | None) -> None:
        started = line is not None and line.started
        if line is not None:
            line.closed, line.latest = True, None
            if line.timer is not None:
                line.timer.cancel()
            if line.in_flight is not None:  # superseded by the final: not published
                self._resolve(line.in_flight, None, "superseded")
        text = original.update.text
        if not text or source == language:
            # Already in the reader's language: the original is its translation, sent as one so that
            # a reader's page does not wait for one and mark the line "not translated".
            if started or text:
                self._resolve(self._enqueue(original, seq, language, source), text, "")
            return
        self._submit(original, seq, language, source, final=True)

    def _pump(self, line: _Line) -> None:
        """Submits the line's latest interim if none is in flight and its interval has passed."""
        if (line.closed or self._closed or line.in_flight is not None or line.latest is None
                or line.timer is not None):
            return
        now = self._loop.time()
        if now < line.next_at:
            line.timer = self._loop.call_later(line.next_at - now, self._pump_later, line)
            return
        (original, seq, source), line.latest = line.latest, None
        line.next_at, line.started = now + self.options.interim_interval_s, True
        line.in_flight = self._submit(original, seq, line.language, source, final=False, line=line)

    def _pump_later(self, line: _Line) -> None:
        line.timer = None
        self._pump(line)

    # The engine ----------------------------------------------------------------------------------

    def _enqueue(self, original: OutgoingCaption, seq: int, language: str, source: str,
                 line: _Line | None = None) -> _Pending:
        pending = _Pending(original, seq, language, source, line)
        self._outputs.setdefault((original.identity, language), collections.deque()).append(pending)
        self._unresolved += 1
        self._settled.clear()
        return pending

    def _submit(self, original: OutgoingCaption, seq: int, language: str, source: str, *, final: bool,
                line: _Line | None = None) -> _Pending:
        pending = self._enqueue(original, seq, language, source, line)
        try:
            # The key: the segment's final (or a newer interim) replaces its interim still queued.
            future = self._engine.submit(original.update.text, source, language, final=final,
                                         key=(original.update.segment_id, language))
        except Exception as e:  # noqa: BLE001 - e.g. the engine closed: the original serves
            self._resolve(pending, None, f"{UNTRANSLATED_ERROR}: {e}")
            return pending
        pending.future = future
        timeout = self.options.final_timeout_s if final else self.options.interim_timeout_s
        pending.timer = self._loop.call_later(timeout, self._resolve, pending, None, UNTRANSLATED_TIMEOUT)
        future.add_done_callback(functools.partial(self._from_engine, pending))
        return pending

    def _from_engine(self, pending: _Pending, future: concurrent.futures.Future[str]) -> None:
        """On the engine's thread (or this one, if it was done already)."""
        with contextlib.suppress(RuntimeError):  # the room's loop is closed: nobody to tell
            self._loop.call_soon_threadsafe(self._engine_done, pending, future)

    def _engine_done(self, pending: _Pending, future: concurrent.futures.Future[str]) -> None:
        if pending.resolved:
            return
        if future.cancelled():
            self._resolve(pending, None, f"{UNTRANSLATED_ERROR}: cancelled")
        elif (error := future.exception()) is not None:
            self._resolve(pending, None, f"{UNTRANSLATED_ERROR}: {type(error).__name__}")
        else:
            self._resolve(pending, future.result(), "")

    def _resolve(self, pending: _Pending, text: str | None, reason: str) -> None:
        """`pending` is done: translated into `text`, or not (`text` None, for `reason`)."""
        if pending.resolved:
            return
        pending.resolved = True
        self._unresolved -= 1
        if pending.timer is not None:
            pending.timer.cancel()
        if pending.future is not None and not pending.future.done():
            pending.future.cancel()  # the engine may skip it
        final = pending.original.update.final
        if text is not None:
            pending.text, pending.untranslated = text, reason
        elif final:
            pending.text, pending.untranslated = pending.original.update.text, reason or UNTRANSLATED_ERROR
            self.counts.reasons[pending.untranslated] += 1
            METRICS.error("translation")
            logger.warning("room %s: final %s of %s published untranslated into %s (%s)", self._room.name,
                           pending.original.update.segment_id, pending.original.identity, pending.language,
                           pending.untranslated)
        else:
            pending.dropped = True  # an interim: the next one, or the final, replaces it
        line = pending.line
        if line is not None and line.in_flight is pending:
            line.in_flight = None
            self._pump(line)
        self._release(pending.original.identity, pending.language)
        if self._unresolved == 0:
            self._settled.set()

    # Captions out --------------------------------------------------------------------------------

    def _release(self, identity: str, language: str) -> None:
        """Publishes the done translations at the head of (speaker, language), in order."""
        queue = self._outputs.get((identity, language))
        while queue and queue[0].resolved:
            pending = queue.popleft()
            if not pending.dropped and not self._closed:
                self._publish(pending)
        if queue is not None and not queue:
            del self._outputs[(identity, language)]

    def _publish(self, pending: _Pending) -> None:
        original, text = pending.original, pending.text or ""
        final = original.update.final
        source_segment = original.update.segment_id
        update = CaptionUpdate(translation_segment_id(source_segment, pending.language), text, final)
        self._publisher.put(OutgoingCaption(
            original.identity, original.track_sid, update,
            translation=Translation(source_segment, pending.source, pending.language, pending.seq,
                                    pending.untranslated)))
        if not final:
            self.counts.interims += 1
            METRICS.translation_published(pending.language, final=False)
            return
        if pending.untranslated:
            self.counts.untranslated += 1
            METRICS.final_untranslated(pending.untranslated)
        else:
            self.counts.translated += 1
            METRICS.translation_published(pending.language, final=True)
            if pending.future is not None:  # the model's (not the original serving for its own language)
                METRICS.observe_translation_delay(time.monotonic() - pending.taken_at)
        if text and original.segment is not None and self._write is not None:
            self._write(dataclasses.replace(original.segment, segment_id=update.segment_id, text=text, words=[],
                                            language=pending.language, translation_of=source_segment,
                                            untranslated=pending.untranslated))

    # Closing -------------------------------------------------------------------------------------

    async def drain(self, timeout: float) -> bool:
        """Waits until every update taken is translated (or given up) and queued for publishing."""
        await asyncio.sleep(0)  # updates numbered just now are taken first
        try:
            await asyncio.wait_for(self._settled.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def close(self) -> None:
        """Stops translating: nothing more is submitted or published."""
        if self._closed:
            return
        self._closed = True
        for event, handler in (("participant_connected", self._on_participant),
                               ("participant_attributes_changed", self._on_attributes),
                               ("participant_disconnected", self._on_participant_left),
                               ("room_metadata_changed", self._on_metadata)):
            with contextlib.suppress(Exception):
                self._room.off(event, handler)
        for lines in self._lines.values():
            for line in lines.values():
                line.closed = True
                if line.timer is not None:
                    line.timer.cancel()
        for queue in self._outputs.values():
            for pending in queue:
                if not pending.resolved and pending.original.update.final:
                    logger.warning("room %s: closed before %s's translation into %s came", self._room.name,
                                   pending.original.update.segment_id, pending.language)
                pending.resolved = True
                if pending.timer is not None:
                    pending.timer.cancel()
                if pending.future is not None:
                    pending.future.cancel()
        self._lines.clear()
        self._outputs.clear()
        self._unresolved = 0
        self._settled.set()
