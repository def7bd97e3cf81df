/**
 * GetMetrics: the guest's and the agent's figures as Prometheus text, produced in the guest as
 * kata-agent's `metrics.rs` does (names and `item` labels are Kata's where Kata has the figure):
 * load and task counts (/proc/loadavg), memory (/proc/meminfo, in bytes), CPU time (/proc/stat,
 * in seconds), the agent's own CPU, RSS and fds, and per-container CPU, memory and pids read from
 * the containers' cgroup v2 directories under {@link CONTAINER_CGROUP_ROOT} when they exist.
 *
 * Written by hand rather than with a client library: the agent imports only wire/ and Node.
 */
import { readFile, readdir } from 'node:fs/promises';
import { SANDBOX_CGROUP, parseFlatKeyed } from './cgroups.js';
import { GUEST_METRICS } from '../../wire/agent/metric-families.js';

/** Where the agent gives each container its cgroup (`<root>/<container-id>`, cgroup v2 files): cgroups.ts says. */
export const CONTAINER_CGROUP_ROOT = SANDBOX_CGROUP;

/** /proc/stat counts in USER_HZ, which is 100 on every Linux architecture the guest runs on. */
const USER_HZ = 100;

/** A container directory is read only when its name is a containerd identifier (no label games). */
const CONTAINER_ID = /^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$/;

/** At most this many container cgroups are reported (the answer stays bounded). */
export const MAX_CONTAINERS = 1024;

interface Sample {
  readonly labels?: Readonly<Record<string, string>>;
  readonly value: number;
}

interface Family {
  readonly name: string;
  readonly help: string;
  readonly type: 'gauge' | 'counter';
  readonly labels?: readonly string[];
  readonly samples: readonly Sample[];
}

function escapeLabel(v: string): string {
  return v.replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/"/g, '\\"');
}

function formatValue(v: number): string {
  if (Number.isNaN(v)) return 'NaN';
  if (v === Infinity) return '+Inf';
  if (v === -Infinity) return '-Inf';
  return String(v);
}

/** Prometheus text exposition format 0.0.4. */
export function formatFamilies(families: readonly Family[]): string {
  const out: string[] = [];
  for (const f of families) {
    if (f.samples.length === 0) continue;
    out.push(`# HELP ${f.name} ${f.help.replace(/\\/g, '\\\\').replace(/\n/g, '\\n')}`, `# TYPE ${f.name} ${f.type}`);
    for (const s of f.samples) {
      const labels = s.labels ? Object.entries(s.labels) : [];
      const l = labels.length ? `{${labels.map(([k, v]) => `${k}="${escapeLabel(v)}"`).join(',')}}` : '';
      out.push(`${f.name}${l} ${formatValue(s.value)}`);
    }
  }
  return out.length ? `${out.join('\n')}\n` : '';
}

/** `MemTotal` → `mem_total`, `Active(anon)` → `active_anon`, `DirectMap4k` → `direct_map_4k` (Kata's item names). */
export function meminfoItem(key: string): string {
  return key
    .replace(/\((\w+)\)/g, '_$1')
    .replace(/([a-z])(\d)/g, '$1_$2')
    .replace(/([a-z])([A-Z])/g, '$1_$2')
    .replace(/([A-Z]+)([A-Z][a-z])/g, '$1_$2')
    .replace(/[^A-Za-z0-9_]/g, '_')
    .toLowerCase();
}

/** /proc/meminfo as bytes per Kata item name. */
export function parseMeminfo(text: string): Map<string, number> {
  const items = new Map<string, number>();
  for (const line of text.split('\n')) {
    const m = /^([A-Za-z0-9_()]+):\s+(\d+)(?:\s+kB)?\s*$/.exec(line);
    if (!m) continue;
    const bytes = Number(m[2]) * (line.trimEnd().endsWith('kB') ? 1024 : 1);
    items.set(meminfoItem(m[1]!), bytes);
  }
  return items;
}

/** /proc/loadavg: `0.00 0.01 0.05 1/123 456`. */
export function parseLoadavg(text: string): { load1: number; load5: number; load15: number; running: number; total: number } | undefined {
  const m = /^(\d+\.\d+) (\d+\.\d+) (\d+\.\d+) (\d+)\/(\d+) /.exec(text);
  if (!m) return undefined;
  return { load1: Number(m[1]), load5: Number(m[2]), load15: Number(m[3]), running: Number(m[4]), total: Number(m[5]) };
}

const CPU_ITEMS = ['user', 'nice', 'system', 'idle', 'iowait', 'irq', 'softirq', 'steal', 'guest', 'guest_nice'] as const;

/** /proc/stat's `cpu` lines: seconds per item, for `total` and each CPU number. */
export function parseProcStat(text: string): { cpu: string; item: string; seconds: number }[] {
  const out: { cpu: string; item: string; seconds: number }[] = [];
  for (const line of text.split('\n')) {
    const m = /^cpu(\d*)\s+([\d\s]+)$/.exec(line);
    if (!m) continue;
    const cpu = m[1] === '' ? 'total' : m[1]!;
    m[2]!.trim().split(/\s+/).forEach((v, i) => {
      const item = CPU_ITEMS[i];
      if (item) out.push({ cpu, item, seconds: Number(v) / USER_HZ });
    });
  }
  return out;
}

