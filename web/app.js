// The captions viewer: joins a LiveKit room as a hidden, subscribe-only participant and shows the
// agent's captions (LiveKit's lk.transcription text streams) one line per speaker turn.
//
// Modules: session.js (the room connection and the state shown), transcript.js (the captions on
// the page), preferences.js (text size, theme, language), export.js (TXT/SRT/WebVTT), protocol.js.
//
// The language read: "Original" or one of the languages the viewer server offers (/api/config),
// from the picker (remembered) or the link's `lang` parameter (for overlays; it wins).

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
  language: $('language'),
  languagePicker: $('language-picker'),
};

const prefs = new Preferences(ui.theme, overlay);
const speakers = new Speakers();
const transcript = new Transcript(ui.captions, ui.empty, speakers, { overlay });

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

// ---------------------------------------------------------------- the language read

/** The languages the viewer server offers translations into (none when it says nothing). */
async function offeredLanguages() {
  try {
    const response = await fetch('/api/config', { cache: 'no-store' });
    const body = await response.json();
    return Array.isArray(body.languages) ? body.languages.filter((code) => typeof code === 'string' && code) : [];
  } catch {
    return [];
  }
}

/** "Deutsch (German)": the language's own name, and its name in the reader's language. */
function languageLabel(code) {
  const name = (locale) => {
    try {
      return new Intl.DisplayNames([locale], { type: 'language' }).of(code) || code;
    } catch {
      return code;
    }
  };
  const own = name(code);
  const ours = name(navigator.language || 'en');
  return own === ours ? own : `${own} (${ours})`;
}

/** The picker's options, and the language to read first: the link's, else the one remembered. */
function setUpLanguages(languages) {
  for (const code of languages) {
    const option = document.createElement('option');
    option.value = code;
    option.lang = code;
    option.textContent = languageLabel(code);
    ui.language.append(option);
  }
  ui.languagePicker.hidden = !languages.length;
  const asked = params.has('lang') ? params.get('lang').trim().toLowerCase().replace(/_/g, '-') : null;
  if (asked === null) return languages.includes(prefs.values.language) ? prefs.values.language : '';
  if (!asked || asked === 'original' || languages.includes(asked)) return asked === 'original' ? '' : asked;
  transcript.note(`Captions are not translated into “${asked}” here: showing the original captions.`);
  return '';
}

function chooseLanguage(session, language) {
  prefs.setLanguage(language);
  if (params.has('lang')) { // the address keeps saying what the page shows (a reload, a bookmark)
    params.set('lang', language || 'original');
    history.replaceState(null, '', `${location.pathname}?${params}`);
  }
  session.setLanguage(language);
}

// ---------------------------------------------------------------- export

function download(format) {
  const spec = FORMATS[format];
  const content = spec.render(transcript.finals());
  const blob = new Blob([content], { type: `${spec.type};charset=utf-8` });
  const link = document.createElement('a');
  const room = (ui.roomName.textContent || 'room').replace(/[^\w.-]+/g, '_').slice(0, 60);
  const stamp = new Date().toISOString().slice(0, 19).replace(/[:T]/g, '-');
  const language = transcript.language ? `-${transcript.language.replace(/[^\w-]+/g, '')}` : '';
  link.href = URL.createObjectURL(blob);
  link.download = `captions-${room}${language}-${stamp}.${spec.extension}`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

// ---------------------------------------------------------------- start

async function start() {
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
  const onLanguageRefused = (language, message) => {
    ui.language.value = '';
    transcript.note(`${message || `Captions are not translated into ${language} here.`} Showing the original captions.`);
  };
  const session = new Session({ ui, params, transcript, speakers, onCaptions: keepLive, onLanguageRefused });
  window.addEventListener('pagehide', () => session.close());
  const language = setUpLanguages(await offeredLanguages());
  ui.language.value = language;
  transcript.setLanguage(language);
  ui.language.addEventListener('change', () => chooseLanguage(session, ui.language.value));
  session.connect();
}

start();
