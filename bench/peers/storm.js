// One client process of the reconnect-storm benchmark (bench/storm.py).
//
//   node storm.js '{"url": "http://127.0.0.1:8000", "kind": "tidings.js", "count": 1000,
//                   "first": 0, "shared": ["public.storm.all"], "own_prefix": "public.storm.c",
//                   "client": "/path/to/tidings.js", "local_address": "127.0.0.10"}'
//
// Two kinds of client, each subscribed to the shared topics and to
// <own_prefix><index>:
//
// - "tidings.js": Tidings' own browser client, webapp/static/tidings.js, on
//   the npm build of the Socket.IO client it ships with (socket.io-client
//   4.8.4, the vendored version): its reconnection backoff and jitter, its
//   resubscribe with `since`, its de-duplication by offset, unchanged.
// - "lean": the same rules on a hand-framed websocket (wsframe.js), for
//   numbers of clients whose socket.io-client would take the CPU the server
//   needs: socket.io-client's reconnection (delay 500 ms doubling to 5 s,
//   randomizationFactor 0.5, its formula), its 20 s connect timeout, and
//   tidings.js's subscribe rules (`since` = the last offset, or "0-0" for a
//   topic that was empty; `unavailable`, and `limit` on a resubscribe, asked
//   again after 1 s doubling to 15 s, x 0.75-1.25; no ack in 15 s drops the
//   connection; publications buffered while a subscribe is in flight, and
//   anything at or below the last offset dropped).
//
// Publications carry {"n": <sequence in its topic>}: what the application
// handler receives is counted per n (lost, twice, out of order).
//
// The harness drives the process with one JSON command per stdin line and
// reads one JSON event per stdout line:
//   (start)                          -> {"event": "ready", "ready", "failed", "errors"}
//   {"cmd": "mark", "at_ms": T}      -> {"event": "marked"}  (the kill happens after T)
//   {"cmd": "stat"}                  -> {"event": "stat", "back", "delivered"}
//   {"cmd": "report", "expected": {topic: N}}
//                                    -> {"event": "report", "clients": [...], "errors"}
//   {"cmd": "close"}                 -> {"event": "closed"}, then the process exits
"use strict";

const readline = require("readline");
const { FramedClient } = require("./wsframe.js");

const config = JSON.parse(process.argv[2]);
const inFlight = config.concurrency || 50;

function out(event) {
  process.stdout.write(JSON.stringify(event) + "\n");
}

const errors = [];
function noteError(message) {
  if (errors.length < 5) errors.push(message);
}

let markMs = Infinity; // events before the kill's mark are the initial connect's
let delivered = 0;
let closing = false;

// -- what one client saw, whichever kind ---------------------------------------

class Tally {
  constructor(index) {
    this.index = index;
    this.topics = [...(config.shared || []), config.own_prefix + index];
    this.seen = new Map(); // topic -> {counts: [], last: -1, outOfOrder: 0}
    this.connects = 0;
    this.acked = new Map(); // topic -> the connect its last ok ack answered
    this.backAt = 0; // epoch ms the client was last connected with every topic acked
    this.connectedAt = 0; // epoch ms of its last connect
    this.disconnects = []; // epoch ms, after the mark
    this.reasons = [];
    this.attempts = []; // epoch ms of each reconnection attempt, after the mark
    this.retries = 0; // subscribes answered `unavailable` or `limit` (asked again)
    this.gaps = 0; // `recovered: false` with something missed: the loss a client is told of
    this.wire = 0; // publications received, duplicates included (live and recovered)
    this.refused = null;
  }

  connected() {
    this.connects++;
    this.connectedAt = Date.now();
  }

  disconnected(reason) {
    const at = Date.now();
    if (at >= markMs) {
      this.disconnects.push(at);
      this.reasons.push(reason);
    }
  }

  attempt() {
    const at = Date.now();
    if (at >= markMs) this.attempts.push(at);
  }

