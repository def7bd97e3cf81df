/**
 * containerd-shim-kata-v2 driven by the real containerd (Debian's 1.6) through `ctr`: containers in
 * QEMU VMs booting the project's guest image under TCG. containerd runs with its own root, state
 * and socket under a temp dir (test/helpers/containerd.ts), a busybox image is imported without a
 * registry, and the shim is put first on containerd's PATH.
 *
 * The overlayfs snapshotter gives a directory rootfs, so these containers reach the guest through
 * the shared filesystem (virtio-9p in the shipped QEMU configuration); the block-device path
 * (devmapper) is covered by the sandbox tests, since this kernel has no device-mapper.
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { PACKAGE_ROOT } from '../../core/paths.js';
import { BUSYBOX_IMAGE, NO_LEFTOVERS, startContainerd, type TestContainerd } from '../helpers/containerd.js';
import { ensureGuestImage } from '../helpers/guest.js';
import { TempDir } from '../helpers/tmp.js';
import { until as untilFast } from '../helpers/wait.js';
import { processesMentioning } from '../helpers/procs.js';
import { shimBinDir, shimConfig } from '../helpers/shim.js';

const RUNTIME = 'io.containerd.kata.v2';

/** Processes whose command line names `dir` (QEMU of a sandbox whose run directory is under it). */
function processesUnder(dir: string): string[] {
  return processesMentioning(`${dir}/`).map((p) => `${p.pid}: ${p.argv.slice(0, 3).join(' ')}`);
}

/** Polls every 200 ms (probes here run ctr or scan /proc), for up to a minute unless told. */
const until = (what: string, ok: () => boolean | Promise<boolean>, timeoutMs = 60_000) => untilFast(what, ok, timeoutMs, 200);

