// One client process of the reconnect-storm benchmark (bench/storm.py).
//
//   node storm.js '{"url": "http://127.0.0.1:8000", "kind": "leanio", "count": 1000,
//                   "first": 0, "shared": ["public.storm.all"], "own_prefix": "public.storm.c",
//                   "client": "/path/to/tidings.js", "local_address": "127.0.0.10"}'
//
// Each client is Tidings' own browser client, webapp/static/tidings.js (its
// resubscribe with `since`, its de-duplication by offset, unchanged),
// subscribed to the shared topics and to <own_prefix><index>, on one of two
// Socket.IO clients:
//
// - "socket.io-client": the npm build of the Socket.IO client it ships with
//   (socket.io-client 4.8.4, the vendored version);
// - "leanio": leanio.js, the same reconnection backoff and jitter on a
//   hand-framed websocket, for numbers of clients whose socket.io-client
//   would take the CPU the server needs.
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

const { out, serve } = require("./lines.js");

const config = JSON.parse(process.argv[2]);
const inFlight = config.concurrency || 50;

const errors = [];
function noteError(message) {
  if (errors.length < 5) errors.push(message);
}

let markMs = Infinity; // events before the kill's mark are the initial connect's
let delivered = 0;

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

// -- tidings.js, on socket.io-client or on leanio.js ---------------------------------

// tidings.js is a browser script: it reads `io` from, and leaves `Tidings` on, the global object.
globalThis.io =
  config.kind === "leanio" ? require("./leanio.js").io : require("socket.io-client").io;
require(config.client);
const Tidings = globalThis.Tidings;
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

class Member {
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

// -- the initial connect: at most `inFlight` clients between start and their last ack --

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

serve({
  mark: (command) => {
    markMs = command.at_ms;
    out({ event: "marked" });
  },
  stat: () => {
    let back = 0;
    for (const member of members) {
      if (member.tally.disconnects.length && member.tally.back(member.isConnected())) back++;
    }
    out({ event: "stat", back, delivered });
  },
  report: (command) =>
    out({
      event: "report",
      clients: members.map((m) => m.tally.report(command.expected || {}, m.isConnected())),
      errors,
    }),
  close: () => {
    for (const member of members) member.close();
  },
});

if (config.count === 0) out({ event: "ready", ready: 0, failed: 0, errors });
else launch();
