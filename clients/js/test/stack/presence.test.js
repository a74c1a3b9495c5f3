/*
 * Presence (CONTRACT.md v2, "Presence") against a running Tidings.
 *
 * The server has no presence yet: python-socketio never answers an event it
 * has no handler for, so `presence` times out, and the client says so. Once
 * it has, the guard below fails: set SERVER_HAS_PRESENCE and the tests of
 * the real thing run (the stack keeps presence and join/leave events on
 * public.presence.*).
 */

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { EventSource } from 'eventsource';

import { TidingsError } from '../../src/index.js';
import { NEEDS_STACK, client, freshTopic, waitFor } from './support.js';

const SERVER_HAS_PRESENCE = true;
const WAITING = 'the server has no presence yet (CONTRACT.md v2, "Presence"): set SERVER_HAS_PRESENCE';

test('bad input to presence is refused without asking the server', { skip: NEEDS_STACK }, async (t) => {
  const { tidings } = client(t);
  for (const ask of [(topic) => tidings.presence(topic), (topic) => tidings.presenceStats(topic)]) {
    await assert.rejects(ask('no spaces allowed'), (error) => {
      assert.ok(error instanceof TidingsError);
      assert.equal(error.code, 'invalid_topic');
      assert.match(error.message, /"no spaces allowed": not a topic/);
      return true;
    });
  }
});

test('a server without presence is a clear error, not a hang',
  { skip: NEEDS_STACK || (SERVER_HAS_PRESENCE && 'the server has presence') }, async (t) => {
    const { tidings } = client(t);
    await waitFor(() => tidings.state === 'connected', 'connected');
    const topic = freshTopic('public.presence');
    for (const [event, ask] of [['presence', tidings.presence], ['presence_stats', tidings.presenceStats]]) {
      const started = Date.now();
      const error = await ask.call(tidings, topic, { timeout: 1000 }).then(
        (ack) => assert.fail(`the server answers ${event} now (${JSON.stringify(ack)}): ` +
          'set SERVER_HAS_PRESENCE in test/stack/presence.test.js'),
        (rejected) => rejected,
      );
      assert.ok(error instanceof TidingsError);
      assert.equal(error.code, 'timeout');
      assert.equal(error.topic, topic);
      assert.match(error.message, new RegExp(`no answer to ${event} within 1000 ms`));
      assert.ok(Date.now() - started < 5000);
    }
    assert.equal(tidings.state, 'connected', 'an unanswered presence leaves the connection alone');
  });

test('presence over SSE is refused: the stream only carries publications', { skip: NEEDS_STACK }, async (t) => {
  const { tidings } = client(t, { transport: 'sse', EventSource });
  await assert.rejects(tidings.presence('public.x'), { name: 'TidingsError', code: 'unsupported' });
});

test('presence counts the clients of a topic, and users by sub',
  { skip: NEEDS_STACK || (!SERVER_HAS_PRESENCE && WAITING) }, async (t) => {
    const topic = freshTopic('public.presence');
    const { tidings: watcher } = client(t);
    await watcher.subscribe(topic, () => {});
    const { tidings: other } = client(t);
    await other.subscribe(topic, () => {});
    const stats = await watcher.presenceStats(topic);
    assert.deepEqual(stats, { ok: true, topic, clients: 2, users: 0 }); // anonymous: clients only
    const presence = await watcher.presence(topic);
    assert.equal(presence.clients, 2);
    assert.deepEqual(presence.users, []);
    await assert.rejects(watcher.presence(freshTopic('public.nopresence')), { code: 'presence_off' });
  });

test('join and leave events reach the subscribers of the topic',
  { skip: NEEDS_STACK || (!SERVER_HAS_PRESENCE && WAITING) }, async (t) => {
    const topic = freshTopic('public.presence');
    const { tidings: watcher } = client(t);
    const joins = [];
    const leaves = [];
    watcher.on('join', (member) => joins.push(member));
    watcher.on('leave', (member) => leaves.push(member));
    await watcher.subscribe(topic, () => {});
    const { tidings: other } = client(t);
    await other.subscribe(topic, () => {});
    await waitFor(() => joins.some((m) => m.topic === topic), 'a join');
    await other.unsubscribe(topic);
    await waitFor(() => leaves.some((m) => m.topic === topic), 'a leave');
    // The watcher may hear its own join too: the leave is the other's, and
    // the other's join came before it.
    const leave = leaves.find((m) => m.topic === topic);
    assert.equal(typeof leave.client, 'string');
    assert.ok(joins.some((m) => m.topic === topic && m.client === leave.client),
      `no join of ${leave.client} among ${JSON.stringify(joins)}`);
  });