describe('containerd-shim-kata-v2 with the real containerd @integration', function () {
  this.timeout(180_000);
  let tmp: TempDir;
  let ctrd: TestContainerd | undefined;
  let runRoot: string;
  let config: string;

  before(async function () {
    this.timeout(600_000);
    const image = await ensureGuestImage();
    tmp = new TempDir('kata-shim-e2e-');
    runRoot = path.join(tmp.path, 'run');
    config = shimConfig(tmp, image);
    ctrd = await startContainerd(this, { pathPrefix: [shimBinDir(tmp)], env: { KATA_CONF_FILE: config, KATA_TS_RUN_ROOT: runRoot } });
  });

  after(async () => {
    await ctrd?.stop();
    tmp?.cleanup();
  });

  const c = () => ctrd!;
  /** The run directory of a sandbox: the shim keeps each containerd namespace's apart. */
  const sandboxDir = (id: string) => path.join(runRoot, c().namespace, id);
  const why = (r: { stdout: string; stderr: string }) => `stdout: ${r.stdout}\nstderr: ${r.stderr}\n--- containerd log ---\n${c().logTail(40)}`;

  it('ctr run --rm echo hello prints hello', async () => {
    const r = await c().run('hello', ['echo', 'hello'], { runtime: RUNTIME, timeoutMs: 120_000 });
    assert.equal(r.code, 0, why(r));
    assert.equal(r.stdout, 'hello\n', why(r));
  });

  it('brings a non-zero exit code back through ctr, with stdout and stderr apart', async () => {
    const r = await c().run('exit3', ['sh', '-c', 'echo out; echo err >&2; exit 3'], { runtime: RUNTIME, timeoutMs: 120_000 });
    assert.equal(r.code, 3, why(r));
    assert.equal(r.stdout, 'out\n', why(r));
    assert.match(r.stderr, /^err$/m, why(r));
  });

  it('pipes stdin through (ctr 1.6 connects it without -i)', async () => {
    const r = await c().run('stdin', ['sh', '-c', 'read line; echo "got:$line"'], { runtime: RUNTIME, input: 'piped-in\n', timeoutMs: 120_000 });
    assert.equal(r.code, 0, why(r));
    assert.equal(r.stdout, 'got:piped-in\n', why(r));
  });

  it('publishes TaskOOM when the guest OOM-kills a container process, and the task exits with 137', async () => {
    const events = spawn('ctr', ['-a', c().socket, 'events'], { stdio: ['ignore', 'pipe', 'ignore'] });
    let seen = '';
    events.stdout.on('data', (d: Buffer) => (seen += d.toString()));
    try {
      await new Promise((r) => setTimeout(r, 500));
      const r = await c().run('oom', ['sh', '-c', 'a=xxxxxxxxxxxxxxxx; while true; do a=$a$a; done'], { runtime: RUNTIME, timeoutMs: 120_000 });
      assert.equal(r.code, 137, why(r));
      await until('the delete event', () => /\/tasks\/delete.*"oom"/.test(seen), 10_000);
    } finally {
      events.kill();
    }
    const mine = seen.split('\n').filter((l) => l.includes(`${c().namespace} /tasks/`) && l.includes('"oom"'));
    const at = (topic: string) => mine.findIndex((l) => l.includes(` ${topic} `));
    assert.ok(at('/tasks/oom') >= 0, `no /tasks/oom event:\n${seen}`);
    assert.match(mine[at('/tasks/oom')]!, /"container_id":"oom"/);
    assert.ok(at('/tasks/oom') < at('/tasks/exit'), `the OOM event comes before the exit:\n${mine.join('\n')}`);
  });

  describe('a long-running task', () => {
    const id = 'long';
    before(async () => {
      const r = await c().ctr(['run', '-d', '--runtime', RUNTIME, BUSYBOX_IMAGE, id, 'sh', '-c', 'trap "exit 143" TERM; sleep 1000 & wait'], { timeoutMs: 120_000 });
      assert.equal(r.code, 0, why(r));
    });

    it('is RUNNING in ctr task ls', async () => {
      const r = await c().ctr(['task', 'ls']);
      assert.match(r.stdout, new RegExp(`^${id}\\s+\\d+\\s+RUNNING`, 'm'), why(r));
    });

    it('survives `kata-runtime cleanup`: the live shim owns its run directory', async () => {
      const bin = path.join(PACKAGE_ROOT, 'dist', 'bundle', 'kata-runtime.mjs');
      const r = spawnSync(process.execPath, [bin, 'cleanup', '--json'], { encoding: 'utf8', env: { ...process.env, KATA_TS_RUN_ROOT: runRoot } });
      assert.equal(r.status, 0, r.stderr);
      const report = JSON.parse(r.stdout) as { removed: string[]; kept: { dir: string; reason: string }[] };
      assert.deepEqual(report.removed, []);
      assert.match(report.kept.find((k) => k.dir === sandboxDir(id))?.reason ?? '', /is running/);
      assert.ok(existsSync(path.join(sandboxDir(id), 'qmp.sock')));
      assert.notDeepEqual(processesUnder(sandboxDir(id)), [], 'its VM still runs');
    });

    it('runs a second process with ctr task exec, with its own exit code', async () => {
      const r = await c().ctr(['task', 'exec', '--exec-id', 'e1', id, 'sh', '-c', 'echo from-exec; ls /proc/1/cmdline >/dev/null; exit 5']);
      assert.equal(r.code, 5, why(r));
      assert.equal(r.stdout, 'from-exec\n', why(r));
    });

    it('pauses and resumes (the whole VM)', async () => {
      assert.equal((await c().ctr(['task', 'pause', id])).code, 0);
      assert.match((await c().ctr(['task', 'ls'])).stdout, new RegExp(`^${id}\\s+\\d+\\s+PAUSED`, 'm'));
      assert.equal((await c().ctr(['task', 'resume', id])).code, 0);
      const r = await c().ctr(['task', 'exec', '--exec-id', 'e2', id, 'echo', 'awake']);
      assert.equal(r.stdout, 'awake\n', why(r));
    });

    it('ends on ctr task kill (SIGTERM, which it traps: 143) and can then be removed', async () => {
      const k = await c().ctr(['task', 'kill', id]);
      assert.equal(k.code, 0, why(k));
      await until('the task to stop', async () => /STOPPED/.test((await c().ctr(['task', 'ls'])).stdout));
      const ls = await c().ctr(['task', 'ls']);
      assert.match(ls.stdout, new RegExp(`^${id}\\s+\\d+\\s+STOPPED`, 'm'));
      const rm = await c().ctr(['task', 'rm', id]);
      assert.equal(rm.code, 0, why(rm));
      assert.match(rm.stderr + rm.stdout, /143/, 'ctr reports the exit code');
      assert.equal((await c().ctr(['container', 'rm', id])).code, 0);
      await until('the VM to go', () => processesUnder(sandboxDir(id)).length === 0, 30_000);
    });
  });

  it('reports the task as exited when its VM is killed', async () => {
    const id = 'vmdies';
    const ctr = spawn('ctr', ['-a', c().socket, '-n', c().namespace, 'run', '--rm', '--fifo-dir', c().fifoDir, '--runtime', RUNTIME, BUSYBOX_IMAGE, id, 'sleep', '1000'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stderr = '';
    ctr.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((resolve) => ctr.once('exit', (code) => resolve(code)));
    const vmDir = sandboxDir(id);
    try {
      await until('the VM and the task to run', async () => processesUnder(vmDir).length > 0 && /RUNNING/.test((await c().ctr(['task', 'ls'])).stdout), 120_000);
      for (const p of processesUnder(vmDir)) process.kill(Number(p.split(':')[0]), 'SIGKILL');
      const code = await Promise.race([exited, new Promise<'hung'>((r) => setTimeout(() => r('hung'), 30_000))]);
      assert.equal(code, 255, `ctr run should end with the lost-VM status; stderr: ${stderr}\n${c().logTail(30)}`);
    } finally {
      if (ctr.exitCode === null) ctr.kill('SIGKILL');
    }
    await until('the run directory to go', () => !existsSync(vmDir), 30_000);
  });

  it('runs the containers of a pod in one VM (CRI annotations)', async () => {
    const pod = ['--annotation', 'io.kubernetes.cri.sandbox-id=pod1'];
    const s = await c().ctr(['run', '-d', '--runtime', RUNTIME, '--annotation', 'io.kubernetes.cri.container-type=sandbox', ...pod, BUSYBOX_IMAGE, 'pod1', 'sleep', '1000'], { timeoutMs: 120_000 });
    assert.equal(s.code, 0, why(s));
    const t0 = Date.now();
    const r = await c().run('pod1-app', ['sh', '-c', 'echo in-pod'], { runtime: RUNTIME, flags: ['--annotation', 'io.kubernetes.cri.container-type=container', ...pod] });
    assert.equal(r.code, 0, why(r));
    assert.equal(r.stdout, 'in-pod\n');
    assert.ok(Date.now() - t0 < 30_000, 'the second container joins the running VM instead of booting one');
    assert.equal(processesUnder(sandboxDir('pod1')).filter((p) => p.includes('qemu')).length, 1, 'one VM for the pod');
    assert.equal((await c().ctr(['task', 'kill', '-s', 'SIGKILL', 'pod1'])).code, 0);
    await until('the pod sandbox to stop', async () => /pod1\s+\d+\s+STOPPED/.test((await c().ctr(['task', 'ls'])).stdout));
    assert.equal((await c().ctr(['task', 'rm', 'pod1'])).code, 0);
    assert.equal((await c().ctr(['container', 'rm', 'pod1'])).code, 0);
    await until('the pod VM to go', () => processesUnder(sandboxDir('pod1')).length === 0, 30_000);
  });

  it('shares volumes (bind mounts) with the guest: read-only, read-write and a single file', async () => {
    const ro = path.join(tmp.path, 'vol-ro');
    const rw = path.join(tmp.path, 'vol-rw');
    mkdirSync(ro);
    mkdirSync(rw);
    writeFileSync(path.join(ro, 'hello.txt'), 'from the host\n');
    const motd = tmp.file('motd', 'a single file\n');
    const r = await c().run(
      'volumes',
      ['sh', '-c', 'cat /data/hello.txt /etc/motd; echo written > /out/new.txt; if echo x > /data/nope 2>/dev/null; then echo ro-writable; fi'],
      {
        runtime: RUNTIME,
        timeoutMs: 120_000,
        flags: ['--mount', `type=bind,src=${ro},dst=/data,options=rbind:ro`, '--mount', `type=bind,src=${rw},dst=/out,options=rbind:rw`, '--mount', `type=bind,src=${motd},dst=/etc/motd,options=bind:ro`],
      },
    );
    assert.equal(r.code, 0, why(r));
    assert.equal(r.stdout, 'from the host\na single file\n', why(r));
    assert.equal(readFileSync(path.join(rw, 'new.txt'), 'utf8'), 'written\n', 'the write reached the host');
    assert.equal(existsSync(path.join(ro, 'nope')), false, 'nothing was written through the read-only volume');
    assert.equal(readFileSync(path.join(ro, 'hello.txt'), 'utf8'), 'from the host\n', 'the volume is intact after the container is gone');
  });

  it('takes its configuration from ctr --runtime-config-path, then the config_path annotation (Kata\'s precedence)', async () => {
    const variant = (marker: string) => tmp.file(`configuration-${marker}.toml`, readFileSync(config, 'utf8').replace(/^kernel_params = "(.*)"$/m, `kernel_params = "$1 kata_ts_marker=${marker}"`));
    const byOption = await c().run('cfg-option', ['cat', '/proc/cmdline'], { runtime: RUNTIME, timeoutMs: 120_000, flags: ['--runtime-config-path', variant('option')] });
    assert.match(byOption.stdout, /kata_ts_marker=option/, why(byOption));
    const byAnnotation = await c().run('cfg-annotation', ['cat', '/proc/cmdline'], {
      runtime: RUNTIME,
      timeoutMs: 120_000,
      flags: ['--runtime-config-path', variant('option2'), '--annotation', `io.katacontainers.config_path=${variant('annotation')}`],
    });
    assert.match(byAnnotation.stdout, /kata_ts_marker=annotation/, why(byAnnotation));
  });

  it('refuses a hypervisor annotation the configuration does not enable, and starts no VM', async () => {
    const r = await c().run('evil', ['true'], { runtime: RUNTIME, flags: ['--annotation', 'io.katacontainers.config.hypervisor.path=/tmp/evil-qemu'] });
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /io\.katacontainers\.config\.hypervisor\.path.*KATA_ERR_ANNOTATION/s, why(r));
    assert.equal(existsSync(sandboxDir('evil')), false);
    await c().ctr(['container', 'rm', 'evil']);
  });

  it('publishes the task events containerd and CRI rely on', async () => {
    const events = spawn('ctr', ['-a', c().socket, 'events'], { stdio: ['ignore', 'pipe', 'ignore'] });
    let seen = '';
    events.stdout.on('data', (d: Buffer) => (seen += d.toString()));
    try {
      await new Promise((r) => setTimeout(r, 500));
      const r = await c().run('events', ['sh', '-c', 'exit 7'], { runtime: RUNTIME, timeoutMs: 120_000 });
      assert.equal(r.code, 7, why(r));
      await until('the delete event', () => /\/tasks\/delete/.test(seen), 10_000);
    } finally {
      events.kill();
    }
    // containerd publishes some task events itself as well (TaskDelete from its task service), so
    // check that ours came and in their order, not that nothing else did.
    const topics = seen
      .split('\n')
      .filter((l) => l.includes(`${c().namespace} /tasks/`) && l.includes('"events"'))
      .map((l) => /(\/tasks\/[a-z-]+)/.exec(l)?.[1]);
    const first = (t: string) => topics.indexOf(t);
    for (const t of ['/tasks/create', '/tasks/start', '/tasks/exit', '/tasks/delete']) assert.ok(first(t) >= 0, `${t} missing:\n${seen}`);
    assert.ok(first('/tasks/create') < first('/tasks/start') && first('/tasks/start') < first('/tasks/exit') && first('/tasks/exit') < first('/tasks/delete'), seen);
    assert.match(seen, /\/tasks\/exit.*"exit_status":7/, seen);
  });

  // Mocha runs a suite's own tests before its nested suites: this one goes in a suite of its own,
  // defined last, so that it runs after everything else.
  describe('at the end', () => {
   it('leaves no shim, VM, mount, FIFO or run directory after 10 runs', async function () {
    this.timeout(600_000);
    for (let i = 0; i < 10; i++) {
      const r = await c().run(`cycle${i}`, ['sh', '-c', `echo cycle ${i}`], { runtime: RUNTIME, timeoutMs: 120_000 });
      assert.equal(r.stdout, `cycle ${i}\n`, why(r));
    }
    assert.deepEqual(processesUnder(runRoot), []);
    const nsRoot = path.join(runRoot, c().namespace);
    assert.deepEqual(existsSync(nsRoot) ? readdirSync(nsRoot) : [], []);
    const left = await c().stop();
    assert.deepEqual(left, NO_LEFTOVERS);
   });
  });
});
