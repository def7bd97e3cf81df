/**
 * Prometheus metrics with the real programs: a sandbox started by a private containerd through
 * containerd-shim-kata-v2 (QEMU under TCG, our guest agent), its management socket scraped with
 * node's HTTP client, and `kata-runtime monitor` scraped with fetch; both answers parsed as
 * Prometheus text. The shims' sockets live under a temp sbs root (KATA_TS_SBS_ROOT).
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { CACHE_MS } from '../../cli/monitor.js';
import { parsePromText, type PromFamily } from '../../core/prom-text.js';
import { PACKAGE_ROOT } from '../../core/paths.js';
import { BUSYBOX_IMAGE, NO_LEFTOVERS, startContainerd, type TestContainerd } from '../helpers/containerd.js';
import { ensureGuestImage } from '../helpers/guest.js';
import { processesMentioning } from '../helpers/procs.js';
import { shimBinDir, shimConfig } from '../helpers/shim.js';
import { TempDir } from '../helpers/tmp.js';
import { until } from '../helpers/wait.js';

const RUNTIME = 'io.containerd.kata.v2';
const BIN = path.join(PACKAGE_ROOT, 'dist', 'bundle', 'kata-runtime.mjs');

function getOverSocket(socketPath: string, p: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    http
      .get({ socketPath, path: p }, (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (d: string) => (body += d));
        res.once('end', () => resolve({ status: res.statusCode ?? 0, body }));
      })
      .once('error', reject);
  });
}

/** The samples of `name` whose labels include `labels`, as numbers. */
function values(f: PromFamily[], name: string, labels: Record<string, string> = {}): number[] {
  return (f.find((x) => x.name === name)?.samples ?? []).filter((s) => Object.entries(labels).every(([k, v]) => s.labels.some(([a, b]) => a === k && b === v))).map((s) => Number(s.value));
}

/** Every family has HELP and TYPE and every sample a finite value or NaN; nothing is untyped. */
function assertWellFormed(f: PromFamily[]): void {
  for (const fam of f) {
    assert.ok(fam.help !== undefined, `HELP of ${fam.name}`);
    assert.notEqual(fam.type, 'untyped', `TYPE of ${fam.name}`);
  }
}

