/**
 * Who owns a sandbox run directory, and reaping the ones whose owner is provably gone.
 *
 * Every run directory gets an owner record (`owner.json`: the pid of the runtime process that made
 * it and that process's start time from /proc/<pid>/stat, so a recycled pid is not mistaken for the
 * owner). A process killed with SIGKILL cannot clean up: its hypervisor dies with it (pdeathsig),
 * but the directory, its sockets and whatever is still mounted under it stay. A directory is
 * **stale** only when all of these hold:
 *
 *  - it has an owner record that can be read (no record, e.g. one being created: never stale);
 *  - the owning process is gone (no such pid, or a pid with another start time);
 *  - no live process mentions the directory in its command line: the hypervisor (whose qemu.pid
 *    or clh.pid is in it), virtiofsd … started without pdeathsig outlive their runtime, and their
 *    sandbox is not stale. A pid in a pid file that now belongs to some other process (a recycled
 *    pid, not mentioning the directory) does not keep it.
 *
 * Reaping unmounts what is mounted under the directory (deepest first) before removing it, and
 * refuses to remove it while anything is still mounted there.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { KataError } from './errors.js';
import { silentLogger, type Logger } from './logger.js';
import { mountsUnder, unmount } from './mounts.js';

/** The owner record in each run directory. */
export const OWNER_FILE = 'owner.json';

export interface RunDirOwner {
  readonly pid: number;
  /** Field 22 of /proc/<pid>/stat (clock ticks since boot): with the pid, names one process. */
  readonly startTime: string;
}

/**
 * The fields of a `/proc/<pid>/stat` text from field 3 (state) on: index 0 is field 3. The command
 * name (field 2) may hold spaces and parentheses, so they are counted from the last ')'.
 */
export function procStatFields(stat: string): string[] | undefined {
  const close = stat.lastIndexOf(')');
  return close < 0 ? undefined : stat.slice(close + 1).trim().split(/\s+/);
}

/** The start time of a process (field 22 of /proc/<pid>/stat), or undefined when there is no such process. */
export function processStartTime(pid: number, proc = '/proc'): string | undefined {
  try {
    const fields = procStatFields(readFileSync(path.join(proc, String(pid), 'stat'), 'latin1'));
    // fields[0] is field 3 (state): a zombie has ended.
    if (fields === undefined || fields[0] === 'Z') return undefined;
    return fields[19];
  } catch {
    return undefined;
  }
}

/** Records this process as the owner of `runDir`. */
export async function writeOwner(runDir: string): Promise<void> {
  const owner: RunDirOwner = { pid: process.pid, startTime: processStartTime(process.pid) ?? '' };
  await writeFile(path.join(runDir, OWNER_FILE), JSON.stringify(owner) + '\n', { mode: 0o600 });
}

function readOwner(runDir: string): RunDirOwner | undefined {
  try {
    const o = JSON.parse(readFileSync(path.join(runDir, OWNER_FILE), 'utf8')) as Partial<RunDirOwner>;
    return Number.isInteger(o.pid) && typeof o.startTime === 'string' && o.startTime !== '' ? { pid: o.pid as number, startTime: o.startTime } : undefined;
  } catch {
    return undefined;
  }
}

/** Live processes one of whose arguments is `dir` or a path under it. */
function processesUsing(dir: string, proc = '/proc'): number[] {
  const pids: number[] = [];
  let entries: string[];
  try {
    entries = readdirSync(proc);
  } catch {
    return pids;
  }
  for (const e of entries) {
    if (!/^\d+$/.test(e)) continue;
    try {
      const argv = readFileSync(path.join(proc, e, 'cmdline'), 'latin1').split('\0');
      if (argv.some((a) => a === dir || a.includes(`${dir}/`)) && processStartTime(Number(e), proc) !== undefined) pids.push(Number(e));
    } catch {
      // gone meanwhile
    }
  }
  return pids;
}

export interface RunDirVerdict {
  readonly dir: string;
  readonly stale: boolean;
  /** Why it is, or is not, stale. */
  readonly reason: string;
}

/** Whether `dir` is a stale run directory (see the module comment); never guesses "stale". */
export function judgeRunDir(dir: string, proc = '/proc'): RunDirVerdict {
  const owner = readOwner(dir);
  if (!owner) return { dir, stale: false, reason: `no readable ${OWNER_FILE}: its owner cannot be told` };
  if (processStartTime(owner.pid, proc) === owner.startTime) return { dir, stale: false, reason: `its owner (pid ${owner.pid}) is running` };
  const users = processesUsing(dir, proc);
  if (users.length > 0) return { dir, stale: false, reason: `its owner (pid ${owner.pid}) is gone, but process ${users.join(', ')} still uses it` };
  return { dir, stale: true, reason: `its owner (pid ${owner.pid}, started at ${owner.startTime}) is gone and no process uses it` };
}

/**
 * The run directories under `root`: its subdirectories that have an owner record, and one level
 * deeper for the shim's `<namespace>/<sandbox>` layout. Directories without a record are listed too
 * (as not stale) so that a report can show them.
 */
export function listRunDirs(root: string): string[] {
  const dirs: string[] = [];
  const subdirs = (d: string) => {
    try {
      return readdirSync(d, { withFileTypes: true }).filter((e) => e.isDirectory()).map((e) => path.join(d, e.name));
    } catch {
      return [];
    }
  };
  for (const d of subdirs(root)) {
    if (readOwner(d) || !subdirs(d).some((s) => readOwner(s))) dirs.push(d);
    else dirs.push(...subdirs(d).filter((s) => readOwner(s)));
  }
  return dirs;
}

export interface ReapReport {
  readonly reaped: string[];
  readonly kept: RunDirVerdict[];
  readonly failed: { dir: string; error: KataError }[];
}

/**
 * Removes `dir` after unmounting what is mounted under it; refuses while a mount stays (removing
 * through a bind mount would delete host data).
 */
export async function removeRunDir(dir: string): Promise<void> {
  for (const m of await mountsUnder(dir)) await unmount(m).catch(() => undefined);
  const left = await mountsUnder(dir);
  if (left.length > 0) throw new KataError('KATA_ERR_SANDBOX', `not removing ${dir}: still mounted there: ${left.join(', ')}`, { fix: 'unmount those by hand (umount -l), then run `kata-runtime cleanup` again' });
  await rm(dir, { recursive: true, force: true });
}

/** Judges every run directory under `root` and removes the stale ones. */
export async function reapStaleRunDirs(root: string, opts: { log?: Logger; dryRun?: boolean; proc?: string } = {}): Promise<ReapReport> {
  const log = opts.log ?? silentLogger();
  const report: ReapReport = { reaped: [], kept: [], failed: [] };
  for (const dir of listRunDirs(root)) {
    const v = judgeRunDir(dir, opts.proc);
    if (!v.stale) {
      report.kept.push(v);
      continue;
    }
    try {
      if (!opts.dryRun) await removeRunDir(dir);
      log.info({ dir, reason: v.reason }, opts.dryRun ? 'stale run directory (dry run: kept)' : 'removed a stale run directory');
      report.reaped.push(dir);
    } catch (e) {
      const error = e instanceof KataError ? e : new KataError('KATA_ERR_SANDBOX', `cannot remove the stale run directory ${dir}: ${(e as Error).message}`, { cause: e });
      log.warn({ dir, err: error.message }, 'could not remove a stale run directory');
      report.failed.push({ dir, error });
    }
  }
  return report;
}
