/*
 * What the tests against a running Tidings need. tests/js/test_node_client.py
 * starts the stack (Redis, gunicorn, Celery) and runs `node --test
 * test/stack/` with its address in TIDINGS_URL, an API key to publish
 * with, and a token for private.node.* topics.
 */

import { randomBytes } from 'node:crypto';

import { Tidings } from '../../src/index.js';

export const URL = process.env.TIDINGS_URL;
export const API_KEY = process.env.TIDINGS_API_KEY;
export const TOKEN = process.env.TIDINGS_TOKEN;
export const HISTORY_SIZE = Number(process.env.TIDINGS_HISTORY_SIZE || 0);

/** Skip (outside CI) when no stack was given: these tests need a running Tidings. */
export const NEEDS_STACK = URL ? false
  : process.env.CI === 'true' ? false // and fail loudly below
    : 'no TIDINGS_URL: run through pytest tests/js (it starts the stack)';

if (!URL && process.env.CI === 'true') {
  throw new Error('TIDINGS_URL is not set: tests/js/test_node_client.py starts the stack and sets it');
}

export function freshTopic(prefix = 'public.node') {
  return `${prefix}.${randomBytes(6).toString('hex')}`;
}

/** Poll condition until it holds; fail with what was waited for at the deadline. */
export async function waitFor(condition, what, timeout = 15000) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = condition();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`not within ${timeout} ms: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/**
 * Publish [topic, data] pairs through POST /api/publish (durable) and wait
 * until the listener has forwarded them; resolves to their offsets.
 */
export async function publish(items) {
  const body = items.map(([topic, data]) => ({ topic, data }));
  const response = await fetch(`${URL}/api/publish?wait=1`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${API_KEY}`, 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  });
  const answer = await response.json();
  if (response.status !== 200) throw new Error(`publish: HTTP ${response.status} ${JSON.stringify(answer)}`);
  return answer.offsets;
}

/** A client of the stack, closed after the test; records what it is told. */
export function client(t, options = {}) {
  const tidings = new Tidings({ url: URL, ...options });
  const seen = { states: [], errors: [], gaps: [], recovered: [] };
  tidings.on('state', (state) => seen.states.push(state));
  tidings.on('error', (info) => seen.errors.push(info));
  tidings.on('gap', (info) => seen.gaps.push(info));
  tidings.on('recovered', (info) => seen.recovered.push(info));
  t.after(() => tidings.close());
  return { tidings, seen };
}

/** A handler that records every publication and how it came. */
export function recorder() {
  const got = [];
  const handler = (pubs, info) => pubs.forEach((p) => got.push({ ...p, recovered: info.recovered }));
  return { got, handler };
}
