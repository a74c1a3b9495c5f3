/*
 * tidings.js: browser client for Tidings (plain ES2017, no build step).
 *
 * Needs the Socket.IO 4.x client loaded first (window.io, vendored in
 * static/vendor/socket.io.min.js).
 *
 *   const t = new Tidings({url, token, transports});
 *   t.on('state', (s) => ...);            // connecting | connected | reconnecting | disconnected
 *   t.on('recovered', ({topic, count}) => ...);
 *   t.on('gap', ({topic}) => ...);        // history no longer covers what we missed: resync
 *   t.on('error', ({topic, error}) => ...); // ack ok:false; topic null: connection refused
 *   await t.subscribe('orders.42', (pubs, {recovered}) => ...);
 *   t.unsubscribe('orders.42');
 *
 * Exactly-once delivery: the client remembers the offset of the last
 * publication it delivered for each topic, drops anything at or below it, and
 * resubscribes with `since` after every (re)connect so the server replays what
 * was missed from the topic's history. A subscribe refused as `unavailable`
 * (the server's Redis is down) is retried with backoff; other refusals
 * (forbidden, invalid_topic, limit) drop the topic.
 */
(function (root) {
  'use strict';

  var STATES = ['connecting', 'connected', 'reconnecting', 'disconnected'];
  var EVENTS = ['state', 'recovered', 'gap', 'error'];
  var OFFSET_RE = /^(\d+)-(\d+)$/;
  // Subscribe errors worth retrying (the server's Redis is down); any other
  // error (forbidden, invalid_topic, limit) ends the subscription, except
  // `limit` on a resubscribe: a topic accepted before can only have met the
  // subscribe rate (a client with many topics resubscribing all at once).
  var TRANSIENT_ERRORS = ['unavailable'];
  // `since` for a topic that had no publication yet when it was subscribed.
  var FROM_START = '0-0';
  var RETRY_BASE_MS = 1000;
  var RETRY_MAX_MS = 15000;

  /* ---- offsets ---------------------------------------------------------
   * An offset is a Redis stream id "<ms>-<seq>". Both parts are unsigned
   * decimal integers of any size, so they are compared as digit strings
   * (length first, then lexicographically) instead of as numbers: never as
   * one string, never as floats. */

  function stripZeros(digits) {
    var i = 0;
    while (i < digits.length - 1 && digits.charAt(i) === '0') i++;
    return digits.slice(i);
  }

  function compareDigits(a, b) {
    a = stripZeros(a);
    b = stripZeros(b);
    if (a.length !== b.length) return a.length < b.length ? -1 : 1;
    if (a === b) return 0;
    return a < b ? -1 : 1;
  }

  /** Parse "<ms>-<seq>" into [ms, seq] digit strings, or null if malformed. */
  function parseOffset(offset) {
    if (typeof offset !== 'string') return null;
    var m = OFFSET_RE.exec(offset);
    return m ? [m[1], m[2]] : null;
  }

  /** offset itself when well formed, else null. */
  function validOffset(offset) {
    return parseOffset(offset) ? offset : null;
  }

  /** -1, 0 or 1 as a is before, equal to or after b. null sorts first. */
  function compareOffsets(a, b) {
    if (a === null || a === undefined) return b === null || b === undefined ? 0 : -1;
    if (b === null || b === undefined) return 1;
    var pa = parseOffset(a);
    var pb = parseOffset(b);
    if (!pa || !pb) throw new TypeError('invalid offset: ' + (pa ? b : a));
    return compareDigits(pa[0], pb[0]) || compareDigits(pa[1], pb[1]);
  }

  /* ---- the client ------------------------------------------------------ */

  function Tidings(options) {
    if (!(this instanceof Tidings)) return new Tidings(options);
    options = options || {};
    if (typeof root.io !== 'function') {
      throw new Error('Tidings needs the Socket.IO client (window.io) loaded first');
    }
    this._listeners = {};
    EVENTS.forEach(function (e) { this._listeners[e] = []; }, this);
    this._topics = new Map(); // topic -> entry (see _entry)
    this._ackTimeout = options.ackTimeout || 15000;
    this._closed = false;
    this._everConnected = false;
    this.state = 'connecting';

    var token = options.token;
    var ioOptions = Object.assign({
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
      ioOptions.auth = function (cb) {
        cb({ token: typeof token === 'function' ? token() : token });
      };
    }
    this.socket = options.url ? root.io(options.url, ioOptions) : root.io(ioOptions);
    this._bindSocket();
    this.socket.connect();
  }

  Tidings.compareOffsets = compareOffsets;
  Tidings.parseOffset = parseOffset;

  Tidings.prototype.on = function (event, fn) {
    if (!this._listeners[event]) throw new Error('unknown Tidings event: ' + event);
    this._listeners[event].push(fn);
    if (event === 'state') fn(this.state); // late listeners learn the current state
    return this;
  };

  Tidings.prototype.off = function (event, fn) {
    var list = this._listeners[event] || [];
    var i = list.indexOf(fn);
    if (i >= 0) list.splice(i, 1);
    return this;
  };

  Tidings.prototype._emit = function (event, arg) {
    this._listeners[event].slice().forEach(function (fn) {
      try {
        fn(arg);
      } catch (e) {
        if (root.console) root.console.error('Tidings ' + event + ' listener failed', e);
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
    var e = this._topics.get(topic);
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
    var entry = this._topics.get(topic);
    if (!entry) {
      var since = opts && opts.since !== undefined ? opts.since : null;
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
      };
      this._topics.set(topic, entry);
    } else {
      entry.handler = onPublications;
    }
    var promise = new Promise(function (resolve) { entry.waiters.push(resolve); });
    if (!entry.pending && this.socket.connected) this._sendSubscribe(entry);
    // Not connected: the 'connect' handler subscribes every topic.
    return promise;
  };

  /** Stop receiving topic and forget its offset. Returns a Promise of the ack. */
  Tidings.prototype.unsubscribe = function (topic) {
    var entry = this._topics.get(topic);
    if (entry) {
      this._topics.delete(topic);
      entry.attempt = -1;
      this._settle(entry, { ok: false, topic: topic, error: 'unsubscribed' });
    }
    var socket = this.socket;
    if (!socket.connected) return Promise.resolve({ ok: true });
    return new Promise(function (resolve) {
      socket.timeout(15000).emit('unsubscribe', { topic: topic }, function (err, ack) {
        resolve(err ? { ok: false, error: String(err.message || err) } : ack);
      });
    });
  };

  /** Disconnect for good. */
  Tidings.prototype.close = function () {
    this._closed = true;
    this.socket.disconnect();
    this._setState('disconnected');
  };

  Tidings.prototype._settle = function (entry, ack) {
    var waiters = entry.waiters;
    entry.waiters = [];
    waiters.forEach(function (resolve) { resolve(ack); });
  };

  Tidings.prototype._bindSocket = function () {
    var self = this;
    var socket = this.socket;

    socket.on('connect', function () {
      self._everConnected = true;
      self._setState('connected');
      self._topics.forEach(function (entry) { self._sendSubscribe(entry); });
    });

    socket.on('disconnect', function (reason) {
      self._topics.forEach(function (entry) { entry.pending = false; entry.attempt++; });
      if (self._closed || reason === 'io client disconnect') {
        self._setState('disconnected');
      } else if (reason === 'io server disconnect') {
        // The server closed this session on purpose: Socket.IO does not retry
        // by itself. Come back after a pause (a restarting server says this too).
        self._setState('reconnecting');
        setTimeout(function () { if (!self._closed && !socket.connected) socket.connect(); }, 1000);
      } else {
        self._setState('reconnecting'); // Socket.IO reconnects by itself
      }
    });

    socket.on('connect_error', function (err) {
      if (socket.active) {
        // Transport-level failure: Socket.IO keeps retrying.
        self._setState(self._everConnected ? 'reconnecting' : 'connecting');
      } else {
        // Refused by the server (e.g. "invalid_token"): no retry.
        var error = (err && err.message) || 'connect_error';
        self._setState('disconnected');
        self._topics.forEach(function (entry) {
          self._settle(entry, { ok: false, topic: entry.topic, error: error });
        });
        self._emit('error', { topic: null, error: error });
      }
    });

    socket.on('publications', function (pubs) {
      if (!Array.isArray(pubs)) pubs = pubs ? [pubs] : [];
      // Group per topic, keeping arrival order inside each topic.
      var groups = new Map();
      pubs.forEach(function (p) {
        if (!p || typeof p.topic !== 'string') return;
        var list = groups.get(p.topic);
        if (!list) groups.set(p.topic, (list = []));
        list.push(p);
      });
      groups.forEach(function (list, topic) {
        var entry = self._topics.get(topic);
        if (!entry) return; // not (or no longer) subscribed
        if (entry.pending) {
          Array.prototype.push.apply(entry.buffer, list);
        } else {
          self._deliver(entry, list, false);
        }
      });
    });
  };

  Tidings.prototype._sendSubscribe = function (entry) {
    var self = this;
    var attempt = ++entry.attempt;
    // A topic that was still empty when we joined has no offset to resume
    // from: ask for everything history holds since its start (FROM_START).
    var since = entry.last !== null ? entry.last : entry.established ? FROM_START : null;
    var payload = since !== null ? { topic: entry.topic, since: since } : { topic: entry.topic };
    entry.pending = true;
    this.socket.timeout(this._ackTimeout).emit('subscribe', payload, function (err, ack) {
      if (self._topics.get(entry.topic) !== entry || entry.attempt !== attempt) return; // stale
      if (err) {
        // No answer. Disconnected: the 'connect' handler resubscribes. Still
        // "connected": the connection is not (a half-open path, a wedged
        // server), and asking again on it would leave the topic silent; drop
        // the transport as a network failure would, so Socket.IO reconnects
        // and resubscribes everything. Keep buffering until then.
        if (self.socket.connected && self.socket.io.engine) self.socket.io.engine.close();
        return;
      }
      self._onSubscribeAck(entry, since, ack || {});
    });
  };

  Tidings.prototype._onSubscribeAck = function (entry, since, ack) {
    var transient = TRANSIENT_ERRORS.indexOf(ack.error) >= 0 ||
      (ack.error === 'limit' && entry.established);
    if (!ack.ok && transient) {
      // The server cannot answer it right now (Redis down, or the subscribe
      // rate): keep the topic, its offset and the buffer, ask again later.
      this._emit('error', { topic: entry.topic, error: ack.error });
      var self = this;
      var attempt = entry.attempt;
      entry.retries = (entry.retries || 0) + 1;
      var delay = Math.min(RETRY_MAX_MS, RETRY_BASE_MS * Math.pow(2, entry.retries - 1));
      setTimeout(function () {
        if (self._topics.get(entry.topic) !== entry || entry.attempt !== attempt) return;
        if (self.socket.connected) self._sendSubscribe(entry);
      }, delay * (0.75 + Math.random() / 2));
      return;
    }

    var buffered = entry.buffer;
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

    var recoveredCount = 0;
    if (since === null) {
      // Fresh subscription: start at the topic's latest offset (null: empty).
      entry.last = validOffset(ack.offset);
    } else if (ack.recovered === false) {
      var latest = validOffset(ack.offset);
      var nothingNewer = latest === null ? since === FROM_START : compareOffsets(latest, since) <= 0;
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
    var resubscribed = entry.established;
    entry.established = true;
    if (resubscribed && recoveredCount > 0) {
      this._emit('recovered', { topic: entry.topic, count: recoveredCount });
    }
  };

  /** Deliver the publications above entry.last, in order; returns how many. */
  Tidings.prototype._deliver = function (entry, pubs, recovered) {
    var fresh = [];
    for (var i = 0; i < pubs.length; i++) {
      var p = pubs[i];
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
        if (root.console) root.console.error('Tidings handler for ' + entry.topic + ' failed', e);
      }
    }
    return fresh.length;
  };

  root.Tidings = Tidings;
})(typeof window !== 'undefined' ? window : globalThis);
