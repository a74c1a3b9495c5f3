/*
 * The client: subscriptions, offsets, recovery and de-duplication, the same
 * whatever carries them (src/websocket.js or src/sse.js).
 *
 * Exactly-once delivery: the client remembers the offset of the last
 * publication it delivered for each topic, drops anything at or below it, and
 * resubscribes with `since` after every (re)connect so the server replays what
 * was missed from the topic's history. A subscribe refused as `unavailable`
 * (the server's Redis is down) is retried with backoff; other refusals
 * (forbidden, invalid_topic, limit) drop the topic.
 */

import { backoffDelay } from './backoff.js';
import { TidingsError } from './errors.js';
import { FROM_START, compareOffsets, isValidTopic, parseOffset, validOffset } from './offsets.js';
import { SseTransport } from './sse.js';
import { SocketIoTransport } from './websocket.js';

const STATES = ['connecting', 'connected', 'reconnecting', 'disconnected'];
const EVENTS = ['state', 'recovered', 'gap', 'error', 'join', 'leave'];
const TRANSPORTS = ['websocket', 'sse'];
// Subscribe errors worth retrying (the server's Redis is down); any other
// error (forbidden, invalid_topic, limit) ends the subscription, except
// `limit` on a resubscribe: a topic accepted before can only have met the
// subscribe rate (a client with many topics resubscribing all at once).
const TRANSIENT_ERRORS = ['unavailable'];
const DEFAULT_ACK_TIMEOUT_MS = 15000;
const PRESENCE_MESSAGES = {
  presence_off: 'presence is off for this topic on this server (TIDINGS_PRESENCE_TOPICS)',
  forbidden: 'this client may not subscribe to this topic, so may not see its presence',
  invalid_topic: 'not a topic: 1 to 128 characters of A-Z a-z 0-9 _ . -',
};

// The Socket.IO client when the page or the caller gives none: the ES module
// entry sets socket.io-client's; the browser build leaves it to window.io.
const defaults = { io: null };

/** Make io the Socket.IO client of every Tidings created without options.ioClient. */
export function setDefaultIo(io) {
  defaults.io = io;
}

function report(what, error) {
  if (globalThis.console) globalThis.console.error(what, error);
}

/**
 *   const t = new Tidings({url, token, transport, transports, ackTimeout, io, ioClient});
 *   t.on('state', (s) => ...);            // connecting | connected | reconnecting | disconnected
 *   t.on('recovered', ({topic, count}) => ...);
 *   t.on('gap', ({topic}) => ...);        // history no longer covers what we missed: resync
 *   t.on('error', ({topic, error}) => ...); // a refusal; topic null: connection refused
 *   t.on('join', ({topic, sub, client}) => ...); t.on('leave', ...);
 *   await t.subscribe('orders.42', (pubs, {recovered}) => ...);
 *   t.unsubscribe('orders.42');
 *   await t.presence('orders.42');        // {clients, users: [{sub, clients}]}
 */
export function Tidings(options) {
  if (!(this instanceof Tidings)) return new Tidings(options);
  options = options || {};
  const transport = options.transport === undefined ? 'websocket' : options.transport;
  if (TRANSPORTS.indexOf(transport) < 0) {
    throw new TypeError('unknown Tidings transport: ' + JSON.stringify(transport) +
      ' (expected "websocket" or "sse")');
  }
  this._listeners = {};
  EVENTS.forEach((e) => { this._listeners[e] = []; });
  this._topics = new Map(); // topic -> entry (see subscribe)
  this._ackTimeout = options.ackTimeout || DEFAULT_ACK_TIMEOUT_MS;
  this._closed = false;
  this._everConnected = false;
  this.state = 'connecting';
  this.transport = transport;
  if (transport === 'sse') {
    this._transport = new SseTransport(this, options);
    this.socket = null;
  } else {
    const io = options.ioClient || defaults.io || globalThis.io;
    if (typeof io !== 'function') {
      throw new Error('Tidings needs the Socket.IO client: load it first (window.io, ' +
        '/static/vendor/socket.io.min.js) or pass options.ioClient');
    }
    this._transport = new SocketIoTransport(this, options, io);
    this.socket = this._transport.socket;
  }
  this._transport.open();
}

