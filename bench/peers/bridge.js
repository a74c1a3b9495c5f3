// The Node peer's listener: PSUBSCRIBE tidings:topic:* and emit each message
// through @socket.io/redis-emitter to room "t:<topic>" as the event
// `publications` with [{topic, offset: null, data}], one emit per message.
//
//   PEER_REDIS_URL=redis://127.0.0.1:6379/0 node bridge.js
"use strict";

const Redis = require("ioredis");
const { Emitter } = require("@socket.io/redis-emitter");

const url = process.env.PEER_REDIS_URL || "redis://127.0.0.1:6379/0";
const PATTERN = "tidings:topic:*";
const PREFIX = "tidings:topic:";

const sub = new Redis(url);
const emitter = new Emitter(new Redis(url));

sub.on("pmessage", (_pattern, channel, message) => {
  const topic = channel.slice(PREFIX.length);
  let data;
  try {
    data = JSON.parse(message);
  } catch {
    data = message;
  }
  emitter.to("t:" + topic).emit("publications", [{ topic, offset: null, data }]);
});

sub.psubscribe(PATTERN).then(() => {
  console.log(`peer bridge subscribed to ${PATTERN} (pid ${process.pid})`);
});

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => process.exit(0));
}
