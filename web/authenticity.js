// Checking that a caption comes from the caption agent, for the speaker it names.
//
// The agent signs every caption with an Ed25519 key it generates when it starts and publishes as
// its own participant attribute (captions.key); only an agent token makes a participant of kind
// AGENT, and only a participant can set its own attributes. LiveKit lets only agents send a
// stream under another participant's identity, but does not tell a receiver whether a stream named
// "alice" came from an agent or from alice, and anyone who saw a stream's header can write into it:
// the signature covers the room, the agent, the speaker, the track, the segment, the update number,
// the words and the text, so nothing else verifies. See captions/protocol.py.

import { ParticipantKind } from './vendor/livekit-client.esm.mjs';
import { ATTR_AGENT_KEY, captionMessage, fromBase64 } from './protocol.js';

const AGENT_WAIT_MS = 5000;
const AGENT_POLL_MS = 200;

export class CaptionVerifier {
  /** `room()`: the current LiveKit room (null while disconnected). */
  constructor(room) {
    this.room = room;
    this.keys = new Map(); // base64 public key -> CryptoKey promise
  }

  /** WebCrypto exists only in secure contexts (https, or this machine): elsewhere nothing verifies. */
  static get available() {
    return Boolean(globalThis.isSecureContext && globalThis.crypto?.subtle);
  }

  /**
   * True when `caption` ({agent, speaker, trackSid, segmentId, seq, final, words, text, signature})
   * was signed by the agent it names, in this room. Waits a few seconds for an agent this viewer
   * does not know yet (LiveKit announces participants that publish nothing in batches).
   */
  async verify(caption) {
    const signature = fromBase64(caption.signature);
    if (!signature || signature.length !== 64) return false;
    const publicKey = await this.agentKey(caption.agent);
    if (!publicKey) return false;
    const room = this.room();
    if (!room) return false;
    const message = captionMessage({ ...caption, room: room.name });
    try {
      const key = await this.importKey(publicKey);
      return await crypto.subtle.verify({ name: 'Ed25519' }, key, signature, message);
    } catch (error) {
      console.warn('caption signature check failed', error);
      return false;
    }
  }

  /** The captions.key of the agent participant `identity`, waiting for it a few seconds. */
  async agentKey(identity) {
    const deadline = Date.now() + AGENT_WAIT_MS;
    for (;;) {
      const participant = this.room()?.getParticipantByIdentity(identity);
      if (participant && participant.kind === ParticipantKind.AGENT && participant.attributes[ATTR_AGENT_KEY]) {
        return participant.attributes[ATTR_AGENT_KEY];
      }
      if (Date.now() >= deadline) return null;
      await new Promise((resolve) => setTimeout(resolve, AGENT_POLL_MS));
    }
  }

  importKey(publicKey) {
    if (!this.keys.has(publicKey)) {
      const raw = fromBase64(publicKey);
      this.keys.set(publicKey, raw && raw.length === 32
        ? crypto.subtle.importKey('raw', raw, { name: 'Ed25519' }, false, ['verify'])
        : Promise.reject(new Error('malformed agent key')));
    }
    return this.keys.get(publicKey);
  }
}
