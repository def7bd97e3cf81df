/**
 * The processes on this machine, from /proc, for tests that check nothing was left running.
 * Zombies (ended, not yet reaped: orphans wait for PID 1) count as gone, and so do kernel threads.
 */
import { readdirSync, readFileSync } from 'node:fs';

export interface ProcessInfo {
  readonly pid: number;
  readonly ppid: number;
  /** The name the kernel keeps (`comm`, at most 15 characters). */
  readonly comm: string;
  readonly argv: readonly string[];
}

/** Live user-space processes. */
export function liveProcesses(): ProcessInfo[] {
  const out: ProcessInfo[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = /^(\d+) \((.*)\) (\S) (\d+) /s.exec(readFileSync(`/proc/${entry}/stat`, 'latin1'));
      if (!stat || stat[3] === 'Z') continue;
      const argv = readFileSync(`/proc/${entry}/cmdline`, 'latin1').split('\0').filter(Boolean);
      if (argv.length === 0) continue;
      out.push({ pid: Number(entry), ppid: Number(stat[4]), comm: stat[2]!, argv });
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

/** Live processes one of whose arguments contains `needle` (a test's temp dir, say). */
export function processesMentioning(needle: string): ProcessInfo[] {
  return liveProcesses().filter((p) => p.argv.some((a) => a.includes(needle)));
}
