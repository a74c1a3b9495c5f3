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

import { backoffDelay } from './backoff.js';

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

export class SseTransport {
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
