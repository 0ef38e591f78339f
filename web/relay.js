// The room as the viewer server relays it (captions/viewer/relay.py): its captioners and the
// speakers' names, and the caption streams, over one WebSocket. The page never joins LiveKit.
//
// Messages from the server: hello (room, caption key, server clock), room (everyone, at once),
// participant (one joined or changed), left, reconnecting, caption (a whole caption stream: sender,
// attributes, text). The page sends nothing. The server closes the socket with a code from
// captions/viewer/server.py CLOSE_CODES when the link is refused or ends.

export const CLOSE_STATES = { 4400: 'refused', 4403: 'refused', 4401: 'expired', 4410: 'revoked', 4429: 'busy' };

/** A participant as the page reads it (the shape livekit-client's has, for what the page uses). */
function participantOf(described) {
  return {
    identity: String(described.identity || ''),
    name: String(described.name || ''),
    kind: Number(described.kind),
    joinedAt: Number.isFinite(described.joined_at_ms) ? new Date(described.joined_at_ms) : undefined,
    attributes: described.attributes && typeof described.attributes === 'object' ? described.attributes : {},
  };
}

export class RelayRoom {
  /** `handlers`: {hello, changed(participant | null), left(participant), caption(message),
   * reconnecting(), closed(code, reason)}. */
  constructor(handlers) {
    this.handlers = handlers;
    this.name = '';
    this.remoteParticipants = new Map();
    this.socket = null;
  }

  /** Opens the relay for `query` (the link); resolves with the hello (and when it was received). */
  connect(query) {
    const scheme = window.location.protocol === 'https:' ? 'wss' : 'ws';
    const sentAt = Date.now();
    return new Promise((resolve, reject) => {
      const socket = new WebSocket(`${scheme}://${window.location.host}/api/live?${query}`);
      this.socket = socket;
      let opened = false;
      socket.onmessage = (event) => {
        let message;
        try {
          message = JSON.parse(event.data);
        } catch {
          return console.warn('the viewer server sent something that is not JSON');
        }
        if (message.type === 'hello' && !opened) {
          opened = true;
          this.name = String(message.room || '');
          resolve({ ...message, sentAt, receivedAt: Date.now() });
          return;
        }
        this.receive(message);
      };
      socket.onclose = (event) => {
        if (!opened) reject(Object.assign(new Error(event.reason || 'the viewer server closed the connection'),
          { code: event.code }));
        else this.handlers.closed(event.code, event.reason);
      };
    });
  }

  receive(message) {
    switch (message.type) {
      case 'room':
        this.remoteParticipants = new Map((message.participants || []).map((p) => [p.identity, participantOf(p)]));
        return this.handlers.changed(null);
      case 'participant': {
        const participant = participantOf(message);
        this.remoteParticipants.set(participant.identity, participant);
        return this.handlers.changed(participant);
      }
      case 'left': {
        const participant = this.remoteParticipants.get(message.identity);
        this.remoteParticipants.delete(message.identity);
        if (participant) this.handlers.left(participant);
        return undefined;
      }
      case 'reconnecting':
        return this.handlers.reconnecting();
      case 'caption':
        return this.handlers.caption(message);
      default:
        return undefined;
    }
  }

  disconnect() {
    this.socket?.close(1000);
  }
}
