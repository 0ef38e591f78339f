// The viewer's connection to the room: the viewer server's relay of it (relay.js: captioners,
// speakers' names and caption streams, with the caption key and clock the server vouches for; the
// page never joins LiveKit), verified captions into the transcript, the backlog from the viewer
// server, the state shown to the reader (live, no captioner, waiting for capacity, reconnecting,
// refused, expired, revoked, insecure page), and retries.

import { ParticipantKind } from './vendor/livekit-client.esm.mjs';
import { CaptionVerifier } from './authenticity.js';
import { CLOSE_STATES, RelayRoom } from './relay.js';
import {
  ATTR_AGENT,
  ATTR_AGENT_PROBLEM,
  ATTR_AGENT_QUEUED,
  ATTR_AGENT_STATUS,
  ATTR_LANGUAGE,
  ATTR_SEGMENT_ID,
  ATTR_SENT,
  ATTR_SEQ,
  ATTR_SIGNATURE,
  ATTR_SOURCE_LANGUAGE,
  ATTR_SOURCE_SEGMENT,
  ATTR_TRANSCRIBED_TRACK_ID,
  ATTR_TRANSCRIPTION_FINAL,
  ATTR_TRANSLATED,
  ATTR_UNTRANSLATED,
  ATTR_WORDS,
  MAX_CAPTION_CHARS,
  electedCaptioner,
  parseJsonArray,
  parseWords,
  speakerOf,
  translationSegmentId,
} from './protocol.js';

const RETRY_DELAYS_S = [1, 2, 4, 8, 15, 30];

const STATES = {
  connecting: ['Connecting…', ''],
  live: ['Live', ''],
  'no-agent': ['No captioner', 'The caption agent is not in this room. Captions start as soon as it joins.'],
  loading: ['Captions loading…', 'The caption agent is starting up; captions begin in a moment.'],
  waiting: ['Waiting for capacity', ''],
  reconnecting: ['Reconnecting…', 'The connection dropped; reconnecting to the room.'],
  retrying: ['Disconnected', ''],
  refused: ['Access refused', ''],
  expired: ['Link expired', ''],
  revoked: ['Link revoked', ''],
  ended: ['Disconnected', ''],
  insecure: ['Captions cannot be verified',
    'This page is not secure (plain http from another machine), so this browser cannot check that captions '
    + 'come from the caption agent, and none are shown. Open the viewer over https://, or on the machine '
    + 'that runs it.'],
};

async function readJson(response) {
  try {
    return await response.json();
  } catch {
    return {};
  }
}

/** What the viewer server needs to know which room to let this page view: the signed link, or
 * (only in its dev-only --open mode) a room name; and the language read, if any. */
function linkQuery(params, language) {
  const query = new URLSearchParams();
  for (const key of ['link', 'room']) if (params.has(key)) query.set(key, params.get(key));
  if (language) query.set('lang', language);
  return query;
}

/** The viewer server's close code for a language it does not translate into (server.py). */
const CLOSE_LANGUAGE = 4422;

export class Session {
  /**
   * `ui`: the status, notice and room-name elements; `onCaptions()`: called after the transcript
   * changed (to follow the live edge).
   */
  constructor({ ui, params, transcript, speakers, onCaptions, onLanguageRefused = () => {} }) {
    this.ui = ui;
    this.onLanguageRefused = onLanguageRefused;
    this.params = params;
    this.transcript = transcript;
    this.speakers = speakers;
    this.onCaptions = onCaptions;
    this.room = null;
    this.phase = 'connecting';
    this.attempt = 0;
    this.retryTimer = null;
    this.closing = false;
    this.backlog = { loaded: false };
    this.verifier = new CaptionVerifier();
    this.refreshes = 0;
  }

  showState(state, detail) {
    const [label, defaultDetail] = STATES[state];
    this.ui.status.dataset.state = state;
    this.ui.statusText.textContent = label;
    const message = detail || defaultDetail;
    this.ui.notice.textContent = message;
    this.ui.notice.hidden = !message;
    this.ui.notice.dataset.state = state;
    document.body.dataset.state = state;
  }

