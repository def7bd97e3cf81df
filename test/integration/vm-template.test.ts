/**
 * VM templating with the real programs: `kata-runtime factory init | status | destroy` boots and
 * saves a real template VM under QEMU (TCG), and `kata-runtime run` starts clones of it running
 * containers on a hot-plugged block rootfs and on a directory shared over virtio-9p. Faults: a
 * stale template, a device state that cannot be restored, template files that vanished. Then the
 * shim under a private containerd starts its pod as a clone (containerd's overlayfs rootfs is a
 * directory: a block rootfs through the shim needs devmapper, which this host's kernel lacks).
 */
import assert from 'node:assert/strict';
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { setTimeout as delay } from 'node:timers/promises';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { createLogger } from '../../core/logger.js';
import { PACKAGE_ROOT } from '../../core/paths.js';
import { loadValidatedConfig } from '../../core/runtime.js';
import { Sandbox } from '../../core/sandbox.js';
import type { QemuVm } from '../../plugins/qemu/driver.js';
import { ensureGuestImage, type GuestImage } from '../helpers/guest.js';
import { BUSYBOX_IMAGE, NO_LEFTOVERS, startContainerd, type TestContainerd } from '../helpers/containerd.js';
import { createPodAndPeer, peerServer, removeNetns } from '../helpers/netns.js';
import { processesMentioning } from '../helpers/procs.js';
import { qemuBinary, qemuLeftBehind } from '../helpers/qemu.js';
import { shimBinDir, shimConfig } from '../helpers/shim.js';
import { TempDir } from '../helpers/tmp.js';

const BIN = path.join(PACKAGE_ROOT, 'dist', 'bundle', 'kata-runtime.mjs');

function mountsUnder(dir: string): string[] {
  return readFileSync('/proc/self/mounts', 'utf8')
    .split('\n')
    .filter((l) => l.split(' ')[1]?.startsWith(dir));
}

