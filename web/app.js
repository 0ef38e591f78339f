// The captions viewer: joins a LiveKit room as a hidden, subscribe-only participant and shows the
// agent's captions (LiveKit's lk.transcription text streams) one line per speaker turn.
//
// Modules: session.js (the room connection and the state shown), transcript.js (the captions on
// the page), preferences.js (text size and theme), export.js (TXT/SRT/WebVTT), protocol.js.

import { FORMATS } from './export.js';
import { Preferences } from './preferences.js';
import { Session } from './session.js';
import { Speakers, Transcript } from './transcript.js';

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

const prefs = new Preferences(ui.theme, overlay);
const speakers = new Speakers();
const transcript = new Transcript(ui.captions, ui.empty, speakers);

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
  prefs.apply();
  ui.roomName.textContent = params.get('room') || '';
  $('font-smaller').addEventListener('click', () => prefs.stepFontSize(-1));
  $('font-larger').addEventListener('click', () => prefs.stepFontSize(+1));
  ui.theme.addEventListener('change', () => prefs.setTheme(ui.theme.value));
  for (const button of document.querySelectorAll('[data-export]')) {
    button.addEventListener('click', () => download(button.dataset.export));
  }
  ui.captions.addEventListener('scroll', onCaptionsScroll, { passive: true });
  ui.jump.addEventListener('click', jumpToLive);
  const session = new Session({ ui, params, transcript, speakers, onCaptions: keepLive });
  window.addEventListener('pagehide', () => session.close());
  session.connect();
}

start();
