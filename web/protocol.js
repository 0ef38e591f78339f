// The captions protocol, as the agent publishes it (mirrors captions/protocol.py).

export const TOPIC_TRANSCRIPTION = 'lk.transcription';
export const ATTR_SEGMENT_ID = 'lk.segment_id';
export const ATTR_TRANSCRIPTION_FINAL = 'lk.transcription_final';
export const ATTR_WORDS = 'captions.words';
export const ATTR_AGENT_STATUS = 'captions.status';
export const ATTR_AGENT_QUEUED = 'captions.queued';
export const RPC_BACKLOG = 'captions.backlog';
export const TOPIC_BACKLOG = 'captions.backlog';

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
