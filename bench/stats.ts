/** What every benchmark prints: medians, milliseconds, PASS/FAIL against a target. */
export function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? (s[m] as number) : ((s[m - 1] as number) + (s[m] as number)) / 2;
}

export const ms = (n: number): string => `${n.toFixed(2)} ms`;

/** Records misses; `failed` is true once any target was missed. */
export class Targets {
  failed = false;
  verdict(ok: boolean, target: string): string {
    if (!ok) this.failed = true;
    return `${ok ? 'PASS' : 'FAIL'} (target: ${target})`;
  }
}
