/* Offsets and topics: the rules de-duplication and ordering rest on. */

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { compareOffsets, isValidTopic, parseOffset } from '../../src/index.js';

test('offsets compare as numbers of any size, part by part', () => {
  assert.equal(compareOffsets('9-0', '10-0'), -1); // not as strings
  assert.equal(compareOffsets('1-10', '1-9'), 1);
  assert.equal(compareOffsets('12345678901234567890-1', '12345678901234567890-1'), 0);
  assert.equal(compareOffsets('99999999999999999999-0', '100000000000000000000-0'), -1); // not as floats
  assert.equal(compareOffsets('007-1', '7-1'), 0);
  assert.equal(compareOffsets(null, '0-0'), -1);
  assert.equal(compareOffsets('0-0', null), 1);
  assert.equal(compareOffsets(undefined, null), 0);
  assert.throws(() => compareOffsets('1-0', 'soon'), /invalid offset: soon/);
});

test('only <digits>-<digits> is an offset', () => {
  assert.deepEqual(parseOffset('1700000000000-3'), ['1700000000000', '3']);
  for (const bad of ['1700000000000', '1-2-3', '-1-0', '1.5-0', ' 1-0', 17, null, undefined]) {
    assert.equal(parseOffset(bad), null, String(bad));
  }
});

test('topics are 1 to 128 of A-Z a-z 0-9 _ . -', () => {
  for (const good of ['a', 'orders.eu.42', 'A_b-c.9', 'x'.repeat(128)]) assert.ok(isValidTopic(good), good);
  for (const bad of ['', 'x'.repeat(129), 'a b', 'a/b', 'ü', 'a*', 42, null, undefined, ['a']]) {
    assert.ok(!isValidTopic(bad), String(bad));
  }
});