describe('VM templates: kata-runtime factory and clones @integration', function () {
  this.timeout(600_000);
  let image: GuestImage;
  let tmp: TempDir;
  let config: string;
  let templateDir: string;
  let rootfsDir: string;
  let n = 0;
  const runRoot = () => path.join(tmp.path, 'run');
  const env = () => ({ ...process.env, KATA_TS_RUN_ROOT: runRoot(), KATA_CONF_FILE: '' });
  const rootfs = () => {
    const p = path.join(tmp.path, `rootfs-${n++}.ext4`);
    copyFileSync(image.busyboxRootfs as string, p);
    return p;
  };
  const configText = (extra = '') =>
    `[hypervisor.qemu]\npath = "${qemuBinary()}"\nkernel = "${image.kernel}"\ninitrd = "${image.initrd}"\ndefault_memory = 512\nshared_fs = "virtio-9p"\ndisable_block_device_use = false\nblock_device_driver = "virtio-blk"\n${extra}\n[agent.kata]\ndial_timeout = 180\n[factory]\nenable_template = true\ntemplate_path = "${templateDir}"\n`;
  const cli = (args: string[], cfg = config) => spawnSync(process.execPath, [BIN, '--config', cfg, ...args], { encoding: 'utf8', env: env() });
  const status = (cfg = config) => {
    const r = cli(['factory', 'status', '--json'], cfg);
    assert.equal(r.status, 0, r.stderr);
    return JSON.parse(r.stdout) as { exists: boolean; usable: boolean; reason?: string };
  };
  const runAsync = (args: string[], cfg = config) =>
    new Promise<{ status: number | null; stdout: string; stderr: string }>((resolve) => {
      const child = spawn(process.execPath, [BIN, '--config', cfg, '--log-level', 'info', 'run', ...args], { env: env(), stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
      child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      child.on('close', (status) => resolve({ status, stdout, stderr }));
    });
  const messages = (stderr: string) =>
    stderr
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => (JSON.parse(l) as { msg: string }).msg);

  before(async function () {
    if (!qemuBinary() || process.getuid?.() !== 0) this.skip(); // the template lives on a tmpfs it mounts
    image = await ensureGuestImage();
    if (!image.busyboxRootfs) this.skip();
    tmp = new TempDir('kata-tmpl-');
    templateDir = path.join(tmp.path, 'template');
    config = tmp.file('configuration.toml', configText());
    rootfsDir = path.join(tmp.path, 'rootfs-dir');
    mkdirSync(rootfsDir);
    execFileSync('debugfs', ['-R', `rdump / ${rootfsDir}`, image.busyboxRootfs], { stdio: 'ignore' });
  });
  after(async () => {
    if (!tmp) return;
    if (existsSync(templateDir)) cli(['factory', 'destroy']);
    assert.deepEqual(await qemuLeftBehind(tmp.path), []);
    assert.deepEqual(mountsUnder(tmp.path), []);
    tmp.cleanup();
  });

  it('factory init interrupted (SIGINT) while its VM boots exits 130 and leaves no VM, tmpfs, directory or lock', async () => {
    const child = spawn(process.execPath, [BIN, '--config', config, 'factory', 'init'], { env: env(), stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((resolve) => child.once('exit', (c) => resolve(c)));
    const vmRunDir = path.join(runRoot(), `vm-template-${child.pid}`);
    // Once the template VM runs (its QEMU wrote its pid), well before its agent answers.
    for (let i = 0; i < 600 && !existsSync(path.join(vmRunDir, 'qemu.pid')); i++) await delay(50);
    assert.ok(existsSync(path.join(vmRunDir, 'qemu.pid')), `the template VM did not start: ${stderr}`);
    assert.equal(mountsUnder(templateDir).length, 1, 'init had mounted its tmpfs');
    child.kill('SIGINT');
    assert.equal(await exited, 130, stderr);
    assert.match(stderr, /factory init interrupted \(SIGINT\)/);
    assert.deepEqual(await qemuLeftBehind(tmp.path), []);
    assert.deepEqual(mountsUnder(templateDir), []);
    assert.equal(existsSync(templateDir), false, 'the template directory is removed');
    assert.equal(existsSync(`${templateDir}.lock`), false, 'the lock is removed');
    assert.equal(existsSync(vmRunDir), false, "the template VM's run directory is removed");
  });

  it('factory status reports no template; init makes one on a tmpfs; init again does nothing and says so', () => {
    assert.deepEqual([status().exists, status().usable], [false, false]);
    const first = cli(['factory', 'init', '--json']);
    assert.equal(first.status, 0, first.stderr);
    assert.equal((JSON.parse(first.stdout) as { created: boolean }).created, true);
    assert.equal(mountsUnder(templateDir).length, 1, 'the template is on its own tmpfs');
    assert.deepEqual(status().usable, true);
    const again = cli(['factory', 'init']);
    assert.equal(again.status, 0, again.stderr);
    assert.match(again.stdout, /already initialized/);
  });

  it('kata-runtime run starts the sandbox as a clone that runs a container on a hot-plugged block rootfs', async () => {
    const r = await runAsync(['--rootfs', rootfs(), '--', 'sh', '-c', 'mount | grep -c " / .*ext4"']);
    assert.equal(r.status, 0, r.stderr);
    const msgs = messages(r.stderr);
    assert.ok(msgs.includes('starting VM as a clone of the template'), msgs.join('\n'));
    assert.ok(msgs.includes('VM restored from the template'));
    assert.ok(!msgs.some((m) => m.includes('cold boot')), msgs.join('\n'));
    assert.equal(r.stdout, '1\n');
  });

  it('runs a container on a directory rootfs shared over 9p in a clone', async () => {
    writeFileSync(path.join(rootfsDir, 'marker'), 'from the host\n');
    const r = await runAsync(['--rootfs', rootfsDir, '--', 'cat', '/marker']);
    assert.equal(r.status, 0, r.stderr);
    assert.ok(messages(r.stderr).includes('VM restored from the template'));
    assert.equal(r.stdout, 'from the host\n');
  });

  it("starts two clones of one template at once, each with its own hostname and kernel RNG output, and the host's time, not the template's", async () => {
    const cmd = ['--', 'sh', '-c', 'hostname; head -c 16 /dev/urandom | od -An -tx1 | tr -d " \\n"; echo; date +%s'];
    const saved = statSync(path.join(templateDir, 'template.json')).mtimeMs / 1000;
    // Far enough from the moment the template was saved for a clone's stale clock to show.
    await delay(Math.max(0, (saved + 15 - Date.now() / 1000) * 1000));
    const before = Math.floor(Date.now() / 1000);
    const [a, b] = await Promise.all([runAsync(['--rootfs', rootfs(), ...cmd]), runAsync(['--rootfs', rootfs(), ...cmd])]);
    const after = Math.ceil(Date.now() / 1000);
    for (const r of [a, b]) {
      assert.equal(r.status, 0, r.stderr);
      assert.ok(messages(r.stderr).includes('VM restored from the template'));
    }
    const [hostA, rngA, timeA] = a.stdout.split('\n');
    const [hostB, rngB, timeB] = b.stdout.split('\n');
    for (const t of [timeA, timeB]) assert.ok(Number(t) >= before - 2 && Number(t) <= after + 2, `guest clock ${t}, host ${before}..${after}, template saved at ${saved}`);
    assert.notEqual(hostA, hostB);
    assert.match(rngA ?? '', /^[0-9a-f]{32}$/);
    assert.notEqual(rngA, rngB);
  });

  it("hot-plugs the pod's interface into a clone after the restore: the container has the pod's address and reaches the peer", async () => {
    const ns = createPodAndPeer('kts-tmpl');
    let server: ChildProcess | undefined;
    try {
      server = await peerServer(ns.peer);
      const r = await runAsync(['--netns', ns.podPath, '--rootfs', rootfs(), '--', 'sh', '-c', 'ip -o -4 addr show dev eth0; echo guest | nc -w 5 192.0.2.1 8080']);
      assert.equal(r.status, 0, r.stderr);
      assert.ok(messages(r.stderr).includes('VM restored from the template'), r.stderr);
      assert.match(r.stdout, /inet 192\.0\.2\.2\/24/);
      assert.match(r.stdout, /hello from the peer\npeer got guest/);
    } finally {
      server?.kill();
      removeNetns([ns.pod, ns.peer]);
    }
  });

  it('does not use a template made for another configuration: the sandbox boots cold and the log says why', async () => {
    const other = tmp.file('other.toml', configText('kernel_params = "kata-ts.template-test=1"'));
    const s = status(other);
    assert.equal(s.usable, false);
    assert.match(s.reason ?? '', /another configuration/);
    const r = await runAsync(['--rootfs', rootfs(), '--', 'true'], other);
    assert.equal(r.status, 0, r.stderr);
    const msgs = messages(r.stderr);
    assert.ok(msgs.some((m) => m.startsWith('VM template not used, cold boot: the template was made for another configuration')), msgs.join('\n'));
    assert.ok(!msgs.includes('VM restored from the template'));
  });

  it("boots cold when the clone's agent stays silent (its guest paused after the restore), and leaves no clone behind", async () => {
    const logs: { msg: string; err?: { code?: string } }[] = [];
    const log = createLogger({ level: 'info', stream: { write: (l: string) => logs.push(JSON.parse(l) as { msg: string }) } });
    const validated = await loadValidatedConfig({ text: configText(), log });
    const silenced: { pid: number }[] = [];
    // The restore succeeds and QEMU runs; the guest is frozen, so the agent channel never answers.
    validated.hooks.vmStarted.tapPromise('test:silent-clone', async (ctx, vm) => {
      if (ctx.template?.role !== 'clone') return;
      await (vm as QemuVm).qmp?.execute('stop');
      silenced.push({ pid: vm.pid as number });
    });
    const t0 = performance.now();
    const sandbox = await Sandbox.create(validated, { sandboxId: 'silent-clone', runRoot: runRoot(), log });
    try {
      assert.equal(silenced.length, 1, 'the sandbox was first started as a clone');
      const fallback = logs.filter((l) => l.msg === "the clone's agent did not answer: cold boot");
      assert.equal(fallback.length, 1, logs.map((l) => l.msg).join('\n'));
      assert.equal(fallback[0]?.err?.code, 'KATA_ERR_AGENT_UNREACHABLE');
      assert.notEqual(sandbox.running.ctx.template?.role, 'clone');
      assert.ok(performance.now() - t0 >= 15_000, 'the clone had its 15 s to answer');
      const clone = silenced[0]!;
      assert.notEqual(sandbox.running.vm.pid, clone.pid);
      assert.deepEqual(processesMentioning(`${templateDir}/memory`).map((p) => p.pid), [], "the silent clone's QEMU is gone");
      // The cold-booted sandbox works: its agent answers.
      assert.match(await sandbox.guestMetrics(), /^kata_guest_/m);
    } finally {
      await sandbox.stop();
    }
    assert.deepEqual(await qemuLeftBehind(runRoot()), []);
  });

  it('boots cold when the device state cannot be restored, and leaves no clone behind', async () => {
    const state = path.join(templateDir, 'state');
    const saved = readFileSync(state);
    try {
      writeFileSync(state, Buffer.alloc(saved.length, 0x5a));
      const r = await runAsync(['--rootfs', rootfs(), '--', 'echo', 'cold']);
      assert.equal(r.status, 0, r.stderr);
      assert.equal(r.stdout, 'cold\n');
      assert.ok(messages(r.stderr).includes('restoring the VM from the template failed: cold boot'), r.stderr);
    } finally {
      writeFileSync(state, saved);
    }
    assert.deepEqual(await qemuLeftBehind(runRoot()), []);
  });

  it('boots cold when the template was saved under another accelerator (accelerator = "auto" resolved otherwise then), before starting a clone', async () => {
    const file = path.join(templateDir, 'qemu-accelerator');
    const saved = readFileSync(file, 'utf8');
    assert.equal(saved, 'tcg\n', 'this host has no KVM: the template was saved under TCG');
    try {
      writeFileSync(file, 'kvm\n');
      const r = await runAsync(['--rootfs', rootfs(), '--', 'echo', 'cold']);
      assert.equal(r.status, 0, r.stderr);
      assert.equal(r.stdout, 'cold\n');
      assert.ok(messages(r.stderr).includes('restoring the VM from the template failed: cold boot'), r.stderr);
      assert.match(r.stderr, /saved under QEMU's kvm, and this VM runs under tcg/);
    } finally {
      writeFileSync(file, saved);
    }
    assert.deepEqual(await qemuLeftBehind(runRoot()), []);
  });

  it("boots cold when the template's memory is corrupt (zeroed: the clone's guest dies as it resumes), and leaves no clone behind", async () => {
    const memory = path.join(templateDir, 'memory');
    const size = statSync(memory).size;
    truncateSync(memory, 0);
    truncateSync(memory, size);
    assert.equal(status().usable, true, 'the files still look like a usable template');
    const r = await runAsync(['--rootfs', rootfs(), '--', 'echo', 'cold']);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, 'cold\n');
    // The guest dies while `cont` is answered or just after: the restore fails, or the agent dial.
    const msgs = messages(r.stderr);
    const fallbacks = msgs.filter((m) => m === 'restoring the VM from the template failed: cold boot' || m === "the clone's agent did not answer: cold boot");
    assert.equal(fallbacks.length, 1, msgs.join('\n'));
    assert.deepEqual(await qemuLeftBehind(runRoot()), []);
  });

  it('factory status says the template is not usable, and why, when its memory file vanished', () => {
    const memory = path.join(templateDir, 'memory');
    rmSync(memory);
    const s = status();
    assert.equal(s.usable, false);
    assert.match(s.reason ?? '', /memory file .* is missing/);
  });

  it('factory destroy leaves no process, mount, file or directory; destroy again is a no-op', async () => {
    const r = cli(['factory', 'destroy']);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(existsSync(templateDir), false);
    assert.deepEqual(mountsUnder(templateDir), []);
    assert.deepEqual(await qemuLeftBehind(tmp.path), []);
    assert.equal(status().exists, false);
    const again = cli(['factory', 'destroy']);
    assert.equal(again.status, 0, again.stderr);
    assert.match(again.stdout, /no vm template/);
  });
});

describe('VM templates: clones through containerd-shim-kata-v2 under containerd @integration', function () {
  this.timeout(600_000);
  let tmp: TempDir;
  let ctrd: TestContainerd | undefined;
  let config: string;
  let templateDir: string;
  const RUNTIME = 'io.containerd.kata.v2';
  const cli = (args: string[]) => spawnSync(process.execPath, [BIN, '--config', config, ...args], { encoding: 'utf8', env: { ...process.env, KATA_TS_RUN_ROOT: path.join(tmp.path, 'run-init'), KATA_CONF_FILE: '' } });

  before(async function () {
    if (!qemuBinary() || process.getuid?.() !== 0) this.skip();
    const image = await ensureGuestImage();
    tmp = new TempDir('kata-tmpl-shim-');
    templateDir = path.join(tmp.path, 'template');
    // The shipped configuration (virtio-9p: containerd's overlayfs rootfs is a directory), templating on.
    config = shimConfig(tmp, image);
    writeFileSync(config, `${readFileSync(config, 'utf8')}\n[factory]\nenable_template = true\ntemplate_path = "${templateDir}"\n`);
    const init = cli(['factory', 'init']);
    assert.equal(init.status, 0, init.stderr);
    ctrd = await startContainerd(this, { pathPrefix: [shimBinDir(tmp)], env: { KATA_CONF_FILE: config, KATA_TS_RUN_ROOT: path.join(tmp.path, 'run'), KATA_TS_SBS_ROOT: path.join(tmp.path, 'sbs') } });
  });
  after(async () => {
    if (ctrd) assert.deepEqual(await ctrd.stop(), NO_LEFTOVERS);
    if (tmp) {
      cli(['factory', 'destroy']);
      assert.deepEqual(await qemuLeftBehind(tmp.path), []);
      assert.deepEqual(mountsUnder(tmp.path), []);
      tmp.cleanup();
    }
  });

  it('ctr run starts the pod as a clone of the template (its QEMU maps the template memory privately) and runs the container on its directory rootfs', async () => {
    const c = ctrd as TestContainerd;
    const id = 'cloned';
    const r = await c.ctr(['run', '-d', '--runtime', RUNTIME, BUSYBOX_IMAGE, id, 'sh', '-c', 'echo hello > /hello; sleep 1000'], { timeoutMs: 120_000 });
    assert.equal(r.code, 0, `${r.stderr}\n${c.logTail(40)}`);
    try {
      const qemus = processesMentioning(`${templateDir}/memory`);
      assert.equal(qemus.length, 1, 'one QEMU runs on the template memory');
      const argv = qemus[0]?.argv ?? [];
      assert.ok(argv.includes(`memory-backend-file,id=guest-ram,size=512M,mem-path=${templateDir}/memory,share=off`), argv.join(' '));
      assert.deepEqual(argv.slice(argv.indexOf('-incoming'), argv.indexOf('-incoming') + 2), ['-incoming', 'defer']);
      // The shipped configuration has reclaim_guest_freed_memory on: its balloon would punch holes in the template's file.
      assert.deepEqual(argv.filter((a) => a.startsWith('virtio-balloon-pci')), []);
      const exec = await c.ctr(['task', 'exec', '--exec-id', 'e1', id, 'cat', '/hello'], { timeoutMs: 60_000 });
      assert.equal(exec.code, 0, exec.stderr);
      assert.equal(exec.stdout, 'hello\n');
    } finally {
      await c.ctr(['task', 'kill', '-s', 'SIGKILL', id]);
      const deadline = Date.now() + 60_000;
      while (/RUNNING/.test((await c.ctr(['task', 'ls'])).stdout) && Date.now() < deadline) await new Promise((res) => setTimeout(res, 200));
      await c.ctr(['task', 'rm', id]);
      await c.ctr(['container', 'rm', id]);
    }
  });
});
