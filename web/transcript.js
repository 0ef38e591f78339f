// The transcript on the page: caption segments rendered as turns (consecutive segments of one
// speaker), interim text replaced in place by the final text, the room's backlog above.
//
// Every piece of text that comes from the room (captions, names, identities) goes into the page
// through textContent, never as HTML.

const COLOR_SLOTS = 6;

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
  constructor(container, empty, speakers) {
    this.container = container;
    this.empty = empty;
    this.speakers = speakers;
    this.segments = new Map();
    this.lastTurn = null;
    this.nameLabels = new Map(); // identity -> name elements of that speaker's turns
  }

  /**
   * Applies one (verified) caption update: new segment, interim replacement, or the final text.
   * Returns why it was not applied ('' when it was). `seq` numbers a segment's updates: an older
   * one arriving late, or one shown already (a replay), never replaces a newer one; a final one
   * (live or from the backlog) is never reverted or shown again.
   */
  update({ id, identity, name, text, final, words, start, seq, agent }) {
    const key = segmentKey(identity, id);
    let segment = this.segments.get(key);
    if (segment?.final) return 'its segment is already final';
    if (segment && seq <= segment.seq) return `update ${seq} is not newer than update ${segment.seq}, already shown`;
    if (!segment) {
      if (!text) return '';
      segment = { id, identity, text: '', final: false, words: [], start, end: start, seq: -1, agent };
      segment.node = document.createElement('span');
      segment.node.className = 'seg';
      this.turnFor(identity, name, start).append(segment.node);
      this.segments.set(key, segment);
      this.empty.hidden = true;
    }
    segment.seq = seq;
    segment.text = text;
    segment.final = final;
    segment.node.textContent = text;
    segment.node.classList.toggle('interim', !final);
    // The captions region is aria-live: announce each segment once, final, not every interim word.
    if (final) segment.node.removeAttribute('aria-hidden');
    else segment.node.setAttribute('aria-hidden', 'true');
    if (final) this.finish(segment, words);
    return '';
  }

  finish(segment, words) {
    segment.words = words;
    if (words.length) {
      segment.start = words[0][1];
      segment.end = words[words.length - 1][2];
    }
    if (!segment.text) segment.node.remove(); // the agent dropped this segment (nothing was said)
  }

  turnFor(identity, name, start) {
    if (this.lastTurn && this.lastTurn.identity === identity) return this.lastTurn.text;
    const turn = this.buildTurn(identity, name, start);
    this.container.append(turn.element);
    this.lastTurn = turn;
    return turn.text;
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
    const date = new Date(start * 1000);
    when.dateTime = date.toISOString();
    when.textContent = date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
    header.append(label, when);
    const text = document.createElement('p');
    text.className = 'text';
    element.append(header, text);
    if (!this.nameLabels.has(identity)) this.nameLabels.set(identity, []);
    this.nameLabels.get(identity).push(label);
    return { identity, element, text };
  }

  /** Puts the room's earlier captions above the live ones, skipping segments already shown. */
  addBacklog(records) {
    const fresh = records
      .filter((r) => r && typeof r.segment_id === 'string' && typeof r.participant_identity === 'string'
        && typeof r.text === 'string' && r.text && Number.isFinite(r.start)
        && !this.segments.has(segmentKey(r.participant_identity, r.segment_id)))
      .sort((a, b) => a.start - b.start);
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
      this.segments.set(segmentKey(r.participant_identity, r.segment_id), {
        id: r.segment_id, identity: r.participant_identity, text: r.text, final: true,
        words, start: r.start, end: Number.isFinite(r.end) ? r.end : r.start, node, seq: Infinity,
      });
    }
    const firstLive = this.container.querySelector('.turn:not(.backlog)');
    this.container.insertBefore(fragment, firstLive);
    if (!this.lastTurn) this.lastTurn = turn;
    this.empty.hidden = true;
    return fresh.length;
  }

  /**
   * A captioner left without finishing its open segments (its worker crashed; a recovered one
   * continues with new segments): they stay as they were, marked as cut off, and are not exported.
   */
  interrupt(agent) {
    for (const segment of this.segments.values()) {
      if (segment.final || segment.agent !== agent) continue;
      segment.final = true;
      segment.interrupted = true;
      segment.node.classList.add('interrupted');
      segment.node.removeAttribute('aria-hidden');
      segment.node.title = 'The captioner stopped here; captions continue below.';
    }
  }

  renameSpeaker(identity) {
    for (const label of this.nameLabels.get(identity) || []) label.textContent = this.speakers.nameOf(identity);
  }

  /** Final segments for export, with their speakers' current names. */
  finals() {
    return [...this.segments.values()]
      .filter((s) => s.final && !s.interrupted && s.text)
      .map((s) => ({
        name: this.speakers.nameOf(s.identity), text: s.text, start: s.start, end: s.end, words: s.words,
      }));
  }

  /** A one-line note in the transcript (not a caption), such as a failed backlog load. */
  note(message) {
    const p = document.createElement('p');
    p.className = 'system-note';
    p.textContent = message;
    this.container.insertBefore(p, this.container.querySelector('.turn'));
  }
}
