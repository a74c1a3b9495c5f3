// A minimal Server-Sent Events client on a plain TCP socket, for the load
// generator (loadgen.js): one `GET` over HTTP/1.1, the response's chunked
// transfer encoding (gevent's pywsgi streams a body of unknown length
// chunked) and the event stream's blank-line framing undone in one loop over
// each received chunk, like wsframe.js does for websocket frames.
//
// A subclass implements the hooks: onOpened() (a 200 head received),
// onEventText(text) (one whole event block, its lines without the blank line
// that ends it; parseEvent reads it), onRefused(status, head, body) (any other
// status), onEnded() (the server ended the response) and onSocketError(err) /
// onSocketClose() (the TCP socket's own events). Tidings ends every line with
// "\n": a "\r\n" server's events would not be split.
"use strict";

const net = require("net");

const BLANK_LINE = Buffer.from("\n\n");

class EventStreamClient {
  // target: {hostname, port, host}; path: the request's path and query.
  constructor(target, path, localAddress) {
    this.target = target;
    this.path = path;
    this.localAddress = localAddress;
    this.sock = null;
    this.opened = false;
    this.pending = null; // bytes of an unfinished head or chunk-size line
    this.rest = null; // body bytes of an unfinished event
    this.chunked = false;
    this.left = 0; // data bytes left in the current chunk
    this.skip = 0; // bytes of the CRLF after a chunk's data still to skip
  }

  start() {
    const target = this.target;
    const sock = net.connect({
      host: target.hostname,
      port: target.port,
      localAddress: this.localAddress,
    });
    this.sock = sock;
    this.opened = false;
    this.pending = null;
    this.rest = null;
    this.left = 0;
    this.skip = 0;
    sock.setNoDelay(true);
    sock.on("connect", () => {
      sock.write(
        `GET ${this.path} HTTP/1.1\r\nHost: ${target.host}\r\n` +
          "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n",
      );
    });
    sock.on("data", (chunk) => {
      if (this.sock === sock) this.onData(chunk);
    });
    sock.on("error", (err) => {
      if (this.sock === sock) this.onSocketError(err);
    });
    sock.on("close", () => {
      if (this.sock === sock) this.onSocketClose();
    });
  }

  closed() {
    return this.sock === null || this.sock.destroyed;
  }

  onData(chunk) {
    if (this.closed()) return; // a hook closed it (the last chunk, a refusal)
    let buf = this.pending === null ? chunk : Buffer.concat([this.pending, chunk]);
    this.pending = null;
    let pos = 0;
    if (!this.opened) {
      const end = buf.indexOf("\r\n\r\n");
      if (end < 0) {
        this.pending = buf;
        return;
      }
      const head = buf.toString("latin1", 0, end);
      const status = Number(head.slice(9, 12));
      if (!head.startsWith("HTTP/1.") || status !== 200) {
        this.onRefused(status, head.split("\r\n", 1)[0], buf.toString("utf8", end + 4, end + 204));
        return;
      }
      this.chunked = /\r\ntransfer-encoding:[ \t]*chunked/i.test(head);
      this.opened = true;
      this.onOpened();
      pos = end + 4;
    }
    if (!this.chunked) {
      if (pos < buf.length) this.onBody(buf.subarray(pos));
      return;
    }
    const length = buf.length;
    while (pos < length) {
      if (this.left > 0) {
        const end = Math.min(length, pos + this.left);
        this.onBody(buf.subarray(pos, end));
        if (this.closed()) return; // a hook closed it
        this.left -= end - pos;
        pos = end;
        if (this.left === 0) this.skip = 2;
      } else if (this.skip > 0) {
        const skipped = Math.min(this.skip, length - pos);
        this.skip -= skipped;
        pos += skipped;
      } else {
        const eol = buf.indexOf(10, pos);
        if (eol < 0) {
          this.pending = buf.subarray(pos);
          return;
        }
        const line = buf.toString("latin1", pos, eol);
        const size = parseInt(line, 16); // stops at ";ext" and "\r"
        pos = eol + 1;
        if (Number.isNaN(size)) {
          this.onSocketError(new Error(`bad chunk size line ${JSON.stringify(line)}`));
          return;
        }
        if (size === 0) {
          this.onEnded(); // the last chunk: the server ended the stream
          return;
        }
        this.left = size;
      }
    }
  }

  onBody(part) {
    if (this.rest !== null) {
      part = Buffer.concat([this.rest, part]);
      this.rest = null;
    }
    let from = 0;
    for (;;) {
      const at = part.indexOf(BLANK_LINE, from);
      if (at < 0) break;
      this.onEventText(part.toString("utf8", from, at));
      from = at + 2;
      if (this.closed()) return;
    }
    // A copy: a view would keep the whole received chunk alive meanwhile.
    if (from < part.length) this.rest = Buffer.from(part.subarray(from));
  }
}

// One event block's fields: {event, data, id, retry}; data is null when the
// block has no `data:` line (a comment, a `retry:`), and event defaults to
// "message", as EventSource reads them.
function parseEvent(text) {
  const fields = { event: "message", data: null, id: null, retry: null };
  for (const line of text.split("\n")) {
    if (line === "" || line.charCodeAt(0) === 58 /* ":" comment */) continue;
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.charCodeAt(0) === 32) value = value.slice(1);
    if (name === "data") fields.data = fields.data === null ? value : `${fields.data}\n${value}`;
    else if (name === "event") fields.event = value;
    else if (name === "id") fields.id = value;
    else if (name === "retry") fields.retry = Number(value);
  }
  return fields;
}

module.exports = { EventStreamClient, parseEvent };
