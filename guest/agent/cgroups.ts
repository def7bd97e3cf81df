/**
 * Guest cgroups (v2), as kata-agent keeps them: the agent mounts the unified hierarchy at
 * /sys/fs/cgroup, enables the cpu, memory, pids and cpuset controllers for a sandbox cgroup
 * (`/sys/fs/cgroup/kata-ts`) and gives each container its own cgroup under it
 * (`/sys/fs/cgroup/kata-ts/<container id>`). That path is a contract: the metrics code reads it,
 * so it is made here only ({@link containerCgroupDir}).
 *
 * OCI `linux.resources` become cgroup v2 files with runc's (and kata-agent's) conversions
 * ({@link resourceWrites}); the values are written by the agent itself (writeFile), never through
 * a shell. The container's processes join the cgroup before they exec anything
 * ({@link joinCgroupArgv}). Statistics are read back from the same files ({@link readCgroupStats}),
 * and OOM kills are counted by `memory.events` (`oom_kill`).
 */
import { mkdirSync, readFileSync, rmdirSync, watch, type FSWatcher } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import type { CgroupStats, LinuxCPU, LinuxMemory, LinuxPids } from '../../wire/agent/proto.gen.js';
import type { MessageInit } from '../../wire/ttrpc/codec.js';
import { internal, invalidArgument } from './errors.js';
import { log } from './log.js';
import { checkContainerId } from './oci.js';
import { BUSYBOX, busyboxOk } from './sys.js';

/** Where the agent mounts cgroup2. */
export const CGROUP_MOUNT = '/sys/fs/cgroup';
/** The sandbox's cgroup; every container's is a child of it. */
export const SANDBOX_CGROUP = `${CGROUP_MOUNT}/kata-ts`;
/** The controllers the agent enables (those the guest kernel has). */
export const WANTED_CONTROLLERS: readonly string[] = Object.freeze(['cpu', 'memory', 'pids', 'cpuset']);

/** The cgroup directory of container `id` (an id kata-agent accepts; INVALID_ARGUMENT otherwise). */
export function containerCgroupDir(id: string, sandboxCgroup = SANDBOX_CGROUP): string {
  checkContainerId(id);
  return path.posix.join(sandboxCgroup, id);
}

/** The word list of a `cgroup.controllers` file. */
export function parseControllers(text: string): Set<string> {
  return new Set(text.split(/\s+/).filter(Boolean));
}

/**
 * A flat-keyed cgroup file (`cpu.stat`, `memory.stat`, `memory.events`: `key value` lines) as a
 * map; lines that are not a key and an unsigned integer are skipped.
 */
export function parseFlatKeyed(text: string): Map<string, bigint> {
  const out = new Map<string, bigint>();
  for (const line of text.split('\n')) {
    const m = /^(\w+) (\d+)$/.exec(line.trim());
    if (m) out.set(m[1] as string, BigInt(m[2] as string));
  }
  return out;
}

/** What the guest has: undefined when cgroups could not be set up (then no limits, no stats, kernel-log OOM events). */
export interface CgroupSupport {
  /** The controllers enabled for the containers' cgroups. */
  readonly controllers: ReadonlySet<string>;
  /** Whether memory.swap.max exists (the kernel accounts swap). */
  readonly swap: boolean;
}

/**
 * Mounts cgroup2 at {@link CGROUP_MOUNT} (unless mounted already), enables the wanted controllers
 * the kernel has down to the sandbox cgroup, and creates that cgroup. Undefined (logged) when the
 * kernel has no cgroup2.
 */
export async function setupCgroups(): Promise<CgroupSupport | undefined> {
  try {
    const mounts = await readFile('/proc/self/mounts', 'utf8');
    if (!mounts.split('\n').some((l) => l.split(' ')[1] === CGROUP_MOUNT && l.split(' ')[2] === 'cgroup2')) {
      await busyboxOk('mount', ['-t', 'cgroup2', '-o', 'nosuid,nodev,noexec', 'cgroup2', CGROUP_MOUNT]);
    }
    const have = parseControllers(await readFile(`${CGROUP_MOUNT}/cgroup.controllers`, 'utf8'));
    const enabled = WANTED_CONTROLLERS.filter((c) => have.has(c));
    const missing = WANTED_CONTROLLERS.filter((c) => !have.has(c));
    mkdirSync(SANDBOX_CGROUP, { recursive: true });
    for (const dir of [CGROUP_MOUNT, SANDBOX_CGROUP]) {
      for (const c of enabled) await writeFile(`${dir}/cgroup.subtree_control`, `+${c}`);
    }
    let swap = false;
    // memory.swap.max shows only in non-root cgroups: probe with the sandbox's.
    try {
      readFileSync(`${SANDBOX_CGROUP}/memory.swap.max`);
      swap = true;
    } catch {
      // no swap accounting
    }
    log(`cgroup2 at ${CGROUP_MOUNT}: controllers ${enabled.join(' ') || '(none)'}${missing.length ? `; the kernel lacks ${missing.join(' ')}` : ''}${swap ? '' : '; no swap accounting'}`);
    return { controllers: new Set(enabled), swap };
  } catch (e) {
    log(`cannot set up cgroup2 (${(e as Error).message}): containers get no cgroup, no limits and no statistics`);
    return undefined;
  }
}

