/*
 * The browser build (webapp/static/tidings.js, dist/tidings.js) as a page
 * loads it: a classic script, run here in a fresh context standing in for
 * the page's global object.
 */

import assert from 'node:assert/strict';
import { test } from 'node:test';
import vm from 'node:vm';

import { build } from '../../scripts/build.mjs';

function load(extra = {}) {
  const page = { console, ...extra };
  page.window = page;
  vm.runInNewContext(build(), page, { filename: 'tidings.js' });
  return page;
}

test('it defines window.Tidings and nothing else', () => {
  const page = load();
  assert.equal(typeof page.Tidings, 'function');
  assert.deepEqual(Object.keys(page).sort(), ['Tidings', 'console', 'window']);
  assert.equal(page.Tidings.compareOffsets('2-0', '10-0'), -1);
  assert.equal(page.Tidings.isValidTopic('public.demo'), true);
  assert.equal(new page.Tidings.TidingsError('timeout', 'late', 'a.b').code, 'timeout');
});

test('it is not a module: no import or export is left', () => {
  assert.doesNotMatch(build(), /^\s*(import|export)\b/m);
});

test('without window.io it says what to load', () => {
  const page = load();
  assert.throws(() => new page.Tidings(), /load it first \(window\.io, \/static\/vendor\/socket\.io\.min\.js\)/);
});

test('over SSE without EventSource it says what is missing', () => {
  const page = load({ location: { href: 'http://localhost/' } });
  assert.throws(() => new page.Tidings({ transport: 'sse' }), /needs EventSource/);
});
