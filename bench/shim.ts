/**
 * The containerd shim (issue 5), measured in one run against baselines taken in the same run:
 *
 * 1. Start-up: `containerd-shim-kata-v2 … start` until it has printed the address and exited (it
 *    spawns the daemon and waits until that serves), against a bare `node -e 0`.
 * 2. Memory: the shim daemon's RSS with one running container, driven through the Task API the way
 *    containerd drives it (Create, Start), against the RSS of an idle `node` process.
 * 3. With containerd installed: `ctr run --rm … echo` wall time, split by the shim's own log lines
 *    (they reach containerd's log through the log pipe) into containerd (before the shim starts and
 *    after it exits), the shim (its start and its own work), VM boot (QEMU spawned → guest agent
 *    answering) and the agent and container (container created, run, removed; VM stopped).
 *
 * Run with `npm run bench:shim`. Parts 2 and 3 boot VMs (QEMU, the project's guest image).
 */
import { spawn, spawnSync } from 'node:child_process';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { Task } from '../wire/containerd/proto.gen.js';
import { TtrpcClient } from '../wire/ttrpc/index.js';
import { startContainerd } from '../test/helpers/containerd.js';
import { ensureGuestImage } from '../test/helpers/guest.js';
import { qemuBinary } from '../test/helpers/qemu.js';
import { TempDir } from '../test/helpers/tmp.js';
import { median, ms } from './stats.js';
import { SHIM, shimBinDir, shimConfig } from '../test/helpers/shim.js';

const RUNS = 11;
const tmp = new TempDir('kata-bench-shim-');
const env = { ...process.env, KATA_TS_SHIM_SOCKET_DIR: path.join(tmp.path, 's'), KATA_TS_RUN_ROOT: path.join(tmp.path, 'run'), TTRPC_ADDRESS: '' };
const flags = (id: string) => ['-namespace', 'bench', '-address', '/bench/containerd.sock', '-publish-binary', '/bin/true', '-id', id];

async function taskClient(address: string) {
  const sock = net.connect(address.replace(/^unix:\/\//, ''));
  await new Promise<void>((resolve, reject) => sock.once('connect', resolve).once('error', reject));
  const client = new TtrpcClient(sock, { defaultTimeoutMs: 180_000 });
  return { client, task: client.service(Task) };
}

function rssKiB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) : NaN;
}

function bundleWith(id: string, spec: object): string {
  return path.dirname(tmp.file(`bundles/${id}/config.json`, JSON.stringify({ ociVersion: '1.0.2', ...spec })));
}

