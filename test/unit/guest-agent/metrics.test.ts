import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { parsePromText, type PromFamily } from '../../../core/prom-text.js';
import { GUEST_METRICS } from '../../../wire/agent/metric-families.js';
import { guestMetrics, meminfoItem, parseLoadavg, parseMeminfo, parseProcStat, readContainerCgroups } from '../../../guest/agent/metrics.js';
import { TempDir } from '../../helpers/tmp.js';

const MEMINFO = 'MemTotal:        2014648 kB\nMemFree:         1900000 kB\nActive(anon):       1234 kB\nHugePages_Total:       0\nDirectMap4k:       12288 kB\n';
const STAT = 'cpu  100 0 50 1000 2 0 1 0 0 0\ncpu0 60 0 30 500 1 0 1 0 0 0\ncpu1 40 0 20 500 1 0 0 0 0 0\nintr 12345 0\nctxt 999\n';

/** Lays out `<root>/<id>/` like a cgroup2 directory with the given files. */
function cgroup(root: string, id: string, files: Record<string, string>): void {
  mkdirSync(path.join(root, id), { recursive: true });
  for (const [f, text] of Object.entries(files)) writeFileSync(path.join(root, id, f), text);
}

function sample(families: PromFamily[], name: string, labels: Record<string, string> = {}): number | undefined {
  const s = families.find((f) => f.name === name)?.samples.find((x) => Object.entries(labels).every(([k, v]) => x.labels.some(([a, b]) => a === k && b === v)));
  return s === undefined ? undefined : Number(s.value);
}

describe('guest metrics (guest/agent/metrics.ts, GetMetrics)', () => {
  let tmp: TempDir;
  beforeEach(() => (tmp = new TempDir('kata-guest-metrics-')));
  afterEach(() => tmp.cleanup());

  it("names /proc/meminfo items as Kata does and counts kB as bytes", () => {
    assert.equal(meminfoItem('MemTotal'), 'mem_total');
    assert.equal(meminfoItem('Active(anon)'), 'active_anon');
    assert.equal(meminfoItem('SReclaimable'), 's_reclaimable');
    assert.equal(meminfoItem('DirectMap4k'), 'direct_map_4k');
    const m = parseMeminfo(MEMINFO);
    assert.equal(m.get('mem_total'), 2014648 * 1024);
    assert.equal(m.get('active_anon'), 1234 * 1024);
    assert.equal(m.get('huge_pages_total'), 0);
  });

  it('reads load and task counts from /proc/loadavg and CPU seconds per CPU from /proc/stat', () => {
    assert.deepEqual(parseLoadavg('0.50 0.25 0.10 2/87 1234\n'), { load1: 0.5, load5: 0.25, load15: 0.1, running: 2, total: 87 });
    assert.equal(parseLoadavg('nonsense'), undefined);
    const cpu = parseProcStat(STAT);
    assert.deepEqual(cpu.find((c) => c.cpu === 'total' && c.item === 'user'), { cpu: 'total', item: 'user', seconds: 1 });
    assert.deepEqual(cpu.find((c) => c.cpu === '1' && c.item === 'idle'), { cpu: '1', item: 'idle', seconds: 5 });
    assert.equal(cpu.length, 30);
  });

  it('reads each container cgroup under the root, leaving out figures whose files are missing and names that are no container id', async () => {
    const root = path.join(tmp.path, 'kata-ts');
    cgroup(root, 'c1', { 'cpu.stat': 'usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n', 'memory.current': '1048576\n', 'memory.max': '67108864\n', 'pids.current': '3\n' });
    cgroup(root, 'c2', { 'cpu.stat': 'usage_usec 10\n', 'memory.current': '4096\n', 'memory.max': 'max\n' });
    cgroup(root, 'bad..id', { 'memory.current': '1\n' });
    writeFileSync(path.join(root, 'cgroup.procs'), '');
    assert.deepEqual(await readContainerCgroups(root), [
      { id: 'c1', cpuSeconds: 2.5, memoryBytes: 1048576, memoryLimitBytes: 67108864, pids: 3 },
      { id: 'c2', cpuSeconds: 0.00001, memoryBytes: 4096 },
    ]);
    assert.deepEqual(await readContainerCgroups(path.join(tmp.path, 'none')), []);
  });

  it('answers well-formed Prometheus text with Kata names: guest load, memory, CPU, tasks, the agent, and per-container figures', async () => {
    const proc = path.join(tmp.path, 'proc');
    mkdirSync(path.join(proc, 'self', 'fd'), { recursive: true });
    writeFileSync(path.join(proc, 'loadavg'), '0.50 0.25 0.10 2/87 1234\n');
    writeFileSync(path.join(proc, 'meminfo'), MEMINFO);
    writeFileSync(path.join(proc, 'stat'), STAT);
    for (const fd of ['0', '1', '2']) writeFileSync(path.join(proc, 'self', 'fd', fd), '');
    const root = path.join(tmp.path, 'kata-ts');
    cgroup(root, 'c1', { 'cpu.stat': 'usage_usec 2500000\n', 'memory.current': '1048576\n', 'memory.max': '67108864\n', 'pids.current': '3\n' });
    const text = await guestMetrics({ proc, cgroupRoot: root });
    const f = parsePromText(text, { allowedPrefixes: ['kata_agent_', 'kata_guest_'] });
    // Every family as the table (and so the README) says: type, help and label names.
    assert.deepEqual(f.map((x) => x.name).sort(), Object.keys(GUEST_METRICS).sort());
    for (const fam of f) {
      const d = GUEST_METRICS[fam.name as keyof typeof GUEST_METRICS];
      assert.deepEqual([fam.type, fam.help], [d.type, d.help], fam.name);
      for (const s of fam.samples) assert.deepEqual(s.labels.map(([k]) => k), [...d.labels], fam.name);
    }
    assert.equal(sample(f, 'kata_guest_load', { item: 'load1' }), 0.5);
    assert.equal(sample(f, 'kata_guest_tasks', { item: 'max' }), 87);
    assert.equal(sample(f, 'kata_guest_meminfo', { item: 'mem_total' }), 2014648 * 1024);
    assert.equal(sample(f, 'kata_guest_cpu_time', { cpu: '0', item: 'system' }), 0.3);
    assert.equal(sample(f, 'kata_agent_process_open_fds'), 3);
    assert.ok((sample(f, 'kata_agent_process_resident_memory_bytes') ?? 0) > 0);
    assert.ok((sample(f, 'kata_agent_scrape_count') ?? 0) >= 1);
    assert.equal(sample(f, 'kata_guest_container_cpu_usage_seconds_total', { container_id: 'c1' }), 2.5);
    assert.equal(sample(f, 'kata_guest_container_memory_usage_bytes', { container_id: 'c1' }), 1048576);
    assert.equal(sample(f, 'kata_guest_container_memory_limit_bytes', { container_id: 'c1' }), 67108864);
    assert.equal(sample(f, 'kata_guest_container_pids', { container_id: 'c1' }), 3);
  });

  it('still answers, without the missing figures, when /proc files and cgroups are absent', async () => {
    const text = await guestMetrics({ proc: path.join(tmp.path, 'empty'), cgroupRoot: path.join(tmp.path, 'none') });
    const f = parsePromText(text);
    assert.equal(f.find((x) => x.name === 'kata_guest_meminfo'), undefined);
    assert.ok(sample(f, 'kata_agent_scrape_count'));
  });
});
