import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import http from 'node:http';
import path from 'node:path';
import { countHotplug } from '../../../core/counters.js';
import { parsePromText, type PromFamily } from '../../../core/prom-text.js';
import { GUEST_METRICS_MAX_BYTES, ShimMetrics, podLabelsFrom, type SandboxFigures } from '../../../shim/metrics.js';
import { ShimMonitor } from '../../../shim/monitor.js';
import { GrpcCode } from '../../../wire/ttrpc/codes.js';
import { TempDir } from '../../helpers/tmp.js';

const GUEST = '# HELP kata_guest_meminfo Memory.\n# TYPE kata_guest_meminfo gauge\nkata_guest_meminfo{item="mem_total"} 2000000000\n# HELP kata_agent_scrape_count Scrapes.\n# TYPE kata_agent_scrape_count counter\nkata_agent_scrape_count 1\n';

function figures(over: Partial<SandboxFigures> = {}): SandboxFigures {
  return {
    hypervisorPid: () => undefined,
    startPhases: () => ({ vm_start: 1.5, agent_connect: 0.25 }),
    guestMetrics: async () => GUEST,
    podLabels: () => ({ cri_name: 'web', cri_namespace: 'default', cri_uid: 'u-1' }),
    ...over,
  };
}

function value(f: PromFamily[], name: string, labels: Record<string, string> = {}): number | undefined {
  const s = f.find((x) => x.name === name)?.samples.find((x) => Object.entries(labels).every(([k, v]) => x.labels.some(([a, b]) => a === k && b === v)));
  return s === undefined ? undefined : Number(s.value);
}

function get(socketPath: string, p: string): Promise<{ status: number; type: string; body: string }> {
  return new Promise((resolve, reject) => {
    http
      .get({ socketPath, path: p }, (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (d: string) => (body += d));
        res.once('end', () => resolve({ status: res.statusCode ?? 0, type: String(res.headers['content-type']), body }));
      })
      .once('error', reject);
  });
}

