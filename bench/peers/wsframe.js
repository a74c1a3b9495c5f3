// A minimal websocket client on a plain TCP socket, for the load generators
// (loadgen.js, storm.js): no `ws`, no socket.io-client. Frames are parsed in
// one loop over each received chunk, which costs several times less per
// message than those libraries, so the generator is not what limits the
// servers.
//
// A subclass implements the hooks: onUpgraded() (101 received), onFrame(text)
// (one whole text frame), onRefused(head) (anything but a 101), and
// onSocketError(err) / onSocketClose() (the TCP socket's own events).
"use strict";

const crypto = require("crypto");
const net = require("net");

class FramedClient {
  // target: {hostname, port, host, path}; localAddress: a source address, or undefined.
  constructor(target, localAddress) {
    this.target = target;
    this.localAddress = localAddress;
    this.sock = null;
    this.opened = false;
    this.pending = null;
    this.fragments = null;
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
    this.fragments = null;
    sock.setNoDelay(true);
    sock.on("connect", () => {
      const key = crypto.randomBytes(16).toString("base64");
      sock.write(
        `GET ${target.path} HTTP/1.1\r\nHost: ${target.host}\r\nUpgrade: websocket\r\n` +
          `Connection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\n` +
          "Sec-WebSocket-Version: 13\r\n\r\n",
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
      if (buf.toString("latin1", 0, 12) !== "HTTP/1.1 101") {
        this.onRefused(buf.toString("latin1", 0, 60));
        return;
      }
      this.opened = true;
      this.onUpgraded();
      pos = end + 4;
    }
    const length = buf.length;
    while (pos + 2 <= length) {
      const b0 = buf[pos];
      const b1 = buf[pos + 1];
      let size = b1 & 0x7f;
      let head = 2;
      if (size === 126) {
        if (pos + 4 > length) break;
        size = buf.readUInt16BE(pos + 2);
        head = 4;
      } else if (size === 127) {
        if (pos + 10 > length) break;
        size = buf.readUInt32BE(pos + 2) * 4294967296 + buf.readUInt32BE(pos + 6);
        head = 10;
      }
      if (b1 & 0x80) head += 4; // servers never mask; tolerate it anyway
      if (pos + head + size > length) break;
      const start = pos + head;
      pos = start + size;
      const opcode = b0 & 0x0f;
      const fin = (b0 & 0x80) !== 0;
      if (opcode === 1 || (opcode === 0 && this.fragments !== null)) {
        if (!fin || this.fragments !== null) {
          (this.fragments ??= []).push(buf.subarray(start, pos));
          if (fin) {
            const whole = Buffer.concat(this.fragments);
            this.fragments = null;
            this.onFrame(whole.toString("utf8"));
          }
        } else {
          this.onFrame(buf.toString("utf8", start, pos));
        }
      } else if (opcode === 9) {
        this.sendFrame(0x8a, buf.subarray(start, pos));
      } else if (opcode === 8) {
        this.sock.end();
      }
      if (this.sock === null || this.sock.destroyed) return; // a hook closed it
    }
    if (pos < length) this.pending = buf.subarray(pos);
  }

  sendFrame(first, payload) {
    const size = payload.length;
    const head = size < 126 ? 6 : 8;
    const frame = Buffer.allocUnsafe(head + size);
    frame[0] = first;
    if (size < 126) {
      frame[1] = 0x80 | size;
    } else {
      frame[1] = 0x80 | 126;
      frame.writeUInt16BE(size, 2);
    }
    // A zero masking key: the frame is masked as the protocol requires, and
    // the payload needs no XOR.
    frame.writeUInt32BE(0, head - 4);
    payload.copy(frame, head);
    this.sock.write(frame);
  }

  send(text) {
    if (this.opened && !this.sock.destroyed) this.sendFrame(0x81, Buffer.from(text));
  }
}

module.exports = { FramedClient };
