// The Node peer's web tier: a socket.io 4 server on @socket.io/redis-adapter,
// speaking Tidings' client protocol (no offsets: `offset` is always null).
//
//   PEER_PORT=8002 PEER_REDIS_URL=redis://127.0.0.1:6379/0 node server.js
//
// `subscribe` {topic} joins the room "t:<topic>" and acks {ok: true};
// `unsubscribe` leaves it. GET /healthz answers 200. Publications reach the
// rooms through the adapter, emitted by bridge.js with @socket.io/redis-emitter.
"use strict";

const http = require("http");
const Redis = require("ioredis");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");

const port = Number(process.env.PEER_PORT || 8002);
const url = process.env.PEER_REDIS_URL || "redis://127.0.0.1:6379/0";

const pub = new Redis(url);
const sub = pub.duplicate();

const httpServer = http.createServer((req, res) => {
  if (req.url === "/healthz") {
    res.writeHead(200, { "content-type": "text/plain" });
    res.end("ok");
    return;
  }
  res.writeHead(404);
  res.end();
});
// Many clients connect at once in the connections workload.
httpServer.maxConnections = 100000;

const io = new Server(httpServer, {
  adapter: createAdapter(pub, sub),
  serveClient: false,
});

function topicOf(payload) {
  return payload && typeof payload.topic === "string" ? payload.topic : null;
}

io.on("connection", (socket) => {
  socket.on("subscribe", (payload, ack) => {
    const topic = topicOf(payload);
    if (topic === null) {
      if (typeof ack === "function") ack({ ok: false, error: "invalid_topic" });
      return;
    }
    socket.join("t:" + topic);
    if (typeof ack === "function") ack({ ok: true });
  });
  socket.on("unsubscribe", (payload, ack) => {
    const topic = topicOf(payload);
    if (topic !== null) socket.leave("t:" + topic);
    if (typeof ack === "function") ack({ ok: true });
  });
});

httpServer.listen(port, "127.0.0.1", 2048, () => {
  console.log(`peer server listening on 127.0.0.1:${port} (pid ${process.pid})`);
});

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => process.exit(0));
}
