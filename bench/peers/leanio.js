// A lean stand-in for socket.io-client's `io()`: as much of its Socket as
// webapp/static/tidings.js uses, on a hand-framed websocket (wsframe.js), so
// that thousands of tidings.js clients fit in a benchmark's CPU budget
// (socket.io-client costs about 1.4 ms of CPU per reconnection).
//
// Kept from socket.io-client 4.8: the reconnection (Manager + contrib/backo2:
// reconnectionDelay doubling to reconnectionDelayMax, randomizationFactor
// jitter, clamped after the jitter, reset once connected), the 20 s connect
// timeout, `connect_error` while still active, `disconnect` reasons
// ("transport close", "forced close", "io server disconnect", "io client
// disconnect"), acks with `timeout(ms)` failing on timeout or disconnect,
// and `socket.io.on("reconnect_attempt")` / `socket.io.engine.close()`.
// Websocket transport only; no auth, no binary, the default namespace.
"use strict";

const { FramedClient } = require("./wsframe.js");

class Backoff {
  constructor(min, max, jitter) {
    this.ms = min;
    this.max = max;
    this.jitter = jitter;
    this.attempts = 0;
  }

  // socket.io-client's contrib/backo2.js, factor 2.
  duration() {
    let ms = this.ms * Math.pow(2, this.attempts++);
    if (this.jitter) {
      const rand = Math.random();
      const deviation = Math.floor(rand * this.jitter * ms);
      ms = (Math.floor(rand * 10) & 1) === 0 ? ms - deviation : ms + deviation;
    }
    return Math.min(ms, this.max) | 0;
  }
}

class Listeners {
  constructor() {
    this.listeners = new Map();
  }

  on(event, fn) {
    if (!this.listeners.has(event)) this.listeners.set(event, []);
    this.listeners.get(event).push(fn);
    return this;
  }

  fire(event, ...args) {
    for (const fn of this.listeners.get(event) || []) fn(...args);
  }
}

class LeanSocket extends FramedClient {
  constructor(url, opts) {
    const base = new URL(url);
    super(
      {
        hostname: base.hostname,
        port: Number(base.port || 80),
        host: base.host,
        path: "/socket.io/?EIO=4&transport=websocket",
      },
      opts.localAddress,
    );
    this.events = new Listeners();
    this.backoff = new Backoff(
      opts.reconnectionDelay ?? 1000,
      opts.reconnectionDelayMax ?? 5000,
      opts.randomizationFactor ?? 0.5,
    );
    this.connectTimeout = opts.timeout ?? 20000;
    this.connected = false;
    this.active = false; // reconnecting on its own
    this.acks = new Map(); // id -> {callback, timer}
    this.nextId = 0;
    this.timer = null; // the connect timeout, or the wait before the next attempt
    const manager = new Listeners();
    manager.engine = { close: () => this.drop("forced close") };
    this.io = manager;
    if (opts.autoConnect !== false) this.connect();
  }

  on(event, fn) {
    this.events.on(event, fn);
    return this;
  }

  connect() {
    if (!this.active) {
      this.active = true;
      this.open();
    }
    return this;
  }

  disconnect() {
    this.active = false;
    clearTimeout(this.timer);
    this.closeSocket();
    if (this.connected) this.lose("io client disconnect");
    return this;
  }

  timeout(ms) {
    return {
      emit: (event, payload, callback) => {
        const id = this.nextId++;
        const timer = setTimeout(() => {
          this.acks.delete(id);
          callback(new Error("operation has timed out"));
        }, ms);
        this.acks.set(id, { callback, timer });
        this.send(`42${id}${JSON.stringify([event, payload])}`);
      },
    };
  }

  // -- the connection --

  open() {
    this.start();
    this.timer = setTimeout(() => this.drop("timeout"), this.connectTimeout);
  }

  closeSocket() {
    const sock = this.sock;
    this.sock = null;
    this.opened = false;
    if (sock) sock.destroy();
  }

  lose(reason) {
    this.connected = false;
    this.events.fire("disconnect", reason);
    // socket.io-client fails the acks that wait with a timeout.
    const acks = [...this.acks.values()];
    this.acks.clear();
    for (const { callback, timer } of acks) {
      clearTimeout(timer);
      callback(new Error("socket has been disconnected"));
    }
  }

  drop(reason) {
    if (this.sock === null) return;
    clearTimeout(this.timer);
    this.closeSocket();
    if (this.connected) this.lose(reason);
    else this.events.fire("connect_error", new Error(reason));
    if (this.active) this.reconnect();
  }

  reconnect() {
    this.timer = setTimeout(() => {
      this.io.fire("reconnect_attempt", this.backoff.attempts);
      this.open();
    }, this.backoff.duration());
  }

  onUpgraded() {}

  onRefused(head) {
    this.drop(`websocket error ${head.slice(9, 12)}`);
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
      if (sub === 50 /* 2: event */) {
        const [event, ...args] = JSON.parse(text.slice(2));
        this.events.fire(event, ...args);
      } else if (sub === 51 /* 3: ack */) {
        let i = 2;
        while (i < text.length && text.charCodeAt(i) >= 48 && text.charCodeAt(i) <= 57) i++;
        const id = Number(text.slice(2, i));
        const ack = this.acks.get(id);
        if (ack !== undefined) {
          this.acks.delete(id);
          clearTimeout(ack.timer);
          ack.callback(null, ...JSON.parse(text.slice(i)));
        }
      } else if (sub === 48 /* 0: namespace connected */) {
        clearTimeout(this.timer);
        this.connected = true;
        this.backoff.attempts = 0;
        this.events.fire("connect");
      } else if (sub === 49 /* 1: server disconnect */) {
        this.active = false;
        this.closeSocket();
        this.lose("io server disconnect");
      } else if (sub === 52 /* 4: connect error */) {
        this.active = false;
        clearTimeout(this.timer);
        this.closeSocket();
        const data = JSON.parse(text.slice(2) || "{}");
        this.events.fire("connect_error", new Error(data.message || "connect_error"));
      }
    }
  }
}

function io(url, opts) {
  return new LeanSocket(url, opts || {});
}

module.exports = { io };
