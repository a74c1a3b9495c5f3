// The Node peer's web tier: a socket.io 4 server on @socket.io/redis-adapter,
// speaking Tidings' client protocol (no offsets: `offset` is always null).
//
//   PEER_PORT=8002 PEER_REDIS_URL=redis://127.0.0.1:6379/0 [PEER_ADAPTER=sharded] node server.js
//
// `subscribe` {topic} joins the room "t:<topic>" and acks {ok: true};
// `unsubscribe` leaves it. GET /healthz answers 200. Publications reach the
// rooms through the adapter, emitted by bridge.js.
//
// PEER_ADAPTER=sharded uses the adapter's `createShardedAdapter` (Redis 7
// sharded pub/sub) in its default "dynamic" mode: a room's first member makes
// the server SSUBSCRIBE `socket.io#/#<room>#`, its last one leaving
// SUNSUBSCRIBEs, so a server hears only its own rooms' broadcasts (the
// socket.io counterpart of Tidings' interest routing).
"use strict";

const http = require("http");
const Redis = require("ioredis");
const { Server } = require("socket.io");
const { createAdapter, createShardedAdapter } = require("@socket.io/redis-adapter");

const port = Number(process.env.PEER_PORT || 8002);
const url = process.env.PEER_REDIS_URL || "redis://127.0.0.1:6379/0";
const sharded = process.env.PEER_ADAPTER === "sharded";

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
  adapter: sharded ? createShardedAdapter(pub, sub) : createAdapter(pub, sub),
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
  const adapter = sharded ? "sharded adapter" : "adapter";
  console.log(`peer server (${adapter}) listening on 127.0.0.1:${port} (pid ${process.pid})`);
});

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => process.exit(0));
}
