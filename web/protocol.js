// The captions protocol, as the agent publishes it (mirrors captions/protocol.py).

export const TOPIC_TRANSCRIPTION = 'lk.transcription';
export const ATTR_SEGMENT_ID = 'lk.segment_id';
export const ATTR_TRANSCRIPTION_FINAL = 'lk.transcription_final';
export const ATTR_TRANSCRIBED_TRACK_ID = 'lk.transcribed_track_id';
export const ATTR_WORDS = 'captions.words';
export const ATTR_AGENT = 'captions.agent';
export const ATTR_SEQ = 'captions.seq';
export const ATTR_SIGNATURE = 'captions.sig';
export const ATTR_AGENT_STATUS = 'captions.status';
export const ATTR_AGENT_QUEUED = 'captions.queued';
export const ATTR_AGENT_KEY = 'captions.key';
export const ATTR_AGENT_SINCE = 'captions.since';

const SIGNATURE_CONTEXT = 'lk-captions-v1';

/** A caption's text is at most a readable line (the agent cuts segments at 20 words): anything far
 * longer is not a caption, and is not read further. */
export const MAX_CAPTION_CHARS = 2000;

/**
 * The bytes a caption's signature covers (captions/protocol.py `caption_message`): each field
 * prefixed with its length in UTF-8 bytes.
 */
export function captionMessage({ room, agent, speaker, trackSid, segmentId, seq, final, words, text }) {
  const encoder = new TextEncoder();
  const fields = [SIGNATURE_CONTEXT, room, agent, speaker, trackSid, segmentId, String(seq),
    final ? 'final' : 'interim', words, text];
  const parts = [];
  for (const value of fields) {
    const bytes = encoder.encode(value);
    parts.push(encoder.encode(`${bytes.length}:`), bytes);
  }
  const out = new Uint8Array(parts.reduce((n, part) => n + part.length, 0));
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
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

/**
 * The room's captioner among several caption agents ({identity, attributes}): the one that joined
 * first (captions.since), the smaller identity on a tie (captions/protocol.py `elected_captioner`).
 */
export function electedCaptioner(agents) {
  let best = null;
  for (const agent of agents) {
    if (!agent.attributes[ATTR_AGENT_KEY]) continue;
    const since = Number(agent.attributes[ATTR_AGENT_SINCE]);
    const key = [Number.isFinite(since) ? since : Infinity, agent.identity];
    if (!best || key[0] < best.key[0] || (key[0] === best.key[0] && key[1] < best.key[1])) best = { agent, key };
  }
  return best ? best.agent : null;
}
