/**
 * A container's statistics for containerd: the guest agent's StatsContainerResponse (kata's
 * CgroupStats, read from the container's cgroup v2 files) → containerd's cgroup v2 `Metrics`
 * (`io.containerd.cgroups.v2.Metrics`, what runc's shim returns on a cgroup v2 host), which
 * `ctr task metrics` prints and CRI's ContainerStats/ListContainerStats read (CPU usage in
 * microseconds, memory usage and working set = usage - inactive_file).
 */
import type { StatsContainerResponse } from '../wire/agent/proto.gen.js';
import { Metrics, type MemoryStat } from '../wire/containerd/proto.gen.js';
import type { MessageInit } from '../wire/ttrpc/codec.js';

/** The Any type URL containerd's typeurl registry knows the cgroup v2 metrics by (gogo's message name, no prefix). */
export const METRICS_TYPE_URL = Metrics.typeName;

/** memory.stat keys that have a MemoryStat field of the same name. */
const MEMORY_STAT_KEYS = [
  'anon', 'file', 'kernel_stack', 'slab', 'sock', 'shmem', 'file_mapped', 'file_dirty', 'file_writeback', 'anon_thp',
  'inactive_anon', 'active_anon', 'inactive_file', 'active_file', 'unevictable', 'slab_reclaimable', 'slab_unreclaimable',
  'pgfault', 'pgmajfault', 'workingset_refault', 'workingset_activate', 'workingset_nodereclaim', 'pgrefill', 'pgscan',
  'pgsteal', 'pgactivate', 'pgdeactivate', 'pglazyfree', 'pglazyfreed', 'thp_fault_alloc', 'thp_collapse_alloc',
] as const;

function camel(k: string): string {
  return k.replace(/_([a-z])/g, (_, c: string) => c.toUpperCase());
}

/** StatsContainerResponse → cgroup v2 Metrics (nanoseconds become microseconds). */
export function metricsFromStats(res: StatsContainerResponse): MessageInit<Metrics> {
  const cg = res.cgroupStats;
  const cpu = cg?.cpuStats;
  const mem = cg?.memoryStats;
  const memory: Record<string, bigint> = {};
  for (const k of MEMORY_STAT_KEYS) {
    const v = mem?.stats[k];
    if (v !== undefined) memory[camel(k)] = v;
  }
  return {
    ...(cg?.pidsStats ? { pids: { current: cg.pidsStats.current, limit: cg.pidsStats.limit } } : {}),
    ...(cpu
      ? {
          cpu: {
            usageUsec: (cpu.cpuUsage?.totalUsage ?? 0n) / 1000n,
            userUsec: (cpu.cpuUsage?.usageInUsermode ?? 0n) / 1000n,
            systemUsec: (cpu.cpuUsage?.usageInKernelmode ?? 0n) / 1000n,
            nrPeriods: cpu.throttlingData?.periods ?? 0n,
            nrThrottled: cpu.throttlingData?.throttledPeriods ?? 0n,
            throttledUsec: (cpu.throttlingData?.throttledTime ?? 0n) / 1000n,
          },
        }
      : {}),
    ...(mem
      ? {
          memory: {
            ...(memory as Partial<MemoryStat>),
            usage: mem.usage?.usage ?? 0n,
            usageLimit: mem.usage?.limit ?? 0n,
            swapUsage: mem.swapUsage?.usage ?? 0n,
            swapLimit: mem.swapUsage?.limit ?? 0n,
          },
        }
      : {}),
  };
}

/** The Stats answer's Any: encoded Metrics under {@link METRICS_TYPE_URL}. */
export function metricsAny(res: StatsContainerResponse): { type_url: string; value: Uint8Array } {
  return { type_url: METRICS_TYPE_URL, value: Metrics.encode(metricsFromStats(res)) };
}
