/**
 * `kata-runtime monitor` without VMs: shims are stood in for by real management sockets
 * (ShimMonitor with given figures) and by raw servers that misbehave, under a temp sbs root.
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { chmodSync, mkdirSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { HTTP_TIMEOUT_MS, KataMonitor, MAX_CONNECTIONS, parseListen } from '../../cli/monitor.js';
import { findExecutable } from '../../core/child.js';
import { KataError } from '../../core/errors.js';
import { createLogger } from '../../core/logger.js';
import { parsePromText, type PromFamily } from '../../core/prom-text.js';
import { ShimMonitor } from '../../shim/monitor.js';
import type { SandboxFigures } from '../../shim/metrics.js';
import { GrpcCode } from '../../wire/ttrpc/codes.js';
import { CLI, STACK_FRAME } from '../helpers/cli.js';
import { TempDir } from '../helpers/tmp.js';
import { until } from '../helpers/wait.js';

function figures(guest: string, pod: Record<string, string> = {}): SandboxFigures {
  return { hypervisorPid: () => process.pid, startPhases: () => ({ vm_start: 1 }), guestMetrics: async () => guest, podLabels: () => pod };
}

/** A guest that never answers: the agent client gives up after the shim's timeout, as the ttrpc client does. */
function hungGuest(): SandboxFigures {
  return {
    ...figures(''),
    guestMetrics: ({ timeoutMs }) => new Promise((_, reject) => setTimeout(() => reject(Object.assign(new Error(`GetMetrics: no reply within ${timeoutMs} ms`), { grpcCode: GrpcCode.DEADLINE_EXCEEDED })), timeoutMs)),
  };
}

function samples(f: PromFamily[], name: string): Record<string, string>[] {
  return (f.find((x) => x.name === name)?.samples ?? []).map((s) => Object.fromEntries([...s.labels, ['__value', s.value]]));
}