try {
  // 1. start-up
  console.log('1. shim start-up: `start` until the address is printed (daemon spawned and serving)');
  const base: number[] = [];
  const start: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    let t = performance.now();
    spawnSync(process.execPath, ['-e', '0']);
    base.push(performance.now() - t);
    const id = `s${i}`;
    const bundle = bundleWith(id, { process: { args: ['true'] } });
    t = performance.now();
    const r = spawnSync(process.execPath, [SHIM, ...flags(id), 'start'], { cwd: bundle, env });
    start.push(performance.now() - t);
    if (r.status !== 0) throw new Error(`start failed: ${r.stderr.toString()}`);
    const { client, task } = await taskClient(r.stdout.toString());
    await task.Shutdown({ id });
    await client.closed;
  }
  const b = median(base);
  const s = median(start);
  console.log(`   baseline  node -e 0          median ${ms(b)}`);
  console.log(`   measured  shim start         median ${ms(s)}   ratio ${(s / b).toFixed(2)}x (two node processes start: start itself and the daemon)`);

  const qemu = qemuBinary();
  if (!qemu) {
    console.log('qemu-system-x86_64 is not installed: parts 2 and 3 skipped');
  } else {
    // 2. memory with one running container
    const image = await ensureGuestImage();
    const rootfs = path.join(tmp.path, 'rootfs');
    execFileSync('mkdir', ['-p', rootfs]);
    execFileSync('debugfs', ['-R', `rdump / ${rootfs}`, image.busyboxRootfs!], { stdio: 'ignore' });
    const idle = spawn(process.execPath, ['-e', 'setInterval(() => {}, 1000)']);
    await new Promise((r) => setTimeout(r, 300));
    const idleRss = rssKiB(idle.pid!);
    idle.kill();
    const bundle = bundleWith('mem', { process: { args: ['sleep', '1000'] }, root: { path: rootfs } });
    const r = spawnSync(process.execPath, [SHIM, ...flags('mem'), 'start'], { cwd: bundle, env });
    const { client, task } = await taskClient(r.stdout.toString());
    const { shimPid } = await task.Connect({ id: 'mem' });
    const t0 = performance.now();
    await task.Create({ id: 'mem', bundle });
    await task.Start({ id: 'mem' });
    const ready = performance.now() - t0;
    await new Promise((res) => setTimeout(res, 500));
    const rss = rssKiB(shimPid);
    await task.Kill({ id: 'mem', signal: 9 });
    await task.Wait({ id: 'mem' });
    await task.Delete({ id: 'mem' });
    await task.Shutdown({ id: 'mem' });
    await client.closed;
    console.log('2. shim RSS with one running container (Create + Start through the Task API)');
    console.log(`   baseline  idle node process  ${(idleRss / 1024).toFixed(1)} MiB`);
    console.log(`   measured  shim daemon        ${(rss / 1024).toFixed(1)} MiB   ratio ${(rss / idleRss).toFixed(2)}x   (Create+Start took ${(ready / 1000).toFixed(1)} s, VM boot included)`);

    // 3. ctr run --rm … echo, split by the shim's log lines in containerd's log.
    const ctx = { skip: () => { throw new Error('containerd is not installed'); } } as unknown as Mocha.Context;
    const ctrd = await startContainerd(ctx, { pathPrefix: [shimBinDir(tmp)], env: { KATA_CONF_FILE: shimConfig(tmp, image), KATA_TS_RUN_ROOT: path.join(tmp.path, 'run') } }).catch((e: Error) => {
      console.log(`3. skipped: ${e.message}`);
      return undefined;
    });
    if (ctrd) {
      try {
        const rows: Record<string, number>[] = [];
        for (let i = 0; i < 3; i++) {
          const t0 = Date.now();
          const r = await ctrd.run(`bench${i}`, ['echo', 'hello'], { runtime: 'io.containerd.kata.v2', timeoutMs: 180_000 });
          const t1 = Date.now();
          if (r.stdout !== 'hello\n') throw new Error(`ctr run failed: ${r.stderr}`);
          const at = (msg: string) => {
            for (const line of ctrd.logTail(400).split('\n')) {
              if (!line.startsWith('{') || !line.includes(`"msg":"${msg}"`) || (!line.includes(`bench${i}`) && msg !== 'shim serving' && msg !== 'shim exiting')) continue;
              const t = Date.parse((JSON.parse(line) as { time: string }).time);
              if (t >= t0) return t;
            }
            throw new Error(`no "${msg}" line in containerd's log`);
          };
          const serving = at('shim serving');
          const vm = at('starting VM');
          const agent = at('sandbox ready');
          const exited = at('process exited');
          const gone = at('shim exiting');
          rows.push({
            'containerd + shim start (until the shim serves)': serving - t0,
            'shim: configuration, sandbox set-up': vm - serving,
            'VM boot: QEMU, guest kernel, agent ready': agent - vm,
            'container: create, run echo, exit': exited - agent,
            'teardown: delete, VM stop, shim exit': gone - exited,
            'containerd after the shim (delete, ctr exit)': t1 - gone,
            total: t1 - t0,
          });
        }
        console.log('3. ctr run --rm … echo hello: wall time split by the shim\'s log lines (median of 3)');
        for (const k of Object.keys(rows[0]!)) console.log(`   ${k.padEnd(48)} ${ms(median(rows.map((r) => r[k]!)))}`);
      } finally {
        await ctrd.stop();
      }
    }
  }
} finally {
  tmp.cleanup();
}
