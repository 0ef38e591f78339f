// The transcript on the page: caption segments rendered as turns (consecutive segments of one
// speaker), interim text replaced in place by the final text, the room's backlog above.
//
// Live segments are laid out in the captions' own order, not in the order their streams reach the
// page: each caption stream is relayed once it is complete, and streams sent one after the other
// can complete out of order (a slow one behind later ones). A segment's place is when the agent
// signed its earliest update the page has (captions.sent), so a stream that comes late goes where
// it belongs, splitting a turn it falls into, and the turns are the same whatever the arrival order.
//
// Reading a translation (issue 26): each segment shows its translation into the reader's language
// (interim translations replaced in place too), the original until one comes; a segment whose
// translation failed, or has not come `TRANSLATION_WAIT_MS` after its final, shows the original
// with a visible "not translated" note; each translated segment can show its original on demand.
// Translations are segments of their own (their own lk.segment_id, updates and final), attached to
// the original they translate.
//
// Every piece of text that comes from the room (captions, names, identities) goes into the page
// through textContent, never as HTML.

import { directionOf, translationSegmentId } from './protocol.js';

const COLOR_SLOTS = 6;

/** How long after an original's final its translation may take before the original is shown as not
 * translated (it still replaces the original if it comes later). */
export const TRANSLATION_WAIT_MS = 5000;

/**
 * Why a line is shown in its original language, in words for its readers: `untranslated` as the
 * captioner sent it (`timeout`, `error` or `error: ...`) or as the page set it (`interrupted`: the
 * captioner left before the translated final), '' when no translation came in time.
 */
export function untranslatedReason(untranslated) {
  if (!untranslated || untranslated === 'timeout') return 'the translation came too late';
  if (untranslated === 'interrupted') return 'the translation was cut off';
  return 'the translation failed';
}

/** Speakers' display names and colours (a colour slot each, in order of first appearance). */
export class Speakers {
  constructor() {
    this.names = new Map(); // identity -> display name
    this.colors = new Map(); // identity -> colour slot
  }

  colorOf(identity) {
    if (!this.colors.has(identity)) this.colors.set(identity, this.colors.size % COLOR_SLOTS);
    return String(this.colors.get(identity));
  }

  nameOf(identity) {
    return this.names.get(identity) || identity || 'Unknown speaker';
  }

  /** Records a name; true when it changed. */
  learn(identity, name) {
    if (!name || this.names.get(identity) === name) return false;
    this.names.set(identity, name);
    return true;
  }
}

/** A segment's key: its speaker and its id, so that nobody else's update can reach it. */
function segmentKey(identity, id) {
  return `${identity}\u0000${id}`;
}

/** Segments keyed by speaker and lk.segment_id, rendered as turns. */
export class Transcript {
  constructor(container, empty, speakers, { overlay = false } = {}) {
    this.container = container;
    this.empty = empty;
    this.speakers = speakers;
    this.overlay = overlay;
    this.segments = new Map();
    this.live = []; // the live segments shown, in their order (`place`)
    this.turns = new WeakMap(); // turn element -> its turn ({identity, element, text, label, when})
    this.nameLabels = new Map(); // identity -> name elements of that speaker's turns
    this.language = ''; // the language read: '' for the originals
  }

  /** Reads `language` ('' for the originals) from now on: every segment is shown again in it. */
  setLanguage(language) {
    if (language === this.language) return;
    this.language = language;
    this.container.classList.toggle('translating', Boolean(language));
    for (const text of this.container.querySelectorAll('.turn .text')) this.directText(text);
    const waiting = [];
    for (const segment of this.segments.values()) {
      if (segment.translationOf) continue;
      segment.late = false;
      if (segment.final) waiting.push(segment);
      this.render(segment);
    }
    this.expectTranslations(waiting);
  }

  /** The direction and language of a turn's text: the reader's language's. */
  directText(text) {
    if (this.language) {
      text.lang = this.language;
      text.dir = directionOf(this.language);
    } else {
      text.removeAttribute('lang');
      text.removeAttribute('dir');
    }
  }

  /** The translation into the language read of original `segment`, if one came. */
  translationOf(segment) {
    if (!this.language) return null;
    const translation = this.segments.get(segmentKey(segment.identity, translationSegmentId(segment.id, this.language)));
    return translation?.translationOf === segment.id && translation.language === this.language ? translation : null;
  }

