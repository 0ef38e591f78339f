// The captions viewer: joins a LiveKit room as a hidden, subscribe-only participant and shows the
// agent's captions (LiveKit's lk.transcription text streams) one line per speaker turn.
//
// Every piece of text that comes from the room (captions, names, identities, the room name) goes
// into the page through textContent, never as HTML.

import {
  ConnectionError,
  ConnectionErrorReason,
  DisconnectReason,
  ParticipantKind,
  Room,
  RoomEvent,
} from './vendor/livekit-client.esm.mjs';
import { FORMATS } from './export.js';

// The protocol (mirrors agent/captions.py).
const TOPIC_TRANSCRIPTION = 'lk.transcription';
const ATTR_SEGMENT_ID = 'lk.segment_id';
const ATTR_TRANSCRIPTION_FINAL = 'lk.transcription_final';
const ATTR_WORDS = 'captions.words';
const ATTR_AGENT_STATUS = 'captions.status';
const ATTR_AGENT_QUEUED = 'captions.queued';
const RPC_BACKLOG = 'captions.backlog';
const TOPIC_BACKLOG = 'captions.backlog';

const PREFS_KEY = 'captions.viewer.prefs';
const FONT_SIZES = [14, 16, 18, 20, 24, 28, 32, 40, 48];
const RETRY_DELAYS_S = [1, 2, 4, 8, 15, 30];
const FOLLOW_SLACK_PX = 48;

const params = new URLSearchParams(location.search);
const overlay = params.get('overlay') === '1';
const $ = (id) => document.getElementById(id);
const ui = {
  status: $('status'),
  statusText: $('status-text'),
  notice: $('notice'),
  captions: $('captions'),
  empty: $('empty'),
  jump: $('jump-live'),
  roomName: $('room-name'),
  theme: $('theme'),
};

// ---------------------------------------------------------------- preferences

function loadPrefs() {
  try {
    return { fontSize: 20, theme: 'system', ...JSON.parse(localStorage.getItem(PREFS_KEY) || '{}') };
  } catch {
    return { fontSize: 20, theme: 'system' };
  }
}

const prefs = loadPrefs();

function applyPrefs() {
  const root = document.documentElement;
  root.dataset.theme = prefs.theme;
  if (!overlay) root.style.setProperty('--caption-size', `${prefs.fontSize}px`);
  ui.theme.value = prefs.theme;
}

function savePrefs() {
  try {
    localStorage.setItem(PREFS_KEY, JSON.stringify(prefs));
  } catch {
    // Private browsing may refuse storage: the settings still apply to this page.
  }
  applyPrefs();
}

function stepFontSize(direction) {
  const index = FONT_SIZES.findIndex((size) => size >= prefs.fontSize);
  const current = index < 0 ? FONT_SIZES.length - 1 : index;
  prefs.fontSize = FONT_SIZES[Math.min(FONT_SIZES.length - 1, Math.max(0, current + direction))];
  savePrefs();
}

// ---------------------------------------------------------------- speakers

const names = new Map(); // identity -> display name
const colors = new Map(); // identity -> colour slot, in order of first appearance
const COLOR_SLOTS = 6;

function colorOf(identity) {
  if (!colors.has(identity)) colors.set(identity, colors.size % COLOR_SLOTS);
  return String(colors.get(identity));
}

function nameOf(identity) {
  return names.get(identity) || identity || 'Unknown speaker';
}

// ---------------------------------------------------------------- the transcript

/** Segments keyed by lk.segment_id, rendered as turns: consecutive segments of one speaker. */
class Transcript {
  constructor(container) {
    this.container = container;
    this.segments = new Map();
    this.lastTurn = null;
    this.nameLabels = new Map(); // identity -> name elements of that speaker's turns
  }

