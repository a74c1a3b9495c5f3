/* The client over Socket.IO (the default transport), against a running Tidings. */

import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  HISTORY_SIZE, NEEDS_STACK, TOKEN, client, freshTopic, publish, recorder, waitFor,
} from './support.js';

const skip = NEEDS_STACK;

/** Drop the connection and keep it down until `reconnect()` is called. */
function holdDisconnected(tidings) {
  const manager = tidings.socket.io;
  manager.reconnection(false);
  manager.engine.close();
  return () => {
    manager.reconnection(true);
    tidings.socket.connect();
  };
}

test('subscribe, then receive each publication once, in order', { skip }, async (t) => {
  const { tidings } = client(t);
  const topic = freshTopic();
  const { got, handler } = recorder();

  const ack = await tidings.subscribe(topic, handler);
  assert.equal(ack.ok, true);
  assert.equal(ack.offset, null, 'a fresh topic has no offset yet');

  const offsets = await publish([[topic, { n: 1 }], [topic, 'two'], [topic, [3]]]);
  await waitFor(() => got.length === 3, 'three publications');
  assert.deepEqual(got.map((p) => p.offset), offsets);
  assert.deepEqual(got.map((p) => p.data), [{ n: 1 }, 'two', [3]]);
  assert.ok(got.every((p) => p.topic === topic && p.recovered === false));
  assert.equal(tidings.offset(topic), offsets[2]);
  assert.deepEqual(tidings.topics(), [topic]);
});

test('a forced reconnect recovers what was missed: none lost, none twice', { skip }, async (t) => {
  const { tidings, seen } = client(t);
  const topic = freshTopic();
  const { got, handler } = recorder();
  await tidings.subscribe(topic, handler);
  const before = await publish([[topic, 0], [topic, 1]]);
  await waitFor(() => got.length === 2, 'the first two');

  const reconnect = holdDisconnected(tidings);
  await waitFor(() => tidings.state === 'reconnecting', 'the client to see the drop');
  const missed = await publish([[topic, 2], [topic, 3], [topic, 4]]);
  reconnect();
  await waitFor(() => got.length === 5, 'the missed three, recovered');
  const after = await publish([[topic, 5]]);
  await waitFor(() => got.length === 6, 'a live one after the recovery');

  assert.deepEqual(got.map((p) => p.offset), [...before, ...missed, ...after]);
  assert.deepEqual(got.map((p) => p.data), [0, 1, 2, 3, 4, 5]);
  assert.deepEqual(got.map((p) => p.recovered), [false, false, true, true, true, false]);
  assert.deepEqual(seen.recovered, [{ topic, count: 3 }]);
  assert.deepEqual(seen.gaps, []);
  assert.equal(seen.states.at(-1), 'connected');
});