describe('ShimMetrics (shim/metrics.ts, GET /metrics)', () => {
  let vm: ChildProcess;
  before(async () => {
    // Stands in for the hypervisor process: a real process with real /proc figures.
    vm = spawn('sleep', ['60'], { stdio: 'ignore' });
    await new Promise((r) => vm.once('spawn', r));
  });
  after(() => vm.kill('SIGKILL'));

  it("reports the hypervisor's and the shim's process figures, start phases, hot-plug counts, pod labels and the guest's figures", async () => {
    countHotplug('test_cpu');
    countHotplug('test_cpu');
    const m = await ShimMetrics.create(figures({ hypervisorPid: () => vm.pid }));
    const f = parsePromText(await m.render());
    assert.ok(f.every((x) => x.help !== undefined && x.type !== 'untyped'), 'HELP and TYPE on every family');
    assert.ok((value(f, 'kata_hypervisor_proc_status', { item: 'vmrss' }) ?? 0) > 0, 'hypervisor RSS');
    assert.ok((value(f, 'kata_hypervisor_proc_status', { item: 'pss' }) ?? 0) > 0, 'hypervisor PSS');
    assert.equal(value(f, 'kata_hypervisor_threads'), 1);
    assert.ok((value(f, 'kata_hypervisor_fds') ?? 0) >= 3);
    assert.ok(value(f, 'kata_hypervisor_process_cpu_seconds_total') !== undefined);
    assert.ok((value(f, 'kata_shim_proc_status', { item: 'vmrss' }) ?? 0) > 0, 'shim RSS');
    assert.ok((value(f, 'kata_shim_process_resident_memory_bytes') ?? 0) > 0, "prom-client's process metrics under Kata's prefix");
    assert.ok((value(f, 'kata_shim_fds') ?? 0) > 0);
    assert.equal(value(f, 'kata_shim_sandbox_start_phase_seconds', { phase: 'vm_start' }), 1.5);
    assert.equal(value(f, 'kata_shim_hotplug_total', { kind: 'test_cpu' }), 2);
    assert.equal(value(f, 'kata_shim_pod_info', { cri_name: 'web', cri_namespace: 'default', cri_uid: 'u-1' }), 1);
    assert.equal(value(f, 'kata_shim_agent_metrics_up'), 1);
    assert.equal(value(f, 'kata_guest_meminfo', { item: 'mem_total' }), 2000000000);
  });

  it('leaves a bad guest answer out with a labelled error, and the scrape still succeeds', async () => {
    const cases: [string, () => Promise<string>][] = [
      ['unavailable', () => Promise.reject(new Error('agent gone'))],
      ['timeout', () => Promise.reject(Object.assign(new Error('GetMetrics: deadline exceeded'), { grpcCode: GrpcCode.DEADLINE_EXCEEDED }))],
      ['too_large', () => Promise.reject(Object.assign(new Error('GetMetrics: reply refused: 5000000 bytes'), { grpcCode: GrpcCode.RESOURCE_EXHAUSTED }))],
      ['too_large', async () => `kata_guest_x 1\n${'#'.repeat(GUEST_METRICS_MAX_BYTES)}\n`],
      ['unparsable', async () => 'kata_guest_x{a="1" 1\n'],
      ['unexpected_name', async () => 'kata_guest_x 1\nkata_hypervisor_fds 999\n'],
      ['unexpected_name', async () => '# TYPE kata_shim_agent_metrics_up gauge\nkata_shim_agent_metrics_up 999\n'],
    ];
    for (const [reason, answer] of cases) {
      const m = await ShimMetrics.create(figures({ guestMetrics: answer }));
      const text = await m.render();
      const f = parsePromText(text);
      assert.equal(value(f, 'kata_shim_agent_metrics_up'), 0, reason);
      assert.equal(value(f, 'kata_shim_agent_metrics_errors_total', { reason }), 1, reason);
      assert.equal(f.find((x) => x.name === 'kata_guest_x'), undefined, `${reason}: nothing of the answer is merged`);
      assert.ok(!/ 999$/m.test(text), `${reason}: no figure of the answer passes as the host's`);
      assert.equal(f.filter((x) => x.name === 'kata_shim_agent_metrics_up').length, 1);
    }
  });

  it('shares one gathering, and one GetMetrics call, between concurrent scrapes', async () => {
    let calls = 0;
    const m = await ShimMetrics.create(figures({ guestMetrics: async () => (calls++, await new Promise((r) => setTimeout(r, 50)), GUEST) }));
    const [a, b] = await Promise.all([m.render(), m.render()]);
    assert.equal(a, b);
    assert.equal(calls, 1);
  });

  it('takes the CRI labels from the sandbox annotations, only those present', () => {
    assert.deepEqual(podLabelsFrom({ 'io.kubernetes.cri.sandbox-name': 'web', 'io.kubernetes.cri.sandbox-uid': 'u-1', other: 'x' }), { cri_name: 'web', cri_uid: 'u-1' });
    assert.deepEqual(podLabelsFrom({}), {});
  });

  describe('on the management socket', () => {
    let tmp: TempDir;
    beforeEach(() => (tmp = new TempDir('kata-shim-metrics-')));
    afterEach(() => tmp.cleanup());

    it('answers GET /metrics as Prometheus text, and 404 where the shim gives no figures', async () => {
      const env = { KATA_TS_SBS_ROOT: path.join(tmp.path, 'sbs') };
      const m = await ShimMonitor.start('sb1', { debugConsoleSocket: () => undefined, figures: figures({ hypervisorPid: () => vm.pid }) }, env);
      const bare = await ShimMonitor.start('sb2', { debugConsoleSocket: () => undefined }, env);
      try {
        const r = await get(m.socketPath, '/metrics');
        assert.equal(r.status, 200);
        assert.match(r.type, /^text\/plain; version=0\.0\.4/);
        assert.ok((value(parsePromText(r.body), 'kata_hypervisor_proc_status', { item: 'vmrss' }) ?? 0) > 0);
        assert.equal((await get(bare.socketPath, '/metrics')).status, 404);
        assert.equal((await get(m.socketPath, '/other')).status, 404);
      } finally {
        await m.close();
        await bare.close();
      }
    });
  });
});
