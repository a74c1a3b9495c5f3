// One load-generator process of the Tidings benchmark: N clients, each on a
// plain TCP socket framed by hand (no socket.io-client, not even `ws`):
//
// - transport "websocket" (the default): Socket.IO clients speaking Engine.IO
//   v4 / Socket.IO v5 over websocket (wsframe.js);
// - transport "sse": Server-Sent Events streams, `GET /sse?topic=...`
//   (ssestream.js), Tidings only.
//
//   node loadgen.js '{"url": "http://127.0.0.1:8000", "count": 100, "first": 0,
//                     "topics": ["public.bench"], "own_prefix": null,
//                     "transport": "websocket"}'
//
// A websocket client connects with transport=websocket, joins the default
// namespace, emits `subscribe` {topic} for each of its topics and waits for
// each ack {ok: true}; it then counts every publication of every
// `publications` event. An SSE client requests `/sse?topic=<t>&...` (all its
// topics in one stream), is ready at the stream's `subscribed` event, and
// counts every `publication` event; a 503 (the contract's "try again") is
// retried on a new connection. Each publication's data is {"t": <publish
// time, epoch ms>, "n": <sequence number in its topic>}, so the receiver
// computes the latency and counts what it got once, twice, or not at all.
//
// The harness drives the process with one JSON command per stdin line and
// reads one JSON event per stdout line:
//   (start)                  -> {"event": "ready", "connect_ms", "failed", ...}
//   {"cmd": "stat"}          -> {"event": "stat", "received", "last_ms", "open",
//                               "unexpected_closes", "server_closes",
//                               "keepalives", ...}
//   {"cmd": "reset"}         -> {"event": "reset"}   (forget what was received)
//   {"cmd": "window", "latfile": path}
//                            -> {"event": "window", "latencies": N}: the latencies
//                               since the last window (float64 ms) written to latfile
//                               and forgotten; the counts are kept (long runs: the
//                               soak asks every 10 s, so latencies never pile up)
//   {"cmd": "report", "expected": {topic: N}, "latfile": path}
//                            -> {"event": "report", "delivered", "lost", ...}
//                               and the latencies (float64 ms) written to latfile
//   {"cmd": "close"}         -> {"event": "closed"}, then the process exits
"use strict";

const fs = require("fs");
const { out, serve } = require("./lines.js");
const { performance } = require("perf_hooks");
const { EventStreamClient, parseEvent } = require("./ssestream.js");
const { FramedClient } = require("./wsframe.js");

const config = JSON.parse(process.argv[2]);
const count = config.count;
const first = config.first || 0;
const shared = config.topics || [];
const ownPrefix = config.own_prefix || null;
const inFlight = config.concurrency || 100;
const transport = config.transport || "websocket";
// A source address of its own per system lets several systems hold 10,000
// connections each without running out of ephemeral ports.
const localAddress = config.local_address || undefined;
const base = new URL(config.url);
const target = {
  hostname: base.hostname,
  port: Number(base.port || 80),
  host: base.host,
  path: "/socket.io/?EIO=4&transport=websocket",
};
if (transport !== "websocket" && transport !== "sse") {
  throw new Error(`unknown transport ${transport}`);
}

const origin = performance.timeOrigin;
const now = () => origin + performance.now();

// -- what was received -------------------------------------------------------

let latencies = new Float64Array(1 << 16);
let nLatencies = 0;
let received = 0; // publications, all clients
let events = 0; // `publications` events (frames), all clients
let firstMs = 0;
let lastMs = 0;
let stray = 0; // publications with no usable {t, n}
let subscribeRetries = 0; // subscribes answered "unavailable" and sent again
let keepalives = 0; // SSE keep-alive comments
let lastEventText = "";
let lastEventMessage = null;

// With config.trace, the sequence number of each latency too (latfile + ".n").
const trace = Boolean(config.trace);
let sequence = new Float64Array(trace ? 1 << 16 : 0);

function recordLatency(value, n) {
  if (nLatencies === latencies.length) {
    const bigger = new Float64Array(latencies.length * 2);
    bigger.set(latencies);
    latencies = bigger;
    if (trace) {
      const more = new Float64Array(latencies.length);
      more.set(sequence);
      sequence = more;
    }
  }
  if (trace) sequence[nLatencies] = n;
  latencies[nLatencies++] = value;
}

// -- the clients -------------------------------------------------------------

const clients = [];
let ready = 0;
let failed = 0;
let open = 0;
let unexpectedCloses = 0;
// The server ended a session: an engine.io CLOSE packet (a ping timeout), or
// the last chunk of an SSE response.
let serverCloses = 0;
const errors = [];
let closing = false;
let readyReported = false;
const startedMs = now();

function noteError(message) {
  if (errors.length < 5) errors.push(message);
}