  /** Live / no captioner / loading / waiting, from the attributes of the room's captioner (an agent
   * that merely says it captions, or sets captions.status, changes nothing). */
  async refreshRoomState() {
    if (this.phase !== 'connected' || !this.room) return;
    if (!CaptionVerifier.available) return this.showState('insecure');
    const refresh = ++this.refreshes;
    const captioner = electedCaptioner(await this.verifier.captioners(this.room));
    if (refresh !== this.refreshes || this.phase !== 'connected') return; // a newer refresh decides
    if (!captioner) return this.showState('no-agent');
    const status = captioner.attributes[ATTR_AGENT_STATUS];
    const queued = parseJsonArray(captioner.attributes[ATTR_AGENT_QUEUED]);
    if (status === 'waiting' || queued.length) {
      const who = queued.map((identity) => this.speakers.nameOf(identity)).join(', ');
      const detail = who
        ? `No free captioning capacity yet for: ${who}. What they say is kept and will be captioned, late, as soon as a slot frees.`
        : 'Some speakers are waiting for captioning capacity.';
      return this.showState('waiting', detail);
    }
    if (status === 'loading') return this.showState('loading');
    if (captioner.attributes[ATTR_AGENT_PROBLEM] === 'transcript_unavailable') {
      return this.showState('live', 'Captions are live, but the captioner cannot save them right now: people who join '
        + 'later, and exports, may miss what is said meanwhile. The operator has been alerted.');
    }
    this.showState('live');
  }

  /** One caption ({id, sender, attributes, text}, a whole stream as the relay read it): verified,
   * then shown; anything else is dropped with a warning. */
  async onCaption(message) {
    const arrived = this.verifier.serverNow(); // its arrival: a replay is older than this
    const attributes = message.attributes && typeof message.attributes === 'object' ? message.attributes : {};
    const translated = attributes[ATTR_TRANSLATED] === 'true';
    const caption = {
      agent: attributes[ATTR_AGENT] || '',
      speaker: speakerOf(String(message.sender || ''), attributes),
      trackSid: attributes[ATTR_TRANSCRIBED_TRACK_ID] || '',
      segmentId: attributes[ATTR_SEGMENT_ID] || '',
      seq: Number(attributes[ATTR_SEQ]),
      final: attributes[ATTR_TRANSCRIPTION_FINAL] === 'true',
      sentMs: Number(attributes[ATTR_SENT]),
      words: attributes[ATTR_WORDS] || '',
      signature: attributes[ATTR_SIGNATURE] || '',
      text: typeof message.text === 'string' ? message.text : '',
      translated,
      sourceSegment: attributes[ATTR_SOURCE_SEGMENT] || '',
      sourceLanguage: attributes[ATTR_SOURCE_LANGUAGE] || '',
      language: attributes[ATTR_LANGUAGE] || '',
      untranslated: attributes[ATTR_UNTRANSLATED] || '',
    };
    if (!caption.agent || !caption.speaker || !caption.segmentId || !Number.isSafeInteger(caption.seq)
        || caption.seq < 0 || !Number.isSafeInteger(caption.sentMs) || !caption.signature) {
      console.warn('ignoring a caption stream without the agent\'s signature fields', message.id);
      return;
    }
    if (translated && (!caption.sourceSegment || !caption.language
        || caption.segmentId !== translationSegmentId(caption.sourceSegment, caption.language))) {
      console.warn('ignoring a translation stream without its source segment and language', message.id);
      return;
    }
    if (translated && caption.language !== this.transcript.language) {
      console.warn(`ignoring a translation into ${caption.language}: this page reads ${this.transcript.language || 'the originals'}`);
      return;
    }
    if (caption.text.length > MAX_CAPTION_CHARS) {
      console.warn(`ignoring a caption stream: longer than ${MAX_CAPTION_CHARS} characters`);
      return;
    }
    const room = this.room;
    if (!CaptionVerifier.available || !room) return;
    if (!(await this.verifier.verify(caption, room.name))) {
      console.warn(`ignoring a caption for ${caption.speaker} that the caption agent did not sign`);
      return;
    }
    const stale = this.verifier.replayReason(caption.sentMs, arrived);
    if (stale) {
      console.warn(`ignoring a caption for ${caption.speaker} (${caption.segmentId}): ${stale}`);
      return;
    }
    // Two captioners in a room for a moment (a recovery racing LiveKit's dispatch): one is shown.
    const elected = await this.verifier.electedWaitingFor(room, caption.agent);
    if (elected?.identity !== caption.agent) {
      console.warn(`ignoring a caption from ${caption.agent}: `
        + `${elected ? `${elected.identity} captions this room` : 'it is not a captioner of this room'}`);
      return;
    }
    const refused = this.transcript.update({
      id: caption.segmentId,
      identity: caption.speaker,
      text: caption.text.trim(),
      final: caption.final,
      words: caption.final ? parseWords(caption.words) : [],
      start: Date.now() / 1000,
      sent: caption.sentMs, // its place among the captions: streams may come out of order
      seq: caption.seq,
      agent: caption.agent,
      translation: translated ? { of: caption.sourceSegment, language: caption.language,
        sourceLanguage: caption.sourceLanguage, untranslated: caption.untranslated } : null,
    });
    if (refused) {
      console.warn(`ignoring a caption for ${caption.speaker} (${caption.segmentId}): ${refused}`);
      return;
    }
    this.onCaptions();
  }