  /** Applies one caption update: new segment, interim replacement, or the final text. */
  update({ id, identity, name, text, final, words, start }) {
    let segment = this.segments.get(id);
    if (segment && segment.final) return; // final is final: never duplicated nor reverted
    if (!segment) {
      if (!text) return;
      segment = { id, identity, text: '', final: false, words: [], start, end: start };
      segment.node = document.createElement('span');
      segment.node.className = 'seg';
      this.turnFor(identity, name, start).append(segment.node);
      this.segments.set(id, segment);
      ui.empty.hidden = true;
    }
    segment.text = text;
    segment.final = final;
    segment.node.textContent = text;
    segment.node.classList.toggle('interim', !final);
    // The captions region is aria-live: announce each segment once, final, not every interim word.
    if (final) segment.node.removeAttribute('aria-hidden');
    else segment.node.setAttribute('aria-hidden', 'true');
    if (final) this.finish(segment, words);
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
    element.dataset.color = colorOf(identity);
    const header = document.createElement('div');
    header.className = 'speaker';
    const label = document.createElement('span');
    label.className = 'name';
    label.textContent = name || nameOf(identity);
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
      .filter((r) => r && r.segment_id && !this.segments.has(r.segment_id) && r.text)
      .sort((a, b) => a.start - b.start);
    if (!fresh.length) return 0;
    const fragment = document.createDocumentFragment();
    let turn = null;
    for (const r of fresh) {
      if (r.participant_name && !names.has(r.participant_identity)) {
        names.set(r.participant_identity, r.participant_name);
      }
      if (!turn || turn.identity !== r.participant_identity) {
        turn = this.buildTurn(r.participant_identity, r.participant_name, r.start);
        turn.element.classList.add('backlog');
        fragment.append(turn.element);
      }
      const node = document.createElement('span');
      node.className = 'seg';
      node.textContent = r.text;
      turn.text.append(node);
      const words = Array.isArray(r.words) ? r.words : [];
      this.segments.set(r.segment_id, {
        id: r.segment_id, identity: r.participant_identity, text: r.text, final: true,
        words, start: r.start, end: r.end, node,
      });
    }
    const firstLive = this.container.querySelector('.turn:not(.backlog)');
    this.container.insertBefore(fragment, firstLive);
    if (!this.lastTurn) this.lastTurn = turn;
    ui.empty.hidden = true;
    return fresh.length;
  }

  renameSpeaker(identity) {
    for (const label of this.nameLabels.get(identity) || []) label.textContent = nameOf(identity);
  }

  /** Final segments for export, with their speakers' current names. */
  finals() {
    return [...this.segments.values()]
      .filter((s) => s.final && s.text)
      .map((s) => ({ name: nameOf(s.identity), text: s.text, start: s.start, end: s.end, words: s.words }));
  }

  /** A one-line note in the transcript (not a caption), such as a failed backlog load. */
  note(message) {
    const p = document.createElement('p');
    p.className = 'system-note';
    p.textContent = message;
    this.container.insertBefore(p, this.container.querySelector('.turn'));
  }
}

const transcript = new Transcript(ui.captions);

// ---------------------------------------------------------------- follow the live edge

const follow = { on: true, lastTop: 0 };

function distanceFromBottom() {
  const c = ui.captions;
  return c.scrollHeight - c.scrollTop - c.clientHeight;
}

function onCaptionsScroll() {
  const top = ui.captions.scrollTop;
  // Only a move up (the reader's doing) stops following; content growing never does.
  if (distanceFromBottom() <= FOLLOW_SLACK_PX) follow.on = true;
  else if (top < follow.lastTop - 2) follow.on = false;
  follow.lastTop = top;
  ui.jump.hidden = follow.on;
}

function keepLive() {
  if (overlay) return;
  if (follow.on) {
    ui.captions.scrollTop = ui.captions.scrollHeight;
    follow.lastTop = ui.captions.scrollTop;
  }
  ui.jump.hidden = follow.on;
}

function jumpToLive() {
  follow.on = true;
  keepLive();
  ui.captions.focus({ preventScroll: true });
}

// ---------------------------------------------------------------- state shown to the reader

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
  ended: ['Disconnected', ''],
};

function showState(state, detail) {
  const [label, defaultDetail] = STATES[state];
  ui.status.dataset.state = state;
  ui.statusText.textContent = label;
  const message = detail || defaultDetail;
  ui.notice.textContent = message;
  ui.notice.hidden = !message;
  ui.notice.dataset.state = state;
  document.body.dataset.state = state;
}

const session = { room: null, phase: 'connecting', attempt: 0, retryTimer: null, closing: false };
const backlog = { requested: false, received: false };

function agentsIn(room) {
  return [...room.remoteParticipants.values()].filter((p) => p.kind === ParticipantKind.AGENT);
}

/** Live / agent absent / loading / waiting, from the agent's participant attributes. */
function refreshRoomState() {
  if (session.phase !== 'connected' || !session.room) return;
  const agents = agentsIn(session.room);
  if (!agents.length) return showState('no-agent');
  const statuses = agents.map((a) => a.attributes[ATTR_AGENT_STATUS]);
  const queued = agents.flatMap((a) => parseJsonArray(a.attributes[ATTR_AGENT_QUEUED]));
  if (statuses.includes('waiting') || queued.length) {
    const who = queued.map((identity) => nameOf(identity)).join(', ');
    const detail = who
      ? `No free captioning capacity yet for: ${who}. They will be captioned as soon as a slot frees.`
      : 'Some speakers are waiting for captioning capacity.';
    return showState('waiting', detail);
  }
  if (statuses.length && statuses.every((s) => s === 'loading')) return showState('loading');
  showState('live');
}

