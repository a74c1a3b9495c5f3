/*
 * Offsets and topics, as the contract defines them.
 *
 * An offset is a Redis stream id "<ms>-<seq>". Both parts are unsigned
 * decimal integers of any size, so they are compared as digit strings
 * (length first, then lexicographically) instead of as numbers: never as one
 * string, never as floats.
 */

const OFFSET_RE = /^(\d+)-(\d+)$/;
const TOPIC_RE = /^[A-Za-z0-9_.-]{1,128}$/;

/** `since` for a topic that had no publication yet when it was subscribed. */
export const FROM_START = '0-0';

function stripZeros(digits) {
  let i = 0;
  while (i < digits.length - 1 && digits.charAt(i) === '0') i++;
  return digits.slice(i);
}

function compareDigits(a, b) {
  a = stripZeros(a);
  b = stripZeros(b);
  if (a.length !== b.length) return a.length < b.length ? -1 : 1;
  if (a === b) return 0;
  return a < b ? -1 : 1;
}

/** Parse "<ms>-<seq>" into [ms, seq] digit strings, or null if malformed. */
export function parseOffset(offset) {
  if (typeof offset !== 'string') return null;
  const m = OFFSET_RE.exec(offset);
  return m ? [m[1], m[2]] : null;
}

/** offset itself when well formed, else null. */
export function validOffset(offset) {
  return parseOffset(offset) ? offset : null;
}

/** -1, 0 or 1 as a is before, equal to or after b. null sorts first. */
export function compareOffsets(a, b) {
  if (a === null || a === undefined) return b === null || b === undefined ? 0 : -1;
  if (b === null || b === undefined) return 1;
  const pa = parseOffset(a);
  const pb = parseOffset(b);
  if (!pa || !pb) throw new TypeError('invalid offset: ' + (pa ? b : a));
  return compareDigits(pa[0], pb[0]) || compareDigits(pa[1], pb[1]);
}

/** Tell whether topic is 1 to 128 characters of A-Z a-z 0-9 _ . - */
export function isValidTopic(topic) {
  return typeof topic === 'string' && TOPIC_RE.test(topic);
}