Tidings.compareOffsets = compareOffsets;
Tidings.parseOffset = parseOffset;
Tidings.isValidTopic = isValidTopic;
Tidings.TidingsError = TidingsError; // for the browser build, which has one global

Tidings.prototype.on = function (event, fn) {
  if (!this._listeners[event]) throw new Error('unknown Tidings event: ' + event);
  if (typeof fn !== 'function') throw new TypeError('on(' + event + ', fn): fn must be a function');
  this._listeners[event].push(fn);
  if (event === 'state') fn(this.state); // late listeners learn the current state
  return this;
};

Tidings.prototype.off = function (event, fn) {
  const list = this._listeners[event] || [];
  const i = list.indexOf(fn);
  if (i >= 0) list.splice(i, 1);
  return this;
};

Tidings.prototype._emit = function (event, arg) {
  this._listeners[event].slice().forEach((fn) => {
    try {
      fn(arg);
    } catch (e) {
      report('Tidings ' + event + ' listener failed', e);
    }
  });
};

Tidings.prototype._setState = function (state) {
  if (STATES.indexOf(state) < 0 || state === this.state) return;
  this.state = state;
  this._emit('state', state);
};

/** The offset of the last publication delivered (or the position) for topic. */
Tidings.prototype.offset = function (topic) {
  const e = this._topics.get(topic);
  return e ? e.last : null;
};

Tidings.prototype.topics = function () {
  return Array.from(this._topics.keys());
};

/**
 * Subscribe to topic. onPublications(list, {recovered}) is called with the
 * publications in offset order, each exactly once. opts.since (an offset)
 * asks for history after it on the first subscribe; without it the topic
 * starts at its latest offset. Returns a Promise of the server's ack.
 */
Tidings.prototype.subscribe = function (topic, onPublications, opts) {
  if (this._closed) return Promise.reject(new Error('Tidings client is closed'));
  if (typeof onPublications !== 'function') {
    throw new TypeError('subscribe(topic, onPublications): onPublications must be a function');
  }
  if (!isValidTopic(topic)) {
    // The server's answer, without asking it: the SSE transport has no
    // per-topic answer to give, and both must refuse alike.
    return Promise.resolve().then(() => {
      this._emit('error', { topic: topic, error: 'invalid_topic' });
      return { ok: false, topic: topic, error: 'invalid_topic' };
    });
  }
  let entry = this._topics.get(topic);
  if (!entry) {
    const since = opts && opts.since !== undefined ? opts.since : null;
    if (since !== null && !parseOffset(since)) throw new TypeError('invalid since: ' + since);
    entry = {
      topic: topic,
      handler: onPublications,
      last: since, // last delivered offset (or starting position); null: none yet
      pending: false, // a subscribe is in flight, live publications are buffered
      attempt: 0, // id of the subscribe in flight; stale acks are ignored
      buffer: [],
      waiters: [], // resolve functions of subscribe() promises
      established: false, // a subscribe was acked ok: later ones are resubscribes
      retries: 0, // transient refusals in a row
    };
    this._topics.set(topic, entry);
  } else {
    entry.handler = onPublications;
  }
  const promise = new Promise((resolve) => { entry.waiters.push(resolve); });
  if (!entry.pending && this._transport.connected) this._sendSubscribe(entry);
  // Not connected: _connected() subscribes every topic.
  return promise;
};

/** Stop receiving topic and forget its offset. Returns a Promise of the ack. */
Tidings.prototype.unsubscribe = function (topic) {
  const entry = this._topics.get(topic);
  if (entry) {
    this._topics.delete(topic);
    entry.attempt = -1;
    this._settle(entry, { ok: false, topic: topic, error: 'unsubscribed' });
  }
  return this._transport.unsubscribe(topic);
};