  /** Final `segments` whose translation does not come in time are shown as not translated. */
  expectTranslations(segments) {
    if (!this.language || !segments.length) return;
    const language = this.language;
    setTimeout(() => {
      if (this.language !== language) return;
      for (const segment of segments) {
        if (segment.late || this.translationOf(segment)?.final) continue;
        segment.late = true;
        this.render(segment);
      }
    }, TRANSLATION_WAIT_MS);
  }

  /**
   * Applies one (verified) caption update: new segment, interim replacement, or the final text.
   * Returns why it was not applied ('' when it was). `seq` numbers a segment's updates: an older
   * one arriving late, or one shown already (a replay), never replaces a newer one; a final one
   * (live or from the backlog) is never reverted or shown again. `sent`: when the agent signed it
   * (captions.sent, ms), which places its segment among the others (`place`); without it, a new
   * segment goes last.
   */
  update({ id, identity, name, text, final, words, start, sent, seq, agent, translation }) {
    const key = segmentKey(identity, id);
    let segment = this.segments.get(key);
    if (segment?.turn && sent < segment.sent) {
      // An earlier update of a segment shown came late: its text is not shown, but the segment
      // began earlier than the page knew, and moves there.
      this.unplace(segment);
      segment.sent = sent;
      this.place(segment);
    }
    if (segment?.final) return 'its segment is already final';
    if (segment && seq <= segment.seq) return `update ${seq} is not newer than update ${segment.seq}, already shown`;
    if (translation) return this.updateTranslation(key, segment, { id, identity, text, final, seq, agent, ...translation });
    if (!segment) {
      if (!text) {
        // A segment dropped before anything of it was shown: kept (not shown), so that an interim
        // of it that comes after its final is not shown for good.
        if (final) this.segments.set(key, { id, identity, text: '', final, words: [], start, end: start, seq, agent });
        return '';
      }
      segment = { id, identity, name, text: '', final: false, words: [], start, end: start, seq: -1, agent,
        sent: Number.isFinite(sent) ? sent : Infinity };
      segment.node = document.createElement('span');
      segment.node.className = 'seg';
      this.place(segment);
      this.segments.set(key, segment);
      this.empty.hidden = true;
    }
    segment.seq = seq;
    segment.text = text;
    segment.final = final;
    if (final) this.finish(segment, words);
    this.render(segment);
    if (final) this.expectTranslations([segment]);
    return '';
  }

  /** A translation's update (`of`: the original's segment id): kept as a segment of its own, and
   * shown in its original's place. */
  updateTranslation(key, segment, { id, identity, text, final, seq, agent, of, language, sourceLanguage, untranslated }) {
    if (!segment) {
      if (!text) return '';
      segment = { id, identity, translationOf: of, language, sourceLanguage, agent, text: '', final: false, seq: -1 };
      this.segments.set(key, segment);
    }
    Object.assign(segment, { seq, text, final, untranslated: untranslated || '' });
    const original = this.segments.get(segmentKey(identity, of));
    if (original && !original.translationOf) this.render(original);
    return '';
  }

  /** Shows original `segment` as the reader reads it: its text, or its translation. */
  render(segment) {
    const { node } = segment;
    if (!node) return;
    const translation = this.translationOf(segment);
    if (!this.language) {
      if (segment.parts) {
        segment.parts = null;
        for (const name of ['lang', 'dir']) node.removeAttribute(name);
        node.classList.remove('translated', 'untranslated');
      }
      node.textContent = segment.text;
      this.settle(node, segment.final || segment.interrupted);
      node.classList.toggle('interim', !segment.final || Boolean(segment.interrupted));
      return;
    }
    const parts = segment.parts || this.buildParts(segment);
    // A translation cut off (its captioner left before its final) serves only while its original
    // was cut off too: then the line stays as it was, marked as cut off, as an original would.
    const failed = translation?.untranslated || (translation?.interrupted && !segment.interrupted ? 'interrupted' : '');
    const shown = Boolean(translation?.text) && !failed && (translation.final || !segment.late);
    const untranslated = Boolean(failed) || (segment.late && segment.final && !shown && Boolean(segment.text));
    const note = untranslated ? `not translated: ${untranslatedReason(failed)}` : '';
    parts.text.textContent = shown ? translation.text : segment.text;
    parts.text.lang = shown ? translation.language : translation?.sourceLanguage || '';
    if (!parts.text.lang) parts.text.removeAttribute('lang');
    parts.text.dir = shown ? directionOf(translation.language) : 'auto';
    node.dir = parts.text.dir;
    // The note's badge says "not translated"; its reason is there in words for everyone: read out
    // (the badge's text and the reason, as one sentence), on the page and on hovering the badge.
    parts.note.hidden = !note;
    parts.note.title = note ? `Shown in the original language: ${untranslatedReason(failed)}.` : '';
    parts.reason.hidden = !note;
    parts.reasonText.textContent = note ? untranslatedReason(failed) : '';
    parts.original.textContent = segment.text;
    if (translation?.sourceLanguage) parts.original.lang = translation.sourceLanguage;
    parts.toggle.hidden = !shown || this.overlay;
    parts.original.hidden = !shown || !segment.showOriginal;
    node.classList.toggle('translated', shown);
    node.classList.toggle('untranslated', Boolean(note));
    node.classList.toggle('interim', !(shown ? translation.final : segment.final) || Boolean(segment.interrupted));
    // Settled: its translation final, or its original final and shown as not translated.
    this.settle(node, segment.interrupted || (shown ? translation.final : segment.final && Boolean(note)));
  }