// ---------------------------------------------------------------------------------------------
// OCI resources → cgroup v2 files

/** OCI resources as decoded (kata's LinuxResources), any field possibly missing. */
export interface ResourcesIn {
  readonly Memory?: Partial<LinuxMemory> | undefined;
  readonly CPU?: Partial<LinuxCPU> | undefined;
  readonly Pids?: Partial<LinuxPids> | undefined;
}

/** cgroup v2's `max` for the OCI's -1 (unlimited). */
const MAX = 'max';
const INT64_MAX = (1n << 63n) - 1n;

/**
 * runc's (and kata-agent's) conversion of cgroup v1 `cpu.shares` (2..262144) to v2 `cpu.weight`
 * (1..10000): linear, 2 → 1, 262144 → 10000. 0 (not set) stays 0.
 */
export function sharesToWeight(shares: bigint): bigint {
  if (shares === 0n) return 0n;
  if (shares < 2n || shares > 262144n) throw invalidArgument(`cpu shares ${shares} is not from 2 to 262144`);
  return 1n + ((shares - 2n) * 9999n) / 262142n;
}

/**
 * runc's `ConvertMemorySwapToCgroupV2Value`: OCI swap is memory + swap, v2's memory.swap.max is
 * swap alone. undefined: leave the file as it is.
 */
export function swapToV2(swap: bigint, limit: bigint): string | undefined {
  if (limit === -1n && swap === 0n) return MAX;
  if (swap === -1n) return MAX;
  if (swap === 0n) return undefined;
  if (swap < -1n) throw invalidArgument(`memory swap ${swap} is not -1 (unlimited) or a byte count`);
  if (limit === 0n || limit === -1n) throw invalidArgument('a swap limit needs a memory limit');
  if (swap < limit) throw invalidArgument(`memory+swap limit ${swap} is below the memory limit ${limit}`);
  return String(swap - limit);
}

/** A byte or count limit: -1 → max, a positive number as it is; other negatives INVALID_ARGUMENT. */
function limitValue(v: bigint, what: string): string {
  if (v === -1n) return MAX;
  if (v < 0n || v > INT64_MAX) throw invalidArgument(`${what} ${v} is not -1 (unlimited) or a positive number`);
  return String(v);
}

/** The cpuset list grammar (`0-3,5`): anything else never reaches the kernel. */
const CPU_LIST = /^\d{1,4}(?:-\d{1,4})?(?:,\d{1,4}(?:-\d{1,4})?)*$/;

/**
 * The cgroup files to write for `res`, in order, as [file, value]. Fields that are 0 (proto3:
 * not set) are left alone, as kata-agent does for CreateContainer and UpdateContainer alike.
 * Controllers the guest lacks are skipped (logged); values out of range are INVALID_ARGUMENT.
 * Fields cgroup v2 has no file for (kernel memory, swappiness, realtime CPU) are ignored, as by
 * kata-agent on a unified hierarchy.
 */