  /** The room's captions so far, from the viewer server (the same signed link as the token). */
  async loadBacklog() {
    if (this.backlog.loaded) return;
    this.backlog.loaded = true;
    let body = {};
    let response;
    try {
      response = await fetch(`/api/backlog?${linkQuery(this.params, this.transcript.language)}`, { cache: 'no-store' });
      body = await readJson(response);
    } catch (error) {
      console.warn('backlog request failed', error);
    }
    if (!response?.ok || !Array.isArray(body.segments)) {
      this.transcript.note(body.error
        ? `Earlier captions could not be loaded: ${body.error}`
        : 'Earlier captions could not be loaded; new captions appear below.');
      return;
    }
    this.transcript.addBacklog(body.segments);
    this.onCaptions();
  }

  rememberNames(room) {
    for (const p of room.remoteParticipants.values()) {
      if (p.kind === ParticipantKind.AGENT) continue;
      if (this.speakers.learn(p.identity, p.name || p.identity)) this.transcript.renameSpeaker(p.identity);
    }
  }

  /** What the relay tells this page about `room` (relay.js). */
  handlersFor(getRoom) {
    const current = () => this.room !== null && this.room === getRoom();
    const changed = () => {
      if (!current()) return;
      if (this.phase === 'reconnecting') this.phase = 'connected'; // a fresh view of the room came
      this.rememberNames(this.room);
      this.refreshRoomState();
    };
    return {
      changed,
      left: (participant) => {
        if (!current()) return;
        if (participant.kind === ParticipantKind.AGENT) this.transcript.interrupt(participant.identity);
        changed();
      },
      caption: (message) => {
        if (current()) this.onCaption(message);
      },
      reconnecting: () => {
        if (!current()) return;
        this.phase = 'reconnecting';
        this.showState('reconnecting', 'The viewer server cannot reach the room right now; it keeps trying.');
      },
      closed: (code, reason) => {
        if (!current() || this.closing) return;
        this.room = null;
        const state = CLOSE_STATES[code];
        if (state && state !== 'busy') return this.end(state, reason);
        return this.scheduleRetry('The connection to the viewer server was lost.');
      },
    };
  }

  end(state, message) {
    this.phase = state;
    clearTimeout(this.retryTimer);
    this.showState(state, message);
  }

  scheduleRetry(reason) {
    clearTimeout(this.retryTimer);
    const delay = RETRY_DELAYS_S[Math.min(this.attempt, RETRY_DELAYS_S.length - 1)];
    this.attempt += 1;
    this.phase = 'retrying';
    let left = delay;
    const tick = () => {
      if (left <= 0) return this.connect();
      this.showState('retrying', `${reason} Retrying in ${left} s…`);
      left -= 1;
      this.retryTimer = setTimeout(tick, 1000);
    };
    tick();
  }

  async connect() {
    this.phase = 'connecting';
    this.showState('connecting');
    let room = null;
    room = new RelayRoom(this.handlersFor(() => room));
    const { language } = this.transcript;
    let hello;
    try {
      hello = await room.connect(linkQuery(this.params, language));
    } catch (error) {
      if (error.code === CLOSE_LANGUAGE && this.transcript.language) {
        // The operator no longer translates into it: the originals, and the reader is told.
        this.onLanguageRefused(this.transcript.language, error.message);
        this.transcript.setLanguage('');
        return this.connect();
      }
      const state = CLOSE_STATES[error.code];
      if (state && state !== 'busy') return this.end(state, error.message);
      return this.scheduleRetry(`Could not reach the viewer server (${error.message}).`);
    }
    if (language !== this.transcript.language) { // the reader chose another meanwhile
      room.disconnect();
      return this.connect();
    }
    if (typeof hello.caption_key !== 'string' || !Number.isFinite(hello.server_time_ms)) {
      room.disconnect();
      return this.scheduleRetry('The viewer server did not say which caption key to trust.');
    }
    this.verifier.trust({ captionKey: hello.caption_key, serverTimeMs: hello.server_time_ms,
      sentAt: hello.sentAt, receivedAt: hello.receivedAt });
    this.ui.roomName.textContent = room.name;
    this.room = room; // only now: a failed connect must not also count as a lost connection
    this.attempt = 0;
    this.phase = 'connected';
    this.rememberNames(room);
    this.refreshRoomState();
    this.loadBacklog();
  }

  /** Reads `language` ('' for the originals) from now on: the relay is opened again for it (each
   * viewer's socket carries one language), and the backlog is asked again for its translations. */
  setLanguage(language) {
    if (language === this.transcript.language) return;
    this.transcript.setLanguage(language);
    this.onCaptions();
    this.backlog.loaded = false;
    if (this.phase === 'connected' || this.phase === 'reconnecting') {
      const room = this.room;
      this.room = null; // its close is not a lost connection
      room?.disconnect();
      this.connect();
    }
  }

  close() {
    this.closing = true;
    this.room?.disconnect();
  }
}
