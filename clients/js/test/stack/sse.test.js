/*
 * The "sse" transport (CONTRACT.md v2, "Server-Sent Events") against a
 * running Tidings.
 *
 * SERVER_HAS_SSE: the server has GET /sse (without it the client says so,
 * "sse_unavailable", which the guard test checks). Node has no EventSource of its own before 22; the
 * "eventsource" package (a dev dependency) stands in for the browser's.
 */

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { EventSource } from 'eventsource';

import {
  HISTORY_SIZE, NEEDS_STACK, TOKEN, client, freshTopic, publish, recorder, waitFor,
} from './support.js';

const SERVER_HAS_SSE = true;
const WAITING = 'the server has no GET /sse yet (CONTRACT.md v2, "Server-Sent Events"): set SERVER_HAS_SSE';
const skip = NEEDS_STACK || (!SERVER_HAS_SSE && WAITING);

/**
 * An EventSource whose connections the test can break as a network failure
 * would (the body fails mid-stream): it then reconnects by itself, sending
 * Last-Event-ID. (Aborting its fetch would not do: the "eventsource"
 * package takes an abort for a deliberate close and never reconnects.)
 */
function breakable() {
  const live = new Set();
  let gate = null; // while set, reconnections wait for it
  let open = () => {};
  class Breakable extends EventSource {
    constructor(url, init) {
      super(url, {
        ...init,
        fetch: async (input, options) => {
          if (gate) await gate;
          const response = await fetch(input, options);
          if (!response.body) return response;
          const reader = response.body.getReader();
          let fail;
          const body = new ReadableStream({
            start(controller) {
              fail = (error) => {
                try { controller.error(error); } catch { /* already closed */ }
                reader.cancel().catch(() => {});
              };
              live.add(fail);
            },
            async pull(controller) {
              try {
                const { done, value } = await reader.read();
                if (done) {
                  live.delete(fail);
                  controller.close();
                } else {
                  controller.enqueue(value);
                }
              } catch (error) {
                try { controller.error(error); } catch { /* already failed */ }
              }
            },
            cancel() {
              live.delete(fail);
              return reader.cancel().catch(() => {});
            },
          });
          return new Response(body, {
            status: response.status, statusText: response.statusText, headers: response.headers,
          });
        },
      });
    }
  }
  const cut = () => {
    live.forEach((fail) => fail(new TypeError('network failure')));
    live.clear();
  };
  // Cut, and keep the network down until release(): what is published
  // meanwhile is missed for sure.
  const hold = () => {
    gate = new Promise((resolve) => { open = resolve; });
    cut();
  };
  const release = () => {
    gate = null;
    open();
  };
  return { EventSource: Breakable, cut, hold, release };
}

function sseClient(t, options = {}) {
  return client(t, { transport: 'sse', EventSource, ...options });
}

test('a server without /sse is reported, not retried',
  { skip: NEEDS_STACK || (SERVER_HAS_SSE && 'the server has /sse') }, async (t) => {
    const { tidings, seen } = sseClient(t);
    const ack = await tidings.subscribe(freshTopic(), () => {});
    assert.deepEqual(ack.error, 'sse_unavailable',
      `the server serves /sse now (${JSON.stringify(ack)}): set SERVER_HAS_SSE in test/stack/sse.test.js`);
    assert.deepEqual(seen.errors, [{ topic: null, error: 'sse_unavailable' }]);
    assert.equal(tidings.state, 'disconnected');
  });

test('sse: subscribe, then receive each publication once, in order', { skip }, async (t) => {
  const { tidings } = sseClient(t);
  const topics = [freshTopic(), freshTopic()];
  const got = topics.map(() => recorder());
  const acks = await Promise.all(topics.map((topic, i) => tidings.subscribe(topic, got[i].handler)));
  assert.ok(acks.every((ack) => ack.ok), JSON.stringify(acks));
  const offsets = await publish([[topics[0], 1], [topics[1], 2], [topics[0], 3]]);
  await waitFor(() => got[0].got.length === 2 && got[1].got.length === 1, 'three publications');
  assert.deepEqual(got[0].got.map((p) => p.offset), [offsets[0], offsets[2]]);
  assert.deepEqual(got[1].got.map((p) => p.data), [2]);
});

test('sse: a topic added later opens a new stream without losing the others', { skip }, async (t) => {
  const { tidings } = sseClient(t);
  const first = freshTopic();
  const { got, handler } = recorder();
  await tidings.subscribe(first, handler);
  let publishing = true;
  const published = [];
  const publisher = (async () => {
    for (let n = 0; publishing; n++) published.push(...(await publish([[first, n]])));
  })();
  await waitFor(() => got.length > 3, 'some publications');
  const second = recorder();
  assert.equal((await tidings.subscribe(freshTopic(), second.handler)).ok, true);
  await new Promise((resolve) => setTimeout(resolve, 3000)); // past the streams' overlap
  publishing = false;
  await publisher;
  await waitFor(() => got.length >= published.length, `all ${published.length}`);
  assert.deepEqual(got.map((p) => p.offset), published);
});

test('sse: a broken stream resumes with Last-Event-ID: none lost, none twice', { skip }, async (t) => {
  const network = breakable();
  const { tidings, seen } = sseClient(t, { EventSource: network.EventSource });
  const topic = freshTopic();
  const { got, handler } = recorder();
  await tidings.subscribe(topic, handler);
  const before = await publish([[topic, 0]]);
  await waitFor(() => got.length === 1, 'the first one');
  network.cut();
  const missed = await publish([[topic, 1], [topic, 2]]);
  await waitFor(() => got.length === 3, 'the missed two');
  assert.deepEqual(got.map((p) => p.offset), [...before, ...missed]);
  assert.deepEqual(seen.gaps, []);
});

test('sse: a gap history no longer covers is reported', { skip }, async (t) => {
  const network = breakable();
  const { tidings, seen } = sseClient(t, { EventSource: network.EventSource });
  const topic = freshTopic();
  await tidings.subscribe(topic, () => {});
  await publish([[topic, 'seen']]);
  network.hold();
  await publish(Array.from({ length: HISTORY_SIZE + 5 }, (_, n) => [topic, n]));
  network.release();
  await waitFor(() => seen.gaps.length === 1, 'the gap');
  assert.deepEqual(seen.gaps, [{ topic }]);
});

test('sse: forbidden and invalid topics are refused one by one', { skip }, async (t) => {
  const { tidings, seen } = sseClient(t);
  const allowed = freshTopic();
  const acks = await Promise.all([
    tidings.subscribe(allowed, () => {}),
    tidings.subscribe('private.node.secret', () => {}),
    tidings.subscribe('not a topic', () => {}),
  ]);
  assert.equal(acks[0].ok, true);
  assert.equal(acks[1].error, 'forbidden');
  assert.equal(acks[2].error, 'invalid_topic');
  assert.deepEqual(tidings.topics(), [allowed]);
  assert.ok(seen.errors.some((e) => e.topic === 'private.node.secret' && e.error === 'forbidden'));
});

test('sse: the token goes as ?token=', { skip }, async (t) => {
  const { tidings } = sseClient(t, { token: () => TOKEN });
  const topic = freshTopic('private.node');
  const { got, handler } = recorder();
  assert.equal((await tidings.subscribe(topic, handler)).ok, true);
  const [offset] = await publish([[topic, 'private']]);
  await waitFor(() => got.length === 1, 'the private publication');
  assert.equal(got[0].offset, offset);
});