export function resourceWrites(res: ResourcesIn | undefined, support: Pick<CgroupSupport, 'controllers' | 'swap'>, note: (line: string) => void = log): [string, string][] {
  const out: [string, string][] = [];
  if (!res) return out;
  const has = (c: string, what: string): boolean => {
    if (support.controllers.has(c)) return true;
    note(`${what} ignored: the guest kernel has no ${c} controller`);
    return false;
  };
  const cpu = res.CPU;
  if (cpu) {
    const cpus = cpu.Cpus ?? '';
    const mems = cpu.Mems ?? '';
    for (const [v, what] of [[cpus, 'cpuset cpus'], [mems, 'cpuset mems']] as const) {
      if (v !== '' && !CPU_LIST.test(v)) throw invalidArgument(`${what} ${JSON.stringify(v)} is not a list like 0-3,5`);
    }
    if ((cpus || mems) && has('cpuset', 'cpuset')) {
      if (cpus) out.push(['cpuset.cpus', cpus]);
      if (mems) out.push(['cpuset.mems', mems]);
    }
    const weight = sharesToWeight(cpu.Shares ?? 0n);
    const quota = cpu.Quota ?? 0n;
    const period = cpu.Period ?? 0n;
    if (quota < -1n || (quota > 0n && quota < 1000n) || quota > INT64_MAX) throw invalidArgument(`cpu quota ${quota} is not -1 (unlimited) or at least 1000 µs`);
    if (period !== 0n && (period < 1000n || period > 1_000_000n)) throw invalidArgument(`cpu period ${period} is not from 1000 to 1000000 µs`);
    if ((weight !== 0n || quota !== 0n || period !== 0n) && has('cpu', 'cpu shares/quota/period')) {
      if (weight !== 0n) out.push(['cpu.weight', String(weight)]);
      // runc: "max" unless a positive quota; the period only when given (the kernel keeps its own otherwise).
      if (quota !== 0n || period !== 0n) out.push(['cpu.max', `${quota > 0n ? quota : MAX}${period !== 0n ? ` ${period}` : ''}`]);
    }
  }
  const mem = res.Memory;
  if (mem) {
    const limit = mem.Limit ?? 0n;
    const swap = mem.Swap ?? 0n;
    const writes: [string, string][] = [];
    if (limit !== 0n) writes.push(['memory.max', limitValue(limit, 'memory limit')]);
    const swapMax = swapToV2(swap, limit);
    if (swapMax !== undefined) {
      if (support.swap) writes.push(['memory.swap.max', swapMax]);
      else note('memory swap limit ignored: the guest kernel does not account swap');
    }
    if ((mem.Reservation ?? 0n) !== 0n) writes.push(['memory.low', limitValue(mem.Reservation as bigint, 'memory reservation')]);
    if (writes.length && has('memory', 'memory limits')) out.push(...writes);
  }
  const pids = res.Pids?.Limit ?? 0n;
  if (pids !== 0n) {
    const v = pids < 0n ? MAX : limitValue(pids, 'pids limit');
    if (has('pids', 'pids limit')) out.push(['pids.max', v]);
  }
  return out;
}

/** Writes `writes` into the cgroup `dir`; the kernel's refusal is INVALID_ARGUMENT naming the file and value. */
export async function applyWrites(dir: string, writes: readonly (readonly [string, string])[]): Promise<void> {
  for (const [file, value] of writes) {
    try {
      await writeFile(path.posix.join(dir, file), value);
    } catch (e) {
      throw invalidArgument(`cannot set ${file} to ${JSON.stringify(value)} in ${dir}: ${(e as Error).message}`);
    }
  }
}

/** Creates container `id`'s cgroup (empty: it must not exist yet) and applies its resources. */
export async function createContainerCgroup(id: string, res: ResourcesIn | undefined, support: CgroupSupport): Promise<string> {
  const writes = resourceWrites(res, support);
  const dir = containerCgroupDir(id);
  try {
    mkdirSync(dir);
  } catch (e) {
    // A container of the same id whose cgroup was still emptying when it was removed: an empty one goes now.
    if ((e as NodeJS.ErrnoException).code === 'EEXIST') removeCgroup(dir);
    try {
      mkdirSync(dir);
    } catch (again) {
      throw internal(`cannot create the cgroup ${dir}: ${(again as Error).message}`, again);
    }
  }
  try {
    await applyWrites(dir, writes);
  } catch (e) {
    removeCgroup(dir);
    throw e;
  }
  return dir;
}

/** Removes an (empty) cgroup; a failure is logged (processes still in it, or already gone). */
export function removeCgroup(dir: string): void {
  try {
    rmdirSync(dir);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') log(`cannot remove the cgroup ${dir}: ${(e as Error).message}`);
  }
}

/**
 * `argv` started inside cgroup `dir`: a busybox shell moves itself into the cgroup and only then
 * execs `argv` (the same process), so nothing of the container ever runs outside it. The
 * directory is a positional parameter, never part of the script's text.
 */