test('publishing without pause across repeated reconnects: exactly the published, in order', { skip }, async (t) => {
  const { tidings, seen } = client(t);
  const topics = [freshTopic(), freshTopic()];
  const got = new Map(topics.map((topic) => [topic, []]));
  for (const topic of topics) {
    await tidings.subscribe(topic, (pubs) => got.get(topic).push(...pubs.map((p) => p.offset)));
  }
  const published = new Map(topics.map((topic) => [topic, []]));
  let publishing = true;
  const publisher = (async () => {
    for (let n = 0; publishing; n++) {
      const offsets = await publish(topics.map((topic) => [topic, n]));
      topics.forEach((topic, i) => published.get(topic).push(offsets[i]));
      // At most ~40/s per topic: history (HISTORY_SIZE) then covers a slow reconnect.
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
  })();
  for (let drop = 0; drop < 3; drop++) {
    await waitFor(() => tidings.state === 'connected', 'connected again');
    await new Promise((resolve) => setTimeout(resolve, 300));
    tidings.socket.io.engine.close(); // as a network failure would; Socket.IO reconnects
    await waitFor(() => tidings.state === 'reconnecting', 'the drop seen');
  }
  await waitFor(() => tidings.state === 'connected', 'connected at the end');
  publishing = false;
  await publisher;
  assert.deepEqual(seen.gaps, [], 'history must cover the reconnects for this test');
  for (const topic of topics) {
    const want = published.get(topic);
    assert.ok(want.length > 10, `published only ${want.length} on ${topic}`);
    await waitFor(() => got.get(topic).length >= want.length, `all ${want.length} of ${topic}`);
    assert.deepEqual(got.get(topic), want);
  }
});

test('a gap history no longer covers is reported, and delivery goes on', { skip }, async (t) => {
  assert.ok(HISTORY_SIZE > 0, 'the stack must say its TIDINGS_HISTORY_SIZE');
  const { tidings, seen } = client(t);
  const topic = freshTopic();
  const { got, handler } = recorder();
  await tidings.subscribe(topic, handler);
  await publish([[topic, 'seen']]);
  await waitFor(() => got.length === 1, 'the first one');

  const reconnect = holdDisconnected(tidings);
  await waitFor(() => tidings.state === 'reconnecting', 'the drop seen');
  const overflow = Array.from({ length: HISTORY_SIZE + 5 }, (_, n) => [topic, n]);
  await publish(overflow);
  reconnect();
  await waitFor(() => seen.gaps.length === 1, 'the gap');
  assert.deepEqual(seen.gaps, [{ topic }]);
  const [live] = await publish([[topic, 'live']]);
  await waitFor(() => got.length === 2, 'the live one after the gap');
  assert.equal(got[1].offset, live);
  assert.equal(got[1].data, 'live');
  assert.deepEqual(seen.recovered, []);
});

test('since on a first subscribe recovers from history', { skip }, async (t) => {
  const { tidings } = client(t);
  const topic = freshTopic();
  const offsets = await publish([[topic, 'a'], [topic, 'b'], [topic, 'c']]);
  const { got, handler } = recorder();
  const ack = await tidings.subscribe(topic, handler, { since: offsets[0] });
  assert.equal(ack.recovered, true);
  assert.deepEqual(got.map((p) => [p.data, p.recovered]), [['b', true], ['c', true]]);
});

test('bad input gets a clear error', { skip }, async (t) => {
  const { tidings, seen } = client(t);
  await waitFor(() => tidings.state === 'connected', 'connected');

  for (const topic of ['has space', '', 'x'.repeat(129), 'ü', 42, null]) {
    const ack = await tidings.subscribe(topic, () => {});
    assert.deepEqual(ack, { ok: false, topic, error: 'invalid_topic' });
  }
  assert.equal(seen.errors.length, 6);
  assert.ok(seen.errors.every((e) => e.error === 'invalid_topic'));
  assert.deepEqual(tidings.topics(), []);

  assert.throws(() => tidings.subscribe('public.ok', 'not a function'), TypeError);
  assert.throws(() => tidings.subscribe(freshTopic(), () => {}, { since: 'yesterday' }),
    /invalid since: yesterday/);
  assert.throws(() => tidings.on('publication', () => {}), /unknown Tidings event: publication/);
  assert.throws(() => client(t, { transport: 'carrier-pigeon' }), /unknown Tidings transport/);

  const forbidden = await tidings.subscribe('private.node.x', () => {});
  assert.deepEqual(forbidden, { ok: false, error: 'forbidden' });
  assert.deepEqual(seen.errors.at(-1), { topic: 'private.node.x', error: 'forbidden' });
});

test('a refused token is an error of the connection', { skip }, async (t) => {
  const { tidings, seen } = client(t, { token: 'not.a.jwt' });
  const ack = await tidings.subscribe(freshTopic(), () => {});
  assert.deepEqual(ack.error, 'invalid_token');
  assert.deepEqual(seen.errors.at(-1), { topic: null, error: 'invalid_token' });
  assert.equal(tidings.state, 'disconnected');
});

test('a token function is asked again on every reconnect', { skip }, async (t) => {
  let asked = 0;
  const { tidings } = client(t, { token: () => { asked++; return TOKEN; } });
  const topic = freshTopic('private.node');
  const { got, handler } = recorder();
  const ack = await tidings.subscribe(topic, handler);
  assert.equal(ack.ok, true, JSON.stringify(ack));
  assert.equal(asked, 1);

  tidings.socket.io.engine.close();
  await waitFor(() => asked === 2 && tidings.state === 'connected', 'a reconnect with the token asked again');
  const [offset] = await publish([[topic, 'private']]);
  await waitFor(() => got.length === 1, 'the private publication');
  assert.equal(got[0].offset, offset);
});

test('an unanswered subscribe drops the connection and resubscribes on a new one', { skip }, async (t) => {
  const { tidings } = client(t, { ackTimeout: 1000 });
  const topic = freshTopic();
  const { got, handler } = recorder();
  let connects = 0;
  tidings.socket.on('connect', () => { connects++; });
  await waitFor(() => connects === 1, 'the first connection');
  // The first connection's acks are lost, as on a wedged path.
  const onack = tidings.socket.onack;
  tidings.socket.onack = function (packet) {
    if (connects === 1) return undefined;
    return onack.call(this, packet);
  };
  const ack = await tidings.subscribe(topic, handler);
  assert.equal(ack.ok, true);
  assert.equal(connects, 2);
  const [offset] = await publish([[topic, 'after']]);
  await waitFor(() => got.length === 1, 'a publication on the new connection');
  assert.equal(got[0].offset, offset);
});
