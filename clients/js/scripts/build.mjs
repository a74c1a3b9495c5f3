#!/usr/bin/env node
/*
 * Builds the browser script (a classic script defining window.Tidings) from
 * src/: dist/tidings.js for the package, and webapp/static/tidings.js when
 * run inside the Tidings repository (`make js`). `--dist-only` (npm pack's
 * prepack) writes the first only. `--check` writes nothing and fails if the
 * committed webapp/static/tidings.js is not what src/ builds.
 *
 * No bundler: the modules of src/ that client.js imports are concatenated in
 * dependency order into one function scope. That holds because src/ keeps to
 * a subset of module syntax, checked here: one-line `import {...} from
 * './x.js'` of sibling modules, and `export` only in front of a declaration.
 * Anything else (a package import, `export default`, re-exports) is for
 * src/index.js, the ES module entry, which the browser build leaves out.
 */

import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const PACKAGE = dirname(dirname(fileURLToPath(import.meta.url)));
const SRC = join(PACKAGE, 'src');
const ENTRY = 'client.js';
const DIST = join(PACKAGE, 'dist', 'tidings.js');
const REPO_STATIC = join(PACKAGE, '..', '..', 'webapp', 'static');
const STATIC = existsSync(REPO_STATIC) ? join(REPO_STATIC, 'tidings.js') : null;

const LOCAL_IMPORT = /^import \{[^}]*\} from '\.\/([a-z-]+\.js)';$/;
const EXPORTED_DECLARATION = /^export (?=(async )?(function|class|const|let) )/;
const MODULE_SYNTAX = /^\s*(import|export)\b/;

class BuildError extends Error {}

/** The modules entry needs, dependencies first, each as {name, lines}. */
function collect(name, done = new Map(), visiting = new Set()) {
  if (done.has(name)) return done;
  if (visiting.has(name)) throw new BuildError(`src/${name}: import cycle`);
  visiting.add(name);
  const lines = [];
  const deps = [];
  readFileSync(join(SRC, name), 'utf8').split('\n').forEach((line, i) => {
    const local = LOCAL_IMPORT.exec(line);
    if (local) {
      deps.push(local[1]);
    } else if (EXPORTED_DECLARATION.test(line)) {
      lines.push(line.replace(EXPORTED_DECLARATION, ''));
    } else if (MODULE_SYNTAX.test(line)) {
      throw new BuildError(`src/${name}:${i + 1}: the browser build takes only one-line ` +
        `imports of ./*.js and exported declarations, not: ${line.trim()}`);
    } else {
      lines.push(line);
    }
  });
  deps.forEach((dep) => collect(dep, done, visiting));
  visiting.delete(name);
  done.set(name, lines);
  return done;
}

export function build() {
  const { version } = JSON.parse(readFileSync(join(PACKAGE, 'package.json'), 'utf8'));
  const parts = [];
  collect(ENTRY).forEach((lines, name) => {
    while (lines.length && lines[lines.length - 1] === '') lines.pop();
    parts.push(`  /* ---- src/${name} ${'-'.repeat(Math.max(0, 66 - name.length))} */\n`);
    parts.push(lines.map((line) => (line ? '  ' + line : '')).join('\n') + '\n\n');
  });
  return [
    '/*',
    ` * tidings-client ${version}, browser build: a classic script defining window.Tidings.`,
    ' * The websocket transport needs the Socket.IO 4.x client loaded first',
    ' * (window.io: /static/vendor/socket.io.min.js); the "sse" transport needs EventSource.',
    ' *',
    ' * GENERATED from clients/js/src by clients/js/scripts/build.mjs: edit those, then `make js`.',
    ' */',
    '(function (root) {',
    "  'use strict';",
    '',
    parts.join('') + '  root.Tidings = Tidings;',
    "})(typeof window !== 'undefined' ? window : globalThis);",
    '',
  ].join('\n');
}

function main(args) {
  const built = build();
  if (args.includes('--check')) {
    if (STATIC === null) throw new BuildError('--check: not inside the Tidings repository');
    const committed = existsSync(STATIC) ? readFileSync(STATIC, 'utf8') : '';
    if (committed !== built) {
      throw new BuildError(`${relative(process.cwd(), STATIC)} is not what clients/js/src ` +
        'builds: run `make js` and commit it');
    }
    return;
  }
  for (const out of args.includes('--dist-only') ? [DIST] : [DIST, STATIC]) {
    if (out === null) continue;
    mkdirSync(dirname(out), { recursive: true });
    writeFileSync(out, built);
    console.error(`built ${relative(process.cwd(), out)}`); // stdout is npm pack's --json
  }
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  try {
    main(process.argv.slice(2));
  } catch (error) {
    if (!(error instanceof BuildError)) throw error;
    console.error(`build: ${error.message}`);
    process.exit(1);
  }
}
