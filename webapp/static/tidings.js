/*
 * tidings-client 0.1.0, browser build: a classic script defining window.Tidings.
 * The websocket transport needs the Socket.IO 4.x client loaded first
 * (window.io: /static/vendor/socket.io.min.js); the "sse" transport needs EventSource.
 *
 * GENERATED from clients/js/src by clients/js/scripts/build.mjs: edit those, then `make js`.
 */
(function (root) {
  'use strict';

  /* ---- src/backoff.js -------------------------------------------------------- */
  const RETRY_BASE_MS = 1000;
  const RETRY_MAX_MS = 15000;

  /**
   * Milliseconds to wait before try number `retries` (1, 2, ...): doubling from
   * 1 s up to 15 s, with +-25 % jitter so that clients refused together (a
   * server restart, Redis down) do not come back together.
   */
  function backoffDelay(retries) {
    const delay = Math.min(RETRY_MAX_MS, RETRY_BASE_MS * Math.pow(2, Math.max(0, retries - 1)));
    return delay * (0.75 + Math.random() / 2);
  }

  /* ---- src/errors.js --------------------------------------------------------- */
  /** A refusal or failure of a request, with the server's error code (`forbidden`, `presence_off`, ...). */
  class TidingsError extends Error {
    constructor(code, message, topic) {
      super(message);
      this.name = 'TidingsError';
      this.code = code;
      this.topic = topic === undefined ? null : topic;
    }
  }

  /* ---- src/offsets.js -------------------------------------------------------- */
  /*
   * Offsets and topics, as the contract defines them.
   *
   * An offset is a Redis stream id "<ms>-<seq>". Both parts are unsigned
   * decimal integers of any size, so they are compared as digit strings
   * (length first, then lexicographically) instead of as numbers: never as one
   * string, never as floats.
   */

  const OFFSET_RE = /^(\d+)-(\d+)$/;
  const TOPIC_RE = /^[A-Za-z0-9_.-]{1,128}$/;

  /** `since` for a topic that had no publication yet when it was subscribed. */
  const FROM_START = '0-0';

  function stripZeros(digits) {
    let i = 0;
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
    const m = OFFSET_RE.exec(offset);
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
    const pa = parseOffset(a);
    const pb = parseOffset(b);
    if (!pa || !pb) throw new TypeError('invalid offset: ' + (pa ? b : a));
    return compareDigits(pa[0], pb[0]) || compareDigits(pa[1], pb[1]);
  }

  /** Tell whether topic is 1 to 128 characters of A-Z a-z 0-9 _ . - */
  function isValidTopic(topic) {
    return typeof topic === 'string' && TOPIC_RE.test(topic);
  }

  /* ---- src/sse.js ------------------------------------------------------------ */
  /*
   * The Server-Sent Events transport: `GET /sse?topic=a&topic=b` (CONTRACT.md,
   * "Server-Sent Events"), one EventSource carrying all the client's topics,
   * the token as `?token=` (an EventSource cannot send headers).
   *
   * What an EventSource gives, and what this makes of it:
   *
   * - It reconnects by itself after a network failure, sending Last-Event-ID;
   *   the server resumes every topic of the stream from it and says with a
   *   `recovered` event whether history covered the gap. So a topic delivered
   *   continuously (on one stream, or across the overlap below) resubscribes
   *   as "recovered"; a topic on a stream that could not resume (a new one)
   *   resubscribes as not recovered, and the client reports a gap.
   * - Its topics are fixed: subscribing or unsubscribing opens a new stream.
   *   The old one stays open until the new one is open and OVERLAP_MS more;
   *   meanwhile the old one delivers the topics both carry and the new one's
   *   copies wait, then pass through the client's de-duplication by offset, so
   *   the switch neither loses nor doubles a publication.
   * - It does not say why it failed. An HTTP refusal closes it for good; the
   *   transport then asks again with fetch to read the status (404: the server
   *   has no /sse; 401: token; 400/403/429: a topic, asked one by one).
   */


  const CLOSED = 2; // EventSource.readyState: failed for good, no more retries
  const OVERLAP_MS = 2000;
  const REFUSALS = {
    400: 'invalid_topic',
    401: 'invalid_token',
    403: 'forbidden',
    404: 'sse_unavailable',
    429: 'limit',
  };
  // Refusals of the connection, not of a topic: nothing is retried.
  const CONNECTION_REFUSALS = ['invalid_token', 'sse_unavailable'];

  function sameTopics(set, list) {
    return set.size === list.length && list.every((topic) => set.has(topic));
  }

  class SseTransport {
    constructor(client, options) {
      this.name = 'sse';
      this.client = client;
      const EventSourceImpl = options.EventSource || globalThis.EventSource;
      if (typeof EventSourceImpl !== 'function') {
        throw new Error('the "sse" transport needs EventSource: browsers have it; in Node pass ' +
          'options.EventSource (e.g. the "eventsource" package)');
      }
      const fetchImpl = options.fetch || (globalThis.fetch && globalThis.fetch.bind(globalThis));
      if (typeof fetchImpl !== 'function') {
        throw new Error('the "sse" transport needs fetch (to learn why a stream was refused): ' +
          'pass options.fetch');
      }
      const endpoint = (options.url || '').replace(/\/+$/, '') + (options.ssePath || '/sse');
      if (!/^https?:\/\//.test(endpoint) && typeof location === 'undefined') {
        throw new Error('the "sse" transport needs options.url outside a browser page');
      }
      this._EventSource = EventSourceImpl;
      this._fetch = fetchImpl;
      this._endpoint = endpoint;
      this._token = options.token;
      this._withCredentials = !!options.withCredentials;
      this.connected = false;
      this._closed = false;
      this._wanted = new Set(); // the topics the client wants streamed
      this._continuous = new Set(); // topics delivered without a break since their subscribe was answered
      this._stream = null; // the open stream: {source, topics, open, held, buffer}
      this._next = null; // a stream opening to replace it
      this._overlap = null; // {old, stream, timer} while both are open
      this._waiting = new Map(); // topic -> subscribes waiting for a stream that carries it
      this._reshapeQueued = false;
      this._retries = 0;
      this._timer = null;
    }

    open() {
      this._connect();
    }

    close() {
      this._closed = true;
      clearTimeout(this._timer);
      this._closeStreams();
      this._dropWaiting();
      this.connected = false;
    }

    subscribe(payload, timeout, callback) {
      const topic = payload.topic;
      this._wanted.add(topic);
      const waiter = { payload: payload, callback: callback, timer: null };
      let list = this._waiting.get(topic);
      if (!list) this._waiting.set(topic, (list = []));
      list.push(waiter);
      waiter.timer = setTimeout(() => {
        const waiting = this._waiting.get(topic) || [];
        if (waiting.indexOf(waiter) >= 0) waiting.splice(waiting.indexOf(waiter), 1);
        callback(new Error('timeout'));
      }, timeout);
      this._queueReshape();
    }

    unsubscribe(topic) {
      this._wanted.delete(topic);
      this._continuous.delete(topic);
      (this._waiting.get(topic) || []).forEach((waiter) => clearTimeout(waiter.timer));
      this._waiting.delete(topic);
      this._queueReshape();
      return Promise.resolve({ ok: true });
    }

    /** A subscribe got no answer: start over, as after a failure. */
    dropConnection() {
      if (this.connected) this._restart();
    }

    /* ---- connecting -------------------------------------------------------- */

    _url(topics) {
      const query = topics.map((topic) => 'topic=' + encodeURIComponent(topic));
      const token = typeof this._token === 'function' ? this._token() : this._token;
      if (token) query.push('token=' + encodeURIComponent(token));
      return this._endpoint + (query.length ? '?' + query.join('&') : '');
    }

    /** GET the stream of topics and read the status only: null when served, else the error. */
    _check(topics) {
      const controller = typeof AbortController === 'function' ? new AbortController() : null;
      return this._fetch(this._url(topics), {
        headers: { Accept: 'text/event-stream' },
        credentials: this._withCredentials ? 'include' : 'same-origin',
        signal: controller ? controller.signal : undefined,
      }).then((response) => {
        if (controller) controller.abort(); // a served stream would never end
        if (response.status >= 200 && response.status < 300) return null;
        return REFUSALS[response.status] || 'unavailable';
      }, () => 'unavailable');
    }

    /** Is there an /sse to talk to? Then the client (re)subscribes everything. */
    _connect() {
      this._timer = null;
      if (this._closed) return;
      this._check([]).then((error) => {
        if (this._closed) return;
        // No topic at all: any answer but these says the endpoint is there.
        if (CONNECTION_REFUSALS.indexOf(error) >= 0) {
          this._refuse(error);
        } else if (error === 'unavailable') {
          this.client._retrying();
          this._retryLater(() => this._connect());
        } else {
          this._retries = 0;
          this.connected = true;
          this.client._connected();
        }
      });
    }

    _retryLater(fn) {
      this._retries++;
      clearTimeout(this._timer);
      this._timer = setTimeout(fn, backoffDelay(this._retries));
    }

    /** Everything down, then up again from the start: nothing can resume. */
    _restart() {
      this._closeStreams();
      this.connected = false;
      this._continuous.clear();
      this._dropWaiting();
      this.client._lost('reconnecting');
      this._retryLater(() => this._connect());
    }

    _refuse(error) {
      this._closeStreams();
      this.connected = false;
      this._dropWaiting();
      this.client._refused(error);
    }

    /** The client stops waiting for these (it resubscribes all on _connected). */
    _dropWaiting() {
      this._waiting.forEach((list) => list.forEach((waiter) => clearTimeout(waiter.timer)));
      this._waiting.clear();
    }

    _closeStreams() {
      this._endOverlap(false);
      [this._stream, this._next].forEach((stream) => { if (stream) stream.source.close(); });
      this._stream = null;
      this._next = null;
    }

    /* ---- the stream and its topics ------------------------------------------ */

    _queueReshape() {
      if (this._reshapeQueued) return;
      this._reshapeQueued = true;
      // After the current task: a page subscribing to ten topics opens one stream.
      Promise.resolve().then(() => {
        this._reshapeQueued = false;
        this._reshape();
      });
    }

    /** Open a stream of exactly the wanted topics, unless one is open or opening. */
    _reshape() {
      if (this._closed || !this.connected) return;
      const wanted = Array.from(this._wanted).sort();
      const target = this._next || this._stream;
      if (target && sameTopics(target.topics, wanted)) {
        if (target === this._stream && target.open) this._answer(target);
        return;
      }
      if (this._next) this._next.source.close();
      this._next = null;
      if (wanted.length === 0) {
        this._closeStreams(); // nothing to carry; still "connected"
        return;
      }
      this._next = this._openStream(wanted);
    }

    _openStream(topics) {
      const stream = { source: null, topics: new Set(topics), open: false, held: null, buffer: [] };
      const source = new this._EventSource(this._url(topics), { withCredentials: this._withCredentials });
      stream.source = source;
      source.onopen = () => this._onOpen(stream);
      source.onerror = () => this._onError(stream);
      source.addEventListener('publication', (event) => this._onPublication(stream, event));
      source.addEventListener('recovered', (event) => this._onRecovered(stream, event));
      return stream;
    }

    _onOpen(stream) {
      if (stream === this._next) {
        this._next = null;
        const old = this._stream;
        this._stream = stream;
        stream.open = true;
        this._retries = 0;
        if (old) this._startOverlap(old, stream);
        this._answer(stream);
      } else if (stream === this._stream) {
        // EventSource reconnected by itself with Last-Event-ID: the server
        // resumes every topic (a `recovered` event says if it could not).
        stream.open = true;
        if (!this.connected) {
          this.connected = true;
          this.client._connected();
        }
      } else {
        stream.source.close(); // replaced while it opened
      }
    }

    _onError(stream) {
      const failed = stream.source.readyState === CLOSED;
      if (this._overlap && stream === this._overlap.old) {
        this._endOverlap();
      } else if (stream === this._next) {
        // Still CONNECTING: EventSource tries again by itself, and the
        // subscribes waiting for it time out if it never opens.
        if (failed) {
          this._next = null;
          this._diagnose(stream);
        }
      } else if (stream === this._stream) {
        if (failed) {
          this._restart(); // an HTTP refusal on a reconnect: start over
        } else if (stream.open) {
          stream.open = false;
          this.connected = false;
          this._dropWaiting();
          this.client._lost('reconnecting'); // EventSource reconnects by itself
        }
      } else {
        stream.source.close();
      }
    }

    /** A new stream was refused: find out why, and answer the subscribes that wait for it. */
    _diagnose(stream) {
      stream.source.close();
      const waiting = Array.from(stream.topics).filter((topic) => this._waiting.has(topic));
      this._check(Array.from(stream.topics)).then((error) => {
        if (this._closed || !this.connected) return null;
        if (CONNECTION_REFUSALS.indexOf(error) >= 0) {
          this._refuse(error);
          return null;
        }
        if (error === null || waiting.length === 0) {
          // Served this time (or nothing waits for it): try again after a pause.
          this._retryLater(() => this._reshape());
          return null;
        }
        if (error === 'unavailable' || waiting.length === 1) {
          waiting.forEach((topic) => this._refuseTopic(topic, error));
          return null;
        }
        // Which of the topics? Ask about each one alone.
        return Promise.all(waiting.map((topic) => this._check([topic]))).then((errors) => {
          if (this._closed || !this.connected) return;
          const refused = waiting.filter((topic, i) => errors[i] !== null);
          if (refused.length === 0) {
            // None alone, all together (say, too many topics): refuse them all.
            waiting.forEach((topic) => this._refuseTopic(topic, error));
          } else {
            refused.forEach((topic) => this._refuseTopic(topic, errors[waiting.indexOf(topic)]));
          }
        });
      }).then(() => this._queueReshape());
    }

    _refuseTopic(topic, error) {
      this._wanted.delete(topic);
      const waiting = this._waiting.get(topic) || [];
      this._waiting.delete(topic);
      waiting.forEach((waiter) => {
        clearTimeout(waiter.timer);
        waiter.callback(null, { ok: false, topic: topic, error: error });
      });
    }

    /** Answer the subscribes waiting for topics this open stream carries. */
    _answer(stream) {
      stream.topics.forEach((topic) => {
        const waiting = this._waiting.get(topic);
        if (!waiting) return;
        this._waiting.delete(topic);
        const continuous = this._continuous.has(topic);
        this._continuous.add(topic);
        waiting.forEach((waiter) => {
          clearTimeout(waiter.timer);
          let ack;
          if (waiter.payload.since === undefined) {
            ack = { ok: true, topic: topic, offset: null, recovered: false, publications: [] };
          } else if (continuous) {
            ack = { ok: true, topic: topic, recovered: true, publications: [] };
          } else {
            // A new stream cannot start from an offset: the client reports a gap.
            ack = { ok: true, topic: topic, recovered: false, publications: [] };
          }
          waiter.callback(null, ack);
        });
      });
    }

    _startOverlap(old, stream) {
      this._endOverlap();
      const held = new Set();
      if (old.open) stream.topics.forEach((topic) => { if (old.topics.has(topic)) held.add(topic); });
      if (held.size === 0) {
        old.source.close();
        return;
      }
      stream.held = held;
      this._overlap = { old: old, stream: stream, timer: setTimeout(() => this._endOverlap(), OVERLAP_MS) };
    }

    /** Close the old stream; flush: hand over what the new one held back. */
    _endOverlap(flush) {
      const overlap = this._overlap;
      if (!overlap) return;
      this._overlap = null;
      clearTimeout(overlap.timer);
      overlap.old.source.close();
      const buffer = overlap.stream.buffer;
      overlap.stream.held = null;
      overlap.stream.buffer = [];
      if (flush !== false && buffer.length) this.client._publications(buffer);
    }

    _onPublication(stream, event) {
      const live = stream === this._stream || (this._overlap && stream === this._overlap.old);
      if (!live) return;
      let pub;
      try {
        pub = JSON.parse(event.data);
      } catch (e) {
        return; // not a publication: it has no offset to order it by
      }
      if (!pub || typeof pub.topic !== 'string') return;
      if (stream.held && stream.held.has(pub.topic)) {
        stream.buffer.push(pub);
      } else {
        this.client._publications([pub]);
      }
    }

    _onRecovered(stream, event) {
      if (stream !== this._stream) return;
      let info;
      try {
        info = JSON.parse(event.data);
      } catch (e) {
        return;
      }
      const recovered = typeof info === 'boolean' ? info : info && info.recovered;
      if (recovered !== false) return;
      let topics = Array.from(stream.topics);
      if (info && typeof info.topic === 'string') topics = [info.topic];
      else if (info && Array.isArray(info.topics)) topics = info.topics;
      else if (info && info.topics && typeof info.topics === 'object') {
        // The server's form: {"recovered": false, "topics": {topic: recovered, ...}}.
        topics = Object.keys(info.topics).filter((topic) => info.topics[topic] === false);
      }
      topics.forEach((topic) => this.client._gap(topic));
    }
  }

  /* ---- src/websocket.js ------------------------------------------------------ */
  /*
   * The Socket.IO transport (the default): the contract's events on one
   * Socket.IO connection, which reconnects by itself.
   */


  // Unsubscribing needs no answer to be right (the topic is forgotten here
  // first), so this only bounds how long the returned Promise can wait.
  const UNSUBSCRIBE_TIMEOUT_MS = 15000;
  // After the server closed the session on purpose (Socket.IO does not retry
  // by itself then; a restarting server says this too).
  const SERVER_DISCONNECT_RETRY_MS = 1000;

  class SocketIoTransport {
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

  /* ---- src/client.js --------------------------------------------------------- */
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
  function setDefaultIo(io) {
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
  function Tidings(options) {
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

  root.Tidings = Tidings;
})(typeof window !== 'undefined' ? window : globalThis);
