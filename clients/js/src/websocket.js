/*
 * The Socket.IO transport (the default): the contract's events on one
 * Socket.IO connection, which reconnects by itself.
 */

import { TidingsError } from './errors.js';

// Unsubscribing needs no answer to be right (the topic is forgotten here
// first), so this only bounds how long the returned Promise can wait.
const UNSUBSCRIBE_TIMEOUT_MS = 15000;
// After the server closed the session on purpose (Socket.IO does not retry
// by itself then; a restarting server says this too).
const SERVER_DISCONNECT_RETRY_MS = 1000;

export class SocketIoTransport {
  constructor(client, options, io) {
    this.name = 'websocket';
    this.client = client;
    const token = options.token;
    const ioOptions = Object.assign({
      transports: options.transports || ['websocket', 'polling'],
      // Without this a client that cannot open a WebSocket never tries polling.
      tryAllTransports: true,
      reconnection: true,
      reconnectionDelay: 500,
      reconnectionDelayMax: 5000,
      autoConnect: false,
    }, options.io || {});
    if (options.path) ioOptions.path = options.path;
    if (token) {
      // A function is called on every (re)connect, so a page can refresh tokens.
      ioOptions.auth = (cb) => {
        cb({ token: typeof token === 'function' ? token() : token });
      };
    }
    this.socket = options.url ? io(options.url, ioOptions) : io(ioOptions);
    this._bind();
  }

  get connected() {
    return this.socket.connected;
  }

  open() {
    this.socket.connect();
  }

  close() {
    this.socket.disconnect();
  }

  /** Emit `subscribe`; callback(err, ack), err when no ack came within timeout ms. */
  subscribe(payload, timeout, callback) {
    this.socket.timeout(timeout).emit('subscribe', payload, callback);
  }

  unsubscribe(topic) {
    const socket = this.socket;
    if (!socket.connected) return Promise.resolve({ ok: true });
    return new Promise((resolve) => {
      socket.timeout(UNSUBSCRIBE_TIMEOUT_MS).emit('unsubscribe', { topic: topic }, (err, ack) => {
        resolve(err ? { ok: false, error: String(err.message || err) } : ack);
      });
    });
  }

  /** Emit event with payload; a Promise of the ack, rejected when none came within timeout ms. */
  request(event, payload, timeout) {
    // Not connected yet: Socket.IO sends it on connect, within the same timeout.
    return new Promise((resolve, reject) => {
      this.socket.timeout(timeout).emit(event, payload, (err, ack) => {
        if (err) {
          reject(new TidingsError('timeout', 'no answer to ' + event + ' within ' + timeout +
            ' ms (a server without ' + event + ' never answers it; or the connection is down)',
          payload.topic));
        } else {
          resolve(ack);
        }
      });
    });
  }

  /**
   * A subscribe got no answer while the connection looks up: it is not (a
   * half-open path, a wedged server), and asking again on it would leave the
   * topic silent. Drop the transport as a network failure would, so
   * Socket.IO reconnects and everything is resubscribed.
   */
  dropConnection() {
    if (this.socket.connected && this.socket.io.engine) this.socket.io.engine.close();
  }

  _bind() {
    const client = this.client;
    const socket = this.socket;

    socket.on('connect', () => client._connected());

    socket.on('disconnect', (reason) => {
      if (client._closed || reason === 'io client disconnect') {
        client._lost('disconnected');
        return;
      }
      client._lost('reconnecting');
      if (reason === 'io server disconnect') {
        // Jittered (0.5x to 1.5x): when the server drops many clients at
        // once (an operator's disconnect, a deploy), they do not all come
        // back in the same instant.
        setTimeout(() => {
          if (!client._closed && !socket.connected) socket.connect();
        }, SERVER_DISCONNECT_RETRY_MS * (0.5 + Math.random()));
      } // else Socket.IO reconnects by itself
    });

    socket.on('connect_error', (err) => {
      if (socket.active) {
        client._retrying(); // a transport-level failure: Socket.IO keeps retrying
      } else {
        client._refused((err && err.message) || 'connect_error'); // e.g. "invalid_token": no retry
      }
    });

    socket.on('publications', (pubs) => client._publications(pubs));
    socket.on('joins', (members) => client._members('join', members));
    socket.on('leaves', (members) => client._members('leave', members));
  }
}