/** Who is subscribed to topic: a Promise of {ok, topic, clients, users: [{sub, clients}]}. */
Tidings.prototype.presence = function (topic, opts) {
  return this._ask('presence', topic, opts);
};

/** How many are subscribed to topic: a Promise of {ok, topic, clients, users}. */
Tidings.prototype.presenceStats = function (topic, opts) {
  return this._ask('presence_stats', topic, opts);
};

/** Disconnect for good. */
Tidings.prototype.close = function () {
  this._closed = true;
  this._transport.close();
  this._setState('disconnected');
};

/** Ask the server about topic; the ack when ok, else a rejection with a TidingsError. */
Tidings.prototype._ask = function (event, topic, opts) {
  const fail = (code, message) => Promise.reject(new TidingsError(code, event + ' ' +
    JSON.stringify(topic) + ': ' + message, typeof topic === 'string' ? topic : null));
  if (this._closed) return fail('closed', 'the client is closed');
  if (!isValidTopic(topic)) return fail('invalid_topic', PRESENCE_MESSAGES.invalid_topic);
  if (!this._transport.request) {
    return fail('unsupported', 'needs the websocket transport (this client uses ' +
      this.transport + ')');
  }
  const timeout = (opts && opts.timeout) || this._ackTimeout;
  return this._transport.request(event, { topic: topic }, timeout).then((ack) => {
    if (ack && ack.ok) return ack;
    const code = (ack && ack.error) || 'error';
    return fail(code, PRESENCE_MESSAGES[code] || 'refused (' + code + ')');
  });
};

Tidings.prototype._settle = function (entry, ack) {
  const waiters = entry.waiters;
  entry.waiters = [];
  waiters.forEach((resolve) => resolve(ack));
};

/* ---- what the transports report ---------------------------------------- */

/** The transport is up: (re)subscribe every topic. */
Tidings.prototype._connected = function () {
  this._everConnected = true;
  this._setState('connected');
  this._topics.forEach((entry) => this._sendSubscribe(entry));
};

/** The transport is down; state says whether it comes back by itself. */
Tidings.prototype._lost = function (state) {
  this._topics.forEach((entry) => { entry.pending = false; entry.attempt++; });
  this._setState(this._closed ? 'disconnected' : state);
};

/** A try to connect failed; the transport tries again. */
Tidings.prototype._retrying = function () {
  this._setState(this._everConnected ? 'reconnecting' : 'connecting');
};

/** The server refused the connection (e.g. "invalid_token"): nothing is retried. */
Tidings.prototype._refused = function (error) {
  this._setState('disconnected');
  this._topics.forEach((entry) => {
    this._settle(entry, { ok: false, topic: entry.topic, error: error });
  });
  this._emit('error', { topic: null, error: error });
};

/** History did not cover what the transport missed on topic (SSE's `recovered: false`). */
Tidings.prototype._gap = function (topic) {
  if (this._topics.has(topic)) this._emit('gap', { topic: topic });
};

Tidings.prototype._publications = function (pubs) {
  if (!Array.isArray(pubs)) pubs = pubs ? [pubs] : [];
  // Group per topic, keeping arrival order inside each topic.
  const groups = new Map();
  pubs.forEach((p) => {
    if (!p || typeof p.topic !== 'string') return;
    let list = groups.get(p.topic);
    if (!list) groups.set(p.topic, (list = []));
    list.push(p);
  });
  groups.forEach((list, topic) => {
    const entry = this._topics.get(topic);
    if (!entry) return; // not (or no longer) subscribed
    if (entry.pending) {
      Array.prototype.push.apply(entry.buffer, list);
    } else {
      this._deliver(entry, list, false);
    }
  });
};

/** Server events `joins` / `leaves`: each member of a subscribed topic, one call each. */
Tidings.prototype._members = function (event, members) {
  if (!Array.isArray(members)) members = members ? [members] : [];
  members.forEach((m) => {
    if (m && typeof m.topic === 'string' && this._topics.has(m.topic)) this._emit(event, m);
  });
};

