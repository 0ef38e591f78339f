// The captions protocol, as the agent publishes it. The spec is docs/protocol.md, which this module
// and captions/protocol.py (the worker's side) both follow.

export const TOPIC_TRANSCRIPTION = 'lk.transcription';
export const ATTR_SEGMENT_ID = 'lk.segment_id';
export const ATTR_TRANSCRIPTION_FINAL = 'lk.transcription_final';
export const ATTR_TRANSCRIBED_TRACK_ID = 'lk.transcribed_track_id';
export const ATTR_WORDS = 'captions.words';
export const ATTR_AGENT = 'captions.agent';
export const ATTR_SPEAKER = 'captions.speaker';
export const ATTR_SEQ = 'captions.seq';
export const ATTR_SENT = 'captions.sent';
export const ATTR_SIGNATURE = 'captions.sig';
export const ATTR_AGENT_STATUS = 'captions.status';
export const ATTR_AGENT_QUEUED = 'captions.queued';
export const ATTR_AGENT_PROBLEM = 'captions.problem';
export const ATTR_AGENT_CLAIM = 'captions.claim';
export const ATTR_AGENT_SUPERSEDED = 'captions.superseded';
export const ATTR_LANGUAGE = 'language';
export const ATTR_TRANSLATED = 'translated';
export const ATTR_SOURCE_SEGMENT = 'captions.source_segment';
export const ATTR_SOURCE_LANGUAGE = 'captions.source_language';
export const ATTR_UNTRANSLATED = 'captions.untranslated';
export const ATTR_READING = 'captions.reading';

const SIGNATURE_CONTEXT = 'lk-captions-v2';

/** A caption signed this far from the viewer's estimate of the server's clock is a replay
 * (captions/protocol.py REPLAY_WINDOW_S). */
export const REPLAY_WINDOW_MS = 6000;

/** A caption's text is at most a readable line (the agent cuts segments at 20 words): anything far
 * longer is not a caption, and is not read further. */
export const MAX_CAPTION_CHARS = 2000;

/** Each field prefixed with its length in UTF-8 bytes, so that no field can spill into the next
 * (captions/protocol.py `_length_prefixed`). */
function lengthPrefixed(...fields) {
  const encoder = new TextEncoder();
  const parts = fields.flatMap((value) => {
    const bytes = encoder.encode(value);
    return [encoder.encode(`${bytes.length}:`), bytes];
  });
  const out = new Uint8Array(parts.reduce((n, part) => n + part.length, 0));
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
}

/** The bytes a caption's signature covers (captions/protocol.py `caption_message`). */
export function captionMessage({ room, agent, speaker, trackSid, segmentId, seq, final, sentMs, words, text }) {
  return lengthPrefixed(SIGNATURE_CONTEXT, 'caption', room, agent, speaker, trackSid, segmentId, String(seq),
    final ? 'final' : 'interim', String(sentMs), words, text);
}

/** The bytes a translation's signature covers (captions/protocol.py `translation_message`): its own
 * kind, so that an original's signature never passes for a translation's, nor the reverse. */
export function translationMessage({ room, agent, speaker, trackSid, segmentId, seq, final, sentMs, sourceSegment,
  sourceLanguage, language, untranslated, text }) {
  return lengthPrefixed(SIGNATURE_CONTEXT, 'translation', room, agent, speaker, trackSid, segmentId, String(seq),
    final ? 'final' : 'interim', String(sentMs), sourceSegment, sourceLanguage, language, untranslated, text);
}

/** The lk.segment_id of `sourceSegment`'s translation into `language` (captions/protocol.py
 * `translation_segment_id`). */
export function translationSegmentId(sourceSegment, language) {
  return `${sourceSegment}~${language}`;
}

/** The bytes a signature covers for `caption` (the fields the page read from its stream): a
 * translation's when it says it is one, an original's otherwise. */
export function signedMessage(caption) {
  return caption.translated ? translationMessage(caption) : captionMessage(caption);
}

// Scripts written right to left: a language whose primary subtag is one of these is shown rtl.
const RTL_LANGUAGES = new Set(['ar', 'arc', 'ckb', 'dv', 'fa', 'he', 'iw', 'ku', 'ps', 'sd', 'syr', 'ug', 'ur', 'yi']);

/** 'rtl' or 'ltr' for a language code (BCP-47: its primary subtag decides); 'auto' when unknown. */
export function directionOf(language) {
  const primary = String(language || '').split('-')[0].toLowerCase();
  if (!primary) return 'auto';
  return RTL_LANGUAGES.has(primary) ? 'rtl' : 'ltr';
}

/** The bytes a captioner's captions.claim signs (captions/protocol.py `claim_message`). */
export function claimMessage({ room, identity }) {
  return lengthPrefixed(SIGNATURE_CONTEXT, 'claim', room, identity);
}

/**
 * Who a caption stream transcribes: its sender, or captions.speaker when the agent it names sent it
 * in its own name (the speaker had left: LiveKit clients drop the streams of a sender who is gone).
 * Nobody else can pick the speaker: the signature covers it either way.
 */
export function speakerOf(sender, attributes) {
  return sender && sender === attributes[ATTR_AGENT] ? attributes[ATTR_SPEAKER] || sender : sender;
}

/** Base64 to bytes; null for anything that is not base64. */
export function fromBase64(text) {
  try {
    return Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  } catch {
    return null;
  }
}

/** A JSON array of strings from an attribute; anything else reads as empty. */
export function parseJsonArray(text) {
  try {
    const value = JSON.parse(text || '[]');
    return Array.isArray(value) ? value.map(String) : [];
  } catch {
    return [];
  }
}

/** The captions.words attribute: [word, start, end] triples; anything malformed is left out. */
export function parseWords(text) {
  try {
    const words = JSON.parse(text || '[]');
    return Array.isArray(words) ? words.filter((w) => Array.isArray(w) && w.length >= 3) : [];
  } catch {
    return [];
  }
}

/** Python's str order (by code point); JavaScript's < compares UTF-16 units, which differs above
 * U+FFFF, and workers and viewers must elect the same captioner. */
function comesBefore(a, b) {
  const x = [...a];
  const y = [...b];
  for (let i = 0; i < Math.min(x.length, y.length); i += 1) {
    const d = x[i].codePointAt(0) - y[i].codePointAt(0);
    if (d) return d < 0;
  }
  return x.length < y.length;
}

/** When the server says a participant joined, in whole Unix seconds (what every SDK reports);
 * unknown sorts last. `joinedAt`: livekit-client's Date. */
export function joinedSeconds(participant) {
  const ms = participant.joinedAt?.getTime();
  return Number.isFinite(ms) ? Math.floor(ms / 1000) : Infinity;
}

/**
 * The room's captioner among captioners whose claim verified ({identity, joinedAt}): the one the
 * server says joined first, the smaller identity on a tie (captions/protocol.py `elected_captioner`).
 */
export function electedCaptioner(captioners) {
  let best = null;
  for (const captioner of captioners) {
    const joined = joinedSeconds(captioner);
    if (!best || joined < best.joined || (joined === best.joined && comesBefore(captioner.identity, best.captioner.identity))) {
      best = { captioner, joined };
    }
  }
  return best ? best.captioner : null;
}