  acknowledged(topic, isConnected) {
    this.acked.set(topic, this.connects);
    if (this.back(isConnected)) this.backAt = Date.now();
  }

  back(isConnected) {
    if (!isConnected) return false;
    for (const topic of this.topics) {
      if (this.acked.get(topic) !== this.connects) return false;
    }
    return true;
  }

  count(topic, pubs) {
    let seen = this.seen.get(topic);
    if (seen === undefined) {
      seen = { counts: [], last: -1, outOfOrder: 0 };
      this.seen.set(topic, seen);
    }
    for (const pub of pubs) {
      const n = pub.data && pub.data.n;
      if (typeof n !== "number") continue;
      delivered++;
      if (n <= seen.last) seen.outOfOrder++;
      seen.last = Math.max(seen.last, n);
      seen.counts[n] = (seen.counts[n] || 0) + 1;
    }
  }

  report(expected, isConnected) {
    let lost = 0;
    let twice = 0;
    let outOfOrder = 0;
    let got = 0;
    let unexpected = 0;
    for (const topic of this.topics) {
      const n = expected[topic] || 0;
      const seen = this.seen.get(topic) || { counts: [], outOfOrder: 0 };
      outOfOrder += seen.outOfOrder;
      for (let k = 0; k < seen.counts.length; k++) {
        const c = seen.counts[k];
        if (c === undefined) continue;
        if (k >= n) {
          unexpected += c;
          continue;
        }
        got += c;
        twice += c - 1;
      }
      let distinct = 0;
      for (let k = 0; k < n; k++) if (seen.counts[k]) distinct++;
      lost += n - distinct;
    }
    return {
      index: this.index,
      kind: config.kind,
      disconnected: this.disconnects.length ? this.disconnects[0] : null,
      disconnects: this.disconnects.length,
      reasons: [...new Set(this.reasons)],
      attempts: this.attempts,
      back: this.backAt >= markMs && this.back(isConnected) ? this.backAt : null,
      connected: this.connectedAt >= markMs ? this.connectedAt : null,
      retries: this.retries,
      gaps: this.gaps,
      delivered: got,
      lost,
      twice,
      out_of_order: outOfOrder,
      unexpected,
      wire: this.wire,
      refused: this.refused,
    };
  }
}

// -- tidings.js on socket.io-client ------------------------------------------------

let Tidings = null;
if (config.kind === "tidings.js") {
  // tidings.js is a browser script: it reads `io` from, and leaves `Tidings` on, the global object.
  globalThis.io = require("socket.io-client").io;
  require(config.client);
  Tidings = globalThis.Tidings;
  // Observe every subscribe answer that tidings.js accepts (first ones and
  // resubscribes alike); it goes on to handle it unchanged.
  const onSubscribeAck = Tidings.prototype._onSubscribeAck;
  if (typeof onSubscribeAck !== "function") {
    throw new Error(`${config.client} has no _onSubscribeAck: update bench/peers/storm.js`);
  }
  Tidings.prototype._onSubscribeAck = function (entry, since, ack) {
    const result = onSubscribeAck.apply(this, arguments);
    if (this.storm) this.storm.onAck(entry.topic, ack || {});
    return result;
  };
}

class BrowserMember {
  constructor(index) {
    this.tally = new Tally(index);
    const tally = this.tally;
    this.client = new Tidings({
      url: config.url,
      transports: ["websocket"],
      // One connection per client, as in a browser: socket.io-client would
      // multiplex clients of one URL over one connection otherwise.
      io: { forceNew: true, localAddress: config.local_address || undefined },
    });
    this.client.storm = this;
    this.client.on("gap", () => tally.gaps++);
    const socket = this.client.socket;
    socket.on("connect", () => tally.connected());
    socket.on("disconnect", (reason) => tally.disconnected(reason));
    socket.on("publications", (pubs) => {
      tally.wire += Array.isArray(pubs) ? pubs.length : 1;
    });
    socket.io.on("reconnect_attempt", () => tally.attempt());
  }

