// Presence benchmark clients: N Socket.IO clients with tokens, framed by hand
// on plain TCP sockets as loadgen.js does, that subscribe to one topic each
// and then churn on command.
//
//   node presence.js '{"url": "http://127.0.0.1:8000", "tokens": "/tmp/tokens",
//                      "first": 0, "count": 1000, "topics": ["room.0", ...]}'
//
// Client i connects with the token on line `first + i` of the tokens file
// (none when the file is not given) and subscribes to topics[i % topics.length].
//   (start)                                  -> {"event": "ready", "ready", "failed", ...}
//   {"cmd": "churn", "rate": 50, "seconds": 20, "topics": [...]}
//        every 1/rate s, one client (in turn) leaves its topic and joins another
//                                            -> {"event": "churned", "moves", "refused", "late_ms"}
//   {"cmd": "close"}                         -> {"event": "closed"}, then the process exits
"use strict";

const fs = require("fs");
const readline = require("readline");
const crypto = require("crypto");
const net = require("net");

const config = JSON.parse(process.argv[2]);
const count = config.count;
const first = config.first || 0;
const topics = config.topics;
const inFlight = config.concurrency || 100;
const tokens = config.tokens ? fs.readFileSync(config.tokens, "utf8").split("\n") : null;
const base = new URL(config.url);

function out(event) {
  process.stdout.write(JSON.stringify(event) + "\n");
}

let ready = 0;
let failed = 0;
let refused = 0;
let readyReported = false;
const errors = [];
const clients = [];

class Client {
  constructor(index) {
    this.index = index;
    this.topic = topics[index % topics.length];
    this.nextId = 1;
    this.pending = null;
    this.opened = false;
    this.state = "connecting";
  }

  start() {
    const sock = net.connect({ host: base.hostname, port: Number(base.port) });
    this.sock = sock;
    sock.setNoDelay(true);
    sock.on("connect", () => {
      const key = crypto.randomBytes(16).toString("base64");
      sock.write(
        `GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: ${base.host}\r\n` +
          `Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\n` +
          "Sec-WebSocket-Version: 13\r\n\r\n",
      );
    });
    sock.on("data", (chunk) => this.onData(chunk));
    sock.on("error", (err) => this.fail(err.message));
    sock.on("close", () => this.fail("closed"));
  }

  fail(why) {
    if (this.state === "connecting") {
      this.state = "failed";
      failed++;
      if (errors.length < 5) errors.push(`client ${this.index}: ${why}`);
      settle();
    }
  }

  onData(chunk) {
    let buf = this.pending === null ? chunk : Buffer.concat([this.pending, chunk]);
    this.pending = null;
    let pos = 0;
    if (!this.opened) {
      const end = buf.indexOf("\r\n\r\n");
      if (end < 0) {
        this.pending = buf;
        return;
      }
      this.opened = true;
      pos = end + 4;
    }
    while (pos + 2 <= buf.length) {
      let size = buf[pos + 1] & 0x7f;
      let head = 2;
      if (size === 126) {
        if (pos + 4 > buf.length) break;
        size = buf.readUInt16BE(pos + 2);
        head = 4;
      } else if (size === 127) {
        if (pos + 10 > buf.length) break;
        size = buf.readUInt32BE(pos + 2) * 4294967296 + buf.readUInt32BE(pos + 6);
        head = 10;
      }
      if (pos + head + size > buf.length) break;
      const opcode = buf[pos] & 0x0f;
      const start = pos + head;
      pos = start + size;
      // Unfragmented text frames only: the server sends no others to these clients.
      if (opcode === 1) this.onFrame(buf.toString("utf8", start, pos));
    }
    if (pos < buf.length) this.pending = buf.subarray(pos);
  }

  send(text) {
    const payload = Buffer.from(text);
    const size = payload.length;
    const head = size < 126 ? 6 : 8;
    const frame = Buffer.alloc(head + size); // zero mask: the payload goes as is
    frame[0] = 0x81;
    if (size < 126) {
      frame[1] = 0x80 | size;
    } else {
      frame[1] = 0x80 | 126;
      frame.writeUInt16BE(size, 2);
    }
    payload.copy(frame, head);
    if (!this.sock.destroyed) this.sock.write(frame);
  }

  emit(event, payload) {
    this.send(`42${this.nextId++}${JSON.stringify([event, payload])}`);
  }

  onFrame(text) {
    if (text.startsWith("0")) {
      const token = tokens ? tokens[first + this.index] : null;
      this.send(token ? `40${JSON.stringify({ token })}` : "40");
    } else if (text === "2") {
      this.send("3");
    } else if (text.startsWith("40")) {
      this.emit("subscribe", { topic: this.topic });
    } else if (text.startsWith("44")) {
      this.fail(`connect_error ${text.slice(2)}`);
    } else if (text.startsWith("43")) {
      const ok = text.includes('"ok":true');
      if (this.state === "connecting") {
        if (!ok) return this.fail(`subscribe refused ${text.slice(0, 120)}`);
        this.state = "ready";
        ready++;
        settle();
      } else if (!ok && text.includes('"error"')) {
        refused++;
      }
    }
  }

  move(to) {
    this.emit("unsubscribe", { topic: this.topic });
    this.topic = to;
    this.emit("subscribe", { topic: to });
  }
}

function settle() {
  if (!readyReported && ready + failed === count) {
    readyReported = true;
    out({ event: "ready", ready, failed, errors });
  }
  launch();
}

let launched = 0;
function launch() {
  while (launched < count && launched - ready - failed < inFlight) {
    const client = new Client(launched);
    clients.push(client);
    launched++;
    client.start();
  }
}

function churn(rate, seconds, choices) {
  const live = clients.filter((c) => c.state === "ready");
  const total = Math.round(rate * seconds);
  const started = Date.now();
  let moves = 0;
  let lateMs = 0;
  refused = 0;
  const step = () => {
    const due = started + (moves * 1000) / rate;
    lateMs = Math.max(lateMs, Date.now() - due);
    const client = live[moves % live.length];
    let to = choices[Math.floor(Math.random() * choices.length)];
    if (to === client.topic) to = choices[(choices.indexOf(to) + 1) % choices.length];
    client.move(to);
    moves++;
    if (moves < total) {
      setTimeout(step, Math.max(0, started + (moves * 1000) / rate - Date.now()));
    } else {
      // Let the last acks come back before reporting.
      setTimeout(() => out({ event: "churned", moves, refused, late_ms: lateMs }), 500);
    }
  };
  step();
}

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const command = JSON.parse(line);
  if (command.cmd === "churn") {
    churn(command.rate, command.seconds, command.topics);
  } else if (command.cmd === "close") {
    for (const client of clients) client.sock.destroy();
    out({ event: "closed" });
    process.exit(0);
  }
});

launch();
