// The Node peer's listener: PSUBSCRIBE tidings:topic:* and emit each message
// to room "t:<topic>" as the event `publications` with [{topic, offset: null,
// data}], one emit per message.
//
//   PEER_REDIS_URL=redis://127.0.0.1:6379/0 [PEER_ADAPTER=sharded] node bridge.js
//
// Default: through @socket.io/redis-emitter, which PUBLISHes the broadcast on
// the classic adapter's channel `socket.io#/#`, heard by every server.
//
// PEER_ADAPTER=sharded: redis-emitter (5.1) cannot address the sharded
// adapter, so the bridge is itself a member of the socket.io cluster: a
// `socket.io` Server with no HTTP server and no clients, on
// `createShardedAdapter`. `io.to(room).emit(...)` makes its adapter SPUBLISH
// the broadcast (JSON) on the room's own sharded channel `socket.io#/#<room>#`,
// which only servers holding a member of the room have SSUBSCRIBEd: the path
// one socket.io node's emit takes to the others in a sharded cluster.
"use strict";

const Redis = require("ioredis");

const url = process.env.PEER_REDIS_URL || "redis://127.0.0.1:6379/0";
const sharded = process.env.PEER_ADAPTER === "sharded";
const PATTERN = "tidings:topic:*";
const PREFIX = "tidings:topic:";

function makeTarget() {
  if (sharded) {
    const { Server } = require("socket.io");
    const { createShardedAdapter } = require("@socket.io/redis-adapter");
    const pub = new Redis(url);
    const io = new Server({ adapter: createShardedAdapter(pub, pub.duplicate()) });
    return (room) => io.to(room);
  }
  const { Emitter } = require("@socket.io/redis-emitter");
  const emitter = new Emitter(new Redis(url));
  return (room) => emitter.to(room);
}

const to = makeTarget();
const sub = new Redis(url);

sub.on("pmessage", (_pattern, channel, message) => {
  const topic = channel.slice(PREFIX.length);
  let data;
  try {
    data = JSON.parse(message);
  } catch {
    data = message;
  }
  to("t:" + topic).emit("publications", [{ topic, offset: null, data }]);
});

sub.psubscribe(PATTERN).then(() => {
  const how = sharded ? "sharded adapter" : "redis-emitter";
  console.log(`peer bridge (${how}) subscribed to ${PATTERN} (pid ${process.pid})`);
});

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => process.exit(0));
}
