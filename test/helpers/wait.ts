/**
 * Waiting in tests without sleeping longer than needed: poll a probe until it holds, bound a
 * promise by a deadline, and tell whether a process is still there. Each failure is an
 * AssertionError naming what did not happen.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';

/** Polls `probe` every `intervalMs` until it returns something other than undefined or false; returns that. */
export async function until<T>(what: string, probe: () => T | undefined | false | Promise<T | undefined | false>, timeoutMs = 3_000, intervalMs = 5): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > deadline) throw new assert.AssertionError({ message: `timed out after ${timeoutMs} ms waiting for ${what}` });
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

/** The promise's value, or an assertion failure naming what did not settle in time. */
export async function within<T>(p: Promise<T>, what: string, timeoutMs = 3_000): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new assert.AssertionError({ message: `${what} did not settle within ${timeoutMs} ms` })), timeoutMs);
  });
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Whether a process with this pid is still running. A zombie (ended, not yet reaped: orphans wait
 * for PID 1 to reap them) counts as gone.
 */
export function pidAlive(pid: number | undefined): boolean {
  if (pid === undefined || pid <= 0) return false;
  try {
    return !/^\S+ \(.*\) Z/s.test(readFileSync(`/proc/${pid}/stat`, 'latin1'));
  } catch {
    return false;
  }
}