  subscribeAll() {
    return Promise.all(
      this.tally.topics.map((topic) =>
        this.client.subscribe(topic, (pubs) => this.tally.count(topic, pubs)),
      ),
    );
  }

  onAck(topic, ack) {
    const tally = this.tally;
    tally.wire += (ack.publications || []).length;
    if (ack.ok) {
      tally.acknowledged(topic, this.isConnected());
    } else if (ack.error === "unavailable" || ack.error === "limit") {
      tally.retries++;
    } else {
      tally.refused = `${topic}: ${ack.error}`;
    }
  }

  isConnected() {
    return this.client.socket.connected;
  }

  close() {
    this.client.close();
  }
}

// -- the lean client: the same rules, framed by hand -------------------------------

const BEGINNING = "0-0"; // tidings.js's FROM_START
const ACK_TIMEOUT_MS = 15000; // tidings.js's ackTimeout
const CONNECT_TIMEOUT_MS = 20000; // socket.io-client's `timeout`

// socket.io-client's Backoff (contrib/backo2.js) as tidings.js configures
// the Manager: reconnectionDelay 500, reconnectionDelayMax 5000, default
// randomizationFactor 0.5 and factor 2.
class Backoff {
  constructor() {
    this.attempts = 0;
  }

  duration() {
    let ms = 500 * Math.pow(2, this.attempts++);
    const rand = Math.random();
    const deviation = Math.floor(rand * 0.5 * ms);
    ms = (Math.floor(rand * 10) & 1) === 0 ? ms - deviation : ms + deviation;
    return Math.min(ms, 5000) | 0;
  }
}

function parseOffset(offset) {
  const m = typeof offset === "string" ? /^(\d+)-(\d+)$/.exec(offset) : null;
  return m ? [Number(m[1]), Number(m[2])] : null;
}

function compareOffsets(a, b) {
  if (a === null) return b === null ? 0 : -1;
  if (b === null) return 1;
  const pa = parseOffset(a);
  const pb = parseOffset(b);
  return pa[0] - pb[0] || pa[1] - pb[1];
}

let target = null;
if (config.kind === "lean") {
  const base = new URL(config.url);
  target = {
    hostname: base.hostname,
    port: Number(base.port || 80),
    host: base.host,
    path: "/socket.io/?EIO=4&transport=websocket",
  };
}

class LeanMember extends FramedClient {
  constructor(index) {
    super(target, config.local_address || undefined);
    this.tally = new Tally(index);
    this.backoff = new Backoff();
    this.entries = new Map(); // topic -> tidings.js's entry: last, pending, buffer, ...
    this.acks = new Map(); // ack id -> {entry, since, attempt, timer}
    this.nextId = 1;
    this.live = false; // the namespace is connected
    this.timer = null; // the connect timeout, or the reconnection delay
    this.waiters = [];
  }

  subscribeAll() {
    for (const topic of this.tally.topics) {
      this.entries.set(topic, {
        topic,
        last: null,
        pending: false,
        attempt: 0,
        buffer: [],
        retries: 0,
        established: false,
      });
    }
    const done = new Promise((resolve) => this.waiters.push(resolve));
    this.open();
    return done;
  }

  open() {
    this.start();
    this.timer = setTimeout(() => this.drop("timeout"), CONNECT_TIMEOUT_MS);
  }

  isConnected() {
    return this.live;
  }

  // -- the socket's and the protocol's events --

  onUpgraded() {}

  onRefused(head) {
    this.drop(`refused ${head.slice(9, 12)}`);
  }

  onSocketError() {
    this.drop("transport error");
  }

  onSocketClose() {
    this.drop("transport close");
  }

  onFrame(text) {
    const type = text.charCodeAt(0);
    if (type === 50 /* 2: ping */) {
      this.send("3");
    } else if (type === 48 /* 0: open */) {
      this.send("40");
    } else if (type === 52 /* 4: message */) {
      const sub = text.charCodeAt(1);
      if (sub === 50 /* 2: event */) this.onEvent(text);
      else if (sub === 51 /* 3: ack */) this.onAck(text);
      else if (sub === 48 /* 0: namespace connected */) this.onConnect();
      else if (sub === 49 /* 1: server disconnect */) this.onServerDisconnect();
      else if (sub === 52 /* 4: connect error */) {
        this.tally.refused = `connect_error ${text.slice(2, 80)}`;
        this.giveUp();
      }
    }
  }