describe('Prometheus metrics of a sandbox with the real containerd @integration', function () {
  this.timeout(300_000);
  let tmp: TempDir;
  let ctrd: TestContainerd | undefined;
  let runRoot: string;
  let sbsRoot: string;
  let monitor: ChildProcess | undefined;
  let monitorUrl = '';

  before(async function () {
    this.timeout(600_000);
    const image = await ensureGuestImage();
    tmp = new TempDir('kata-metrics-e2e-');
    runRoot = path.join(tmp.path, 'run');
    sbsRoot = path.join(tmp.path, 'sbs');
    ctrd = await startContainerd(this, { pathPrefix: [shimBinDir(tmp)], env: { KATA_CONF_FILE: shimConfig(tmp, image), KATA_TS_RUN_ROOT: runRoot, KATA_TS_SBS_ROOT: sbsRoot } });
    monitor = spawn(process.execPath, [BIN, 'monitor', '--listen', '127.0.0.1:0'], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, KATA_TS_SBS_ROOT: sbsRoot } });
    let out = '';
    monitor.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    await until('kata-runtime monitor to listen', () => /serving (http:\S+)/.exec(out)?.[1], 30_000, 50).then((u) => (monitorUrl = u));
  });

  after(async () => {
    monitor?.kill('SIGKILL');
    await ctrd?.stop();
    tmp?.cleanup();
  });

  const c = () => ctrd!;
  const scrapeMonitor = async () => {
    const res = await fetch(monitorUrl);
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-type') ?? '', /^text\/plain; version=0\.0\.4/);
    const f = parsePromText(await res.text());
    assertWellFormed(f);
    return f;
  };

  it("serves the hypervisor's, the shim's, the agent's and the guest's figures on the management socket, and the monitor labels them with the sandbox", async () => {
    const id = 'metrics1';
    const r = await c().ctr(['run', '-d', '--runtime', RUNTIME, '--annotation', 'io.kubernetes.cri.sandbox-name=web', '--annotation', 'io.kubernetes.cri.sandbox-namespace=shop', BUSYBOX_IMAGE, id, 'sleep', '1000'], { timeoutMs: 120_000 });
    assert.equal(r.code, 0, `${r.stderr}\n${c().logTail(40)}`);
    try {
      const res = await getOverSocket(path.join(sbsRoot, id, 'shim-monitor.sock'), '/metrics');
      assert.equal(res.status, 200, res.body);
      const f = parsePromText(res.body);
      assertWellFormed(f);
      const [vmRss] = values(f, 'kata_hypervisor_proc_status', { item: 'vmrss' });
      assert.ok(vmRss! > 16 * 1024 * 1024, `hypervisor RSS ${vmRss}`);
      assert.ok(values(f, 'kata_hypervisor_proc_status', { item: 'pss' })[0]! > 0, 'hypervisor PSS');
      assert.ok(values(f, 'kata_hypervisor_threads')[0]! >= 2, 'QEMU has several threads');
      assert.ok(values(f, 'kata_hypervisor_fds')[0]! > 3);
      assert.ok(values(f, 'kata_hypervisor_process_cpu_seconds_total')[0]! > 0, 'booting used CPU');
      assert.ok(values(f, 'kata_shim_process_resident_memory_bytes')[0]! > 0);
      assert.ok(values(f, 'kata_shim_sandbox_start_phase_seconds', { phase: 'vm_start' })[0]! > 0);
      assert.ok(values(f, 'kata_shim_sandbox_start_phase_seconds', { phase: 'agent_connect' })[0]! > 0);
      assert.deepEqual(values(f, 'kata_shim_pod_info', { cri_name: 'web', cri_namespace: 'shop' }), [1]);
      assert.deepEqual(values(f, 'kata_shim_agent_metrics_up'), [1]);
      // From the guest, through GetMetrics.
      const [memTotal] = values(f, 'kata_guest_meminfo', { item: 'mem_total' });
      assert.ok(memTotal! > 64 * 1024 * 1024 && memTotal! < 64 * 1024 * 1024 * 1024, `guest MemTotal ${memTotal}`);
      assert.ok(values(f, 'kata_guest_meminfo', { item: 'mem_free' })[0]! < memTotal!);
      assert.equal(values(f, 'kata_guest_load', { item: 'load1' }).length, 1);
      assert.ok(values(f, 'kata_guest_cpu_time', { cpu: 'total', item: 'idle' })[0]! >= 0);
      assert.ok(values(f, 'kata_guest_tasks', { item: 'max' })[0]! > 5, 'the guest runs the agent, the container and kernel threads');
      assert.ok(values(f, 'kata_agent_process_resident_memory_bytes')[0]! > 1024 * 1024, "the agent's RSS");

      const m = await scrapeMonitor();
      assert.deepEqual(values(m, 'kata_monitor_running_shim_count'), [1]);
      assert.ok(values(m, 'kata_hypervisor_proc_status', { sandbox_id: id, item: 'vmrss' })[0]! > 0);
      const mem = m.find((x) => x.name === 'kata_guest_meminfo')!.samples.find((s) => s.labels.some(([k, v]) => k === 'item' && v === 'mem_total'))!;
      assert.deepEqual(mem.labels.slice(0, 3), [['sandbox_id', id], ['cri_name', 'web'], ['cri_namespace', 'shop']]);
      assert.ok(m.every((fam) => !fam.name.startsWith('kata_monitor_') || fam.samples.every((s) => !s.labels.some(([k]) => k === 'sandbox_id'))), "the monitor's own figures carry no sandbox");
    } finally {
      await c().ctr(['task', 'kill', '-s', 'SIGKILL', id]);
      await until('the task to stop', async () => !new RegExp(`^${id}\\s+\\d+\\s+RUNNING`, 'm').test((await c().ctr(['task', 'ls'])).stdout), 60_000, 200);
      await c().ctr(['task', 'rm', id]);
      await c().ctr(['container', 'rm', id]);
    }
    await until('the shim to remove its management socket', () => !existsSync(path.join(sbsRoot, id)), 60_000, 200);
    // The monitor serves its last answer again for CACHE_MS.
    const m = await until('the monitor to drop the sandbox', async () => {
      const f = await scrapeMonitor();
      return values(f, 'kata_monitor_running_shim_count')[0] === 0 && f;
    }, CACHE_MS + 5_000, 200);
    assert.deepEqual(values(m, 'kata_hypervisor_threads'), []);
    assert.deepEqual(processesMentioning(`${runRoot}/`).map((p) => p.pid), [], 'no QEMU left');
  });

  it('leaves nothing behind', async () => {
    monitor!.kill('SIGTERM');
    assert.equal(await new Promise((r) => monitor!.once('close', r)), 0, 'the monitor exits 0 on SIGTERM');
    assert.deepEqual(await ctrd!.stop(), NO_LEFTOVERS, ctrd!.logTail());
    assert.deepEqual(existsSync(sbsRoot) ? readdirSync(sbsRoot) : [], []);
  });
});