function parseJsonArray(text) {
  try {
    const value = JSON.parse(text || '[]');
    return Array.isArray(value) ? value.map(String) : [];
  } catch {
    return [];
  }
}

// ---------------------------------------------------------------- tokens

class AccessError extends Error {
  constructor(message, state) {
    super(message);
    this.state = state; // 'refused' or 'expired': retrying would not help
  }
}

async function readJson(response) {
  try {
    return await response.json();
  } catch {
    return {};
  }
}

/** The LiveKit URL and token: from the viewer server for a signed link, or a token in the URL. */
async function fetchGrant() {
  if (params.has('token')) {
    const response = await fetch('/api/config', { cache: 'no-store' });
    const config = await readJson(response);
    if (!response.ok || !config.livekit_url) throw new Error('the viewer server did not answer');
    return { url: config.livekit_url, token: params.get('token'), room: params.get('room') || '' };
  }
  const query = new URLSearchParams();
  for (const key of ['room', 'exp', 'access']) if (params.has(key)) query.set(key, params.get(key));
  const response = await fetch(`/api/token?${query}`, { cache: 'no-store' });
  const body = await readJson(response);
  if (response.ok) return body;
  const message = body.error || `the viewer server answered HTTP ${response.status}`;
  if (response.status === 400 || response.status === 403) {
    throw new AccessError(message, body.reason === 'expired' ? 'expired' : 'refused');
  }
  throw new Error(message);
}

// ---------------------------------------------------------------- the room

function parseWords(text) {
  try {
    const words = JSON.parse(text || '[]');
    return Array.isArray(words) ? words.filter((w) => Array.isArray(w) && w.length >= 3) : [];
  } catch {
    return [];
  }
}

async function onCaptionStream(reader, participantInfo) {
  const attributes = reader.info.attributes || {};
  let text;
  try {
    text = await reader.readAll();
  } catch (error) {
    console.warn('caption stream failed', error);
    return;
  }
  const final = attributes[ATTR_TRANSCRIPTION_FINAL] === 'true';
  transcript.update({
    id: attributes[ATTR_SEGMENT_ID] || reader.info.id,
    identity: participantInfo.identity,
    text: text.trim(),
    final,
    words: final ? parseWords(attributes[ATTR_WORDS]) : [],
    start: Date.now() / 1000,
  });
  keepLive();
}

async function onBacklogStream(reader) {
  let content;
  try {
    content = await reader.readAll();
  } catch (error) {
    console.warn('backlog stream failed', error);
    return;
  }
  backlog.received = true;
  const records = [];
  for (const line of content.split('\n')) {
    if (!line.trim()) continue;
    try {
      records.push(JSON.parse(line));
    } catch {
      console.warn('skipping a malformed backlog line');
    }
  }
  transcript.addBacklog(records);
  keepLive();
}

/** Asks the agent for the captions so far; the answer comes as a captions.backlog text stream. */
async function requestBacklog(room) {
  const [agent] = agentsIn(room);
  if (!agent || backlog.requested) return;
  backlog.requested = true;
  try {
    // A hidden viewer's identity is blanked by the server on the request, so it travels in the
    // payload; the RPC's own response cannot be routed back to a hidden caller and may time out.
    await room.localParticipant.performRpc({
      destinationIdentity: agent.identity,
      method: RPC_BACKLOG,
      payload: JSON.stringify({ reply_to: room.localParticipant.identity }),
      responseTimeout: 10000,
    });
  } catch (error) {
    await new Promise((resolve) => setTimeout(resolve, 1500));
    if (!backlog.received && session.room === room) {
      console.warn('backlog request failed', error);
      transcript.note('Earlier captions could not be loaded; new captions appear below.');
    }
  }
}

function rememberNames(room) {
  for (const p of room.remoteParticipants.values()) learnName(p);
}

function learnName(participant) {
  if (participant.kind === ParticipantKind.AGENT) return;
  const name = participant.name || participant.identity;
  if (names.get(participant.identity) === name) return;
  names.set(participant.identity, name);
  transcript.renameSpeaker(participant.identity);
}