// What both kinds of client share: their topics, their state, and how they
// count a publication.
const Counting = (Base) =>
  class extends Base {
    constructor(index, topics, ...transportArgs) {
      super(...transportArgs);
      this.index = index;
      this.topics = topics;
      // topic -> counts by n, one byte each: a 30-minute soak numbers 36,000
      // publications per topic, for every one of a thousand clients.
      this.seen = new Map();
      this.state = "connecting";
      this.retries = 0;
    }

    onSocketError(err) {
      noteError(`client ${this.index}: ${err.message}`);
      this.fail();
    }

    onSocketClose() {
      if (this.opened) open--;
      this.opened = false;
      if (!closing) {
        if (this.state === "ready") unexpectedCloses++;
        this.fail();
      }
      this.state = "closed";
    }

    fail() {
      if (this.state === "connecting" || this.state === "subscribing") {
        this.state = "failed";
        failed++;
        settle();
      }
      if (this.sock && !closing) this.sock.destroy();
    }

    becomeReady() {
      this.state = "ready";
      ready++;
      settle();
    }

    // One publication {topic, data: {t, n}} received at `at` (epoch ms).
    count(pub, at) {
      const data = pub && pub.data;
      if (!data || !Number.isInteger(data.n) || data.n < 0 || typeof data.t !== "number") {
        stray++;
        return;
      }
      const n = data.n;
      received++;
      recordLatency(at - data.t, n);
      let counts = this.seen.get(pub.topic);
      if (counts === undefined || n >= counts.length) {
        counts = grown(counts, n);
        this.seen.set(pub.topic, counts);
      }
      if (counts[n] < 255) counts[n]++;
    }
  };

// A timestamp for a publication event: the first and last of the process kept.
function receivedEvent() {
  const at = now();
  events++;
  if (firstMs === 0) firstMs = at;
  lastMs = at;
  return at;
}

class SocketIOClient extends Counting(FramedClient) {
  constructor(index) {
    super(index, topicsOf(index), target, localAddress);
    this.pendingAcks = 0;
  }

  onUpgraded() {
    open++;
  }

  onRefused(head) {
    noteError(`client ${this.index}: upgrade refused: ${head}`);
    this.fail();
  }

  onFrame(text) {
    const type = text.charCodeAt(0);
    if (type === 52 /* 4: message */) {
      const sub = text.charCodeAt(1);
      if (sub === 50 /* 2: event */) {
        this.onEvent(text);
      } else if (sub === 51 /* 3: ack */) {
        this.onAck(text);
      } else if (sub === 48 /* 0: namespace connected */) {
        this.subscribe();
      } else if (sub === 52 /* 4: connect error */) {
        noteError(`client ${this.index}: connect_error ${text.slice(2)}`);
        this.fail();
      }
    } else if (type === 50 /* 2: ping */) {
      this.send("3");
    } else if (type === 49 /* 1: close */) {
      serverCloses++;
    } else if (type === 48 /* 0: open */) {
      this.send("40");
    }
  }

  subscribe() {
    this.state = "subscribing";
    this.pendingAcks = this.topics.length;
    this.topics.forEach((_, i) => this.sendSubscribe(i + 1));
    if (this.pendingAcks === 0) this.becomeReady();
  }

  sendSubscribe(id) {
    const topic = this.topics[id - 1];
    this.send(`42${id}${JSON.stringify(["subscribe", { topic }])}`);
  }

  onAck(text) {
    let i = 2;
    while (i < text.length && text.charCodeAt(i) >= 48 && text.charCodeAt(i) <= 57) i++;
    const id = Number(text.slice(2, i));
    let answer;
    try {
      answer = JSON.parse(text.slice(i))[0];
    } catch {
      answer = null;
    }
    if (answer && answer.ok === false && answer.error === "unavailable" && this.retries < 100) {
      // The contract's "try again": Redis could not be read at that moment.
      this.retries++;
      subscribeRetries++;
      setTimeout(() => this.sendSubscribe(id), 20 + Math.random() * 80);
      return;
    }
    if (!answer || answer.ok !== true) {
      noteError(`client ${this.index}: subscribe refused ${text.slice(i, i + 200)}`);
      this.fail();
      return;
    }
    if (--this.pendingAcks === 0 && this.state === "subscribing") this.becomeReady();
  }

  onEvent(text) {
    // The clients of one process mostly receive the same frames one after the
    // other: an identical text (compared in full) is parsed once. Each client
    // still counts and times every publication of it as its own.
    let message;
    if (text === lastEventText) {
      message = lastEventMessage;
    } else {
      try {
        message = JSON.parse(text.slice(2));
      } catch {
        stray++;
        return;
      }
      lastEventText = text;
      lastEventMessage = message;
    }
    if (message[0] !== "publications" || !Array.isArray(message[1])) return;
    const at = receivedEvent();
    for (const pub of message[1]) this.count(pub, at);
  }
}

class SseClient extends Counting(EventStreamClient) {
  constructor(index) {
    const topics = topicsOf(index);
    const query = topics.map((topic) => `topic=${encodeURIComponent(topic)}`).join("&");
    super(index, topics, target, `/sse?${query}`, localAddress);
  }

  onOpened() {
    open++;
  }