/* ---- subscribing --------------------------------------------------------- */

Tidings.prototype._sendSubscribe = function (entry) {
  const attempt = ++entry.attempt;
  // A topic that was still empty when we joined has no offset to resume
  // from: ask for everything history holds since its start (FROM_START).
  const since = entry.last !== null ? entry.last : entry.established ? FROM_START : null;
  const payload = since !== null ? { topic: entry.topic, since: since } : { topic: entry.topic };
  entry.pending = true;
  this._transport.subscribe(payload, this._ackTimeout, (err, ack) => {
    if (this._topics.get(entry.topic) !== entry || entry.attempt !== attempt) return; // stale
    if (err) {
      // No answer. Disconnected: _connected() resubscribes. Still
      // "connected": the transport reconnects (see dropConnection). Keep
      // buffering until then.
      if (this._transport.connected) this._transport.dropConnection();
      return;
    }
    this._onSubscribeAck(entry, since, ack || {});
  });
};

Tidings.prototype._onSubscribeAck = function (entry, since, ack) {
  const transient = TRANSIENT_ERRORS.indexOf(ack.error) >= 0 ||
    (ack.error === 'limit' && entry.established);
  if (!ack.ok && transient) {
    // The server cannot answer it right now (Redis down, or the subscribe
    // rate): keep the topic, its offset and the buffer, ask again later.
    this._emit('error', { topic: entry.topic, error: ack.error });
    const attempt = entry.attempt;
    entry.retries++;
    setTimeout(() => {
      if (this._topics.get(entry.topic) !== entry || entry.attempt !== attempt) return;
      if (this._transport.connected) this._sendSubscribe(entry);
    }, backoffDelay(entry.retries));
    return;
  }

  const buffered = entry.buffer;
  entry.buffer = [];
  entry.pending = false;
  entry.retries = 0;

  if (!ack.ok) {
    // forbidden, invalid_topic, limit: asking again would not help.
    this._topics.delete(entry.topic);
    this._emit('error', { topic: entry.topic, error: ack.error || 'error' });
    this._settle(entry, ack);
    return;
  }

  let recoveredCount = 0;
  if (since === null) {
    // Fresh subscription: start at the topic's latest offset (null: empty).
    entry.last = validOffset(ack.offset);
  } else if (ack.recovered === false) {
    const latest = validOffset(ack.offset);
    // No offset at all (the SSE transport cannot learn it): a gap cannot be ruled out.
    const nothingNewer = ack.offset === undefined ? false
      : latest === null ? since === FROM_START : compareOffsets(latest, since) <= 0;
    if (!nothingNewer) {
      // History no longer reaches back to `since`: tell the app, go on from now.
      entry.last = latest;
      this._emit('gap', { topic: entry.topic });
    }
  } else {
    recoveredCount = this._deliver(entry, ack.publications || [], true);
  }
  this._settle(entry, ack);
  this._deliver(entry, buffered, false);
  const resubscribed = entry.established;
  entry.established = true;
  if (resubscribed && recoveredCount > 0) {
    this._emit('recovered', { topic: entry.topic, count: recoveredCount });
  }
};

/** Deliver the publications above entry.last, in order; returns how many. */
Tidings.prototype._deliver = function (entry, pubs, recovered) {
  const fresh = [];
  for (let i = 0; i < pubs.length; i++) {
    const p = pubs[i];
    if (!p || (p.topic !== undefined && p.topic !== entry.topic)) continue;
    if (!parseOffset(p.offset)) continue; // malformed: cannot be ordered
    if (compareOffsets(p.offset, entry.last) <= 0) continue; // already delivered
    fresh.push(p);
    entry.last = p.offset;
  }
  if (fresh.length) {
    try {
      entry.handler(fresh, { recovered: recovered });
    } catch (e) {
      report('Tidings handler for ' + entry.topic + ' failed', e);
    }
  }
  return fresh.length;
};