  /** The captions region is aria-live: announce each segment once, settled, not every interim word. */
  settle(node, settled) {
    if (settled) node.removeAttribute('aria-hidden');
    else node.setAttribute('aria-hidden', 'true');
  }

  /** The elements of a segment read in translation: its text, the "not translated" note, the
   * button that shows its original, and the original. */
  buildParts(segment) {
    const text = document.createElement('span');
    text.className = 'seg-text';
    const note = document.createElement('span');
    note.className = 'untranslated-note';
    note.textContent = 'not translated';
    note.setAttribute('aria-hidden', 'true'); // read out from `reason`, with its reason
    note.hidden = true;
    const reason = document.createElement('span');
    reason.className = 'untranslated-reason';
    const spoken = document.createElement('span');
    spoken.className = 'visually-hidden';
    spoken.textContent = 'not translated: ';
    const reasonText = document.createElement('span');
    reason.append(spoken, reasonText);
    reason.hidden = true;
    const original = document.createElement('span');
    original.className = 'seg-original';
    original.dir = 'auto';
    original.id = `original-${(this.originalIds = (this.originalIds || 0) + 1)}`;
    original.hidden = true;
    const toggle = document.createElement('button');
    toggle.type = 'button';
    toggle.className = 'show-original';
    toggle.textContent = 'Original';
    toggle.title = 'Show what was said, in the original language';
    toggle.setAttribute('aria-expanded', 'false');
    toggle.setAttribute('aria-controls', original.id);
    toggle.hidden = true;
    toggle.addEventListener('click', () => {
      segment.showOriginal = !segment.showOriginal;
      toggle.setAttribute('aria-expanded', String(segment.showOriginal));
      this.render(segment);
    });
    segment.node.replaceChildren(text, note, reason, toggle, original);
    segment.parts = { text, note, reason, reasonText, toggle, original };
    return segment.parts;
  }

  finish(segment, words) {
    segment.words = words;
    if (words.length) {
      segment.start = words[0][1];
      segment.end = words[words.length - 1][2];
    }
    if (!segment.text && segment.turn) this.unplace(segment); // the agent dropped it (nothing was said)
  }

  /**
   * Shows live `segment` in its place: after every live segment sent before it (or at the same
   * time: those came first), before the others; in a turn of its speaker's next to it, or a turn
   * of its own, splitting the turn of another speaker that it falls into. With nothing live
   * before it, it follows the backlog (its last turn continues, when it is the same speaker's).
   */
  place(segment) {
    let i = this.live.length;
    while (i > 0 && this.live[i - 1].sent > segment.sent) i -= 1;
    const next = this.live[i];
    this.live.splice(i, 0, segment);
    const { identity } = segment;
    if (next && next.node.previousSibling) { // it falls inside next's turn
      if (next.identity === identity) return this.join(segment, next.turn, next.node);
      const rest = this.split(next.turn, next);
      return this.join(segment, this.newTurn(segment, rest.element), null);
    }
    const before = next ? this.turnBefore(next.turn.element) : this.lastTurn();
    if (before?.identity === identity) return this.join(segment, before, null);
    if (next?.identity === identity) {
      this.join(segment, next.turn, next.node);
      return this.setWhen(next.turn, segment.start); // the turn begins with it now
    }
    return this.join(segment, this.newTurn(segment, next ? next.turn.element : null), null);
  }

  /** Takes live `segment` off the page (dropped, or to be placed again): a turn left empty goes,
   * and the turns around it join when they are one speaker's. */
  unplace(segment) {
    const { turn } = segment;
    this.live.splice(this.live.indexOf(segment), 1);
    segment.node.remove();
    segment.turn = null;
    if (turn.text.firstChild) return;
    const before = this.turnBefore(turn.element);
    const after = this.turnAfter(turn.element);
    this.removeTurn(turn);
    if (before && after && before.identity === after.identity) this.moveInto(before, after.text.firstChild, after);
  }

