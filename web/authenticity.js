// Checking that a caption comes from this deployment's caption agent, for the speaker it names, now.
//
// One trust root: the viewer server hands the page, with the room, the public half of the caption
// key (derived from CAPTIONS_CAPTION_SECRET, which only the server and the caption workers hold) and
// its clock. Nothing a participant says about itself is trusted: LiveKit does not tell a receiver
// whether a stream named "alice" came from an agent or from alice, anyone who saw a stream's header
// can write into it, and every participant sets its own attributes. So:
// * a caption's signature (over room, agent, speaker, track, segment, update number, final, time,
//   words and text; a translation's over its language and source segment too, as a message of
//   another kind) must verify with the server's key;
// * a participant is a captioner only if it is an agent and its captions.claim (a signature of the
//   room and its own identity) verifies with that key; the room's captioner is elected among them
//   from what the server says (join time), never from an attribute;
// * a caption signed too far from the server's clock is a replay (a participant receives her own
//   captions and can resend them under her own identity).
// See captions/protocol.py.

import { ParticipantKind } from './vendor/livekit-client.esm.mjs';
import {
  ATTR_AGENT_CLAIM,
  ATTR_AGENT_SUPERSEDED,
  REPLAY_WINDOW_MS,
  claimMessage,
  electedCaptioner,
  fromBase64,
  signedMessage,
} from './protocol.js';

const CAPTIONER_WAIT_MS = 5000;
const CAPTIONER_POLL_MS = 200;

export class CaptionVerifier {
  constructor() {
    this.key = null; // CryptoKey promise of the server's caption key
    this.keyText = '';
    this.clockOffsetMs = 0; // server clock − this browser's clock
    this.claims = new Map(); // identity NUL claim -> Promise<boolean>
  }

  /** WebCrypto exists only in secure contexts (https, or this machine): elsewhere nothing verifies. */
  static get available() {
    return Boolean(globalThis.isSecureContext && globalThis.crypto?.subtle);
  }

  /**
   * What the viewer server vouched for in its answer: `captionKey` (base64 raw Ed25519) and
   * `serverTimeMs`, answered between `sentAt` and `receivedAt` (this browser's Date.now()).
   */
  trust({ captionKey, serverTimeMs, sentAt, receivedAt }) {
    // The server read its clock somewhere during the request: the midpoint is off by at most half
    // the round trip.
    this.clockOffsetMs = serverTimeMs - (sentAt + receivedAt) / 2;
    // No WebCrypto on an insecure page: nothing verifies there, and the page says so.
    if (captionKey === this.keyText || !CaptionVerifier.available) return;
    this.keyText = captionKey;
    this.claims.clear();
    const raw = fromBase64(captionKey);
    this.key = raw && raw.length === 32
      ? crypto.subtle.importKey('raw', raw, { name: 'Ed25519' }, false, ['verify'])
      : Promise.reject(new Error('the viewer server sent a malformed caption key'));
    this.key.catch((error) => console.warn(error.message));
  }

  /** This browser's estimate of the server's clock, Unix ms. */
  serverNow() {
    return Date.now() + this.clockOffsetMs;
  }

  /** Why a caption signed at `sentMs` (by the agent's clock) is not live, or '' when it is. */
  replayReason(sentMs, now = this.serverNow()) {
    const skew = sentMs - now;
    if (Math.abs(skew) <= REPLAY_WINDOW_MS) return '';
    const seconds = (Math.abs(skew) / 1000).toFixed(1);
    return skew < 0 ? `it was signed ${seconds} s ago (a replay)` : `it was signed ${seconds} s in the future`;
  }

  async signedByKey(signatureText, message) {
    const signature = fromBase64(signatureText);
    if (!this.key || !signature || signature.length !== 64) return false;
    try {
      return await crypto.subtle.verify({ name: 'Ed25519' }, await this.key, signature, message);
    } catch (error) {
      console.warn('signature check failed', error);
      return false;
    }
  }

  /** True when `caption` ({agent, speaker, trackSid, segmentId, seq, final, sentMs, words, text,
   * signature}, and for a translation translated, sourceSegment, sourceLanguage, language,
   * untranslated) was signed with the caption key for this room, as what it says it is. */
  verify(caption, roomName) {
    return this.signedByKey(caption.signature, signedMessage({ ...caption, room: roomName }));
  }

  /** Whether `participant` is a captioner: an agent whose claim names it in this room. Cached per
   * identity and claim (a claim never changes its meaning). */
  isCaptioner(participant, roomName) {
    const claim = participant.attributes[ATTR_AGENT_CLAIM];
    if (participant.kind !== ParticipantKind.AGENT || !claim || !this.key) return Promise.resolve(false);
    const cacheKey = `${participant.identity}\u0000${claim}`;
    if (!this.claims.has(cacheKey)) {
      this.claims.set(cacheKey, this.signedByKey(claim, claimMessage({ room: roomName, identity: participant.identity })));
    }
    return this.claims.get(cacheKey);
  }

  /** The room's participants whose claim verifies and that the recovery has not superseded (a
   * captioner whose heartbeat stopped; only the server API, or the captioner itself, sets it). */
  async captioners(room) {
    const agents = [...room.remoteParticipants.values()].filter((p) => !p.attributes[ATTR_AGENT_SUPERSEDED]);
    const valid = await Promise.all(agents.map((p) => this.isCaptioner(p, room.name)));
    return agents.filter((_, i) => valid[i]);
  }

  /** The room's elected captioner (null when none), waiting a few seconds for `identity` to be
   * known as a captioner (LiveKit announces participants that publish nothing in batches). */
  async electedWaitingFor(room, identity) {
    const deadline = Date.now() + CAPTIONER_WAIT_MS;
    for (;;) {
      const captioners = await this.captioners(room);
      if (captioners.some((p) => p.identity === identity) || Date.now() >= deadline) {
        return electedCaptioner(captioners);
      }
      await new Promise((resolve) => setTimeout(resolve, CAPTIONER_POLL_MS));
    }
  }
}