export function joinCgroupArgv(dir: string, argv: readonly string[]): string[] {
  const script = 'echo $$ > "$1/cgroup.procs" || { echo "kata-ts-agent: cannot join the cgroup $1" >&2; exit 125; }\nshift\nexec "$@"\n';
  return [BUSYBOX, 'sh', '-c', script, 'kata-ts-cgroup', dir, ...argv];
}

// ---------------------------------------------------------------------------------------------
// Statistics and OOM kills

const U64_MAX = (1n << 64n) - 1n;

/** A single-value cgroup file: a number, `max` (→ `maxAs`), or undefined when absent. */
function readValue(dir: string, file: string, maxAs: bigint): bigint | undefined {
  let text: string;
  try {
    text = readFileSync(path.posix.join(dir, file), 'utf8').trim();
  } catch {
    return undefined;
  }
  if (text === MAX) return maxAs;
  return /^\d+$/.test(text) ? BigInt(text) : undefined;
}

function readKeyed(dir: string, file: string): Map<string, bigint> {
  try {
    return parseFlatKeyed(readFileSync(path.posix.join(dir, file), 'utf8'));
  } catch {
    return new Map();
  }
}

/**
 * The container cgroup's figures as kata-agent's CgroupStats for a unified hierarchy: CPU times
 * in nanoseconds (cpu.stat counts microseconds), memory from memory.current/.max/.peak/.stat
 * (an unlimited limit is 2^64-1, as runc reports it), failcnt from memory.events `max`, pids from
 * pids.current/.max (unlimited: 0, as runc).
 */
export function readCgroupStats(dir: string): MessageInit<CgroupStats> {
  const cpu = readKeyed(dir, 'cpu.stat');
  const us = (k: string): bigint => (cpu.get(k) ?? 0n) * 1000n;
  const stat = readKeyed(dir, 'memory.stat');
  const events = readKeyed(dir, 'memory.events');
  return {
    cpuStats: {
      cpuUsage: { totalUsage: us('usage_usec'), usageInUsermode: us('user_usec'), usageInKernelmode: us('system_usec'), percpuUsage: [] },
      throttlingData: { periods: cpu.get('nr_periods') ?? 0n, throttledPeriods: cpu.get('nr_throttled') ?? 0n, throttledTime: us('throttled_usec') },
    },
    memoryStats: {
      cache: stat.get('file') ?? 0n,
      usage: {
        usage: readValue(dir, 'memory.current', 0n) ?? 0n,
        maxUsage: readValue(dir, 'memory.peak', 0n) ?? 0n,
        failcnt: events.get('max') ?? 0n,
        limit: readValue(dir, 'memory.max', U64_MAX) ?? U64_MAX,
      },
      swapUsage: { usage: readValue(dir, 'memory.swap.current', 0n) ?? 0n, maxUsage: readValue(dir, 'memory.swap.peak', 0n) ?? 0n, failcnt: 0n, limit: readValue(dir, 'memory.swap.max', U64_MAX) ?? U64_MAX },
      useHierarchy: true,
      stats: Object.fromEntries(stat),
    },
    pidsStats: { current: readValue(dir, 'pids.current', 0n) ?? 0n, limit: readValue(dir, 'pids.max', 0n) ?? 0n },
  };
}

/** memory.events' `oom_kill`: how many processes of the cgroup an OOM killer has killed (0 when unreadable). */
export function readOomKills(dir: string): bigint {
  return readKeyed(dir, 'memory.events').get('oom_kill') ?? 0n;
}

/**
 * Watches a container cgroup's `memory.events` (inotify: the kernel notifies each change), calling
 * `onKills(n)` with the number of new OOM kills. {@link check} reads it at once, synchronously
 * (the agent calls it when a process of the container ends, so the event precedes the exit: the
 * kernel counts a kill before it sends SIGKILL).
 */
export class OomCounter {
  private seen: bigint;
  private watcher: FSWatcher | undefined;

  constructor(
    readonly dir: string,
    private readonly onKills: (n: number) => void,
  ) {
    this.seen = readOomKills(dir);
    try {
      this.watcher = watch(path.posix.join(dir, 'memory.events'), () => this.check());
      this.watcher.on('error', () => this.close());
      this.watcher.unref();
    } catch (e) {
      log(`cannot watch ${dir}/memory.events (${(e as Error).message}): OOM kills are noticed when a process ends`);
    }
  }

  check(): void {
    const now = readOomKills(this.dir);
    if (now <= this.seen) return;
    const n = Number(now - this.seen);
    this.seen = now;
    this.onKills(n);
  }

  close(): void {
    this.watcher?.close();
    this.watcher = undefined;
  }
}