  /** `segment`'s node into `turn`, before `node` (at its end when null). */
  join(segment, turn, node) {
    turn.text.insertBefore(segment.node, node);
    segment.turn = turn;
  }

  /** A new turn for `segment`'s speaker, before element `next` (at the end when null). */
  newTurn(segment, next) {
    const turn = this.buildTurn(segment.identity, segment.name, segment.start);
    this.container.insertBefore(turn.element, next);
    return turn;
  }

  /** Splits `turn` before live segment `first`: a new turn of the same speaker, right after it,
   * takes `first` and what follows it; returns it. */
  split(turn, first) {
    const rest = this.buildTurn(turn.identity, '', first.start);
    turn.element.after(rest.element);
    this.moveInto(rest, first.node, turn);
    return rest;
  }

  /** Moves `node` and the nodes after it in turn `from` to the end of turn `to`; an emptied `from`
   * goes. */
  moveInto(to, node, from) {
    for (let next = node; next;) {
      const following = next.nextSibling;
      to.text.append(next);
      next = following;
    }
    for (const segment of this.live) if (segment.turn === from && segment.node.parentNode === to.text) segment.turn = to;
    if (!from.text.firstChild) this.removeTurn(from);
  }

  removeTurn(turn) {
    turn.element.remove();
    const labels = this.nameLabels.get(turn.identity) || [];
    if (labels.includes(turn.label)) labels.splice(labels.indexOf(turn.label), 1);
  }

  /** The turn before (or after) turn element `element`, skipping anything else in the container. */
  turnBefore(element) {
    let e = element.previousElementSibling;
    while (e && !this.turns.has(e)) e = e.previousElementSibling;
    return e ? this.turns.get(e) : null;
  }

  turnAfter(element) {
    let e = element.nextElementSibling;
    while (e && !this.turns.has(e)) e = e.nextElementSibling;
    return e ? this.turns.get(e) : null;
  }

  /** The last turn on the page (live, or the backlog's). */
  lastTurn() {
    let e = this.container.lastElementChild;
    while (e && !this.turns.has(e)) e = e.previousElementSibling;
    return e ? this.turns.get(e) : null;
  }

  /** A turn's time: `start` (Unix seconds), as hours and minutes. */
  setWhen(turn, start) {
    const date = new Date(start * 1000);
    turn.when.dateTime = date.toISOString();
    turn.when.textContent = date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  }

  buildTurn(identity, name, start) {
    const element = document.createElement('article');
    element.className = 'turn';
    element.dataset.color = this.speakers.colorOf(identity);
    const header = document.createElement('div');
    header.className = 'speaker';
    const label = document.createElement('span');
    label.className = 'name';
    label.textContent = name || this.speakers.nameOf(identity);
    const when = document.createElement('time');
    when.className = 'when';
    header.append(label, when);
    const text = document.createElement('p');
    text.className = 'text';
    this.directText(text);
    element.append(header, text);
    if (!this.nameLabels.has(identity)) this.nameLabels.set(identity, []);
    this.nameLabels.get(identity).push(label);
    const turn = { identity, element, text, label, when };
    this.setWhen(turn, start);
    this.turns.set(element, turn);
    return turn;
  }

  /** Puts the room's earlier captions above the live ones, skipping segments already shown; the
   * translated finals among them (into the language read) go to their originals. */
  addBacklog(records) {
    const known = records
      .filter((r) => r && typeof r.segment_id === 'string' && typeof r.participant_identity === 'string'
        && typeof r.text === 'string' && r.text && Number.isFinite(r.start)
        && !this.segments.has(segmentKey(r.participant_identity, r.segment_id)));
    const translations = known.filter((r) => typeof r.translation_of === 'string' && r.translation_of);
    const fresh = known.filter((r) => !r.translation_of).sort((a, b) => a.start - b.start);
    for (const r of translations) this.addBacklogTranslation(r);
    if (!fresh.length) return 0;
    const fragment = document.createDocumentFragment();
    let turn = null;
    for (const r of fresh) {
      if (typeof r.participant_name === 'string' && r.participant_name
          && !this.speakers.names.has(r.participant_identity)) {
        this.speakers.learn(r.participant_identity, r.participant_name);
      }
      if (!turn || turn.identity !== r.participant_identity) {
        const name = typeof r.participant_name === 'string' ? r.participant_name : '';
        turn = this.buildTurn(r.participant_identity, name, r.start);
        turn.element.classList.add('backlog');
        fragment.append(turn.element);
      }
      const node = document.createElement('span');
      node.className = 'seg';
      node.textContent = r.text;
      turn.text.append(node);
      const words = Array.isArray(r.words) ? r.words : [];
      const segment = {
        id: r.segment_id, identity: r.participant_identity, text: r.text, final: true,
        words, start: r.start, end: Number.isFinite(r.end) ? r.end : r.start, node, seq: Infinity,
      };
      this.segments.set(segmentKey(r.participant_identity, r.segment_id), segment);
      if (this.language) this.render(segment);
    }
    this.expectTranslations(fresh.map((r) => this.segments.get(segmentKey(r.participant_identity, r.segment_id))));
    const firstLive = this.container.querySelector('.turn:not(.backlog)');
    this.container.insertBefore(fragment, firstLive);
    this.empty.hidden = true;
    return fresh.length;
  }