  onRefused(status, line, body) {
    const sock = this.sock;
    if (status === 503 && this.retries < 100) {
      // The contract's "try again" (Redis or the queue unreachable for now),
      // on a new connection, as an EventSource would.
      this.retries++;
      subscribeRetries++;
      this.sock = null; // its close is not this client's failure
      sock.destroy();
      setTimeout(() => closing || this.start(), 20 + Math.random() * 80);
      return;
    }
    noteError(`client ${this.index}: ${line} ${body}`);
    this.fail();
  }

  onEnded() {
    serverCloses++;
    this.sock.destroy(); // its close counts it, as an unexpected close once ready
  }

  onEventText(text) {
    // Every stream of one topic set gets the same event text (its id is the
    // stream's position in each topic): an identical text is parsed once.
    let fields;
    if (text === lastEventText) {
      fields = lastEventMessage;
    } else {
      fields = parseEvent(text);
      if (fields.event === "publication") {
        try {
          fields.publication = JSON.parse(fields.data);
        } catch {
          fields.publication = null;
        }
      }
      lastEventText = text;
      lastEventMessage = fields;
    }
    if (fields.event === "publication") {
      this.count(fields.publication, receivedEvent());
    } else if (fields.data === null) {
      if (fields.retry === null) keepalives++; // not the stream's first block (`retry:`)
    } else if (fields.event === "subscribed" && this.state === "connecting") {
      this.becomeReady();
    } else {
      noteError(`client ${this.index}: event ${fields.event} ${String(fields.data).slice(0, 200)}`);
      stray++;
    }
  }
}

function topicsOf(index) {
  return ownPrefix ? [...shared, ownPrefix + index] : [...shared];
}

const Client = transport === "sse" ? SseClient : SocketIOClient;

// A copy of `counts` (or a new one) with room for index n: doubled, so a topic
// numbered 0..N costs log N copies.
function grown(counts, n) {
  let size = counts === undefined ? 64 : counts.length;
  while (size <= n) size *= 2;
  const bigger = new Uint8Array(size);
  if (counts !== undefined) bigger.set(counts);
  return bigger;
}

function settle() {
  if (!readyReported && ready + failed === count) {
    readyReported = true;
    out({
      event: "ready",
      connect_ms: now() - startedMs,
      started_ms: startedMs,
      ready,
      failed,
      subscribe_retries: subscribeRetries,
      errors,
    });
  }
  launch();
}

let launched = 0;
function launch() {
  // At most `inFlight` clients between their first byte and their last ack.
  while (launched < count && launched - ready - failed < inFlight) {
    const client = new Client(first + launched);
    clients.push(client);
    launched++;
    client.start();
  }
}

// -- commands ----------------------------------------------------------------

function writeLatencies(latfile) {
  fs.writeFileSync(latfile, Buffer.from(latencies.buffer, 0, nLatencies * 8));
  if (trace) fs.writeFileSync(latfile + ".n", Buffer.from(sequence.buffer, 0, nLatencies * 8));
}

function report(expected, latfile) {
  let delivered = 0;
  let distinct = 0;
  let duplicated = 0;
  let lost = 0;
  let clientsWithLoss = 0;
  let unexpected = 0;
  for (const client of clients) {
    let clientLost = 0;
    for (const topic of client.topics) {
      const n = expected[topic] || 0;
      const counts = client.seen.get(topic) || [];
      let got = 0;
      for (let k = 0; k < counts.length; k++) {
        const c = counts[k];
        if (c === 0) continue;
        delivered += c;
        if (k < n) {
          got++;
          duplicated += c - 1;
        } else {
          unexpected += c;
        }
      }
      distinct += got;
      clientLost += n - got;
    }
    for (const [topic, counts] of client.seen) {
      if (!client.topics.includes(topic)) {
        for (const c of counts) unexpected += c;
      }
    }
    lost += clientLost;
    if (clientLost > 0) clientsWithLoss++;
  }
  if (latfile) writeLatencies(latfile);
  out({
    event: "report",
    clients: clients.length,
    ready,
    failed,
    delivered,
    distinct,
    duplicated,
    lost,
    clients_with_loss: clientsWithLoss,
    unexpected,
    stray,
    events,
    first_ms: firstMs,
    last_ms: lastMs,
    latencies: nLatencies,
    unexpected_closes: unexpectedCloses,
    errors,
  });
}

serve({
  stat: () =>
    out({
      event: "stat",
      received,
      events,
      last_ms: lastMs,
      open,
      ready,
      failed,
      unexpected_closes: unexpectedCloses,
      server_closes: serverCloses,
      keepalives,
    }),
  reset: () => {
    for (const client of clients) client.seen.clear();
    nLatencies = 0;
    received = 0;
    events = 0;
    firstMs = 0;
    lastMs = 0;
    stray = 0;
    out({ event: "reset" });
  },
  window: (command) => {
    const count = nLatencies;
    writeLatencies(command.latfile);
    nLatencies = 0;
    out({ event: "window", latencies: count });
  },
  report: (command) => report(command.expected || {}, command.latfile),
  close: () => {
    closing = true;
    for (const client of clients) {
      if (client.sock) client.sock.destroy();
    }
  },
});

if (count === 0) settle();
else launch();
