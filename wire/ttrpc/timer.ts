/**
 * setTimeout takes at most 2^31-1 ms (24.8 days): a longer delay fires after 1 ms instead (Node
 * warns with TimeoutOverflowWarning). A ttrpc deadline is an int64 of nanoseconds, so a peer may
 * well ask for longer; such a wait is a chain of timers.
 */
export const MAX_TIMER_MS = 2 ** 31 - 1;

/** Calls `fn` once `ms` have passed, however many; returns what cancels it. */
export function setLongTimeout(fn: () => void, ms: number): () => void {
  const due = Date.now() + ms;
  let timer: NodeJS.Timeout;
  const arm = (left: number): void => {
    timer = left > MAX_TIMER_MS ? setTimeout(() => arm(due - Date.now()), MAX_TIMER_MS) : setTimeout(fn, Math.max(1, left));
  };
  arm(ms);
  return () => clearTimeout(timer);
}