  onConnect() {
    clearTimeout(this.timer);
    this.live = true;
    // socket.io-client resets its backoff once a (re)connection succeeds.
    this.backoff.attempts = 0;
    this.tally.connected();
    for (const entry of this.entries.values()) this.sendSubscribe(entry);
  }

  onServerDisconnect() {
    // tidings.js: the server closed the session on purpose; socket.io does
    // not retry by itself, so tidings.js comes back after a fixed 1 s.
    this.lose("io server disconnect");
    this.closeSocket();
    this.timer = setTimeout(() => {
      if (!closing) this.open();
    }, 1000);
  }

  // -- losing and reconnecting --

  lose(reason) {
    // A connection that was up; failed attempts are socket.io's connect_error.
    if (this.live) this.tally.disconnected(reason);
    this.live = false;
    for (const entry of this.entries.values()) {
      entry.pending = false;
      entry.attempt++;
    }
    for (const pending of this.acks.values()) clearTimeout(pending.timer);
    this.acks.clear();
  }

  closeSocket() {
    const sock = this.sock;
    this.sock = null;
    this.opened = false;
    if (sock) sock.destroy();
  }

  drop(reason) {
    // A transport failure, a connect timeout or a dead ack: socket.io-client
    // reconnects on its backoff.
    if (closing || this.sock === null) return;
    clearTimeout(this.timer);
    this.lose(reason);
    this.closeSocket();
    this.timer = setTimeout(() => this.reconnect(), this.backoff.duration());
  }

  reconnect() {
    if (closing) return;
    this.tally.attempt();
    this.open();
  }

  giveUp() {
    clearTimeout(this.timer);
    this.lose("refused");
    this.closeSocket();
    this.settle({ ok: false, error: this.tally.refused });
  }

  settle(ack) {
    const waiters = this.waiters;
    this.waiters = [];
    for (const resolve of waiters) resolve([ack]);
  }

  // -- subscribing, as tidings.js does --

  sendSubscribe(entry) {
    const id = this.nextId++;
    const attempt = ++entry.attempt;
    const since = entry.last !== null ? entry.last : entry.established ? BEGINNING : null;
    const payload = since !== null ? { topic: entry.topic, since } : { topic: entry.topic };
    entry.pending = true;
    const timer = setTimeout(() => {
      // No answer on a connection that looks up: it is not; drop it.
      if (this.acks.has(id)) this.drop("forced close");
    }, ACK_TIMEOUT_MS);
    this.acks.set(id, { entry, since, attempt, timer });
    this.send(`42${id}${JSON.stringify(["subscribe", payload])}`);
  }