function wireRoom(room) {
  room.registerTextStreamHandler(TOPIC_TRANSCRIPTION, onCaptionStream);
  room.registerTextStreamHandler(TOPIC_BACKLOG, onBacklogStream);
  const changed = () => {
    rememberNames(room);
    refreshRoomState();
    if (session.phase === 'connected') requestBacklog(room);
  };
  room.on(RoomEvent.ParticipantConnected, changed);
  room.on(RoomEvent.ParticipantDisconnected, changed);
  room.on(RoomEvent.ParticipantAttributesChanged, changed);
  room.on(RoomEvent.ParticipantNameChanged, changed);
  room.on(RoomEvent.Reconnecting, () => {
    session.phase = 'reconnecting';
    showState('reconnecting');
  });
  room.on(RoomEvent.Reconnected, () => {
    session.phase = 'connected';
    changed();
  });
  room.on(RoomEvent.Disconnected, (reason) => onDisconnected(room, reason));
}

function onDisconnected(room, reason) {
  if (session.room !== room || session.closing) return;
  session.room = null;
  if (reason === DisconnectReason.ROOM_DELETED) {
    return endSession('ended', 'The room has ended. Reload the page to join again.');
  }
  if (reason === DisconnectReason.PARTICIPANT_REMOVED) {
    return endSession('ended', 'This viewer was removed from the room.');
  }
  scheduleRetry('The connection to the room was lost.');
}

function endSession(state, message) {
  session.phase = state;
  clearTimeout(session.retryTimer);
  showState(state, message);
}

function scheduleRetry(reason) {
  clearTimeout(session.retryTimer);
  const delay = RETRY_DELAYS_S[Math.min(session.attempt, RETRY_DELAYS_S.length - 1)];
  session.attempt += 1;
  session.phase = 'retrying';
  let left = delay;
  const tick = () => {
    if (left <= 0) return connect();
    showState('retrying', `${reason} Retrying in ${left} s…`);
    left -= 1;
    session.retryTimer = setTimeout(tick, 1000);
  };
  tick();
}

function refusedByLiveKit(error) {
  return error instanceof ConnectionError && error.reason === ConnectionErrorReason.NotAllowed;
}

async function connect() {
  session.phase = 'connecting';
  showState('connecting');
  let grant;
  try {
    grant = await fetchGrant();
  } catch (error) {
    if (error instanceof AccessError) return endSession(error.state, error.message);
    return scheduleRetry(`Could not reach the viewer server (${error.message}).`);
  }
  if (grant.room) ui.roomName.textContent = grant.room;
  const room = new Room({ adaptiveStream: false, dynacast: false });
  wireRoom(room);
  try {
    // Captions arrive as data; the viewer never plays the room's audio or video.
    await room.connect(grant.url, grant.token, { autoSubscribe: false });
  } catch (error) {
    if (refusedByLiveKit(error)) {
      return endSession('refused', 'The LiveKit server refused this viewer token: it is invalid or has expired. '
        + 'Ask the operator for a new link.');
    }
    return scheduleRetry(`Could not connect to the room (${error.message}).`);
  }
  if (!grant.room) ui.roomName.textContent = room.name;
  session.room = room; // only now: a failed connect must not also count as a lost connection
  session.attempt = 0;
  session.phase = 'connected';
  backlog.requested = false;
  rememberNames(room);
  refreshRoomState();
  requestBacklog(room);
}

// ---------------------------------------------------------------- export

function download(format) {
  const spec = FORMATS[format];
  const content = spec.render(transcript.finals());
  const blob = new Blob([content], { type: `${spec.type};charset=utf-8` });
  const link = document.createElement('a');
  const room = (ui.roomName.textContent || 'room').replace(/[^\w.-]+/g, '_').slice(0, 60);
  const stamp = new Date().toISOString().slice(0, 19).replace(/[:T]/g, '-');
  link.href = URL.createObjectURL(blob);
  link.download = `captions-${room}-${stamp}.${spec.extension}`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

// ---------------------------------------------------------------- start

function start() {
  if (overlay) {
    document.body.classList.add('overlay');
    const size = Number(params.get('size'));
    if (size >= 12 && size <= 200) document.documentElement.style.setProperty('--overlay-size', `${size}px`);
  }
  applyPrefs();
  ui.roomName.textContent = params.get('room') || '';
  $('font-smaller').addEventListener('click', () => stepFontSize(-1));
  $('font-larger').addEventListener('click', () => stepFontSize(+1));
  ui.theme.addEventListener('change', () => {
    prefs.theme = ui.theme.value;
    savePrefs();
  });
  for (const button of document.querySelectorAll('[data-export]')) {
    button.addEventListener('click', () => download(button.dataset.export));
  }
  ui.captions.addEventListener('scroll', onCaptionsScroll, { passive: true });
  ui.jump.addEventListener('click', jumpToLive);
  window.addEventListener('pagehide', () => {
    session.closing = true;
    session.room?.disconnect();
  });
  connect();
}

start();
