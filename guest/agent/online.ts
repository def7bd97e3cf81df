/**
 * OnlineCPUMem: brings hot-plugged vCPUs and memory blocks online, as kata-agent does, by writing
 * `1` to `/sys/devices/system/cpu/cpuN/online` and `/sys/devices/system/memory/memoryN/online`.
 *
 * The guest kernel (Debian's) adds an ACPI-hot-plugged CPU or DIMM offline and does so
 * asynchronously, after the hypervisor's device_add has returned: the directories appear a little
 * later. So the agent polls: for vCPUs until `nb_cpus` of them have been onlined (an error after
 * the deadline, as kata-agent's retries end in one); for memory until blocks have been onlined
 * and a further pass finds no new one, or the deadline passes.
 */
import { readdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { log } from './log.js';
import { sleep } from './sys.js';

export const SYSFS_CPU = '/sys/devices/system/cpu';
export const SYSFS_MEMORY = '/sys/devices/system/memory';

export const ONLINE_DEFAULTS = Object.freeze({
  /** Between two passes over sysfs. */
  pollMs: 50,
  /** The whole request (kata-agent: 100 retries of 50 ms). */
  timeoutMs: 5_000,
});

export interface OnlineRequest {
  readonly nbCpus: number;
  readonly cpuOnly: boolean;
}

export interface OnlineOptions {
  readonly cpuDir?: string;
  readonly memoryDir?: string;
  readonly pollMs?: number;
  readonly timeoutMs?: number;
  readonly signal?: AbortSignal;
}

/** What one request onlined. */
export interface OnlineResult {
  readonly cpus: number;
  readonly memoryBlocks: number;
}

/** Onlines every offline `<prefix>N` under `dir`, at most `limit` of them; returns how many. */
async function onlinePass(dir: string, prefix: string, limit: number): Promise<number> {
  const pattern = new RegExp(`^${prefix}[0-9]+$`);
  const names = (await readdir(dir).catch(() => [] as string[])).filter((n) => pattern.test(n)).sort((a, b) => Number(a.slice(prefix.length)) - Number(b.slice(prefix.length)));
  let count = 0;
  for (const name of names) {
    if (count >= limit) break;
    const file = path.join(dir, name, 'online');
    const state = await readFile(file, 'utf8').catch(() => undefined);
    if (state?.trim() !== '0') continue;
    try {
      await writeFile(file, '1');
      count++;
    } catch (e) {
      // A block the kernel cannot online now (EBUSY, or EINVAL while it is still being added) is tried again next pass.
      log(`cannot online ${name}: ${(e as Error).message}`);
    }
  }
  return count;
}

export async function onlineCpuMem(req: OnlineRequest, opts: OnlineOptions = {}): Promise<OnlineResult> {
  const cpuDir = opts.cpuDir ?? SYSFS_CPU;
  const memoryDir = opts.memoryDir ?? SYSFS_MEMORY;
  const pollMs = opts.pollMs ?? ONLINE_DEFAULTS.pollMs;
  const deadline = Date.now() + (opts.timeoutMs ?? ONLINE_DEFAULTS.timeoutMs);
  let cpus = 0;
  while (cpus < req.nbCpus) {
    cpus += await onlinePass(cpuDir, 'cpu', req.nbCpus - cpus);
    if (cpus >= req.nbCpus) break;
    if (Date.now() >= deadline) throw new Error(`onlined ${cpus} of ${req.nbCpus} hot-plugged vCPUs before the deadline (${cpuDir}/cpuN/online)`);
    await sleep(pollMs, opts.signal);
  }
  let memoryBlocks = 0;
  if (!req.cpuOnly) {
    for (;;) {
      const n = await onlinePass(memoryDir, 'memory', Number.POSITIVE_INFINITY);
      memoryBlocks += n;
      if ((memoryBlocks > 0 && n === 0) || Date.now() >= deadline) break;
      await sleep(pollMs, opts.signal);
    }
    if (memoryBlocks === 0) log(`OnlineCPUMem: no offline memory block appeared under ${memoryDir}`);
  }
  log(`OnlineCPUMem: onlined ${cpus} vCPU(s) and ${memoryBlocks} memory block(s)`);
  return { cpus, memoryBlocks };
}
