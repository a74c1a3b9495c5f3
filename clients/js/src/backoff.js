const RETRY_BASE_MS = 1000;
const RETRY_MAX_MS = 15000;

/**
 * Milliseconds to wait before try number `retries` (1, 2, ...): doubling from
 * 1 s up to 15 s, with +-25 % jitter so that clients refused together (a
 * server restart, Redis down) do not come back together.
 */
export function backoffDelay(retries) {
  const delay = Math.min(RETRY_MAX_MS, RETRY_BASE_MS * Math.pow(2, Math.max(0, retries - 1)));
  return delay * (0.75 + Math.random() / 2);
}