describe('kata-runtime monitor (cli/monitor.ts)', () => {
  describe('parseListen', () => {
    it('takes HOST:PORT and [IPv6]:PORT', () => {
      assert.deepEqual(parseListen('127.0.0.1:8090'), { host: '127.0.0.1', port: 8090 });
      assert.deepEqual(parseListen('[::1]:0'), { host: '::1', port: 0 });
      assert.deepEqual(parseListen('localhost:65535'), { host: 'localhost', port: 65535 });
    });

    it('refuses a port that is not a number from 0 to 65535, or no HOST:PORT at all, with KATA_ERR_MONITOR naming --listen', () => {
      for (const bad of ['127.0.0.1:x', '127.0.0.1:80a', '127.0.0.1:-1', '127.0.0.1:65536', '127.0.0.1:', '127.0.0.1', ':8090', '::1:8090', '[::1]8090', '[nothex]:1', 'a b:1', '-x:1']) {
        assert.throws(
          () => parseListen(bad),
          (e: { code: string; key: string }) => e.code === 'KATA_ERR_MONITOR' && e.key === '--listen',
          bad,
        );
      }
    });
  });

  describe('KataMonitor', () => {
    let tmp: TempDir;
    let root: string;
    const closers: (() => unknown)[] = [];
    beforeEach(() => {
      tmp = new TempDir('kata-monitor-cli-');
      root = path.join(tmp.path, 'sbs');
    });
    afterEach(async () => {
      for (const c of closers.splice(0)) await c();
      tmp.cleanup();
    });

    /** A server on `<root>/<id>/shim-monitor.sock` answering with `handler`. */
    async function rawShim(id: string, handler: http.RequestListener): Promise<void> {
      mkdirSync(path.join(root, id), { recursive: true });
      const server = http.createServer(handler);
      await new Promise<void>((r) => server.listen(path.join(root, id, 'shim-monitor.sock'), r));
      closers.push(() => new Promise((r) => (server.closeAllConnections(), server.close(r))));
    }

    it('scrapes every sandbox, labels each sample with its sandbox_id and CRI labels, and skips and counts dead, slow and broken shims', async () => {
      const env = { KATA_TS_SBS_ROOT: root };
      const guest = '# HELP kata_guest_load Load.\n# TYPE kata_guest_load gauge\nkata_guest_load{item="load1"} 0.5\n';
      const a = await ShimMonitor.start('pod-a', { debugConsoleSocket: () => undefined, figures: figures(guest, { cri_name: 'web', cri_namespace: 'default', cri_uid: 'u-a' }) }, env);
      const b = await ShimMonitor.start('pod-b', { debugConsoleSocket: () => undefined, figures: figures(guest.replace('0.5', '1.5')) }, env);
      closers.push(() => a.close(), () => b.close());
      // A shim that died: its directory and socket file are left, nothing listens.
      mkdirSync(path.join(root, 'dead'));
      const dead = net.createServer();
      await new Promise<void>((r) => dead.listen(path.join(root, 'dead', 'shim-monitor.sock'), r));
      // Closing a listening unix server removes the file; make a stale one with a server that exits.
      await new Promise<void>((r) => dead.close(() => r()));
      const stale = spawn(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(path.join(root, 'dead', 'shim-monitor.sock'))}, () => process.kill(process.pid, 'SIGKILL'))`]);
      await new Promise((r) => stale.once('exit', r));
      await rawShim('slow', () => undefined);
      await rawShim('garbage', (_req, res) => res.end('this is not prometheus text\n'));
      await rawShim('spoof', (_req, res) => res.end('kata_monitor_running_shim_count 1000\n'));
      await rawShim('error', (_req, res) => res.writeHead(500).end());
      mkdirSync(path.join(root, 'no-socket'));
      mkdirSync(path.join(root, 'bad..id'));

      const monitor = new KataMonitor({ root, timeoutMs: 500 });
      const f = parsePromText(await monitor.render());
      assert.ok(f.every((x) => x.help !== undefined && x.type !== 'untyped'), 'HELP and TYPE on every family');
      assert.deepEqual(
        samples(f, 'kata_guest_load').map((s) => [s.sandbox_id, s.cri_name, s.cri_namespace, s.cri_uid, s.item, s.__value]),
        [
          ['pod-a', 'web', 'default', 'u-a', 'load1', '0.5'],
          ['pod-b', undefined, undefined, undefined, 'load1', '1.5'],
        ],
      );
      assert.deepEqual(samples(f, 'kata_hypervisor_threads').map((s) => s.sandbox_id), ['pod-a', 'pod-b']);
      assert.deepEqual(samples(f, 'kata_monitor_running_shim_count').map((s) => s.__value), ['2']);
      // dead, slow, garbage, spoof, error, no-socket: six left out; bad..id is no sandbox.
      assert.deepEqual(samples(f, 'kata_monitor_scrape_failed_count').map((s) => s.__value), ['6']);
      assert.deepEqual(samples(f, 'kata_monitor_scrape_count').map((s) => s.__value), ['1']);
      assert.ok(f.find((x) => x.name === 'kata_monitor_scrape_durations_histogram_milliseconds'));
      assert.ok(f.find((x) => x.name === 'kata_monitor_process_cpu_seconds_total'));
    });

    it("keeps a sandbox whose guest does not answer, with the shim's and the hypervisor's figures, within its own scrape timeout", async () => {
      const a = await ShimMonitor.start('pod-a', { debugConsoleSocket: () => undefined, figures: hungGuest() }, { KATA_TS_SBS_ROOT: root });
      closers.push(() => a.close());
      const f = parsePromText(await new KataMonitor({ root }).render());
      assert.deepEqual(samples(f, 'kata_hypervisor_threads').map((s) => s.sandbox_id), ['pod-a']);
      assert.deepEqual(samples(f, 'kata_shim_agent_metrics_up').map((s) => [s.sandbox_id, s.__value]), [['pod-a', '0']]);
      assert.deepEqual(samples(f, 'kata_shim_agent_metrics_errors_total').map((s) => [s.reason, s.__value]), [['timeout', '1']]);
      assert.deepEqual(samples(f, 'kata_monitor_scrape_failed_count').map((s) => s.__value), ['0']);
    });

    it('keeps the type the runtime gives a family, so that a guest retyping it hides only its own samples', async () => {
      const env = { KATA_TS_SBS_ROOT: root };
      const gauge = '# HELP kata_guest_meminfo Memory.\n# TYPE kata_guest_meminfo gauge\nkata_guest_meminfo{item="mem_total"} 2\n';
      // pod-a comes first in the merge (sandbox ids in order).
      const a = await ShimMonitor.start('pod-a', { debugConsoleSocket: () => undefined, figures: figures(gauge.replace('gauge', 'counter').replace(' 2', ' 1')) }, env);
      const b = await ShimMonitor.start('pod-b', { debugConsoleSocket: () => undefined, figures: figures(gauge) }, env);
      closers.push(() => a.close(), () => b.close());
      const lines: { sandbox?: string; metric?: string }[] = [];
      const log = createLogger({ level: 'warn', stream: { write: (l) => void lines.push(JSON.parse(l) as { sandbox?: string; metric?: string }) } });
      const f = parsePromText(await new KataMonitor({ root, log }).render());
      assert.equal(f.find((x) => x.name === 'kata_guest_meminfo')?.type, 'gauge');
      assert.deepEqual(samples(f, 'kata_guest_meminfo').map((s) => [s.sandbox_id, s.__value]), [['pod-b', '2']]);
      assert.deepEqual(lines.map((l) => [l.sandbox, l.metric]), [['pod-a', 'kata_guest_meminfo']]);
    });

    it('takes no sandbox_id or cri_* label from an answer: a guest of a pod without CRI labels cannot lend itself some', async () => {
      const guest = '# HELP kata_guest_load Load.\n# TYPE kata_guest_load gauge\nkata_guest_load{cri_namespace="kube-system",cri_name="coredns",cri_uid="u-x",cri_other="y",sandbox_id="other",item="load1"} 0.5\n';
      const a = await ShimMonitor.start('pod-a', { debugConsoleSocket: () => undefined, figures: figures(guest) }, { KATA_TS_SBS_ROOT: root });
      const b = await ShimMonitor.start('pod-b', { debugConsoleSocket: () => undefined, figures: figures(guest, { cri_name: 'web', cri_namespace: 'default', cri_uid: 'u-b' }) }, { KATA_TS_SBS_ROOT: root });
      closers.push(() => a.close(), () => b.close());
      const f = parsePromText(await new KataMonitor({ root }).render());
      assert.deepEqual(
        f.find((x) => x.name === 'kata_guest_load')?.samples.map((s) => s.labels),
        [
          [['sandbox_id', 'pod-a'], ['item', 'load1']],
          [['sandbox_id', 'pod-b'], ['cri_uid', 'u-b'], ['cri_name', 'web'], ['cri_namespace', 'default'], ['item', 'load1']],
        ],
      );
      assert.deepEqual(samples(f, 'kata_shim_pod_info').map((s) => [s.sandbox_id, s.cri_name]), [['pod-b', 'web']]);
    });

    it('serves a merged answer again for a while instead of scraping every shim for every request', async () => {
      let hits = 0;
      await rawShim('pod-a', (_req, res) => (hits++, res.end('# TYPE kata_shim_x gauge\nkata_shim_x 1\n')));
      const monitor = new KataMonitor({ root, cacheMs: 300 });
      const first = await monitor.render();
      for (let i = 0; i < 5; i++) assert.equal(await monitor.render(), first);
      assert.equal(hits, 1);
      await new Promise((r) => setTimeout(r, 350));
      await monitor.render();
      assert.equal(hits, 2);
    });

    it('answers at the round deadline with what it gathered, however many shims hang', async () => {
      await rawShim('a-good', (_req, res) => res.end('# TYPE kata_shim_x gauge\nkata_shim_x 1\n'));
      // More hung shims than are scraped at once: without a deadline they would take two timeouts.
      for (let i = 0; i < 20; i++) await rawShim(`hung-${i}`, () => undefined);
      const t0 = performance.now();
      const f = parsePromText(await new KataMonitor({ root, timeoutMs: 2_000, deadlineMs: 300 }).render());
      const took = performance.now() - t0;
      assert.ok(took < 1_500, `took ${Math.round(took)} ms`);
      assert.deepEqual(samples(f, 'kata_shim_x').map((s) => s.sandbox_id), ['a-good']);
      assert.deepEqual(samples(f, 'kata_monitor_scrape_failed_count').map((s) => s.__value), ['20']);
    });

    it('refuses with KATA_ERR_MONITOR_SBS_ROOT, logged and answered 500, an sbs root it cannot read', async () => {
      writeFileSync(root, 'not a directory');
      await assert.rejects(new KataMonitor({ root }).render(), (e: unknown) => e instanceof KataError && e.code === 'KATA_ERR_MONITOR_SBS_ROOT' && e.message.includes('ENOTDIR'));
      const lines: { msg?: string; err?: { code?: string } }[] = [];
      const server = new KataMonitor({ root, log: createLogger({ level: 'error', stream: { write: (l) => void lines.push(JSON.parse(l) as { msg?: string; err?: { code?: string } }) } }) }).server();
      await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
      closers.push(() => new Promise((r) => server.close(r)));
      const res = await fetch(`http://127.0.0.1:${(server.address() as net.AddressInfo).port}/metrics`);
      assert.equal(res.status, 500);
      assert.match(await res.text(), /code: KATA_ERR_MONITOR_SBS_ROOT/);
      assert.deepEqual(lines.map((l) => l.err?.code), ['KATA_ERR_MONITOR_SBS_ROOT']);
    });

    it('answers with its own figures when there is no sandbox, or no sbs root at all', async () => {
      const f = parsePromText(await new KataMonitor({ root: path.join(tmp.path, 'none') }).render());
      assert.deepEqual(samples(f, 'kata_monitor_running_shim_count').map((s) => s.__value), ['0']);
    });

    it('serves /metrics over HTTP and 404 elsewhere', async () => {
      const server = new KataMonitor({ root }).server();
      await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
      closers.push(() => new Promise((r) => server.close(r)));
      const port = (server.address() as net.AddressInfo).port;
      const res = await fetch(`http://127.0.0.1:${port}/metrics`);
      assert.equal(res.status, 200);
      assert.match(res.headers.get('content-type') ?? '', /^text\/plain; version=0\.0\.4/);
      assert.ok(parsePromText(await res.text()).length > 0);
      assert.equal((await fetch(`http://127.0.0.1:${port}/`)).status, 404);
    });

    it(`holds at most ${MAX_CONNECTIONS} connections, and gives each request and idle connection ${HTTP_TIMEOUT_MS / 1000} s`, async () => {
      const server = new KataMonitor({ root }).server();
      assert.equal(server.requestTimeout, HTTP_TIMEOUT_MS);
      assert.equal(server.headersTimeout, HTTP_TIMEOUT_MS);
      assert.equal(server.timeout, HTTP_TIMEOUT_MS);
      await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
      const port = (server.address() as net.AddressInfo).port;
      const held: net.Socket[] = [];
      closers.push(() => new Promise((r) => (held.forEach((s) => s.destroy()), server.close(r))));
      for (let i = 0; i < MAX_CONNECTIONS; i++) held.push(net.connect(port, '127.0.0.1'));
      await until('the server to hold them', () => new Promise<boolean>((r) => server.getConnections((_e, n) => r(n === MAX_CONNECTIONS))), 5_000, 20);
      const dropped = new Promise((r) => server.once('drop', r));
      await assert.rejects(fetch(`http://127.0.0.1:${port}/metrics`));
      await dropped;
      held.pop()!.destroy();
      await until('a connection to be free', () => new Promise<boolean>((r) => server.getConnections((_e, n) => r(n < MAX_CONNECTIONS))), 5_000, 20);
      assert.equal((await fetch(`http://127.0.0.1:${port}/metrics`)).status, 200);
    });
  });

  describe('the command', () => {
    it('refuses, as a user who cannot read the sbs root, with KATA_ERR_MONITOR_SBS_ROOT saying to run as root, exit 1', function () {
      if (process.getuid?.() !== 0 || !findExecutable('setpriv')) this.skip();
      const tmp = new TempDir('kata-monitor-nobody-');
      try {
        const sbs = path.join(tmp.path, 'sbs');
        mkdirSync(sbs, { mode: 0o700 });
        chmodSync(tmp.path, 0o755);
        const r = spawnSync('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, CLI, 'monitor', '--listen', '127.0.0.1:0'], { encoding: 'utf8', env: { ...process.env, KATA_TS_SBS_ROOT: sbs }, timeout: 20_000 });
        assert.equal(r.status, 1, r.stderr);
        assert.match(r.stderr, /cannot read the sandbox directory .*sbs: EACCES \(running as uid 65534\)/);
        assert.match(r.stderr, /fix: Run kata-runtime monitor as root/);
        assert.match(r.stderr, /code: KATA_ERR_MONITOR_SBS_ROOT/);
        assert.doesNotMatch(r.stderr, STACK_FRAME);
      } finally {
        tmp.cleanup();
      }
    });

    it('refuses an address it cannot listen on with KATA_ERR_MONITOR, exit 1', async () => {
      const taken = net.createServer();
      await new Promise<void>((r) => taken.listen(0, '127.0.0.1', r));
      try {
        const port = (taken.address() as net.AddressInfo).port;
        const r = await new Promise<{ code: number | null; err: string }>((resolve) => {
          const p = spawn(process.execPath, [CLI, 'monitor', '--listen', `127.0.0.1:${port}`], { stdio: ['ignore', 'ignore', 'pipe'] });
          let err = '';
          p.stderr.on('data', (d: Buffer) => (err += d.toString()));
          p.once('close', (code) => resolve({ code, err }));
        });
        assert.equal(r.code, 1);
        assert.match(r.err, /cannot listen on 127\.0\.0\.1:\d+: .*EADDRINUSE/);
        assert.match(r.err, /code: KATA_ERR_MONITOR/);
      } finally {
        await new Promise((r) => taken.close(r));
      }
    });

    it('refuses a non-numeric --listen port with KATA_ERR_MONITOR naming the option, and listens on a good one until SIGTERM', async () => {
      const bad = await new Promise<{ code: number | null; err: string }>((resolve) => {
        const p = spawn(process.execPath, [CLI, 'monitor', '--listen', '127.0.0.1:http'], { stdio: ['ignore', 'ignore', 'pipe'] });
        let err = '';
        p.stderr.on('data', (d: Buffer) => (err += d.toString()));
        p.once('close', (code) => resolve({ code, err }));
      });
      assert.equal(bad.code, 1);
      assert.match(bad.err, /--listen "127\.0\.0\.1:http"/);
      assert.match(bad.err, /code: KATA_ERR_MONITOR/);

      const tmp = new TempDir('kata-monitor-cmd-');
      const p = spawn(process.execPath, [CLI, 'monitor', '--listen', '127.0.0.1:0'], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, KATA_TS_SBS_ROOT: tmp.path } });
      try {
        let out = '';
        p.stdout.on('data', (d: Buffer) => (out += d.toString()));
        await until('the monitor to listen', () => /serving (http:\S+)/.test(out), 20_000, 50);
        const url = /serving (http:\S+)/.exec(out)![1]!;
        const res = await fetch(url);
        assert.equal(res.status, 200);
        assert.ok(parsePromText(await res.text()).some((f) => f.name === 'kata_monitor_scrape_count'));
        p.kill('SIGTERM');
        assert.equal(await new Promise((r) => p.once('close', r)), 0);
      } finally {
        p.kill('SIGKILL');
        tmp.cleanup();
      }
    });
  });
});