/** One container's cgroup v2 figures; a file that is missing (a controller not enabled) leaves its figure out. */
export interface ContainerCgroup {
  readonly id: string;
  readonly cpuSeconds?: number;
  readonly memoryBytes?: number;
  /** memory.max; absent when it is `max` (no limit). */
  readonly memoryLimitBytes?: number;
  readonly pids?: number;
}

async function readOrUndefined(file: string): Promise<string | undefined> {
  try {
    return await readFile(file, 'utf8');
  } catch {
    return undefined;
  }
}

function nonNegativeInteger(text: string | undefined): number | undefined {
  const t = text?.trim();
  return t !== undefined && /^\d+$/.test(t) ? Number(t) : undefined;
}

/**
 * The container cgroups under `root` (cgroup v2 files: `cpu.stat` usage_usec, `memory.current`,
 * `memory.max`, `pids.current`); none when `root` does not exist. Only directories named as
 * containerd identifiers count, sorted, at most {@link MAX_CONTAINERS}.
 */
export async function readContainerCgroups(root: string = CONTAINER_CGROUP_ROOT): Promise<ContainerCgroup[]> {
  let entries;
  try {
    entries = await readdir(root, { withFileTypes: true });
  } catch {
    return [];
  }
  const ids = entries.filter((e) => e.isDirectory() && e.name.length <= 128 && CONTAINER_ID.test(e.name)).map((e) => e.name).sort().slice(0, MAX_CONTAINERS);
  return Promise.all(
    ids.map(async (id) => {
      const dir = `${root}/${id}`;
      const [cpuStat, memCurrent, memMax, pids] = await Promise.all(['cpu.stat', 'memory.current', 'memory.max', 'pids.current'].map((f) => readOrUndefined(`${dir}/${f}`)));
      const usage = parseFlatKeyed(cpuStat ?? '').get('usage_usec');
      const c: { -readonly [K in keyof ContainerCgroup]: ContainerCgroup[K] } = { id };
      if (usage !== undefined) c.cpuSeconds = Number(usage) / 1e6;
      const mem = nonNegativeInteger(memCurrent);
      if (mem !== undefined) c.memoryBytes = mem;
      const max = nonNegativeInteger(memMax);
      if (max !== undefined) c.memoryLimitBytes = max;
      const p = nonNegativeInteger(pids);
      if (p !== undefined) c.pids = p;
      return c;
    }),
  );
}

/** Where the figures come from (the tests point them at temporary files). */
export interface MetricsSources {
  readonly proc?: string;
  readonly cgroupRoot?: string;
}

let scrapes = 0;

/** The whole GetMetrics answer. */
export async function guestMetrics(src: MetricsSources = {}): Promise<string> {
  const proc = src.proc ?? '/proc';
  scrapes += 1;
  const [loadavg, meminfo, stat, fds, containers] = await Promise.all([
    readOrUndefined(`${proc}/loadavg`),
    readOrUndefined(`${proc}/meminfo`),
    readOrUndefined(`${proc}/stat`),
    readdir(`${proc}/self/fd`).then((l) => l.length, () => undefined),
    readContainerCgroups(src.cgroupRoot),
  ]);
  const load = loadavg ? parseLoadavg(loadavg) : undefined;
  const cpu = process.cpuUsage();
  const d = (name: keyof typeof GUEST_METRICS, samples: readonly Sample[]): Family => ({ name, ...GUEST_METRICS[name], samples });
  const perContainer = (pick: (c: ContainerCgroup) => number | undefined): Sample[] =>
    containers.flatMap((c) => {
      const value = pick(c);
      return value === undefined ? [] : [{ labels: { container_id: c.id }, value }];
    });
  const families: Family[] = [
    d('kata_agent_scrape_count', [{ value: scrapes }]),
    d('kata_agent_process_cpu_seconds_total', [{ value: (cpu.user + cpu.system) / 1e6 }]),
    d('kata_agent_process_resident_memory_bytes', [{ value: process.memoryUsage.rss() }]),
    d('kata_agent_process_open_fds', fds === undefined ? [] : [{ value: fds }]),
    d('kata_guest_load', load ? (['load1', 'load5', 'load15'] as const).map((item) => ({ labels: { item }, value: load[item] })) : []),
    d('kata_guest_tasks', load ? [{ labels: { item: 'cur' }, value: load.running }, { labels: { item: 'max' }, value: load.total }] : []),
    d('kata_guest_meminfo', meminfo ? [...parseMeminfo(meminfo)].map(([item, value]) => ({ labels: { item }, value })) : []),
    d('kata_guest_cpu_time', stat ? parseProcStat(stat).map((s) => ({ labels: { cpu: s.cpu, item: s.item }, value: s.seconds })) : []),
    d('kata_guest_container_cpu_usage_seconds_total', perContainer((c) => c.cpuSeconds)),
    d('kata_guest_container_memory_usage_bytes', perContainer((c) => c.memoryBytes)),
    d('kata_guest_container_memory_limit_bytes', perContainer((c) => c.memoryLimitBytes)),
    d('kata_guest_container_pids', perContainer((c) => c.pids)),
  ];
  return formatFamilies(families);
}
