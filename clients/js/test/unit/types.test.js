/* types/index.d.ts declares the whole public API (tsc checks its use: test/types). */

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';

import * as api from '../../src/index.js';

const declared = readFileSync(new URL('../../types/index.d.ts', import.meta.url), 'utf8');

function declares(pattern) {
  return new RegExp(pattern, 'm').test(declared);
}

test('every export is declared', () => {
  for (const name of Object.keys(api)) {
    if (name === 'default') {
      assert.ok(declares('^export default Tidings;$'), 'export default');
    } else {
      assert.ok(declares(`^export (declare )?(class|function) ${name}\\b`), name);
    }
  }
});

test('every public method and static of Tidings is declared', () => {
  const methods = Object.keys(api.Tidings.prototype).filter((name) => !name.startsWith('_'));
  assert.ok(methods.length >= 9, methods.join());
  for (const name of methods) assert.ok(declares(`^  ${name}(<[^>]*>)?\\(`), `Tidings#${name}`);
  for (const name of Object.keys(api.Tidings)) assert.ok(declares(`^  static ${name}\\b`), `Tidings.${name}`);
});
