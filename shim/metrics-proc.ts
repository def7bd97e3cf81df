/**
 * A host process's figures from /proc, as Kata's shim reports them for itself and the hypervisor
 * (`kata_shim_proc_stat`, `kata_shim_proc_status`, `kata_hypervisor_*`): CPU time from
 * `/proc/<pid>/stat`, memory and context switches from `/proc/<pid>/status`, PSS from
 * `/proc/<pid>/smaps_rollup`, open descriptors from `/proc/<pid>/fd`.
 */
import { readFile, readdir } from 'node:fs/promises';
import { procStatFields } from '../core/run-dirs.js';

/** USER_HZ: /proc/<pid>/stat counts CPU time in these ticks (100 on every Linux ABI). */
export const CLOCK_TICKS = 100;

export interface ProcStat {
  /** Ticks, as in the file (Kata's `item` values). */
  readonly utime: number;
  readonly stime: number;
  readonly cutime: number;
  readonly cstime: number;
  readonly numThreads: number;
}

/** `/proc/<pid>/stat`: the fields after the command name, which may itself hold spaces and parentheses. */
export function parseProcStat(text: string): ProcStat | undefined {
  const f = procStatFields(text);
  if (f === undefined) return undefined;
  // f[0] is field 3 (state); utime is field 14, num_threads field 20.
  const at = (field: number) => Number(f[field - 3]);
  const stat = { utime: at(14), stime: at(15), cutime: at(16), cstime: at(17), numThreads: at(20) };
  return Object.values(stat).every((v) => Number.isFinite(v)) ? stat : undefined;
}

/**
 * `/proc/<pid>/status`: Kata's items (lower-case key names: `vmrss`, `rssanon`, `vmswap`,
 * `voluntary_ctxt_switches` …), sizes in bytes, counts as they are.
 */
export function parseProcStatus(text: string): Map<string, number> {
  const items = new Map<string, number>();
  for (const line of text.split('\n')) {
    const m = /^(Vm\w+|Rss\w+|HugetlbPages|Threads|(?:non)?voluntary_ctxt_switches):\s+(\d+)(\s+kB)?\s*$/.exec(line);
    if (!m) continue;
    items.set(m[1]!.toLowerCase(), Number(m[2]) * (m[3] ? 1024 : 1));
  }
  return items;
}

/** `Pss:` of `/proc/<pid>/smaps_rollup`, in bytes. */
export function parsePss(text: string): number | undefined {
  const m = /^Pss:\s+(\d+) kB$/m.exec(text);
  return m ? Number(m[1]) * 1024 : undefined;
}

export interface ProcessFigures {
  readonly stat?: ProcStat;
  readonly status: ReadonlyMap<string, number>;
  readonly pssBytes?: number;
  readonly fds?: number;
}

async function readOrUndefined(file: string): Promise<string | undefined> {
  try {
    return await readFile(file, 'utf8');
  } catch {
    return undefined;
  }
}

/** What /proc says of `pid` now; figures it cannot read (the process gone, no permission) are left out. */
export async function readProcessFigures(pid: number, procRoot = '/proc'): Promise<ProcessFigures> {
  const dir = `${procRoot}/${pid}`;
  const [stat, status, smaps, fds] = await Promise.all([
    readOrUndefined(`${dir}/stat`),
    readOrUndefined(`${dir}/status`),
    readOrUndefined(`${dir}/smaps_rollup`),
    readdir(`${dir}/fd`).then((l) => l.length, () => undefined),
  ]);
  const s = stat === undefined ? undefined : parseProcStat(stat);
  const pss = smaps === undefined ? undefined : parsePss(smaps);
  return { status: status === undefined ? new Map() : parseProcStatus(status), ...(s ? { stat: s } : {}), ...(pss !== undefined ? { pssBytes: pss } : {}), ...(fds !== undefined ? { fds } : {}) };
}