  /** A translated final from the backlog (the transcript file keeps every language). */
  addBacklogTranslation(r) {
    if (r.language !== this.language || !this.language) return;
    const segment = {
      id: r.segment_id, identity: r.participant_identity, translationOf: r.translation_of, language: r.language,
      sourceLanguage: '', text: r.text, final: true, seq: Infinity,
      untranslated: typeof r.untranslated === 'string' ? r.untranslated : '',
    };
    this.segments.set(segmentKey(r.participant_identity, r.segment_id), segment);
    const original = this.segments.get(segmentKey(r.participant_identity, r.translation_of));
    if (original && !original.translationOf) this.render(original);
  }

  /**
   * A captioner left without finishing its open segments (its worker crashed; a recovered one
   * continues with new segments): they stay as they were, marked as cut off, and are not exported.
   * A translation cut off whose original was final is not a translation of it (an interim
   * translation may leave out what changes its meaning): the original serves, marked as not
   * translated; one whose original was cut off too stays with it as it was.
   */
  interrupt(agent) {
    const cut = [];
    for (const segment of this.segments.values()) {
      if (segment.final || segment.agent !== agent) continue;
      segment.final = true;
      segment.interrupted = true;
      cut.push(segment);
    }
    const originals = new Set();
    for (const segment of cut) {
      if (!segment.translationOf) {
        if (!segment.node) continue;
        segment.node.classList.add('interrupted');
        segment.node.title = 'The captioner stopped here; captions continue below.';
        originals.add(segment);
        continue;
      }
      const original = this.segments.get(segmentKey(segment.identity, segment.translationOf));
      if (!original || original.translationOf) continue;
      if (!original.interrupted) segment.untranslated ||= 'interrupted';
      originals.add(original);
    }
    for (const original of originals) this.render(original);
  }

  renameSpeaker(identity) {
    for (const label of this.nameLabels.get(identity) || []) label.textContent = this.speakers.nameOf(identity);
  }

  /** Final segments for export, with their speakers' current names, in the language read: each
   * one's final translation, or its original where there is none. */
  finals() {
    return [...this.segments.values()]
      .filter((s) => s.final && !s.interrupted && s.text && !s.translationOf)
      .map((s) => {
        const name = this.speakers.nameOf(s.identity);
        const translation = this.translationOf(s);
        if (!translation?.final || translation.interrupted || !translation.text || translation.untranslated) {
          return { name, text: s.text, start: s.start, end: s.end, words: s.words };
        }
        return { name, text: translation.text, start: s.start, end: s.end, words: spreadWords(translation.text, s) };
      });
  }

  /** A one-line note in the transcript (not a caption), such as a failed backlog load. */
  note(message) {
    const p = document.createElement('p');
    p.className = 'system-note';
    p.textContent = message;
    this.container.insertBefore(p, this.container.querySelector('.turn'));
  }
}

/** A translation's words laid evenly over its original's time (a translation has no word times of
 * its own), so that exports cut it into cues of readable length as they cut the original. */
function spreadWords(text, original) {
  const words = text.split(/\s+/).filter(Boolean);
  const start = original.words?.length ? original.words[0][1] : original.start;
  const end = original.words?.length ? original.words[original.words.length - 1][2] : original.end;
  if (!Number.isFinite(start) || !Number.isFinite(end) || end <= start || !words.length) return [];
  const step = (end - start) / words.length;
  return words.map((word, i) => [word, start + i * step, start + (i + 1) * step]);
}