  onAck(text) {
    let i = 2;
    while (i < text.length && text.charCodeAt(i) >= 48 && text.charCodeAt(i) <= 57) i++;
    const id = Number(text.slice(2, i));
    const pending = this.acks.get(id);
    if (pending === undefined) return;
    this.acks.delete(id);
    clearTimeout(pending.timer);
    const { entry, since, attempt } = pending;
    if (entry.attempt !== attempt) return; // stale
    let ack;
    try {
      ack = JSON.parse(text.slice(i))[0] || {};
    } catch {
      ack = {};
    }
    const tally = this.tally;
    tally.wire += (ack.publications || []).length;
    const transient = ack.error === "unavailable" || (ack.error === "limit" && entry.established);
    if (!ack.ok && transient) {
      tally.retries++;
      entry.retries++;
      const delay = Math.min(15000, 1000 * Math.pow(2, entry.retries - 1));
      setTimeout(
        () => {
          if (entry.attempt === attempt && this.live) this.sendSubscribe(entry);
        },
        delay * (0.75 + Math.random() / 2),
      );
      return;
    }
    const buffered = entry.buffer;
    entry.buffer = [];
    entry.pending = false;
    entry.retries = 0;
    if (!ack.ok) {
      tally.refused = `${entry.topic}: ${ack.error}`;
      this.settle(ack);
      return;
    }
    if (since === null) {
      entry.last = parseOffset(ack.offset) ? ack.offset : null;
    } else if (ack.recovered === false) {
      const latest = parseOffset(ack.offset) ? ack.offset : null;
      const nothingNewer =
        latest === null ? since === BEGINNING : compareOffsets(latest, since) <= 0;
      if (!nothingNewer) {
        entry.last = latest;
        tally.gaps++;
      }
    } else {
      this.deliver(entry, ack.publications || []);
    }
    this.deliver(entry, buffered);
    entry.established = true;
    tally.acknowledged(entry.topic, this.live);
    if (this.waiters.length && [...this.entries.values()].every((e) => e.established)) {
      this.settle({ ok: true });
    }
  }

  onEvent(text) {
    let message;
    try {
      message = JSON.parse(text.slice(2));
    } catch {
      return;
    }
    if (message[0] !== "publications" || !Array.isArray(message[1])) return;
    this.tally.wire += message[1].length;
    for (const pub of message[1]) {
      const entry = pub && this.entries.get(pub.topic);
      if (!entry) continue;
      if (entry.pending) entry.buffer.push(pub);
      else this.deliver(entry, [pub]);
    }
  }

  deliver(entry, pubs) {
    const fresh = [];
    for (const pub of pubs) {
      if (!pub || pub.topic !== entry.topic || !parseOffset(pub.offset)) continue;
      if (compareOffsets(pub.offset, entry.last) <= 0) continue; // already delivered
      fresh.push(pub);
      entry.last = pub.offset;
    }
    if (fresh.length) this.tally.count(entry.topic, fresh);
  }

  close() {
    clearTimeout(this.timer);
    for (const pending of this.acks.values()) clearTimeout(pending.timer);
    this.closeSocket();
  }
}

// -- the initial connect: at most `inFlight` clients between start and their last ack --

const Member = config.kind === "lean" ? LeanMember : BrowserMember;
const members = [];
let launched = 0;
let ready = 0;
let failed = 0;

function launch() {
  while (launched < config.count && launched - ready - failed < inFlight) {
    const member = new Member(config.first + launched);
    members.push(member);
    launched++;
    member.subscribeAll().then((acks) => {
      const bad = acks.find((ack) => !ack || !ack.ok);
      if (bad) {
        failed++;
        noteError(`client ${member.tally.index}: subscribe refused ${JSON.stringify(bad)}`);
      } else {
        ready++;
      }
      if (ready + failed === config.count) out({ event: "ready", ready, failed, errors });
      launch();
    });
  }
}

// -- commands ----------------------------------------------------------------

const input = readline.createInterface({ input: process.stdin });
input.on("line", (line) => {
  if (!line.trim()) return;
  const command = JSON.parse(line);
  switch (command.cmd) {
    case "mark":
      markMs = command.at_ms;
      out({ event: "marked" });
      break;
    case "stat": {
      let back = 0;
      for (const member of members) {
        if (member.tally.disconnects.length && member.tally.back(member.isConnected())) back++;
      }
      out({ event: "stat", back, delivered });
      break;
    }
    case "report":
      out({
        event: "report",
        clients: members.map((m) => m.tally.report(command.expected || {}, m.isConnected())),
        errors,
      });
      break;
    case "close":
      closing = true;
      for (const member of members) member.close();
      out({ event: "closed" });
      setTimeout(() => process.exit(0), 10);
      break;
    default:
      out({ event: "error", message: `unknown command ${command.cmd}` });
  }
});
input.on("close", () => process.exit(0));

if (config.count === 0) out({ event: "ready", ready: 0, failed: 0, errors });
else launch();
